"""Pairwise DPO on pairs grouped by prompt: `fused_linear_dpo_by_prompt`.

Many preference sets hold several pairs per prompt, and a response often appears in more than one of them. Grouped
by prompt, each distinct response is one sequence (a shared-prompt group row, `shared_prompt.build_group_batch`, or
one row per response) and the pairs name their chosen and rejected sequences by index. The loss is the pairwise op's
on those pairs, exactly the loss of the same pairs laid out as unshared rows; only the layout changes, so the prompt
and each response run through the model once.

It is the fused DPO run of `functional.py` with the prompt groups as the engine's units of completion
(`units.GroupUnits`, docs/design.md, "The fused linear engine"): a pair lies within one group, so its loss and
coefficients are known once its group's tokens are scored. A response's coefficient is the sum over the pairs it is
in, added in a fixed order (`_PairIndex`), so repeated runs give the same bits on any device.
"""
import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import (
    FusedLinearDPOFunction,
    GradsWanted,
    _device_of,
    check_reference_source,
    checked_positions,
    local_operands,
    pairs_output,
    prepare_units,
    run_units,
    unit_inputs,
)
from dpo_kernels.fused_linear.group import check_group_vectors
from dpo_kernels.fused_linear.lora import LoraHead
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions, options_of
from dpo_kernels.fused_linear.plan import plan_units_step
from dpo_kernels.fused_linear.units import GroupUnits
from dpo_kernels.loss_op.loss_types import couples_logps
from dpo_kernels.loss_op.op import dpo_loss_and_grads
from dpo_kernels.loss_op.spec import check_average, check_loss_settings
from dpo_kernels.outputs import DPOOutput


class _PairIndex(NamedTuple):
    """The pairs as index tensors, and where each pair's two coefficients go in a `[R, slots]` table whose row sums
    are the responses' coefficients (a fixed order of addition: no atomic adds)."""

    chosen: torch.Tensor  # [P] int64
    rejected: torch.Tensor  # [P] int64
    seqs: torch.Tensor  # [2P] int64: chosen then rejected
    slots: torch.Tensor  # [2P] int64: each entry's column in its sequence's row
    width: int  # the most pairs one response is in


def _sizes_of(group_sizes, num_seqs: int) -> tuple:
    """`group_sizes` as a tuple of positive ints summing to `num_seqs`; ValueError otherwise. A prompt group may hold
    one response (a pair whose two responses are the same text)."""
    if isinstance(group_sizes, torch.Tensor):
        if group_sizes.dim() != 1 or group_sizes.is_floating_point() or group_sizes.is_complex() \
                or group_sizes.dtype == torch.bool or group_sizes.is_meta:
            raise ValueError(f"group_sizes must be a 1-D integer tensor [G] with values, got shape "
                             f"{tuple(group_sizes.shape)} of {group_sizes.dtype}")
        group_sizes = group_sizes.tolist()
    if not isinstance(group_sizes, Sequence) or isinstance(group_sizes, str) or not all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in group_sizes):
        raise ValueError(f"group_sizes must be a sequence of ints or a 1-D integer tensor, got {group_sizes!r}")
    sizes = tuple(int(k) for k in group_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"group_sizes must be a non-empty list of sizes >= 1, got {list(sizes)[:8]}")
    if sum(sizes) != num_seqs:
        raise ValueError(f"group_sizes sum to {sum(sizes)} but labels hold R = {num_seqs} sequences (one per "
                         f"response, group by group)")
    return sizes


def _pair_index(pairs, sizes: tuple, device) -> _PairIndex:
    """The checked pairs (`[P, 2]` (chosen, rejected) sequence indices, each pair within one group), read once on the
    host; ValueError naming the first bad pair."""
    if isinstance(pairs, torch.Tensor):
        if pairs.is_floating_point() or pairs.is_complex() or pairs.dtype == torch.bool or pairs.is_meta:
            raise ValueError(f"pairs must be an integer tensor [P, 2], got {pairs.dtype}")
        pairs = pairs.tolist()
    try:
        pairs = [(int(c), int(r)) for c, r in pairs]
    except (TypeError, ValueError):
        raise ValueError("pairs must be [P, 2]: (chosen, rejected) sequence indices") from None
    if not pairs:
        raise ValueError("pairs is empty: the batch needs at least one pair")
    group_of = [g for g, k in enumerate(sizes) for _ in range(k)]
    num_seqs = len(group_of)
    for i, pair in enumerate(pairs):
        for seq in pair:
            if not 0 <= seq < num_seqs:
                raise ValueError(f"pair {i} {pair} names sequence {seq}, outside [0, {num_seqs})")
        if group_of[pair[0]] != group_of[pair[1]]:
            raise ValueError(f"pair {i} {pair} spans groups {group_of[pair[0]]} and {group_of[pair[1]]}: a pair's "
                             f"responses answer one prompt")
    uses = [0] * num_seqs
    slots = []
    for seq in [c for c, _ in pairs] + [r for _, r in pairs]:
        slots.append(uses[seq])
        uses[seq] += 1
    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.int64, device=device)
    rejected = torch.tensor([r for _, r in pairs], dtype=torch.int64, device=device)
    return _PairIndex(chosen, rejected, torch.cat([chosen, rejected]),
                      torch.tensor(slots, dtype=torch.int64, device=device), max(uses))


def _over_indexed_pairs(loss_fn, index: _PairIndex, logps):
    """A loss over the `[R]` response log-probs from the pairwise op on the indexed pairs: `(DPOLossOutput,
    dloss/dlogp [R])`, each response's coefficient the sum of its pairs' in a fixed order."""
    out, grad_c, grad_r = loss_fn(logps[index.chosen], logps[index.rejected])
    table = grad_c.new_zeros(logps.shape[0], index.width)
    table[index.seqs, index.slots] = torch.cat([grad_c, grad_r])
    return out, table.sum(1)


@torch.compiler.disable
def fused_linear_dpo_by_prompt(hidden, weight, labels, group_sizes, pairs, *, bias=None, cu_seqlens=None,
                               ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1,
                               loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX,
                               shift=True, memory_budget=None, token_stats=False,
                               parallel_options: ParallelOptions | None = None, lora: LoraHead | None = None,
                               **loss_params) -> DPOOutput:
    """The pairwise DPO loss of pairs that share prompts, each distinct response scored once, from the policy's last
    hidden states and lm_head, with its gradients formed in the forward (as `fused_linear_dpo`'s).

    The loss, metrics and gradients equal `fused_linear_dpo`'s on the same pairs laid out as unshared rows (pair i
    being `pairs[i]`), within the accuracy rule. Under torch.compile this call runs eagerly (a graph break).

    Args:
        hidden: `[R, T, H]` float32/bfloat16/float16, one row per distinct response, group by group; or packed
            `[N, H]` with `cu_seqlens` `[R + 1]`; or the rows of a shared-prompt group batch with `labels` its
            `attribution` (`shared_prompt.build_group_batch`).
        weight: `[V, H]` lm_head weight; bias: optional `[V]` (as `fused_linear_dpo`).
        labels: `[R, T]` (or `[N]`) int64 with `ignore_index` on prompt and padding, or a `plan.TokenAttribution` with
            `num_seqs = R`, sequences numbered group by group.
        group_sizes: `[G]` ints >= 1 summing to R: the distinct responses of each prompt.
        pairs: `[P, 2]` ints (a tensor, read once on the host, or a sequence of pairs): each pair's chosen and
            rejected sequence, both in one group. A response may be in several pairs, or in none.
        ref_logps: `[R]` precomputed reference log-probs of the responses, or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states and head, as `fused_linear_dpo`.
            Neither: reference-free.
        beta, loss_type, label_smoothing, **loss_params: as `dpo_kernels.dpo_loss` (the lengths it reads are each
            response's scored tokens).
        average, ignore_index, shift, memory_budget, token_stats, parallel_options, lora: as `fused_linear_dpo`.
    Returns:
        `DPOOutput` of the P pairs in the order given; only `loss` is differentiable.
    """
    par = HeadParallel(options_of(parallel_options, None, None), shift)
    hidden, weight, bias, ref_weight, ref_bias, lora = local_operands(par, hidden, weight, bias, ref_weight, ref_bias,
                                                                      lora)
    average = check_average(average)
    check_loss_settings(loss_type, beta=beta, label_smoothing=label_smoothing, loss_params=loss_params)
    check_reference_source(ref_logps, ref_hidden, ref_weight, ref_bias)
    wanted = GradsWanted.current(hidden, weight, bias, lora)

    def prepare():
        positions = checked_positions(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, lora)
        sizes = _sizes_of(group_sizes, positions.num_seqs)
        index = _pair_index(pairs, sizes, hidden.device)
        check_group_vectors(None, ref_logps, positions.num_seqs, hidden.device, "hidden")
        summary, inputs = unit_inputs(hidden, weight, bias, positions, ref_hidden, ref_weight, ref_bias, lora)
        return summary, (inputs, sizes, index)

    agreed = ("by prompt", loss_type, beta, label_smoothing, sorted(loss_params.items()), ignore_index, shift,
              average, memory_budget, token_stats, ref_logps is not None, wanted.weight, wanted.enabled)
    inputs, sizes, index = par.agree(prepare, agreed, _device_of(hidden))
    plan_units = functools.partial(plan_units_step, tied=False, couples=couples_logps(loss_type),
                                   weight_grad=wanted.weight)
    prepared = prepare_units(inputs, GroupUnits.of_sizes(sizes), par, average, memory_budget, False, plan_units,
                             "fused_linear_dpo_by_prompt")
    del inputs  # its positions in natural order go with it (see `prepare_units`)
    if prepared.ref_logps is not None:
        ref_logps = prepared.ref_logps
    counts = prepared.layout.counts
    ref_chosen = None if ref_logps is None else ref_logps[index.chosen]
    ref_rejected = None if ref_logps is None else ref_logps[index.rejected]
    loss_fn = functools.partial(dpo_loss_and_grads, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                                beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                chosen_lengths=counts[index.chosen], rejected_lengths=counts[index.rejected],
                                average=average, **loss_params)
    loss, run = run_units(prepared, functools.partial(_over_indexed_pairs, loss_fn, index), average, token_stats,
                          wanted, FusedLinearDPOFunction.apply)
    return pairs_output(loss, run, ref_chosen, ref_rejected, index.chosen, index.rejected)
