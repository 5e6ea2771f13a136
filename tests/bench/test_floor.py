"""The fused-linear floor is plain GEMMs in the operands' dtype: it never goes through the engine's fp32-result
GEMMs (`fused_linear/fp32_gemm.py`), whose branch depends on the device's probe, and it does 6·N·H·V FLOPs."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_kernels.bench import timing
from dpo_kernels.fused_linear import fp32_gemm

GEMM_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "addmv", "mv", "dot"}


class GemmCalls(TorchDispatchMode):
    """Records `(op, operand dtypes, result dtype, FLOPs)` of every matrix product run inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in GEMM_OPS:
            a, b = args[0], args[1]
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] if a.dim() == b.dim() == 2 else None
            self.calls.append((str(func), a.dtype, b.dtype, out.dtype, flops))
        return out


def test_gemm_floor_is_plain_mm_without_fp32_gemm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the floor went through fused_linear/fp32_gemm.py")

    for name in ("mm_fp32", "addmm_fp32_", "fp32_gemm_support", "fp32_gemm_branch", "_probe"):
        monkeypatch.setattr(fp32_gemm, name, refuse)
    monkeypatch.setattr(timing, "_CHUNK_TOKENS", 16)  # three chunks of the 40 tokens
    tokens, hidden, vocab, iters = 40, 24, 130, 2
    with GemmCalls() as seen:
        ms = timing.gemm_floor_ms(tokens, hidden, vocab, torch.bfloat16, torch.device("cpu"), iters=iters)
    assert ms > 0
    steps = 1 + 1 + iters  # warm-up, the memory step, the timed steps (`time_step`)
    assert len(seen.calls) == 3 * 3 * steps, seen.calls
    for op, a, b, out, _ in seen.calls:
        assert op.startswith("aten.mm.") and a == b == out == torch.bfloat16, (op, a, b, out)
    assert sum(c[-1] for c in seen.calls) == 6 * tokens * hidden * vocab * steps
