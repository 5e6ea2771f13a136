"""The engine's run on meta tensors: what the memory and cost models sum (`dry_run`).

`dry_run` runs the real engine code (`functional.FusedLinearDPOFunction`, forward and backward) on meta tensors
inside `trace.record()`, so the models cannot describe another engine than the one that runs. Two pieces behave as
on the device modeled: the logsoftmax pass allocates only what its Triton launcher allocates (`launcher_pass`), and
the fp32-result GEMMs take the branch the modeled device supports (`fp32_gemm.assume_support`).
"""
import functools

import torch

from dpo_kernels.fused_linear import fp32_gemm
from dpo_kernels.fused_linear.logsoftmax_pass import logsoftmax_pass_torch
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions
from dpo_kernels.fused_linear.plan import StepPlan, TokenLayout
from dpo_kernels.fused_linear.trace import CUDA_OUT_DTYPE, Trace, opaque, record
from dpo_kernels.fused_linear.units import PairUnits


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


def _meta_layout(pair_lengths, device) -> TokenLayout:
    """A paired layout of `sum(pair_lengths)` tokens (each pair split evenly between its two responses); meta
    tensors carry shapes only."""
    B = len(pair_lengths)
    counts_host = [n - n // 2 for n in pair_lengths] + [n // 2 for n in pair_lengths]
    total = sum(pair_lengths)
    idx = [torch.empty(total, dtype=torch.long, device=device) for _ in range(4)]
    counts = torch.empty(2 * B, dtype=torch.long, device=device)
    return TokenLayout(*idx, counts, counts_host, max(counts_host, default=0))


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
            lora_rank: int = 0) -> Trace:
    """The trace of one `fused_linear_dpo` forward + backward that runs `plan`, on meta tensors.

    hidden_rows: rows of the flattened hidden states (`[hidden_rows, hidden_size]`, requiring gradients, as the
    `[vocab, hidden_size]` weight; no bias); dtype: theirs. pair_lengths: scored tokens per pair (default
    `plan_pairs(plan)`). fp32_gemm_support: `(mm with out_dtype, addmm into fp32)` of the device modeled.
    lora_rank: r of a LoRA adapter on the head (`lora.LoraHead`, `[r, hidden_size]` and `[vocab, r]` requiring
    gradients), 0 for none; with one the weight is frozen, as PEFT keeps it. Inputs are not counted; the returned
    gradients are.
    """
    from dpo_kernels.fused_linear import functional
    from dpo_kernels.loss_op.op import dpo_loss_and_grads

    meta = torch.device("meta")
    pairs = list(plan_pairs(plan) if pair_lengths is None else pair_lengths)
    B = len(pairs)
    hidden = torch.empty(hidden_rows, hidden_size, dtype=dtype, device=meta, requires_grad=True)
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=meta, requires_grad=not lora_rank)
    lora_a = lora_b = None
    if lora_rank:
        lora_a = torch.empty(lora_rank, hidden_size, dtype=dtype, device=meta, requires_grad=True)
        lora_b = torch.empty(vocab, lora_rank, dtype=dtype, device=meta, requires_grad=True)
    with fp32_gemm.assume_support(meta, dtype, fp32_gemm_support), record() as trace:
        layout = _meta_layout(pairs, meta)
        loss_fn = functools.partial(dpo_loss_and_grads, loss_type=loss_type, chosen_lengths=layout.counts[:B],
                                    rejected_lengths=layout.counts[B:])
        run = functional._DPORun(layout, plan, PairUnits(B), False, functional.pairwise_loss(loss_fn, B),
                                 token_stats=False, grad_enabled=True,
                                 par=_OneProcessLauncherPass(ParallelOptions(), shift=False),
                                 lora_scaling=1.0 if lora_rank else None)
        functional.FusedLinearDPOFunction.apply(hidden, weight, None, lora_a, lora_b, run).backward()
        del layout, loss_fn, run
    return trace
