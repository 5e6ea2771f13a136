"""Builds dpo_kernels._C from csrc/.

CUDA is built when torch was built with CUDA and nvcc is found (or DPO_KERNELS_FORCE_CUDA=1); otherwise a CPU-only
extension. Switches (environment variables):
  DPO_KERNELS_CPU_ONLY=1    build the CPU extension even where CUDA is available
  DPO_KERNELS_FORCE_CUDA=1  build the CUDA extension even without a visible GPU (e.g. in a build container)
  DPO_KERNELS_DEBUG=1       -O0 -g, device code with -G
  DPO_KERNELS_CUDA_ARCH     passed to TORCH_CUDA_ARCH_LIST when it is unset (default "9.0")
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        return [], {}
    want_cuda = not _flag("DPO_KERNELS_CPU_ONLY") and (
        _flag("DPO_KERNELS_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
