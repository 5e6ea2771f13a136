"""benchmarks/gpu_check.sh on the CPU: its two calls (caps against budgets, the order, the device timeouts the header
and the README give), --rerun, the CUDA test sample, its toolkit resolution, its build and wheels stages (build
first; a wheel that fails costs only its rows; PEP 668) with a stand-in interpreter, and a short --cpu-smoke run.
Makefile's gpu-wheels list and the script's map of who needs which wheel against the peers table
(dpo_kernels/bench/peers.py)."""
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from dpo_kernels.bench import peers

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()
README = (ROOT / "README.md").read_text()
# A GPU session's device time, machine starts included (the device tool's limit), and what one start costs at most.
SESSION_S, START_S = 900, 90


def declared_stages():
    """`[(name, cap in call 1 or None, cap in call 2 or None)]` in the script's order."""
    block = re.search(r"^STAGES=\(\n(.*?)^\)", TEXT, re.MULTILINE | re.DOTALL).group(1)
    rows = [line.strip().strip('"').split() for line in block.splitlines() if line.strip()]
    return [(name, None if c1 == "-" else int(c1), None if c2 == "-" else int(c2)) for name, c1, c2 in rows]


def declared_array(name):
    return [int(v) for v in re.search(rf"^{name}=\(([\d ]+)\)", TEXT, re.MULTILINE).group(1).split()]


def call_plan(call):
    return [(name, caps[call - 1]) for name, *caps in declared_stages() if caps[call - 1] is not None]


def listed(*args):
    out = subprocess.run(["bash", str(SCRIPT), *args, "--list"], capture_output=True, text=True, timeout=30,
                         check=True, env=clean_env())
    lines = [line for line in out.stdout.split("\n") if line]
    return int(lines[0].removeprefix("budget ")), [(n, int(c)) for n, c in (line.split() for line in lines[1:])]


def clean_env(**extra):
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("GPU_CHECK_", "CUDA_", "DPO_KERNELS_")) and k not in ("OUT", "PYTHON")}
    environ.update(extra)
    return environ


def test_each_calls_caps_add_up_to_its_budget_and_fit_the_session():
    budgets, timeouts = declared_array("CALL_BUDGETS"), declared_array("CALL_TIMEOUTS")
    for call in (1, 2):
        assert sum(cap for _, cap in call_plan(call)) == budgets[call - 1]
        assert timeouts[call - 1] == budgets[call - 1] + 60 <= 600  # one command's limit
    # Both calls, each on a fresh machine at worst, leave the session time to spare.
    assert sum(timeouts) + 2 * START_S < SESSION_S


def test_call_1_gives_the_most_information_first_and_call_2_ends_with_the_peers():
    assert [name for name, _ in call_plan(1)] == ["build", "environment", "profile", "bench-linear", "loss-op",
                                                  "cuda-tests-sample"]
    second = [name for name, _ in call_plan(2)]
    assert second[:2] == ["build", "cuda-tests-rest"]
    assert {"memory", "bench-logits", "bench-loss", "shared-prompt"} < set(second[:second.index("wheels")])
    peer_stages = second[second.index("wheels") + 1:]
    assert peer_stages == ["bench-linear-peers", "memory-peers", "bench-logits-peers", "trl-step"]
    for name in set(call_plan(1)) & set(call_plan(2)):
        assert name == "build"
    for name, *_ in declared_stages():
        assert re.search(rf"^stage_{name.replace('-', '_')}\(\) \{{", TEXT, re.MULTILINE), name


def test_the_header_and_the_readme_say_which_timeout_each_call_gets():
    for call, timeout in zip((1, 2), declared_array("CALL_TIMEOUTS"), strict=True):
        assert re.search(rf"--call {call} .*?timeout_s: {timeout}\.", TEXT, re.DOTALL), call
        assert re.search(rf"--call {call}`[^\n]*\n?[^\n]*`timeout_s: {timeout}`", README), call


@pytest.mark.parametrize("call", [1, 2])
def test_list_prints_each_calls_plan(call):
    assert listed("--call", str(call)) == (declared_array("CALL_BUDGETS")[call - 1], call_plan(call))


def test_a_rerun_builds_first_and_installs_the_wheels_before_a_peer_stage():
    budget, plan = listed("--rerun", "memory-peers,bench-linear")
    assert [name for name, _ in plan] == ["build", "bench-linear", "wheels", "memory-peers"]
    assert budget == sum(cap for _, cap in plan)
    assert [name for name, _ in listed("--rerun", "bench-loss")[1]] == ["build", "bench-loss"]
    # A smoke run builds nothing unasked, and has room for a slow CPU.
    budget, plan = listed("--cpu-smoke", "--rerun", "memory-peers")
    assert plan == [("memory-peers", 10)] and budget == 30


@pytest.mark.parametrize("args", [["--call", "3"], ["--rerun", "no-such-stage"], ["--rerun"], ["--frobnicate"]])
def test_bad_arguments_are_refused(args):
    proc = subprocess.run(["bash", str(SCRIPT), *args, "--list"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def pick(ids, limit):
    return subprocess.run(["bash", str(SCRIPT), "--pick-sample", str(limit)], input="\n".join(ids) + "\n",
                          env=clean_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=30,
                          check=True).stdout.split()


IDS = [f"tests/a.py::test_values[{backend}-{dtype}-{size}]"
       for backend in ("triton", "cuda") for dtype in ("dtype0", "dtype1", "dtype2") for size in (1, 513, 4097)]
IDS += ["tests/a.py::test_plain", "tests/b.py::test_flags[True]", "tests/b.py::test_flags[False]"]


def test_the_sample_takes_every_function_first_then_every_parameter_value():
    everything = pick(IDS, 1000)
    assert everything[:3] == ["tests/a.py::test_values[triton-dtype0-1]", "tests/a.py::test_plain",
                              "tests/b.py::test_flags[True]"]
    assert pick(IDS, 3) == everything[:3]
    values = lambda ids: {(k, v) for i in ids if "[" in i for k, v in enumerate(i[:-1].split("[")[1].split("-"))}
    assert values(everything) == values(IDS)
    assert len(everything) < len(IDS)
    assert set(everything) <= set(IDS) and len(set(everything)) == len(everything)


def test_the_script_finds_the_toolkit_behind_a_wrapper_nvcc(tmp_path):
    home = tmp_path / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime_api.h").write_text("")
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    for f in (home / "bin" / "nvcc", tmp_path / "bin" / "nvcc"):
        f.chmod(0o755)
    environ = clean_env(PYTHON=sys.executable, PATH=f"{tmp_path}/bin{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", str(SCRIPT), "--cuda-home"], env=environ, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f"CUDA_HOME={home}\n" in out
    assert f"{tmp_path}/bin/nvcc -> {home}/bin/nvcc" in out


def make_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel that pip installs."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 1\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


# Stands in for the GPU machine's interpreter: logs each call but the -c ones, builds nothing, and with FAKE_PEP668=1
# refuses pip installs into its environment the way an externally managed Python does; installs with --target and
# everything else go to the real interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
[[ $1 == -c ]] || echo "$*" >> "$FAKE_LOG"
if [[ "$1 $2 $3" == "-m pip install" && " $* " != *" --target "* ]]; then
  if [[ $FAKE_PEP668 == 1 ]]; then
    echo "error: externally-managed-environment" >&2
    exit 1
  fi
  [[ " $* " == *" -e "* ]] && { echo "editable build (fake)"; exit 0; }
  for a in "$@"; do [[ $a == *liger_kernel* ]] && { echo "ERROR: $a is not a valid wheel (fake)" >&2; exit 1; }; done
  exit 0
fi
[[ "$1 $2 $3" == "setup.py build_ext --inplace" ]] && { echo "in-place build (fake)"; exit 0; }
exec "$REAL_PYTHON" "$@"
"""


def run_install(tmp_path, pep668):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "gpucheckprobe")
    (wheels / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"not a zip")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    environ = clean_env(PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_LOG=str(log), FAKE_PEP668=str(pep668),
                        OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"),
                        GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_KEEP_DIRS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--rerun", "build,wheels"], env=environ,
                          capture_output=True, text=True, timeout=180)
    return proc, log.read_text().splitlines()


def test_build_comes_first_and_a_bad_wheel_costs_only_its_rows(tmp_path):
    proc, calls = run_install(tmp_path, pep668=0)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the wheels stage failed: exit 3
    stages = [line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert stages == [["build", "0"], ["wheels", "3"]]
    assert calls[0] == "-m pip install --no-build-isolation --no-deps -e ."
    assert all("-e" not in c.split() for c in calls[1:])
    wheels = (out / "wheels" / "wheels.tsv").read_text()
    assert "gpucheckprobe-1.0-py3-none-any.whl\tinstalled" in wheels
    assert "liger_kernel-0.8.5-py3-none-any.whl\tfailed\tLiger: the liger rows" in wheels
    assert "FAILED liger_kernel-0.8.5-py3-none-any.whl; lost: Liger" in proc.stdout
    assert "--rerun wheels" in (out / "SUMMARY.md").read_text()
    assert (tmp_path / "work" / "pythonpath").read_text() == ""
    assert not any("--target" in c for c in calls)


def test_under_pep_668_build_is_in_place_and_the_wheels_go_into_a_folder(tmp_path):
    proc, calls = run_install(tmp_path, pep668=1)
    work = tmp_path / "work"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert calls[:2] == ["-m pip install --no-build-isolation --no-deps -e .", "setup.py build_ext --inplace"]
    assert (work / "site" / "gpucheckprobe" / "__init__.py").exists()
    assert not (work / "site" / "liger_kernel").exists()
    assert (work / "pythonpath").read_text().split() == [str(ROOT), str(work / "site")]
    assert "PYTHONPATH=" + str(ROOT) + ":" + str(work / "site") in proc.stdout
    wheels = (tmp_path / "out" / "wheels" / "wheels.tsv").read_text()
    assert "gpucheckprobe-1.0-py3-none-any.whl\tinstalled" in wheels
    assert "liger_kernel-0.8.5-py3-none-any.whl\tfailed" in wheels


def test_the_makefile_downloads_exactly_the_pinned_wheels():
    out = subprocess.run(["make", "-n", "gpu-wheels", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    download = re.search(r"-m pip download (.*?)(\n\S|$)", out.replace("\\\n", " "), re.DOTALL).group(1)
    assert download.split()[-len(peers.wheels()):] == peers.wheels()
    assert download.split()[-len(peers.wheels()) - 1] == ".whl"


def needed_by_in_script(wheel: str) -> str:
    """The script's own `needed_by`, run from the repository root as the stages run it."""
    function = re.search(r"^needed_by\(\) \{.*?^\}", TEXT, re.MULTILINE | re.DOTALL).group(0)
    return subprocess.run(["bash", "-c", f'{function}\nneeded_by "$1"', "bash", f"/wheels/{wheel}"], cwd=ROOT,
                          env=clean_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def test_the_script_names_the_rows_of_every_pinned_wheel_from_the_peers_table():
    for pin in peers.wheels():
        name, version = pin.split("==")
        wheel = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        assert needed_by_in_script(wheel) == peers.needed_by(wheel) != f"whatever imports {name}", wheel


def smoke(tmp_path, *args, timeout=600):
    environ = clean_env(PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"))
    return subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def test_a_short_smoke_run_leaves_one_tarball_with_every_stage(tmp_path):
    """The environment stage, and the profiler, which the tree may not hold yet: then the stage says so and counts
    as absent, not failed."""
    proc = smoke(tmp_path, "--rerun", "environment,profile")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # OUT came from the environment: what comes back is these three files, the stage folders are in the tarball.
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "gpu_check.tar.gz", "stages.tsv"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        members = set(tar.getnames())
    assert {"SUMMARY.md", "stages.tsv", "environment/log.txt", "environment/environment.txt",
            "profile/log.txt"} <= members
    stages = [line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert stages[0] == ["environment", "0"] and stages[1][0] == "profile" and stages[1][1] in ("0", "absent")
    assert ("profile/note.txt" in members) == (stages[1][1] == "absent")
    summary = (out / "SUMMARY.md").read_text()
    assert "| environment | 0 |" in summary and "dpo_kernels imported from" in summary
    assert "fp32 GEMM probe: not run (no CUDA device)" in summary and "Failed or not run" not in summary


def test_the_memory_stage_profiles_to_t_65536_at_the_reference_head():
    assert "--seq-lens 1024,2048,4096,8192,16384,32768,65536 --hidden 4096 --vocab 128256" in TEXT


def test_gpu_check_picks_the_python_that_has_torch(tmp_path):
    """The GPU image's torch lives in `python3`; a `python` without torch first on PATH must not be chosen. With a
    zero budget every stage is skipped, so the script only picks its interpreter and writes its summary."""
    script = str(SCRIPT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", OUT=str(tmp_path / "out"), GPU_CHECK_BUDGET_S="0")
    out = subprocess.run(["bash", script, "--cpu-smoke", "--call", "1"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "python python3," in out.stdout, out.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DPO_KERNELS_FULL_SMOKE") != "1",
                    reason="every stage at tiny sizes takes minutes on 2 cores; the short smoke run above covers the "
                           "script's machinery in CI. Set DPO_KERNELS_FULL_SMOKE=1 to run it")
@pytest.mark.parametrize("call", [1, 2])
def test_the_whole_smoke_run_of_each_call_passes(tmp_path, call):
    proc = smoke(tmp_path, "--call", str(call), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    names = [line.split("\t")[0] for line in (tmp_path / "out" / "stages.tsv").read_text().splitlines()[1:]]
    assert names == [name for name, _ in call_plan(call) if name != "build"]
