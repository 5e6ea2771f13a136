"""The group DPO loss straight from hidden states: `fused_linear_group_dpo`, for G groups of K ranked responses.

It is the fused DPO run of `functional.py` with groups as the engine's units of completion (`units.GroupUnits`,
docs/design.md, "The fused linear engine"): the tokens in natural order (a group's K consecutive sequences are
contiguous), the plan's groups of whole groups (`plan.plan_group_step`), and `FusedLinearDPOFunction` calling the
group loss op (`loss_op.group.group_dpo_loss_and_grads`) on the batch's `[R]` log-probs each time groups complete.
A group's loss reads only its own log-probs and batch facts known up front (scores, lengths, reference log-probs),
so the coefficients of a completed group do not depend on the groups not yet scored.
"""
import functools
import numbers
from collections.abc import Sequence

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import (
    FusedLinearDPOFunction,
    GradsWanted,
    _device_of,
    check_reference_source,
    checked_positions,
    local_operands,
    prepare_units,
    run_units,
    unit_inputs,
)
from dpo_kernels.fused_linear.lora import LoraHead
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions, options_of
from dpo_kernels.fused_linear.plan import plan_group_step
from dpo_kernels.fused_linear.units import GroupUnits
from dpo_kernels.loss_op.group import group_dpo_loss_and_grads
from dpo_kernels.loss_op.group_spec import check_group_settings, check_group_sizes
from dpo_kernels.loss_op.spec import check_average
from dpo_kernels.outputs import GroupDPOOutput

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checked_group_sizes(group_sizes, num_seqs: int, source: str) -> tuple:
    """`group_sizes` (ints, or a 1-D integer tensor read once on the host) as a tuple of ints, each from 2 to 16,
    summing to `num_seqs`, the batch's sequences as `source` holds them; ValueError otherwise."""
    if isinstance(group_sizes, torch.Tensor) and group_sizes.dim() == 1 and not group_sizes.is_meta \
            and not (group_sizes.is_floating_point() or group_sizes.is_complex() or group_sizes.dtype == torch.bool):
        group_sizes = group_sizes.tolist()
    if isinstance(group_sizes, Sequence) and not isinstance(group_sizes, str) and all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in group_sizes) \
            and sum(group_sizes) != num_seqs:
        raise ValueError(f"group_sizes sum to {sum(group_sizes)} but {source} holds R = {num_seqs} sequences (one "
                         f"per response, group by group)")
    return check_group_sizes(group_sizes, num_seqs)


def check_group_vectors(scores, ref_logps, num_seqs: int, device, source: str) -> None:
    """`scores` (integer or float) and `ref_logps` (float) are each None or a `[R]` tensor on `device`, the device
    of the input named `source`; ValueError otherwise, before any kernel runs."""
    for name, t in (("scores", scores), ("ref_logps", ref_logps)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [R] or None, got {type(t).__name__}")
        if name == "ref_logps" and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"ref_logps must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if name == "scores" and (t.dtype == torch.bool or t.dtype.is_complex):
            raise ValueError(f"scores must hold integer or floating values, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != num_seqs:
            raise ValueError(f"{name} must be [R] = [{num_seqs}] (one per response), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {source} is on {device}")


@torch.compiler.disable
def fused_linear_group_dpo(hidden, weight, labels, group_sizes, scores=None, *, bias=None, cu_seqlens=None,
                           ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, loss_type="plackett_luce",
                           beta=0.1, top_k=None, pair_loss="sigmoid", pair_weighting=None, sft_weight=0.0,
                           label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX, shift=True,
                           memory_budget=None, token_stats=False, parallel_options: ParallelOptions | None = None,
                           lora: LoraHead | None = None, **loss_params) -> GroupDPOOutput:
    """The group DPO loss from the policy's last hidden states and lm_head, with its gradients formed in the
    forward (as `fused_linear_dpo`'s; the loss and its conventions are `dpo_kernels.group_dpo_loss`'s).

    Under torch.compile this call runs eagerly (a graph break): its plan reads token counts from the device.

    Args:
        hidden: `[R, T, H]` float32/bfloat16/float16, one row per response, group by group; or packed `[N, H]` with
            `cu_seqlens` `[R + 1]`; or the rows of a shared-prompt group batch (`GroupBatch.input_ids`'s hidden
            states) with `labels` its `attribution`.
        weight: `[V, H]` lm_head weight (same dtype; inside autocast both are cast to the autocast dtype first, see
            `functional.head_operands`); bias: optional `[V]`.
        labels: `[R, T]` (or `[N]`) int64, `ignore_index` on prompt and padding positions; or a
            `plan.TokenAttribution` with `num_seqs = R`, sequences numbered group by group
            (`GroupBatch.attribution`); `shift` and `cu_seqlens` do not apply then.
        group_sizes: `[G]` ints (a sequence, or an integer tensor read once), each from 2 to 16, summing to R.
        scores: `[R]` integer or float, higher is better, or None: each group is ordered best first already.
        ref_logps: `[R]` precomputed reference log-probs, or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states (same layout as `hidden`) and head;
            `ref_weight`/`ref_bias` default to `weight`/`bias`. Neither: reference-free.
        loss_type, beta, top_k, pair_loss, pair_weighting, sft_weight, label_smoothing, **loss_params: as
            `group_dpo_loss` (the lengths it reads are the numbers of scored tokens per response).
        average: per-token mean log-probs instead of sums (for policy and reference alike).
        memory_budget: None, bytes for the `[C, V]` logits buffer, or "low" (the recompute path): see `plan.py`.
        token_stats: also fill the output's `entropy_sum` and `top1_count` from the pass that reads every logit.
        parallel_options: a `ParallelOptions` (vocabulary- or sequence-parallel head), as `fused_linear_dpo`.
        lora: a `LoraHead(a [r, H], b [V, r], scaling)` on the policy's head, as `fused_linear_dpo`.
    Returns:
        `GroupDPOOutput`; only `loss` is differentiable (w.r.t. hidden, weight, bias and the adapter's `a`, `b`).
    """
    par = HeadParallel(options_of(parallel_options, None, None), shift)
    hidden, weight, bias, ref_weight, ref_bias, lora = local_operands(par, hidden, weight, bias, ref_weight, ref_bias,
                                                                      lora)
    settings = dict(loss_type=loss_type, beta=beta, top_k=top_k, pair_loss=pair_loss, pair_weighting=pair_weighting,
                    sft_weight=sft_weight, label_smoothing=label_smoothing, average=check_average(average),
                    **loss_params)
    check_group_settings(loss_type, beta=beta, pair_loss=pair_loss, top_k=top_k, pair_weighting=pair_weighting,
                         sft_weight=sft_weight, label_smoothing=label_smoothing, loss_params=loss_params)
    check_reference_source(ref_logps, ref_hidden, ref_weight, ref_bias)
    wanted = GradsWanted.current(hidden, weight, bias, lora)

    def prepare():
        positions = checked_positions(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, lora)
        sizes = checked_group_sizes(group_sizes, positions.num_seqs, "labels")
        check_group_vectors(scores, ref_logps, positions.num_seqs, hidden.device, "hidden")
        summary, inputs = unit_inputs(hidden, weight, bias, positions, ref_hidden, ref_weight, ref_bias, lora)
        return summary, (inputs, sizes)

    agreed = ("group", sorted(settings.items()), ignore_index, shift, memory_budget, token_stats,
              ref_logps is not None, scores is not None, wanted.weight, wanted.enabled)
    inputs, sizes = par.agree(prepare, agreed, _device_of(hidden))
    plan_units = functools.partial(plan_group_step, weight_grad=wanted.weight)
    prepared = prepare_units(inputs, GroupUnits.of_sizes(sizes), par, average, memory_budget, False, plan_units,
                             "fused_linear_group_dpo")
    del inputs  # its positions in natural order go with it (see `prepare_units`)
    if prepared.ref_logps is not None:
        ref_logps = prepared.ref_logps
    lengths = prepared.layout.counts
    loss_fn = functools.partial(group_dpo_loss_and_grads, ref_logps=ref_logps, group_sizes=sizes, scores=scores,
                                lengths=lengths, **settings)
    loss, run = run_units(prepared, loss_fn, average, token_stats, wanted, FusedLinearDPOFunction.apply)
    out, logps = run.result["out"], run.result["logps"]
    return GroupDPOOutput(
        loss=loss,
        losses=out.losses,
        logps=logps,
        rewards=out.rewards,
        ranking_accuracy=out.ranking_accuracy,
        top1_accuracy=out.top1_accuracy,
        groups_left_out=out.groups_left_out,
        ref_logps=None if ref_logps is None else ref_logps.detach(),
        lengths=lengths,
        entropy_sum=run.result.get("entropy"),
        top1_count=run.result.get("top1"),
    )
