"""GEMMs whose results are kept in fp32 whatever the operands' dtype.

The engine accumulates the weight gradient over chunks and keeps the unscaled hidden-state gradient `U = D @ W`
in fp32: rounding each chunk's contribution to bf16 biases training. On CUDA, torch's `out_dtype` overloads
(`aten::mm.dtype`, `aten::addmm.dtype_out`) run a bf16/fp16 cuBLAS GEMM with an fp32 result and `C = C + A @ B`
in place. They exist only for CUDA, and older releases refuse an fp32 `C`; a one-time probe checks both and
falls back to an fp32 product added in a second step, or else to upcast operands (correct, slower). fp32
operands use the plain ops.

The branch decides the step's memory and speed (docs/design.md, "The fused linear engine"), so the probe's outcome is
logged once per device and dtype (logger `dpo_kernels.fused_linear.fp32_gemm`), a slow branch on CUDA also warns,
and `fp32_gemm_branch` names it for reports.
"""
import contextlib
import logging
import warnings

import torch

logger = logging.getLogger(__name__)

_PROBED: dict = {}

# The branch each `(mm with out_dtype, addmm into fp32)` outcome takes, and what it costs.
BRANCHES = {
    (True, True): ("out_dtype", "fp32-result cuBLAS GEMMs accumulating in place"),
    (True, False): ("out_dtype_mm_then_add", "in-place fp32 accumulate refused: each accumulating GEMM adds a "
                                             "transient fp32 product (one more [rows, cols] buffer and pass)"),
    (False, True): ("upcast_mm", "fp32-result mm refused: its operands are upcast to fp32 (fp32 GEMMs, several "
                                 "times slower, and fp32 copies of the operands)"),
    (False, False): ("upcast", "fp32-result GEMMs refused: every GEMM upcasts its operands to fp32 (fp32 GEMMs, "
                               "several times slower, and fp32 copies of the operands)"),
}
# fp32 operands take the plain ops, whatever the probe says.
FP32_BRANCH = "fp32"


def _try_out_dtype_gemms(device: torch.device, dtype: torch.dtype) -> tuple:
    """`(fp32-result mm works, in-place fp32 accumulate works)` for `dtype` operands on the CUDA `device`.

    Older torch releases accept `out_dtype` only when `self` has the operands' dtype, so accumulation into an fp32
    buffer is checked separately from the plain product.
    """
    # Small integers: exact in every operand dtype and in fp32 sums, so the check is an exact comparison (no
    # tolerance) and draws nothing from the caller's RNG. Autocast off: inside a bf16 region the fp32 `want` would
    # come back rounded to bf16 and a wrong "unsupported" would be cached for good.
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
    return mm_ok, acc_ok


def _report(device: torch.device, dtype: torch.dtype, support: tuple) -> None:
    """Logs a CUDA probe's outcome; a branch slower than `out_dtype` also warns, as it changes the step's memory or
    speed without changing its results."""
    name, meaning = BRANCHES[support]
    message = (f"fp32-result GEMMs for {dtype} operands on {device}: branch {name!r} ({meaning}); "
               f"torch {torch.__version__}")
    logger.info(message)
    if support != (True, True):
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _probe(device: torch.device, dtype: torch.dtype):
    """(fp32-result mm works, in-place fp32 accumulate works) for half-precision operands on `device`; probed once
    per device and dtype on CUDA, `(False, False)` elsewhere (the ops exist only for CUDA)."""
    key = (device, dtype)
    if key not in _PROBED:
        support = (False, False)
        if device.type == "cuda":
            support = _try_out_dtype_gemms(device, dtype)
            _report(device, dtype, support)
        _PROBED[key] = support
    return _PROBED[key]


def _as_probe_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def fp32_gemm_support(device, dtype: torch.dtype) -> tuple:
    """`(mm with out_dtype works, addmm into fp32 works)` for `dtype` operands on `device` (probed on first use;
    `(True, True)` for fp32 operands, which take the plain ops)."""
    if dtype == torch.float32:
        return True, True
    return _probe(_as_probe_key(device), dtype)


def fp32_gemm_branch(device, dtype: torch.dtype) -> str:
    """The name of the branch the fp32-result GEMMs take for `dtype` operands on `device` (the first item of a
    `BRANCHES` value: `"out_dtype"`, the fast one, `"out_dtype_mm_then_add"`, `"upcast_mm"` or `"upcast"`), or
    `"fp32"` for fp32 operands. On CUDA the first call runs the probe."""
    if dtype == torch.float32:
        return FP32_BRANCH
    return BRANCHES[fp32_gemm_support(device, dtype)][0]


@contextlib.contextmanager
def assume_support(device: torch.device, dtype: torch.dtype, support: tuple):
    """Within the block the probe answers `support`, `(mm works, accumulate works)`, for `device` and `dtype`: a dry
    run on "meta" tensors (`dry_run.dry_run`) takes the branch of the device it models."""
    key = (_as_probe_key(device), dtype)
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
        if a.is_meta:  # a dry run: the same allocation, without torch 2.11's meta kernel of the overload
            return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = True) -> None:
    """`acc = acc + a @ b` (or `acc = a @ b` when not `accumulate`) with `acc` fp32, in place."""
    beta = 1 if accumulate else 0
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
        return
    mm_ok, acc_ok = _probe(a.device, a.dtype)
    if acc_ok and a.is_meta:
        return  # a dry run: in place, nothing is allocated (torch 2.11's meta kernel of the overload is broken)
    if acc_ok and (accumulate or not mm_ok):
        if not accumulate:
            acc.zero_()
        # Called exactly as the probe called it: no beta, which torch 2.11 mis-parses beside out_dtype (seen on meta).
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mm_ok and accumulate:
        # A transient fp32 product: one extra [rows, cols] buffer and pass, still no rounding to half precision.
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    elif mm_ok:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)
