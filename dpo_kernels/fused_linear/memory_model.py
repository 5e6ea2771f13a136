"""Byte model of the fused linear DPO step: the peak extra memory of one forward + backward.

`plan_peak_bytes` walks the `plan.StepPlan` the engine runs, group by group in the plan's mode, replays the
engine's allocations of that mode in order (`engine.py`, `functional.py`) and returns the highest sum of live
bytes, counting everything the step allocates, the returned gradients included; inputs and the weights' existing
storage are not counted (what `torch.cuda.max_memory_allocated()` minus the memory allocated before the step
measures). `estimate_peak_bytes` builds that plan from scored-token counts, as `fused_linear_dpo` does from its
labels. Assumptions: CUDA with torch's fp32-result GEMMs (`out_dtype`, see `fp32_gemm.py`), the Triton pass (in
place, no `[C, V]` temporaries), hidden states and weight requiring gradients, no bias, and autograd taking the
returned gradients as `.grad` without a copy (it does when nothing else holds them). Kilobyte-sized tensors are
counted per token (`_TOKEN_BYTES`).

Table (H = 4096, V = 128256 bf16, the first quarter of each row prompt, reference-free sigmoid; GiB, and the
target: 1.3x the peak of TRL's own loss for the default, that peak for "low"):

    B x T      valid tokens   default (C = 8192)                  "low" (C = 2048, recompute)
    2 x 2048       6144       2.60   (<= 4.4) one chunk           3.00   (<= 3.37)
    2 x 8192      24576       4.97   (<= 5.1) 2 streaming pairs   3.19   (<= 3.94)
    1 x 32768     49152       5.29   (<= 6.1) 1 streaming pair    3.44   (<= 4.69)

Where the default peaks come from (V*H fp32 = 1.96 GiB, V*H bf16 = 0.98, [8192, V] bf16 = 1.96):
2 x 2048: the logits buffer (1.47) and the weight gradient written in bf16 by the only weight GEMM (0.98).
2 x 8192: each pair (12288 tokens) is longer than a chunk, and the second runs twice, so the buffer takes 2.5 GiB
(C = 10368, see `plan.py`): the first pair streams into the fp32 accumulator (1.96) beside the logits buffer (2.48),
its fp32 U (0.19), grad_h (0.25) and two chunks' hidden rows (0.08 and 0.01); the second pair, run twice (forward,
then gradients), peaks lower. 1 x 32768: one pair streamed through C = 8192, with U = 0.75 and grad_h = 0.5.
"low": the end of the backward, the fp32 accumulator (1.96) and its bf16 conversion (0.98) plus grad_h.
"""
import torch

from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_ONCE, StepPlan, plan_dpo_step

# Per scored token: the layout (rows, targets, seq, slot: int64) and the fp32 token log-probs.
_TOKEN_BYTES = 4 * 8 + 4


class _Live:
    """A running sum of live bytes and its peak."""

    def __init__(self):
        self.bytes = self.peak = 0

    def alloc(self, n: int) -> int:
        self.bytes += n
        self.peak = max(self.peak, self.bytes)
        return n

    def free(self, n: int) -> None:
        self.bytes -= n


def estimate_peak_bytes(hidden_rows, pair_lengths, hidden_size, vocab, dtype=torch.bfloat16, memory_budget=None,
                        loss_type="sigmoid") -> int:
    """Peak extra bytes of one `fused_linear_dpo` forward + backward (see the module docstring).

    Args:
        hidden_rows: rows of the flattened hidden states, `2B * T` (padded) or `N` (packed): grad_h's size.
        pair_lengths: scored tokens of each pair, chosen plus rejected, in batch order (length B).
        hidden_size, vocab: H and V of the `[V, H]` head; dtype: the hidden states' and head's dtype.
        memory_budget, loss_type: as `fused_linear_dpo`.
    """
    itemsize = torch.tensor([], dtype=dtype).element_size()
    plan = plan_dpo_step(list(pair_lengths), vocab, itemsize, memory_budget, loss_type)
    return plan_peak_bytes(plan, hidden_rows, hidden_size, vocab, itemsize)


def plan_peak_bytes(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, itemsize: int) -> int:
    """Peak extra bytes of one forward + backward that runs `plan` (weight and hidden states requiring gradients,
    no bias): the engine's allocations replayed in its order, mode by mode as the plan gives them."""
    live = _Live()
    live.alloc(_TOKEN_BYTES * plan.total)
    shapes = _Shapes(hidden_size, vocab, itemsize, plan.buffer_rows)
    if plan.recompute:
        _recompute_step(live, shapes, hidden_rows, plan)
    else:
        _fused_step(live, shapes, hidden_rows, plan)
    return live.peak


class _Shapes:
    def __init__(self, H, V, s, buffer_rows):
        self.H, self.V, self.s = H, V, s
        self.zbuf = buffer_rows * (-(-V // 16) * 16) * s  # the logits buffer, rows padded to 16 elements
        self.acc = V * H * 4

    def rows(self, n, itemsize=None):
        """Bytes of an `[n, H]` tensor (the inputs' dtype by default)."""
        return n * self.H * (self.s if itemsize is None else itemsize)

    def cast(self, n):
        """Bytes a `.to(dtype)` of an fp32 `[n, H]` tensor allocates (none when the dtype is fp32)."""
        return 0 if self.s == 4 else self.rows(n)


def _finish_weight(live, sh, acc):
    """`Grads.weight_bias`: the fp32 accumulator's conversion to the weight's dtype (a view when that is fp32)."""
    if acc and sh.s != 4:
        live.alloc(sh.V * sh.H * sh.s)
        live.free(acc)


def _fused_step(live, sh, hidden_rows, plan):
    live.alloc(sh.rows(hidden_rows))  # grad_h
    live.alloc(sh.zbuf)
    state = {"acc": 0}
    for group in plan.groups:
        if group.mode == RESIDENT:
            _resident(live, sh, group.end - group.start, state, only=plan.one_weight_gemm)
        elif group.mode == STREAM_ONCE:
            _stream(live, sh, group, state)
        else:
            _twice(live, sh, group.chunks, state)
    live.free(sh.zbuf)
    _finish_weight(live, sh, state["acc"])


def _weight_gemm(live, sh, state, only=False):
    if only:
        live.alloc(sh.V * sh.H * sh.s)  # the weight gradient itself, returned
    elif not state["acc"]:
        state["acc"] = live.alloc(sh.acc)


def _resident(live, sh, n, state, only):
    if n == 0:
        return
    h = live.alloc(sh.rows(n))
    u = live.alloc(sh.rows(n, 4))  # c * (D @ W) in fp32, then rounded into grad_h
    live.free(live.alloc(sh.cast(n)))
    live.free(u)
    product = live.alloc(sh.rows(n, 4))  # the operand h * c, formed in fp32 and rounded
    operand = live.alloc(sh.cast(n))
    if operand:
        live.free(product)
    _weight_gemm(live, sh, state, only)
    live.free(operand or product)
    live.free(h)


def _stream(live, sh, group, state):
    u = live.alloc(sh.rows(group.end - group.start, 4))
    h = 0
    for s, e in group.chunks:
        new = live.alloc(sh.rows(e - s))  # index_select runs before the previous chunk's h is released
        live.free(h)
        h = new
        _weight_gemm(live, sh, state)
    live.free(h)
    for s, e in group.chunks:
        live.free(live.alloc(sh.cast(e - s)))
    live.free(u)


def _twice(live, sh, chunks, state):
    for s, e in chunks:
        live.free(live.alloc(sh.rows(e - s)))
    for s, e in reversed(chunks):  # the gradient pass runs backwards from the chunk still in the buffer
        h = live.alloc(sh.rows(e - s))
        live.free(live.alloc(sh.rows(e - s)))  # D @ W in the inputs' dtype, copied into grad_h
        _weight_gemm(live, sh, state)
        live.free(h)


def _recompute_step(live, sh, hidden_rows, plan):
    """A forward that keeps nothing, then a backward that recomputes every chunk."""
    chunks = plan.chunks
    live.alloc(sh.zbuf)
    for s, e in chunks:
        live.free(live.alloc(sh.rows(e - s)))
    live.free(sh.zbuf)
    live.alloc(sh.rows(hidden_rows))  # grad_h
    live.alloc(sh.zbuf)
    state = {"acc": 0}
    for s, e in chunks:
        h = live.alloc(sh.rows(e - s))
        live.free(live.alloc(sh.rows(e - s)))
        _weight_gemm(live, sh, state, only=plan.one_weight_gemm)
        live.free(h)
    live.free(sh.zbuf)
    _finish_weight(live, sh, state["acc"])
