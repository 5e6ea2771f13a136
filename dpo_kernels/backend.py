"""Which implementation runs an op: the Triton kernels or the PyTorch fallback.

`DPO_KERNELS_BACKEND=triton|torch|auto` (default auto: Triton for CUDA tensors, PyTorch for CPU tensors). Forcing
`triton` on CPU tensors needs `TRITON_INTERPRET=1`, set before Triton is imported; the tests do this. PyTorch chosen
by auto is a fallback (`torch_fallback_reason`), which `dpo_kernels.paths` records and strict mode refuses; PyTorch
chosen by `torch` is not.
"""
import contextlib
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def backend_choice() -> str:
    choice = os.environ.get("DPO_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"DPO_KERNELS_BACKEND must be one of {_CHOICES}, got {choice!r}")
    return choice


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when `tensor`'s op should run the Triton kernels."""
    choice = backend_choice()
    if choice == "torch":
        return False
    if choice == "auto":
        return tensor.is_cuda
    if not tensor.is_cuda and not triton_interpreted():
        raise ValueError(
            "DPO_KERNELS_BACKEND=triton was asked for CPU tensors; set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels in the interpreter, or use DPO_KERNELS_BACKEND=torch"
        )
    return True


def launch_device(tensor: torch.Tensor):
    """The context a Triton launch on `tensor` runs in: its CUDA device made current (Triton launches on the current
    device, and the tensor may live on another one, e.g. an lm_head placed on a second GPU by device_map); a no-op
    for CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def torch_fallback_reason(tensor: torch.Tensor) -> str | None:
    """Why an op on `tensor` runs the PyTorch twin without being asked to (auto, and a tensor Triton does not run),
    or None: Triton runs it, or `DPO_KERNELS_BACKEND=torch` chose PyTorch."""
    if backend_choice() != "auto" or use_triton(tensor):
        return None
    return (f"{tensor.device.type} tensors run the PyTorch twin of the Triton kernels under DPO_KERNELS_BACKEND=auto "
            "(Triton runs CUDA tensors); DPO_KERNELS_BACKEND=torch asks for it")
