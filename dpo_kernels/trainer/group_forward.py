"""One group-DPO forward of a policy on a group batch (`trainer.group_batches`), through the three loss backends.

    fused-linear  backbone hidden states + lm_head weight -> dpo_kernels.fused_linear_group_dpo (the group loss op
                  called as groups complete, gradients formed in the forward); no [R, T, V] logits
    logits        model(...).logits -> dpo_kernels.sequence_logprobs -> dpo_kernels.group_dpo_loss
    reference     model(...).logits -> dpo_kernels.reference.sequence_logprobs -> dpo_kernels.reference.group_dpo_loss

The batch is a `GroupBatch` (the shared layout, `labels` carries it) or unshared rows `[R, T]`; either way the `[R]`
log-probs come group by group. Autocast and the DDP/FSDP wrapping are `trainer.forward.DPOForward`'s.

`PromptGroupDPOForward` (`--group-by-prompt`) runs the same per-response log-probs and applies the pairwise loss to
the pairs given, gathered from them (fused-linear: `dpo_kernels.fused_linear_dpo_by_prompt`): the loss of the pairs
as unshared rows, with one prompt forward per group.
"""
from __future__ import annotations

import torch

import dpo_kernels
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.plan import scored_counts
from dpo_kernels.loss_op.group_spec import GroupDPOLossOutput
from dpo_kernels.outputs import DPOOutput, GroupDPOOutput
from dpo_kernels.shared_prompt.batch import SharedBatch
from dpo_kernels.trainer.forward import PolicyForward, _logits
from dpo_kernels.trainer.group_batches import GroupInfo, PairIndex


def response_lengths(labels) -> torch.Tensor:
    """`[R]` int64 scored tokens per response of a group batch or of unshared rows (HuggingFace shift)."""
    if isinstance(labels, SharedBatch):
        return labels.counts
    return scored_counts(labels, IGNORE_INDEX, shift=True)


class GroupDPOForward(PolicyForward):
    """Wraps a causal LM; `forward(batch tensors, ref log-probs [R], GroupInfo)` returns the group loss and its
    metrics (`GroupDPOLossOutput`)."""

    def response_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """`[R]` fp32 log-probs of the batch's responses, group by group, through the backend's op
        (differentiable)."""
        if self.backend == "fused-linear":
            return self.on_fused_head(dpo_kernels.linear_sequence_logprobs, input_ids, attention_mask, labels)
        logits, labels = _logits(self.model, input_ids, attention_mask, labels, self.autocast_dtype)
        logps_fn = dpo_kernels.sequence_logprobs if self.backend == "logits" else \
            dpo_kernels.reference.sequence_logprobs
        return logps_fn(logits, labels)

    def forward(self, input_ids, attention_mask, labels, ref_logps, group: GroupInfo) \
            -> GroupDPOOutput | GroupDPOLossOutput:
        """The loss of the batch (`[R, T]` rows, or a `GroupBatch` as `labels` with its `input_ids` and no
        attention_mask); only `loss` carries gradient."""
        if self.backend == "fused-linear":
            return self.on_fused_head(dpo_kernels.fused_linear_group_dpo, input_ids, attention_mask, labels,
                                      group.sizes, group.scores, ref_logps=ref_logps, **self.loss_kwargs)
        lengths = response_lengths(labels)
        logps = self.response_logps(input_ids, attention_mask, labels)
        loss_fn = dpo_kernels.group_dpo_loss if self.backend == "logits" else dpo_kernels.reference.group_dpo_loss
        return loss_fn(logps, ref_logps, group.sizes, group.scores, lengths=lengths, **self.loss_kwargs)


class PromptGroupDPOForward(GroupDPOForward):
    """Wraps a causal LM for `--group-by-prompt` batches; `forward(batch tensors, ref log-probs [R], PairIndex)`
    returns the pairwise loss of the batch's pairs (`DPOOutput`, as `trainer.forward.DPOForward`)."""

    def forward(self, input_ids, attention_mask, labels, ref_logps, pairs: PairIndex) -> DPOOutput:
        """The pairwise loss of `pairs` (`[P]` chosen and rejected indices into the `[R]` log-probs)."""
        if self.backend == "fused-linear":
            return self.on_fused_head(dpo_kernels.fused_linear_dpo_by_prompt, input_ids, attention_mask, labels,
                                      pairs.sizes, pairs.pairs, ref_logps=ref_logps, **self.loss_kwargs)
        lengths = response_lengths(labels)
        logps = self.response_logps(input_ids, attention_mask, labels)
        c, r = pairs.chosen, pairs.rejected
        ref_c, ref_r = (None, None) if ref_logps is None else (ref_logps[c], ref_logps[r])
        loss_fn = dpo_kernels.reference.dpo_loss if self.backend == "reference" else dpo_kernels.dpo_loss
        out = loss_fn(logps[c], logps[r], ref_c, ref_r, chosen_lengths=lengths[c], rejected_lengths=lengths[r],
                      **self.loss_kwargs)
        metrics = logps.detach().float()
        return DPOOutput(
            loss=out.loss, chosen_logps=metrics[c], rejected_logps=metrics[r],
            chosen_rewards=out.chosen_rewards.detach(), rejected_rewards=out.rejected_rewards.detach(),
            reward_accuracy=out.reward_accuracy.detach(), reward_margin=out.reward_margin.detach(),
            losses=out.losses.detach(), ref_chosen_logps=ref_c, rejected_lengths=lengths[r],
            ref_rejected_logps=ref_r, chosen_lengths=lengths[c],
        )
