"""The engine's run on meta tensors: what the memory and cost models sum (`dry_run`, `dry_run_group`).

`dry_run` (pairs) and `dry_run_group` (groups of K responses) run the real engine code
(`functional.FusedLinearDPOFunction`, forward and backward) on meta tensors inside `trace.record()`, so the models
cannot describe another engine than the one that runs. Two pieces behave as on the device modeled: the logsoftmax
pass allocates only what its Triton launcher allocates (`launcher_pass`), and the fp32-result GEMMs take the branch
the modeled device supports (`fp32_gemm.assume_support`).
"""
import functools

import torch

from dpo_kernels.fused_linear import fp32_gemm
from dpo_kernels.fused_linear.logsoftmax_pass import logsoftmax_pass_torch
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions
from dpo_kernels.fused_linear.plan import StepPlan, TokenLayout
from dpo_kernels.fused_linear.trace import CUDA_OUT_DTYPE, Trace, opaque, record
from dpo_kernels.fused_linear.units import GroupUnits, PairUnits


def launcher_pass(z, labels, *, scale=None, write_grad=False, stats=False):
    """The logsoftmax pass as the Triton launcher allocates it: its outputs only, `[C]` fp32 log-probs (and with
    `stats`, `[C]` fp32 entropy and `[C]` bool top-1). The values come from the PyTorch twin run as one opaque
    kernel, whose `[C, V]` temporaries stand for the registers of the Triton kernel (meta tensors: no values to
    compute). Arguments as `logsoftmax_pass`."""
    rows = z.shape[0]
    logp = torch.empty(rows, dtype=torch.float32, device=z.device)
    entropy = torch.empty(rows, dtype=torch.float32, device=z.device) if stats else None
    top1 = torch.empty(rows, dtype=torch.bool, device=z.device) if stats else None
    if z.is_meta:
        return (logp, entropy, top1) if stats else logp
    with opaque():
        values = logsoftmax_pass_torch(z, labels, scale, write_grad, stats)
        if stats:
            for out, value in zip((logp, entropy, top1), values, strict=True):
                out.copy_(value)
        else:
            logp.copy_(values)
    return (logp, entropy, top1) if stats else logp


def pair_sequence_counts(pair_lengths) -> list:
    """Scored tokens per sequence `[2B]` (chosen first) of pairs of `pair_lengths` tokens, each pair split evenly
    between its two responses (the chosen one takes the odd token)."""
    return [n - n // 2 for n in pair_lengths] + [n // 2 for n in pair_lengths]


def _meta_layout(seq_counts, device) -> TokenLayout:
    """A layout of `sum(seq_counts)` tokens, `seq_counts[i]` of them scored for sequence i; meta tensors carry
    shapes only."""
    total = sum(seq_counts)
    idx = [torch.empty(total, dtype=torch.long, device=device) for _ in range(4)]
    counts = torch.empty(len(seq_counts), dtype=torch.long, device=device)
    return TokenLayout(*idx, counts, list(seq_counts), max(seq_counts, default=0))


def plan_pairs(plan: StepPlan) -> list:
    """Scored tokens per pair in batch order, as far as the plan tells them: each pair group's tokens split evenly
    among its pairs (a recompute plan: one pair of all tokens)."""
    if not plan.groups:
        return [plan.total]
    pairs = [0] * max(g.units.stop for g in plan.groups)
    for g in plan.groups:
        share, extra = divmod(g.end - g.start, max(1, len(g.units)))
        for k, i in enumerate(g.units):
            pairs[i] = share + (k < extra)
    return pairs


class _OneProcessLauncherPass(HeadParallel):
    """No process group, and each chunk's pass allocating what its Triton launcher allocates (`launcher_pass`)."""

    pass_fn = staticmethod(launcher_pass)


def dry_run(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype,
            loss_type: str = "sigmoid", pair_lengths=None, fp32_gemm_support=CUDA_OUT_DTYPE,
            lora_rank: int = 0, weight_grad: bool = True) -> Trace:
    """The trace of one `fused_linear_dpo` forward + backward that runs `plan`, on meta tensors.

    hidden_rows: rows of the flattened hidden states (`[hidden_rows, hidden_size]`, requiring gradients, as the
    `[vocab, hidden_size]` weight; no bias); dtype: theirs. pair_lengths: scored tokens per pair (default
    `plan_pairs(plan)`), split evenly between chosen and rejected (`pair_sequence_counts`). fp32_gemm_support:
    `(mm with out_dtype, addmm into fp32)` of the device modeled. lora_rank: r of a LoRA adapter on the head
    (`lora.LoraHead`, `[r, hidden_size]` and `[vocab, r]` requiring gradients), 0 for none; with one the weight is
    frozen, as PEFT keeps it. weight_grad: False freezes the head (weight or adapter) too, so that only the hidden
    states get a gradient; the plan should be built with the same flag. Inputs are not counted; the returned
    gradients are.
    """
    from dpo_kernels.fused_linear import functional
    from dpo_kernels.loss_op.op import dpo_loss_and_grads

    pairs = list(plan_pairs(plan) if pair_lengths is None else pair_lengths)
    B = len(pairs)

    def pairwise(counts):
        return functional.pairwise_loss(functools.partial(dpo_loss_and_grads, loss_type=loss_type,
                                                          chosen_lengths=counts[:B], rejected_lengths=counts[B:]), B)

    return _traced_step(plan, PairUnits(B), pair_sequence_counts(pairs), pairwise, hidden_rows, hidden_size, vocab,
                        dtype, fp32_gemm_support, lora_rank, weight_grad)


def dry_run_group(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                  response_lengths, group_sizes, loss_type: str = "plackett_luce",
                  fp32_gemm_support=CUDA_OUT_DTYPE, lora_rank: int = 0, weight_grad: bool = True) -> Trace:
    """The trace of one `fused_linear_group_dpo` forward + backward that runs `plan` (`plan.plan_group_step`), on
    meta tensors: reference-free, without scores (each group ordered best first), `loss_type` with the group
    loss's other defaults.

    response_lengths: scored tokens per response `[R]`, group by group; group_sizes: responses per group `[G]`,
    summing to R. The other arguments as `dry_run`.
    """
    from dpo_kernels.loss_op.group import group_dpo_loss_and_grads

    sizes = tuple(group_sizes)

    def group_loss(counts):
        return functools.partial(group_dpo_loss_and_grads, ref_logps=None, group_sizes=sizes, scores=None,
                                 lengths=counts, loss_type=loss_type, average=False)

    return _traced_step(plan, GroupUnits.of_sizes(sizes), list(response_lengths), group_loss, hidden_rows,
                        hidden_size, vocab, dtype, fp32_gemm_support, lora_rank, weight_grad)


def _traced_step(plan, units, seq_counts, loss_of, hidden_rows, hidden_size, vocab, dtype, fp32_gemm_support,
                 lora_rank, weight_grad) -> Trace:
    """The trace of `FusedLinearDPOFunction`'s forward + backward over `units` with `seq_counts` scored tokens per
    sequence, on meta tensors; `loss_of(counts [R]) -> loss_fn` builds the loss over the `[R]` log-probs from the
    layout's counts, as the API does."""
    from dpo_kernels.fused_linear import functional

    meta = torch.device("meta")
    hidden = torch.empty(hidden_rows, hidden_size, dtype=dtype, device=meta, requires_grad=True)
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=meta, requires_grad=weight_grad and not lora_rank)
    lora_a = lora_b = None
    if lora_rank:
        lora_a = torch.empty(lora_rank, hidden_size, dtype=dtype, device=meta, requires_grad=weight_grad)
        lora_b = torch.empty(vocab, lora_rank, dtype=dtype, device=meta, requires_grad=weight_grad)
    with fp32_gemm.assume_support(meta, dtype, fp32_gemm_support), record() as trace:
        layout = _meta_layout(seq_counts, meta)
        loss_fn = loss_of(layout.counts)
        run = functional._DPORun(layout, plan, units, False, loss_fn, token_stats=False, grad_enabled=True,
                                 par=_OneProcessLauncherPass(ParallelOptions(), shift=False),
                                 lora_scaling=1.0 if lora_rank else None)
        functional.FusedLinearDPOFunction.apply(hidden, weight, None, lora_a, lora_b, run).backward()
        del layout, loss_fn, run
    return trace
