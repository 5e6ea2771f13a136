"""GEMMs whose results are kept in fp32 whatever the operands' dtype.

The engine accumulates the weight gradient over chunks and keeps the unscaled hidden-state gradient `U = D @ W`
in fp32: rounding each chunk's contribution to bf16 biases training. On CUDA, torch's `out_dtype` overloads
(`aten::mm.dtype`, `aten::addmm.dtype_out`) run a bf16/fp16 cuBLAS GEMM with an fp32 result and `C = C + A @ B`
in place. They exist only for CUDA, so a one-time probe checks them and, where they are missing or wrong,
the operands are upcast to fp32 instead (correct, slower). fp32 operands use the plain ops.
"""
import torch

_PROBED: dict = {}


def _native_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device, dtype)
    if key not in _PROBED:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(16, 8, device=device).to(dtype)
                b = torch.randn(8, 24, device=device).to(dtype)
                acc = torch.ones(16, 24, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                want = 1.0 + a.float() @ b.float()
                prod = torch.mm(a, b, out_dtype=torch.float32)
                ok = bool(torch.allclose(acc, want, atol=1e-3) and torch.allclose(prod, want - 1.0, atol=1e-3))
            except (RuntimeError, TypeError):
                ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` as fp32."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _native_out_dtype(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = True) -> None:
    """`acc = acc + a @ b` (or `acc = a @ b` when not `accumulate`) with `acc` fp32, in place."""
    beta = 1 if accumulate else 0
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif _native_out_dtype(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)
