"""The metrics of a group run, as `metrics.jsonl` records them (train, and `eval/` ones).

    loss                       the group loss: the mean over the step's (or the evaluation's) kept groups, every
                               group for plackett_luce, those with two different scores for all_pairs and
                               best_vs_worst, however they are batched (0 when none is kept)
    rewards/ranking_accuracy   over the ordered pairs (a strictly higher score), the fraction whose rewards are
                               ordered the same way (`GroupDPOLossOutput.ranking_accuracy`); 0 without any
    rewards/top1_accuracy      over the groups with an ordered pair, the fraction whose best-scored responses
                               out-reward every other (`GroupDPOLossOutput.top1_accuracy`); 0 without any
    rewards/kendall_tau        Kendall's tau-b between rewards and scores, averaged over the groups where it is
                               defined (see `kendall_tau_b`); null when it is defined for none
    rewards/rank_k             the mean reward of the rank-k response (rank 1 the best score; ties keep their given
                               order, as the loss orders them), over the groups that have a k-th response
    groups_left_out            groups left out of the loss mean (every score tied under all_pairs/best_vs_worst)

A batch's values are the loss, the mean over the batch's kept groups, which the trainer weighs by those groups
(`trainer.loop.loss_items`), and sums and counts divided by the batch's groups, so that averaging them over
equal-size batches, or weighting them by each batch's groups, keeps every `sum / count` exact. The two accuracies
are such ratios too: batches hold different numbers of ordered pairs (and of groups with one), so a mean of the
batches' fractions would depend on how the groups are batched (eval_batch_size, processes, grad_accum).
"""
from __future__ import annotations

import math

import torch

MEAN_KEYS = ("loss",)


def kendall_tau_b(rewards: torch.Tensor, scores: torch.Tensor) -> float | None:
    """Kendall's tau-b of one group's `rewards [K]` against its `scores [K]`:

        tau_b = sum_{i<j} sign(r_i - r_j) sign(s_i - s_j) / sqrt((n0 - n_r) (n0 - n_s)),

    n0 = K (K - 1) / 2 the pairs, n_r and n_s the pairs tied in rewards and in scores. +1 when the rewards order the
    responses as the scores do, -1 when reversed. None when a factor of the denominator is 0 (all rewards tied, as
    at the first step with a live reference, or all scores tied): no order to compare.
    """
    dr, ds = _pair_signs(rewards), _pair_signs(scores)
    n0 = dr.numel()
    denominator = (n0 - int((dr == 0).sum())) * (n0 - int((ds == 0).sum()))
    if denominator == 0:
        return None
    return float((dr * ds).sum()) / math.sqrt(denominator)


def _pair_signs(values: torch.Tensor) -> torch.Tensor:
    """`[K (K - 1) / 2]` float64: sign(v_i - v_j) over the pairs i < j of one group's `values [K]`."""
    v = values.double()
    upper = torch.triu(torch.ones(v.numel(), v.numel(), dtype=torch.bool), diagonal=1)
    return torch.sign(v[:, None] - v[None, :])[upper]


def ordered_pairs(scores: torch.Tensor) -> int:
    """The ordered pairs of one group's `scores [K]`: the pairs of responses whose scores differ."""
    return int((_pair_signs(scores) != 0).sum())


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """The indices of one group's responses best first: descending score, ties in their given order."""
    return torch.sort(-scores.double(), stable=True).indices


class GroupMetrics:
    """Turns group forwards into metric values and the values into a record; `max_size` is the largest K of the
    run's data (one `rewards/rank_k` key per rank up to it)."""

    loss_means = len(MEAN_KEYS)  # the leading values that are means over the loss's kept groups

    def __init__(self, max_size: int):
        self.max_size = max_size

    def values(self, out, batch: dict) -> list[float]:
        """One forward's values (`out` a `GroupDPOLossOutput` of `batch`, a `collate_groups` dict): the MEAN_KEYS,
        then per group: left-out groups, correctly ordered pairs and ordered pairs, top-1 hits and groups with an
        ordered pair, tau's sum and count, each rank's reward sum and count."""
        group = batch["group"]
        scalars = [out.loss.detach(), out.ranking_accuracy, out.top1_accuracy]
        loss, ranking, top1 = torch.stack(scalars).double().tolist()
        rewards, scores = out.rewards.detach().double().cpu(), group.scores.double().cpu()
        pairs = ranked = 0
        taus, rank_sums, rank_counts = [], [0.0] * self.max_size, [0.0] * self.max_size
        for r, s in zip(rewards.split(group.sizes), scores.split(group.sizes), strict=True):
            pairs += ordered_pairs(s)
            ranked += int(bool((s != s[0]).any()))
            tau = kendall_tau_b(r, s)
            if tau is not None:
                taus.append(tau)
            for k, i in enumerate(rank_order(s).tolist()):
                rank_sums[k] += float(r[i])
                rank_counts[k] += 1.0
        # The op's fractions over this batch, back to the whole numbers they divide.
        counts = [round(ranking * pairs), pairs, round(top1 * ranked), ranked]
        per_group = [float(out.groups_left_out), *map(float, counts), math.fsum(taus), float(len(taus)), *rank_sums,
                     *rank_counts]
        return [loss] + [v / len(group.sizes) for v in per_group]

    def record(self, values: list[float], groups: int) -> dict:
        """The record of `values` (means of `values()` lists over batches of equal size, or weighted by their
        groups) that cover `groups` groups in all."""
        means, per_group = values[:len(MEAN_KEYS)], values[len(MEAN_KEYS):]
        left_out, correct, pairs, hits, ranked, tau_sum, tau_count = per_group[:7]
        rank_sums, rank_counts = per_group[7:7 + self.max_size], per_group[7 + self.max_size:]
        ratio = (lambda a, b, empty=float("nan"): a / b if b > 0 else empty)  # noqa: E731
        return {**dict(zip(MEAN_KEYS, means, strict=True)),
                "rewards/ranking_accuracy": ratio(correct, pairs, 0.0),
                "rewards/top1_accuracy": ratio(hits, ranked, 0.0),
                "rewards/kendall_tau": ratio(tau_sum, tau_count),
                **{f"rewards/rank_{k + 1}": ratio(s, n) for k, (s, n) in enumerate(zip(rank_sums, rank_counts,
                                                                                       strict=True))},
                "groups_left_out": round(left_out * groups)}
