"""GEMMs whose results are kept in fp32 whatever the operands' dtype.

The engine accumulates the weight gradient over chunks and keeps the unscaled hidden-state gradient `U = D @ W`
in fp32: rounding each chunk's contribution to bf16 biases training. On CUDA, torch's `out_dtype` overloads
(`aten::mm.dtype`, `aten::addmm.dtype_out`) run a bf16/fp16 cuBLAS GEMM with an fp32 result and `C = C + A @ B`
in place. They exist only for CUDA, and older releases refuse an fp32 `C`; a one-time probe checks both and
falls back to an fp32 product added in a second step, or else to upcast operands (correct, slower). fp32
operands use the plain ops.
"""
import contextlib

import torch

_PROBED: dict = {}


def _probe(device: torch.device, dtype: torch.dtype):
    """(fp32-result mm works, in-place fp32 accumulate works) for half-precision operands on `device`.

    Older torch releases accept `out_dtype` only when `self` has the operands' dtype, so accumulation into an fp32
    buffer is checked separately from the plain product.
    """
    key = (device, dtype)
    if key not in _PROBED:
        mm_ok = acc_ok = False
        if device.type == "cuda":
            # Small integers: exact in every operand dtype and in fp32 sums, so the check is an exact comparison
            # (no tolerance) and draws nothing from the caller's RNG. Autocast off: inside a bf16 region the
            # fp32 `want` would come back rounded to bf16 and a wrong "unsupported" would be cached for good.
            with torch.autocast("cuda", enabled=False):
                a = (torch.arange(16 * 8, device=device) % 7 - 3).view(16, 8).to(dtype)
                b = (torch.arange(8 * 24, device=device) % 5 - 2).view(8, 24).to(dtype)
                want = a.float() @ b.float()
                try:
                    mm_ok = bool(torch.equal(torch.mm(a, b, out_dtype=torch.float32), want))
                except (RuntimeError, TypeError):
                    mm_ok = False
                try:
                    acc = torch.ones(16, 24, device=device)
                    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                    acc_ok = bool(torch.equal(acc, want + 1.0))
                except (RuntimeError, TypeError):
                    acc_ok = False
        _PROBED[key] = (mm_ok, acc_ok)
    return _PROBED[key]


@contextlib.contextmanager
def assume_support(device: torch.device, dtype: torch.dtype, support: tuple):
    """Within the block the probe answers `support`, `(mm works, accumulate works)`, for `device` and `dtype`: a dry
    run on "meta" tensors (`dry_run.dry_run`) takes the branch of the device it models."""
    key = (torch.device(device), dtype)
    saved = _PROBED.get(key)
    _PROBED[key] = tuple(support)
    try:
        yield
    finally:
        if saved is None:
            del _PROBED[key]
        else:
            _PROBED[key] = saved


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` as fp32."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _probe(a.device, a.dtype)[0]:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = True) -> None:
    """`acc = acc + a @ b` (or `acc = a @ b` when not `accumulate`) with `acc` fp32, in place."""
    beta = 1 if accumulate else 0
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
        return
    mm_ok, acc_ok = _probe(a.device, a.dtype)
    if acc_ok:
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    elif mm_ok and accumulate:
        # A transient fp32 product: one extra [rows, cols] buffer and pass, still no rounding to half precision.
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    elif mm_ok:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)
