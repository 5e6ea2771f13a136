"""Installed like a library: `make wheel` builds a wheel that holds the extension, and the wheel, installed into a
fresh virtual environment that sees the system's torch, imports outside the source tree and runs the loss op and one
fused step against the float64 references. `make sdist` brings every source the build needs.

The wheel is built in the checkout, so its build reuses the objects that `make install` (or an earlier wheel) left in
build/; only a fresh checkout compiles the extension here.
"""
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# Run in the fresh environment, from a folder outside the checkout: the package must come from the wheel.
RUN_INSTALLED = textwrap.dedent("""
    import importlib
    import sys
    from pathlib import Path

    import torch

    import dpo_kernels
    from dpo_kernels import reference

    where = Path(dpo_kernels.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, (where, sys.prefix)

    torch.manual_seed(0)
    chosen, rejected = torch.randn(7, requires_grad=True), torch.randn(7, requires_grad=True)
    out = dpo_kernels.dpo_loss(chosen, rejected, beta=0.1)
    out.loss.backward()
    truth = reference.dpo_loss(chosen.detach().double(), rejected.detach().double(), beta=0.1)
    assert abs(out.loss.item() - truth.loss.item()) < 1e-6, (out.loss, truth.loss)
    extension = Path(importlib.import_module("dpo_kernels._C").__file__).resolve()
    assert extension.parent == where.parent, extension

    hidden = torch.randn(4, 13, 16, requires_grad=True)
    weight = (0.3 * torch.randn(37, 16)).requires_grad_()
    labels = torch.randint(0, 37, (4, 13))
    labels[:, :4] = -100
    fused = dpo_kernels.FusedLinearDPOLoss(beta=0.1)(hidden, weight, labels)
    fused.loss.backward()
    hidden64, weight64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    truth = reference.fused_linear_dpo(hidden64, weight64, labels, beta=0.1)
    truth.loss.backward()
    assert torch.allclose(fused.loss.double(), truth.loss, rtol=1e-5), (fused.loss, truth.loss)
    assert torch.allclose(hidden.grad.double(), hidden64.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(weight.grad.double(), weight64.grad, rtol=1e-4, atol=1e-7)
    print("installed", where.parent, "loss", out.loss.item(), "fused", fused.loss.item())
""")


def _make(target, dist, timeout):
    # Under `make test` the parent make's flags would make this one print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", target, f"PYTHON={sys.executable}", f"DIST={dist}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    _make("wheel", dist, timeout=900)
    wheels = list(dist.glob("dpo_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_holds_the_package_and_its_extension(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if re.fullmatch(r"dpo_kernels/_C\.[\w.-]+\.so", n)], names
    assert "dpo_kernels/fused_linear/engine.py" in names and "dpo_kernels/bench/providers/linear.py" in names
    assert not [n for n in names if n.startswith(("tests/", "csrc/", "benchmarks/"))]


def test_the_wheel_installs_into_a_fresh_environment_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The system's site-packages hold torch (and pip, which installs into the environment it runs in).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    environ.update(TRITON_INTERPRET="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # --force-reinstall: the editable install of the same version in the system's site-packages would satisfy pip.
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                              "--force-reinstall", str(wheel)], env=environ, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run([str(python), "-c", RUN_INSTALLED], cwd=outside, env=environ, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"installed {venv.resolve()}" in run.stdout, run.stdout


def test_the_sdist_brings_every_source_the_build_needs(tmp_path):
    proc = _make("sdist", tmp_path, timeout=300)
    sdist = Path(proc.stdout.strip().splitlines()[-1])
    assert sdist.name.startswith("dpo_kernels-") and sdist.name.endswith(".tar.gz"), proc.stdout
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    needed = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "dpo_kernels/__init__.py", *sources}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", ".o"))], names
