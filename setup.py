"""Builds dpo_kernels._C from csrc/.

CUDA is built when torch was built with CUDA and a CUDA toolkit is found (or DPO_KERNELS_FORCE_CUDA=1); otherwise a
CPU-only extension. Switches (environment variables):
  DPO_KERNELS_CPU_ONLY=1    build the CPU extension even where CUDA is available
  DPO_KERNELS_FORCE_CUDA=1  build the CUDA extension even without a visible GPU (e.g. in a build container)
  DPO_KERNELS_DEBUG=1       -O0 -g, device code with -G
  DPO_KERNELS_CUDA_ARCH     passed to TORCH_CUDA_ARCH_LIST when it is unset (default "9.0")
  CUDA_HOME, CUDA_PATH      the CUDA toolkit, used when it holds include/cuda_runtime_api.h (see resolve_cuda_home)

Importing this file defines `resolve_cuda_home` and builds nothing: setuptools, pip and `python setup.py ...` run it
as __main__, and benchmarks/gpu_check.sh loads it with runpy to resolve the toolkit the same way.
"""
import glob
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
_HEADER = os.path.join("include", "cuda_runtime_api.h")
# `exec /path/to/bin/nvcc "$@"`, the path bare or quoted, with words before it allowed (exec's -a NAME, a launcher).
_EXEC_NVCC = re.compile(r"""^\s*exec\s+(?:\S+\s+)*?(["']?)([^\s"'$`]*/nvcc)\1(?:\s|$)""", re.MULTILINE)


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, _HEADER))


def _wrapped_nvcc(path):
    """The nvcc that a wrapper script at `path` execs, or None when `path` is no such script."""
    try:
        if os.path.getsize(path) > 65536:
            return None
        with open(path, "rb") as f:
            head = f.read()
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = _EXEC_NVCC.search(head.decode("utf-8", "replace"))
    if match is None:
        return None
    return os.path.join(os.path.dirname(path), match.group(2))


def _nvcc_chain(nvcc):
    """Every path the nvcc on PATH leads to, through symbolic links and `exec .../nvcc` wrappers, first to last."""
    chain, seen = [], set()
    path = nvcc
    while path and path not in seen and len(chain) < 16:
        seen.add(path)
        chain.append(path)
        real = os.path.realpath(path)
        if real != path and real not in seen:
            seen.add(real)
            chain.append(real)
        path = _wrapped_nvcc(real)
    return chain


def resolve_cuda_home(environ=None, which=shutil.which, default="/usr/local/cuda"):
    """Returns (toolkit directory or None, why) for the CUDA toolkit to build against.

    torch.utils.cpp_extension takes CUDA_HOME, else CUDA_PATH, else the folder above the bin/ of the `nvcc` on PATH;
    where that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc running `exec /usr/local/cuda-13.0/bin/nvcc "$@"`)
    its guess is /usr/local, which has no CUDA headers, and the build fails at cuda_runtime_api.h. A toolkit here is
    a folder holding include/cuda_runtime_api.h, looked for in this order: CUDA_HOME, CUDA_PATH; the folder above
    bin/ of the nvcc on PATH, followed through symbolic links and `exec .../nvcc` wrappers, the innermost one that is
    a toolkit; `default`.
    """
    environ = os.environ if environ is None else environ
    rejected = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = environ.get(var)
        if not value:
            continue
        if _is_toolkit(value):
            return value, f"{var}={value} from the environment"
        rejected.append(f"{var}={value} has no {_HEADER}")
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        chain = _nvcc_chain(nvcc)
        homes = [os.path.dirname(os.path.dirname(p)) for p in chain]
        found = [h for h in homes if _is_toolkit(h)]
        if found:
            home = found[-1]
            route = " -> ".join(chain)
            return home, "; ".join(rejected + [f"{home}, the toolkit of the nvcc on PATH ({route})"])
        rejected.append(f"the nvcc on PATH ({' -> '.join(chain)}) is in no folder with {_HEADER}")
    else:
        rejected.append("no nvcc on PATH")
    if _is_toolkit(default):
        return default, "; ".join(rejected + [f"{default}, the default location"])
    rejected.append(f"{default} has no {_HEADER}")
    return None, "no CUDA toolkit: " + "; ".join(rejected)


def _extensions():
    # CUDA_HOME goes into the environment before torch.utils.cpp_extension is imported: it reads it once, at import.
    cuda_home, why = resolve_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        return [], {}
    cuda_asked = not _flag("DPO_KERNELS_CPU_ONLY") and (_flag("DPO_KERNELS_FORCE_CUDA") or torch.version.cuda)
    if cuda_asked:
        print(f"setup.py: CUDA_HOME={cuda_home or '(none)'}: {why}", file=sys.stderr)
        if cuda_home is None and _flag("DPO_KERNELS_FORCE_CUDA"):
            sys.exit(f"setup.py: DPO_KERNELS_FORCE_CUDA=1 but {why}; set CUDA_HOME to the toolkit's folder")
    want_cuda = bool(cuda_asked) and cuda_home is not None
    if cuda_asked and not want_cuda:
        print("setup.py: building the CPU-only extension", file=sys.stderr)
    debug = _flag("DPO_KERNELS_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # OpenMP in both builds: the CPU kernel's at::parallel_for is inlined from ATen's headers and runs serially
    # unless this extension itself is compiled with -fopenmp (the CUDA build's CPU kernel included).
    cxx += ["-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("DPO_KERNELS_CUDA_ARCH", "9.0"))
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        # No --use_fast_math: the DPO loss's log-sigmoid of saturated margins needs the accurate expf/log1pf.
        nvcc = ["-O0", "-G", "-g"] if debug else ["-O3"]
        nvcc += ["-std=c++17"]
        ext = CUDAExtension(
            "dpo_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("DPO_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "dpo_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    from torch.utils.cpp_extension import BuildExtension

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    from setuptools import setup

    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
