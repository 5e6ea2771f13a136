"""The fused-linear floor is plain GEMMs in the operands' dtype: it never goes through the engine's fp32-result
GEMMs (`fused_linear/fp32_gemm.py`), whose branch depends on the device's probe, and it does 6·N·H·V FLOPs."""
import torch

from dpo_kernels.bench import timing
from dpo_kernels.fused_linear import fp32_gemm
from tests.helpers import OpLog

GEMM_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "addmv", "mv", "dot"}


def test_gemm_floor_is_plain_mm_without_fp32_gemm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the floor went through fused_linear/fp32_gemm.py")

    for name in ("mm_fp32", "addmm_fp32_", "fp32_gemm_support", "fp32_gemm_branch", "_probe"):
        monkeypatch.setattr(fp32_gemm, name, refuse)
    monkeypatch.setattr(timing, "_CHUNK_TOKENS", 16)  # three chunks of the 40 tokens
    tokens, hidden, vocab, iters = 40, 24, 130, 2
    with OpLog() as log:
        ms = timing.gemm_floor_ms(tokens, hidden, vocab, torch.bfloat16, torch.device("cpu"), iters=iters)
    assert ms > 0
    gemms = [call for call in log.calls if call.name in GEMM_OPS]
    steps = 1 + 1 + iters  # warm-up, the memory step, the timed steps (`time_step`)
    assert len(gemms) == 3 * 3 * steps, gemms
    flops = 0
    for call in gemms:
        (a_shape, a), (b_shape, b) = call.inputs[:2]
        assert call.name == "mm" and a == b == call.outputs[0][1] == torch.bfloat16, call
        flops += 2 * a_shape[0] * a_shape[1] * b_shape[1]
    assert flops == 6 * tokens * hidden * vocab * steps
