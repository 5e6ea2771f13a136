"""DPO losses to drop into a training loop: from logits (`DPOLoss`) or from hidden states (`FusedLinearDPOLoss`),
and their group forms for K ranked responses per prompt (`GroupDPOLoss`, `FusedLinearGroupLoss`).

The pair losses take a batch of 2B sequences, the B chosen responses first (pair i is rows i and B+i), and return a
`DPOOutput`; the group losses take R sequences group by group with `group_sizes [G]` (and optional `scores [R]`),
and return a `GroupDPOOutput`. Labels carry `ignore_index` on prompt and padding positions; `loss` is the only
differentiable field. Sequence log-probs are label log-prob sums (means with `average=True`); the response lengths
handed to length-normalized losses are the numbers of scored tokens.
"""
from torch import nn

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import fused_linear_dpo
from dpo_kernels.fused_linear.group import check_group_vectors, checked_group_sizes, fused_linear_group_dpo
from dpo_kernels.fused_linear.parallel import options_of
from dpo_kernels.fused_linear.plan import scored_counts
from dpo_kernels.logprobs.from_logits import sequence_logprobs
from dpo_kernels.loss_op.group import group_dpo_loss
from dpo_kernels.loss_op.group_spec import check_group_settings
from dpo_kernels.loss_op.op import dpo_loss
from dpo_kernels.loss_op.spec import check_average, check_loss_settings, check_reference_logps, op_constants
from dpo_kernels.outputs import DPOOutput, GroupDPOOutput
from dpo_kernels.validation import check_ndim

__all__ = ["DPOLoss", "DPOOutput", "FusedLinearDPOLoss", "FusedLinearGroupLoss", "GroupDPOLoss", "GroupDPOOutput"]


class DPOLoss(nn.Module):
    """DPO from logits: `sequence_logprobs` (one Triton read of the logits) then the fused `dpo_loss` op.

    `forward(logits [2B, T, V], labels [2B, T], ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput`;
    logits in float32/bfloat16/float16, reference log-probs `[B]` (None for reference-free losses).
    `loss_params` are the loss's hyper-parameters (`gamma`, `tau`, `dpop_lambda`, `loss_weights`), as `dpo_loss`.
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX,
                 shift=True, **loss_params):
        super().__init__()
        check_loss_settings(loss_type, beta=beta, label_smoothing=label_smoothing, loss_params=loss_params)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average, self.ignore_index, self.shift, self.loss_params = average, ignore_index, shift, loss_params

    def forward(self, logits, labels, ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput:
        # Only what the pair split needs: sequence_logprobs validates logits and labels in full, and a second
        # label-range check here would cost a second device sync per step on CUDA.
        check_ndim(logits, 3, "logits", "[R, T, V]")
        if logits.shape[0] == 0 or logits.shape[0] % 2:
            raise ValueError(f"the batch needs an even, non-zero number of rows (B chosen then B rejected), got "
                             f"{logits.shape[0]}")
        B = logits.shape[0] // 2
        # Settings and references before the pass over the logits (the settings' check is cached, and the attributes
        # may have changed since __init__ checked them).
        op_constants(self.loss_type, self.beta, self.label_smoothing, True, True, self.loss_params)
        check_average(self.average)
        check_reference_logps(ref_chosen_logps, ref_rejected_logps, B, logits.device, "logits")
        logps = sequence_logprobs(logits, labels, ignore_index=self.ignore_index, shift=self.shift,
                                  average=self.average)
        counts = scored_counts(labels, self.ignore_index, self.shift)
        out = dpo_loss(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps, beta=self.beta,
                       loss_type=self.loss_type, label_smoothing=self.label_smoothing, chosen_lengths=counts[:B],
                       rejected_lengths=counts[B:], average=self.average, **self.loss_params)
        ref_c = None if ref_chosen_logps is None else ref_chosen_logps.detach()
        ref_r = None if ref_rejected_logps is None else ref_rejected_logps.detach()
        return DPOOutput(out.loss, logps[:B].detach(), logps[B:].detach(), out.chosen_rewards.detach(),
                         out.rejected_rewards.detach(), out.reward_accuracy.detach(), out.reward_margin.detach(),
                         out.losses.detach(), ref_c, ref_r, counts[:B], counts[B:])


class FusedLinearDPOLoss(nn.Module):
    """DPO from the policy's last hidden states and lm_head, never materializing the `[2B, T, V]` logits.

    `forward(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None, ref_rejected_logps=None,
    ref_hidden=None, ref_weight=None, ref_bias=None) -> DPOOutput`, shapes as `fused_linear_dpo`:
    hidden `[2B, T, H]` (or packed `[N, H]` with `cu_seqlens [2B + 1]`), weight `[V, H]`, labels `[2B, T]`
    (or `[N]`). The gradients w.r.t. hidden, weight and bias are formed during the forward (6NHV FLOPs) and
    only scaled in the backward, so call `backward` once per forward.

    memory_budget: None (a 2 GiB `[C, V]` logits buffer, C <= 8192 tokens), bytes for that buffer, or "low"
    (a 512 MiB buffer and recompute in the backward: least memory, 8NHV).
    token_stats: also return the policy's per-sequence entropy sums and top-1 counts (`DPOOutput` fields
    `chosen_entropy_sum` ... `rejected_top1_count`), taken from the pass that reads the logits anyway.
    parallel_options: a `ParallelOptions`, the process groups over which the head's vocabulary rows or the sequences'
    positions are split and the ranks' consistency check (see `fused_linear_dpo`); `vocab_parallel_group=` and
    `sequence_parallel_group=` are shorthands that build one. A DTensor weight sharded on dim 0 needs no group.
    `forward(..., lora=LoraHead(a, b, scaling))`: a LoRA adapter on the head (a PEFT LoRA lm_head), run inside the
    engine; `a` and `b` get their gradients (see `fused_linear_dpo`).
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX,
                 memory_budget=None, shift=True, token_stats=False, parallel_options=None, vocab_parallel_group=None,
                 sequence_parallel_group=None, **loss_params):
        super().__init__()
        self.parallel_options = options_of(parallel_options, vocab_parallel_group, sequence_parallel_group)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average, self.ignore_index, self.memory_budget = average, ignore_index, memory_budget
        self.shift, self.token_stats, self.loss_params = shift, token_stats, loss_params

    def forward(self, hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, lora=None) -> DPOOutput:
        return fused_linear_dpo(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens,
                                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, beta=self.beta,
                                loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                average=self.average, ignore_index=self.ignore_index, shift=self.shift,
                                memory_budget=self.memory_budget, token_stats=self.token_stats,
                                parallel_options=self.parallel_options, lora=lora, **self.loss_params)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, average={self.average}, "
                f"memory_budget={self.memory_budget!r}, token_stats={self.token_stats}")


class GroupDPOLoss(nn.Module):
    """Group DPO from logits: `sequence_logprobs` (one Triton read of the logits) then the fused `group_dpo_loss` op.

    `forward(logits [R, T, V], labels [R, T], group_sizes [G], scores=None, ref_logps=None) -> GroupDPOOutput`;
    R responses group by group (one row each), logits in float32/bfloat16/float16, `scores [R]` higher is better
    (None: each group is ordered best first), `ref_logps [R]` (None: reference-free). The settings (`loss_type`,
    `beta`, `top_k`, `pair_loss`, `pair_weighting`, `sft_weight`, `label_smoothing`, `loss_params`) are
    `group_dpo_loss`'s; the lengths it reads are the numbers of scored tokens.
    """

    def __init__(self, loss_type="plackett_luce", beta=0.1, top_k=None, pair_loss="sigmoid", pair_weighting=None,
                 sft_weight=0.0, label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX, shift=True,
                 **loss_params):
        super().__init__()
        check_group_settings(loss_type, beta=beta, pair_loss=pair_loss, top_k=top_k, pair_weighting=pair_weighting,
                             sft_weight=sft_weight, label_smoothing=label_smoothing, loss_params=loss_params)
        self.loss_type, self.beta, self.top_k, self.pair_loss = loss_type, beta, top_k, pair_loss
        self.pair_weighting, self.sft_weight, self.label_smoothing = pair_weighting, sft_weight, label_smoothing
        self.average, self.ignore_index, self.shift, self.loss_params = average, ignore_index, shift, loss_params

    def forward(self, logits, labels, group_sizes, scores=None, ref_logps=None) -> GroupDPOOutput:
        # Settings, sizes and vectors before the pass over the logits (the attributes may have changed since
        # __init__ checked them); sequence_logprobs validates logits and labels in full.
        check_ndim(logits, 3, "logits", "[R, T, V]")
        check_group_settings(self.loss_type, beta=self.beta, pair_loss=self.pair_loss, top_k=self.top_k,
                             pair_weighting=self.pair_weighting, sft_weight=self.sft_weight,
                             label_smoothing=self.label_smoothing, loss_params=self.loss_params)
        check_average(self.average)
        sizes = checked_group_sizes(group_sizes, logits.shape[0], "logits")
        check_group_vectors(scores, ref_logps, logits.shape[0], logits.device, "logits")
        logps = sequence_logprobs(logits, labels, ignore_index=self.ignore_index, shift=self.shift,
                                  average=self.average)
        counts = scored_counts(labels, self.ignore_index, self.shift)
        out = group_dpo_loss(logps, ref_logps, sizes, scores, loss_type=self.loss_type, beta=self.beta,
                             top_k=self.top_k, pair_loss=self.pair_loss, pair_weighting=self.pair_weighting,
                             lengths=counts, sft_weight=self.sft_weight, label_smoothing=self.label_smoothing,
                             average=self.average, **self.loss_params)
        return GroupDPOOutput(out.loss, out.losses.detach(), logps.detach(), out.rewards.detach(),
                              out.ranking_accuracy.detach(), out.top1_accuracy.detach(), out.groups_left_out,
                              None if ref_logps is None else ref_logps.detach(), counts)


class FusedLinearGroupLoss(nn.Module):
    """Group DPO from the policy's last hidden states and lm_head, never materializing the `[R, T, V]` logits.

    `forward(hidden, weight, labels, group_sizes, scores=None, *, bias=None, cu_seqlens=None, ref_logps=None,
    ref_hidden=None, ref_weight=None, ref_bias=None, lora=None) -> GroupDPOOutput`, shapes as
    `fused_linear_group_dpo`: hidden `[R, T, H]` (or packed `[N, H]` with `cu_seqlens [R + 1]`), labels `[R, T]`
    (or `[N]`, or a `GroupBatch.attribution`), weight `[V, H]`. The gradients are formed during the forward and
    only scaled in the backward, so call `backward` once per forward. Under torch.compile the call runs eagerly
    (a graph break).

    memory_budget: None, bytes for the `[C, V]` logits buffer, or "low" (recompute in the backward), as
    `FusedLinearDPOLoss`. The other settings are `fused_linear_group_dpo`'s keyword arguments.
    """

    def __init__(self, memory_budget=None, loss_type="plackett_luce", beta=0.1, top_k=None, pair_loss="sigmoid",
                 pair_weighting=None, sft_weight=0.0, label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX,
                 shift=True, token_stats=False, parallel_options=None, **loss_params):
        super().__init__()
        check_group_settings(loss_type, beta=beta, pair_loss=pair_loss, top_k=top_k, pair_weighting=pair_weighting,
                             sft_weight=sft_weight, label_smoothing=label_smoothing, loss_params=loss_params)
        self.memory_budget, self.loss_type, self.beta, self.top_k = memory_budget, loss_type, beta, top_k
        self.pair_loss, self.pair_weighting, self.sft_weight = pair_loss, pair_weighting, sft_weight
        self.label_smoothing, self.average = label_smoothing, average
        self.ignore_index, self.shift = ignore_index, shift
        self.token_stats, self.parallel_options, self.loss_params = token_stats, parallel_options, loss_params

    def forward(self, hidden, weight, labels, group_sizes, scores=None, *, bias=None, cu_seqlens=None, ref_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None, lora=None) -> GroupDPOOutput:
        return fused_linear_group_dpo(hidden, weight, labels, group_sizes, scores, bias=bias, cu_seqlens=cu_seqlens,
                                      ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                      ref_bias=ref_bias, loss_type=self.loss_type, beta=self.beta, top_k=self.top_k,
                                      pair_loss=self.pair_loss, pair_weighting=self.pair_weighting,
                                      sft_weight=self.sft_weight, label_smoothing=self.label_smoothing,
                                      average=self.average, ignore_index=self.ignore_index, shift=self.shift,
                                      memory_budget=self.memory_budget, token_stats=self.token_stats,
                                      parallel_options=self.parallel_options, lora=lora, **self.loss_params)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, average={self.average}, "
                f"memory_budget={self.memory_budget!r}, token_stats={self.token_stats}")
