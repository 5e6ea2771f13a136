"""setup.py's CUDA toolkit resolution: CUDA_HOME/CUDA_PATH when valid, else the nvcc on PATH followed through
symbolic links and `exec .../nvcc` wrapper scripts, else the default; and CUDA_HOME set before torch's extension
builder reads it. Fake toolkits in tmp folders; no CUDA, no compiler, no torch needed."""
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
resolve = SETUP["resolve_cuda_home"]


def make_toolkit(parent: Path, name: str = "cuda-13.0") -> Path:
    home = parent / name
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime_api.h").write_text("/* a fake toolkit */\n")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: a fake'\n")
    nvcc.chmod(0o755)
    return home


def make_wrapper(folder: Path, line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "nvcc"
    wrapper.write_text(f"#!/bin/sh\n{line}\n")
    wrapper.chmod(0o755)
    return wrapper


def env(path_dirs, **extra):
    return {"PATH": os.pathsep.join(str(p) for p in path_dirs), **extra}


def test_a_wrapper_script_on_path_leads_to_the_toolkit_it_execs(tmp_path):
    home = make_toolkit(tmp_path / "opt")
    # The layout that made torch guess /usr/local: PREFIX/bin/nvcc is a wrapper and PREFIX has no CUDA headers.
    make_wrapper(tmp_path / "usr" / "bin", f'exec {home}/bin/nvcc "$@"')
    found, why = resolve(env([tmp_path / "usr" / "bin"]), default=str(tmp_path / "none"))
    assert found == str(home)
    assert f"{tmp_path}/usr/bin/nvcc -> {home}/bin/nvcc" in why


@pytest.mark.parametrize("line", ['exec "{nvcc}" "$@"', "exec '{nvcc}' \"$@\"", 'exec -a nvcc {nvcc} "$@"',
                                  'set -e\n  exec {nvcc} "$@"'])
def test_wrapper_forms(tmp_path, line):
    home = make_toolkit(tmp_path)
    make_wrapper(tmp_path / "bin", line.format(nvcc=home / "bin" / "nvcc"))
    assert resolve(env([tmp_path / "bin"]), default=str(tmp_path / "none"))[0] == str(home)


def test_a_wrapper_of_a_wrapper_and_a_symlinked_toolkit(tmp_path):
    home = make_toolkit(tmp_path, "cuda-13.0")
    (tmp_path / "cuda").symlink_to(home)
    inner = make_wrapper(tmp_path / "inner", f'exec {tmp_path}/cuda/bin/nvcc "$@"')
    make_wrapper(tmp_path / "outer", f'exec {inner} "$@"')
    found, _ = resolve(env([tmp_path / "outer"]), default=str(tmp_path / "none"))
    assert found == str(home)


def test_a_symlink_on_path(tmp_path):
    home = make_toolkit(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    assert resolve(env([tmp_path / "bin"]), default=str(tmp_path / "none"))[0] == str(home)


def test_cuda_home_from_the_environment_wins_when_it_holds_the_headers(tmp_path):
    on_path = make_toolkit(tmp_path, "on-path")
    chosen = make_toolkit(tmp_path, "chosen")
    found, why = resolve(env([on_path / "bin"], CUDA_HOME=str(chosen)), default=str(tmp_path / "none"))
    assert (found, why) == (str(chosen), f"CUDA_HOME={chosen} from the environment")
    found, why = resolve(env([on_path / "bin"], CUDA_PATH=str(chosen)), default=str(tmp_path / "none"))
    assert (found, why) == (str(chosen), f"CUDA_PATH={chosen} from the environment")


def test_a_cuda_home_without_headers_is_passed_over_and_said_so(tmp_path):
    home = make_toolkit(tmp_path)
    (tmp_path / "empty").mkdir()
    found, why = resolve(env([home / "bin"], CUDA_HOME=str(tmp_path / "empty")), default=str(tmp_path / "none"))
    assert found == str(home)
    assert f"CUDA_HOME={tmp_path / 'empty'} has no include/cuda_runtime_api.h" in why


def test_no_nvcc_falls_back_to_the_default_then_to_none(tmp_path):
    default = make_toolkit(tmp_path, "default")
    (tmp_path / "empty").mkdir()
    assert resolve(env([tmp_path / "empty"]), default=str(default)) == (
        str(default), f"no nvcc on PATH; {default}, the default location")
    found, why = resolve(env([tmp_path / "empty"]), default=str(tmp_path / "none"))
    assert found is None and why.startswith("no CUDA toolkit: no nvcc on PATH")


def test_a_wrapper_it_cannot_follow_is_not_guessed_from(tmp_path):
    make_toolkit(tmp_path)
    make_wrapper(tmp_path / "usr" / "bin", 'exec "$CUDA_ROOT/bin/nvcc" "$@"')
    found, why = resolve(env([tmp_path / "usr" / "bin"]), default=str(tmp_path / "none"))
    assert found is None
    assert "is in no folder with include/cuda_runtime_api.h" in why


FAKE_TORCH = {
    "torch/__init__.py": "from torch import cuda, version  # noqa: F401\n",
    "torch/version.py": "cuda = '13.0'\n",
    "torch/cuda.py": "def _is_compiled():\n    return True\n",
    "torch/utils/__init__.py": "",
    # Like torch's: CUDA_HOME is read once, when the module is imported.
    "torch/utils/cpp_extension.py": textwrap.dedent("""\
        import os
        CUDA_HOME = os.environ.get("CUDA_HOME")
        class _Extension:
            def __init__(self, name, sources, **kwargs):
                self.name, self.sources = name, sources
        class CppExtension(_Extension):
            kind = "cpp"
        class CUDAExtension(_Extension):
            kind = "cuda"
        class BuildExtension:
            @classmethod
            def with_options(cls, **kwargs):
                return cls
        """),
}

PROBE = textwrap.dedent("""\
    import json, runpy
    extensions, _ = runpy.run_path("setup.py", run_name="probe")["_extensions"]()
    from torch.utils import cpp_extension
    print(json.dumps({"kind": extensions[0].kind, "cuda_home": cpp_extension.CUDA_HOME}))
    """)


def test_setup_sets_cuda_home_before_the_extension_builder_reads_it(tmp_path):
    """With a CUDA torch (a stand-in here) and only a wrapper nvcc on PATH, the build is the CUDA one and torch's
    extension builder sees the toolkit behind the wrapper."""
    for rel, text in FAKE_TORCH.items():
        (tmp_path / "fake" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fake" / rel).write_text(text)
    home = make_toolkit(tmp_path)
    make_wrapper(tmp_path / "usr" / "bin", f'exec {home}/bin/nvcc "$@"')
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH") and
               not k.startswith("DPO_KERNELS_")}
    environ["PATH"] = f"{tmp_path}/usr/bin{os.pathsep}{environ.get('PATH', '')}"
    environ["PYTHONPATH"] = str(tmp_path / "fake")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"kind": "cuda", "cuda_home": str(home)}
    assert f"setup.py: CUDA_HOME={home}: {home}, the toolkit of the nvcc on PATH" in proc.stderr


def test_importing_setup_py_builds_nothing():
    """gpu_check.sh loads setup.py for resolve_cuda_home; only running it as __main__ (setuptools, pip and
    `python setup.py` do) calls setup()."""
    proc = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path('setup.py', run_name='probe')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "running" not in proc.stderr
