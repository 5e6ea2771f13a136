"""The result types of the DPO modules and fused calls: `DPOOutput` for pairs (`DPOLoss`, `FusedLinearDPOLoss`,
`fused_linear_dpo`), `GroupDPOOutput` for groups of K ranked responses (`GroupDPOLoss`, `FusedLinearGroupLoss`,
`fused_linear_group_dpo`)."""
from typing import NamedTuple

import torch


class DPOOutput(NamedTuple):
    """One DPO step's loss and metrics. Only `loss` carries gradient; every other field is detached.

    loss:               `[]` float32, the DPO loss (mean over pairs of the per-pair losses).
    chosen_logps:       `[B]` float32 policy log-probs of the chosen responses (sums, or means with `average`).
    rejected_logps:     `[B]` float32, the same for the rejected responses.
    chosen_rewards:     `[B]` `beta * (chosen_logps - ref_chosen_logps)` (ref 0 when reference-free).
    rejected_rewards:   `[B]` `beta * (rejected_logps - ref_rejected_logps)`.
    reward_accuracy:    `[]` fraction of pairs with `chosen_rewards > rejected_rewards`.
    reward_margin:      `[]` mean of `chosen_rewards - rejected_rewards`.
    losses:             `[B]` per-pair losses whose mean is `loss`.
    ref_chosen_logps:   `[B]` float32 reference log-probs used, or None when reference-free.
    ref_rejected_logps: `[B]` or None, likewise.
    chosen_lengths:     `[B]` int64 number of scored (valid-label) tokens of each chosen response.
    rejected_lengths:   `[B]` int64, likewise for the rejected responses.

    Filled only on request (`token_stats=True` of `fused_linear_dpo` / `FusedLinearDPOLoss`), else None:
    chosen_entropy_sum:   `[B]` float32, over each chosen response's scored tokens, the sum of the entropy (nats)
                          of the policy's next-token distribution softmax(logits).
    rejected_entropy_sum: `[B]` float32, likewise for the rejected responses.
    chosen_top1_count:    `[B]` int64 number of scored tokens whose label is the logits' first argmax (a tie with
                          an earlier vocabulary entry is not a hit, as `torch.argmax` and TRL count).
    rejected_top1_count:  `[B]` int64, likewise for the rejected responses.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    losses: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_entropy_sum: torch.Tensor | None = None
    rejected_entropy_sum: torch.Tensor | None = None
    chosen_top1_count: torch.Tensor | None = None
    rejected_top1_count: torch.Tensor | None = None



class GroupDPOOutput(NamedTuple):
    """One group DPO step's loss and metrics (G groups, R responses in all, group by group). Only `loss` carries
    gradient; every other field is detached. The loss and metrics are `group_dpo_loss`'s (its conventions).

    loss:             `[]` float32, the mean of `losses` over the groups kept (0 when none is).
    losses:           `[G]` float32, each group's loss; 0 for a group left out.
    logps:            `[R]` float32 policy log-probs of the responses (sums, or means with `average`).
    rewards:          `[R]` float32 `beta * (logps - ref_logps)` (ref 0 when reference-free).
    ranking_accuracy: `[]` over the batch's ordered pairs (a strictly higher score), the fraction whose rewards are
                      ordered the same way.
    top1_accuracy:    `[]` over the groups with an ordered pair, the fraction whose best-scored responses hold the
                      highest reward.
    groups_left_out:  `[]` int64, the groups left out of the mean (all_pairs or best_vs_worst, every score tied).
    ref_logps:        `[R]` reference log-probs used (as given, or float32 from `ref_hidden`), or None when
                      reference-free.
    lengths:          `[R]` int64 number of scored (valid-label) tokens of each response.

    Filled only on request (`token_stats=True` of `fused_linear_group_dpo` / `FusedLinearGroupLoss`), else None:
    entropy_sum:      `[R]` float32, over each response's scored tokens, the sum of the entropy (nats) of the
                      policy's next-token distribution.
    top1_count:       `[R]` int64 number of scored tokens whose label is the logits' first argmax.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    logps: torch.Tensor
    rewards: torch.Tensor
    ranking_accuracy: torch.Tensor
    top1_accuracy: torch.Tensor
    groups_left_out: torch.Tensor
    ref_logps: torch.Tensor | None
    lengths: torch.Tensor
    entropy_sum: torch.Tensor | None = None
    top1_count: torch.Tensor | None = None
