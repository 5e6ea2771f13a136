"""Byte model of the fused linear DPO step: the peak extra memory of one forward + backward.

`plan_peak_bytes` records the engine's own run of a `plan.StepPlan` on meta tensors (`dry_run.dry_run`: the engine's
code and mode functions, without memory or arithmetic) and returns the highest sum of live bytes of the tensors it
allocates, the returned gradients included; inputs and the weights' existing storage are not counted (what
`torch.cuda.max_memory_allocated()` minus the memory allocated before the step measures). `estimate_peak_bytes`
builds that plan from scored-token counts, as `fused_linear_dpo` does from its labels; `estimate_group_peak_bytes`
does the same for `fused_linear_group_dpo` from the scored tokens per response and the group sizes
(`dry_run.dry_run_group`, one unit per group). Assumptions: CUDA with
torch's fp32-result GEMMs (`out_dtype`, see `fp32_gemm.py`; given a `device`, the branch its probe takes there, and
given `fp32_gemm_support`, that branch), the Triton pass (in place, no `[C, V]` temporaries), hidden states and
weight requiring gradients, no bias, each pair's tokens split evenly between its two responses, and autograd taking
the returned gradients as `.grad` without a copy (it does when nothing else holds them).

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

from dpo_kernels.fused_linear.dry_run import dry_run, dry_run_group
from dpo_kernels.fused_linear.fp32_gemm import fp32_gemm_support as probed_support
from dpo_kernels.fused_linear.plan import StepPlan, plan_dpo_step, plan_group_step
from dpo_kernels.fused_linear.trace import CUDA_OUT_DTYPE
from dpo_kernels.fused_linear.units import GroupUnits

# The dtype a dry run gives tensors of each operand itemsize: only the bytes matter.
DTYPE_OF_ITEMSIZE = {4: torch.float32, 2: torch.bfloat16}


def estimate_peak_bytes(hidden_rows, pair_lengths, hidden_size, vocab, dtype=torch.bfloat16, memory_budget=None,
                        loss_type="sigmoid", fp32_gemm_support=None, device=None, lora_rank=0) -> int:
    """Peak extra bytes of one `fused_linear_dpo` forward + backward (see the module docstring).

    Args:
        hidden_rows: rows of the flattened hidden states, `2B * T` (padded) or `N` (packed): grad_h's size.
        pair_lengths: scored tokens of each pair, chosen plus rejected, in batch order (length B).
        hidden_size, vocab: H and V of the `[V, H]` head; dtype: the hidden states' and head's dtype.
        memory_budget, loss_type: as `fused_linear_dpo`.
        fp32_gemm_support: `(mm with out_dtype, addmm into fp32)` on the device modeled (`fp32_gemm.py`); None:
            the branch `device`'s probe takes, or without a device `trace.CUDA_OUT_DTYPE` (both supported).
        device: the device the step runs on, when known (a CUDA device is probed on first use).
        lora_rank: r of a LoRA adapter on the head (0: none); with one the weight is frozen (`dry_run.dry_run`).
    """
    fp32_gemm_support = _gemm_support(fp32_gemm_support, device, dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    plan = plan_dpo_step(list(pair_lengths), vocab, itemsize, memory_budget, loss_type)
    return dry_run(plan, hidden_rows, hidden_size, vocab, dtype, loss_type, list(pair_lengths),
                   fp32_gemm_support, lora_rank).peak_bytes()


def estimate_group_peak_bytes(hidden_rows, response_lengths, group_sizes, hidden_size, vocab, dtype=torch.bfloat16,
                              memory_budget=None, loss_type="plackett_luce", fp32_gemm_support=None, device=None,
                              lora_rank=0, weight_grad=True) -> int:
    """Peak extra bytes of one `fused_linear_group_dpo` forward + backward, reference-free and without scores
    (`dry_run.dry_run_group`), as `estimate_peak_bytes` for pairs.

    Args:
        response_lengths: scored tokens of each response `[R]`, group by group.
        group_sizes: responses per group `[G]`, summing to R.
        weight_grad: the head (weight, or with `lora_rank` the adapter) gets a gradient; False: only the hidden
            states do, and a group longer than a chunk streams once instead of twice (`plan.plan_group_step`).
        The other arguments as `estimate_peak_bytes`.
    """
    fp32_gemm_support = _gemm_support(fp32_gemm_support, device, dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    group_counts = GroupUnits.of_sizes(group_sizes).token_counts(list(response_lengths))
    plan = plan_group_step(group_counts, vocab, itemsize, memory_budget, weight_grad=weight_grad)
    return dry_run_group(plan, hidden_rows, hidden_size, vocab, dtype, response_lengths, group_sizes, loss_type,
                         fp32_gemm_support, lora_rank, weight_grad).peak_bytes()


def _gemm_support(fp32_gemm_support, device, dtype) -> tuple:
    """The fp32-result GEMM branch modeled: the one given, else `device`'s probe, else CUDA's."""
    if fp32_gemm_support is not None:
        return fp32_gemm_support
    return CUDA_OUT_DTYPE if device is None else probed_support(device, dtype)


def plan_peak_bytes(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, itemsize: int,
                    loss_type: str = "sigmoid", pair_lengths=None, lora_rank: int = 0) -> int:
    """Peak extra bytes of one forward + backward that runs `plan` (weight and hidden states requiring gradients,
    no bias; with `lora_rank` an adapter's A and B instead of the weight), summed from the engine's trace of it;
    `pair_lengths` default to `dry_run.plan_pairs(plan)`."""
    return dry_run(plan, hidden_rows, hidden_size, vocab, DTYPE_OF_ITEMSIZE[itemsize], loss_type,
                   pair_lengths, lora_rank=lora_rank).peak_bytes()
