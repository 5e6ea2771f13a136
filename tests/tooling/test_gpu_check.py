"""benchmarks/gpu_check.sh on the CPU: its stage caps against its budget, its toolkit resolution, its install stage
(build first, then the wheels; a wheel that fails costs only its rows; PEP 668) with a stand-in interpreter, and a
short --cpu-smoke run. Makefile's gpu-wheels list and the script's map of who needs which wheel against the peers
table (dpo_kernels/bench/peers.py)."""
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


def declared_stages():
    block = re.search(r"^STAGES=\(\n(.*?)^\)", TEXT, re.MULTILINE | re.DOTALL).group(1)
    rows = [line.strip().strip('"').split() for line in block.splitlines() if line.strip()]
    return [(name, int(cap)) for name, cap in rows]


def declared_budget():
    return int(re.search(r"^BUDGET_S=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", TEXT, re.MULTILINE).group(1))


def clean_env(**extra):
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("GPU_CHECK_", "CUDA_", "DPO_KERNELS_")) and k not in ("OUT", "PYTHON")}
    environ.update(extra)
    return environ


def test_the_caps_add_up_to_the_budget():
    stages = declared_stages()
    assert sum(cap for _, cap in stages) == declared_budget()


def test_headline_rows_come_first_and_every_stage_has_a_function():
    names = [name for name, _ in declared_stages()]
    assert names[:8] == ["install", "environment", "bench-linear", "memory", "bench-logits", "loss-overhead",
                         "cuda-tests", "trl-step"]
    for name in names:
        assert re.search(rf"^stage_{name.replace('-', '_')}\(\) \{{", TEXT, re.MULTILINE), name


def test_list_prints_the_declared_table():
    out = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, timeout=30, check=True)
    lines = out.stdout.split("\n")
    assert lines[0] == f"budget {declared_budget()}"
    assert [tuple(line.split()) for line in lines[1:] if line] == [(n, str(c)) for n, c in declared_stages()]


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
                        GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_STAGES="install", GPU_CHECK_KEEP_DIRS="1",
                        PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], env=environ, capture_output=True, text=True,
                          timeout=180)
    return proc, log.read_text().splitlines()


def test_install_builds_first_and_a_bad_wheel_costs_only_its_rows(tmp_path):
    proc, calls = run_install(tmp_path, pep668=0)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the install stage failed: exit 3
    assert (out / "stages.tsv").read_text().splitlines()[1].split("\t")[:2] == ["install", "3"]
    assert calls[0] == "-m pip install --no-build-isolation --no-deps -e ."
    assert all("-e" not in c.split() for c in calls[1:])
    wheels = (out / "install" / "wheels.tsv").read_text()
    assert "gpucheckprobe-1.0-py3-none-any.whl\tinstalled" in wheels
    assert "liger_kernel-0.8.5-py3-none-any.whl\tfailed\tLiger: the liger rows" in wheels
    assert "FAILED liger_kernel-0.8.5-py3-none-any.whl; lost: Liger" in proc.stdout
    assert (tmp_path / "work" / "pythonpath").read_text() == ""
    assert not any("--target" in c for c in calls)


def test_install_under_pep_668_builds_in_place_and_installs_the_wheels_into_a_folder(tmp_path):
    proc, calls = run_install(tmp_path, pep668=1)
    work = tmp_path / "work"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert calls[:2] == ["-m pip install --no-build-isolation --no-deps -e .", "setup.py build_ext --inplace"]
    assert (work / "site" / "gpucheckprobe" / "__init__.py").exists()
    assert not (work / "site" / "liger_kernel").exists()
    assert (work / "pythonpath").read_text().split() == [str(ROOT), str(work / "site")]
    assert "PYTHONPATH=" + str(ROOT) + ":" + str(work / "site") in proc.stdout
    wheels = (tmp_path / "out" / "install" / "wheels.tsv").read_text()
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


def smoke(tmp_path, stages=None, timeout=600):
    environ = clean_env(PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"))
    if stages:
        environ["GPU_CHECK_STAGES"] = stages
    return subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], cwd=tmp_path, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def test_a_short_smoke_run_leaves_one_tarball_with_every_stage(tmp_path):
    proc = smoke(tmp_path, "environment,bench-loss")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # OUT came from the environment: what comes back is these three files, the stage folders are in the tarball.
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "gpu_check.tar.gz", "stages.tsv"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        members = set(tar.getnames())
    assert {"SUMMARY.md", "stages.tsv", "environment/log.txt", "environment/environment.txt", "bench-loss/loss.md",
            "bench-loss/loss.json"} <= members
    stages = [line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert stages == [["environment", "0"], ["bench-loss", "0"]]
    summary = (out / "SUMMARY.md").read_text()
    assert "| environment | 0 |" in summary and "dpo_kernels imported from" in summary


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
    out = subprocess.run(["bash", script, "--cpu-smoke"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "python python3," in out.stdout, out.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DPO_KERNELS_FULL_SMOKE") != "1",
                    reason="every stage at tiny sizes takes 1.5-3 minutes on 2 cores; the short smoke run above "
                           "covers the script's machinery in CI. Set DPO_KERNELS_FULL_SMOKE=1 to run it")
def test_the_whole_smoke_run_passes(tmp_path):
    proc = smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    names = [line.split("\t")[0] for line in (tmp_path / "out" / "stages.tsv").read_text().splitlines()[1:]]
    assert names == [name for name, _ in declared_stages() if name != "install"]
