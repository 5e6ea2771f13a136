"""The group run's metrics: Kendall's tau-b against a brute-force count in float64, the mean reward by rank, and
records that stay exact when batches of different sizes are combined."""
import itertools
import math
import random

import pytest
import torch

import dpo_kernels
from dpo_kernels.loss_op.group_spec import GroupDPOLossOutput
from dpo_kernels.trainer.group_batches import GroupInfo
from dpo_kernels.trainer.group_metrics import GroupMetrics, kendall_tau_b, rank_order


def brute_force_tau_b(r: list[float], s: list[float]) -> float | None:
    """tau_b = (concordant - discordant) / sqrt((n0 - n1)(n0 - n2)), counted pair by pair."""
    concordant = discordant = tied_r = tied_s = 0
    for i, j in itertools.combinations(range(len(r)), 2):
        if r[i] == r[j]:
            tied_r += 1
        if s[i] == s[j]:
            tied_s += 1
        if r[i] != r[j] and s[i] != s[j]:
            if (r[i] > r[j]) == (s[i] > s[j]):
                concordant += 1
            else:
                discordant += 1
    n0 = len(r) * (len(r) - 1) // 2
    if (n0 - tied_r) * (n0 - tied_s) == 0:
        return None
    return (concordant - discordant) / math.sqrt((n0 - tied_r) * (n0 - tied_s))


@pytest.mark.parametrize("seed", range(40))
def test_kendall_tau_b_equals_a_brute_force_count(seed):
    rng = random.Random(seed)
    k = rng.randint(2, 16)
    # Few distinct values so that ties in both occur.
    r = [rng.choice([-0.5, 0.0, 0.25, 1.0, rng.random()]) for _ in range(k)]
    s = [float(rng.randint(0, 3)) for _ in range(k)]
    got = kendall_tau_b(torch.tensor(r, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    want = brute_force_tau_b(r, s)
    assert (got is None) == (want is None), (got, want)
    if want is not None:
        assert got == pytest.approx(want, rel=1e-15, abs=1e-15)


def test_kendall_tau_b_extremes():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert kendall_tau_b(torch.tensor([4.0, 3.0, 2.0, 1.0]), s) == 1.0
    assert kendall_tau_b(torch.tensor([1.0, 2.0, 3.0, 4.0]), s) == -1.0
    assert kendall_tau_b(torch.zeros(4), s) is None  # the first step of a run: every reward 0
    assert kendall_tau_b(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) is None


def test_rank_order_is_by_descending_score_ties_in_given_order():
    assert rank_order(torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0])).tolist() == [1, 3, 4, 0, 2]


def fake_output(rewards, sizes, left_out=0, ranking_accuracy=0.25, top1_accuracy=0.75):
    return GroupDPOLossOutput(torch.tensor(0.5), torch.zeros(len(sizes)), torch.tensor(rewards),
                              torch.tensor(ranking_accuracy), torch.tensor(top1_accuracy), torch.tensor(left_out))


def combined_record(metrics, batches):
    """The record of `batches` (`(rewards, sizes, scores)` each) weighted by their groups, as evaluation combines
    them; each batch's output is the group op's (reward = log-prob at beta 1, reference-free)."""
    total, groups = None, 0
    for rewards, sizes, scores in batches:
        scores = torch.tensor(scores, dtype=torch.float64)
        out = dpo_kernels.group_dpo_loss(torch.tensor(rewards), None, sizes, scores, beta=1.0)
        values = metrics.values(out, {"group": GroupInfo(sizes, scores)})
        weighted = [v * len(sizes) for v in values]
        total = weighted if total is None else [a + b for a, b in zip(total, weighted, strict=True)]
        groups += len(sizes)
    return metrics.record([v / groups for v in total], groups)


def test_accuracies_count_every_ordered_pair_however_the_groups_are_batched():
    # Group A: 1 ordered pair, ordered right, top-1 right. Group B: 6 ordered pairs, 2 ordered right (0 > 2,
    # 1 > 2), top-1 wrong. Group C: scores tied, no ordered pair.
    a = ([0.5, -0.5], (2,), [1.0, 0.0])
    b = ([0.0, 0.1, -0.2, 0.3], (4,), [3.0, 2.0, 1.0, 0.0])
    c = ([0.2, 0.1], (2,), [1.0, 1.0])
    whole = ([*a[0], *b[0], *c[0]], (2, 4, 2), [*a[2], *b[2], *c[2]])
    metrics = GroupMetrics(max_size=4)
    for batches in ([whole], [a, b, c], [a, (b[0] + c[0], (4, 2), b[2] + c[2])]):
        record = combined_record(metrics, batches)
        assert record["rewards/ranking_accuracy"] == pytest.approx(3 / 7, rel=1e-12)
        assert record["rewards/top1_accuracy"] == pytest.approx(1 / 2, rel=1e-12)
    tied = combined_record(metrics, [c])
    assert tied["rewards/ranking_accuracy"] == 0.0 and tied["rewards/top1_accuracy"] == 0.0


def test_record_is_exact_over_batches_of_different_sizes():
    # Batch 1: groups of 3 and 2; batch 2: one group of 4. Evaluation weighs each batch by its groups.
    batches = [([0.1, 0.3, 0.2, -1.0, 2.0], (3, 2), [2.0, 1.0, 0.0, 5.0, 1.0], 0),
               ([0.4, 0.0, 0.0, 0.0], (4,), [1.0, 1.0, 1.0, 1.0], 1)]
    metrics = GroupMetrics(max_size=4)
    total, groups = None, 0
    for rewards, sizes, scores, left_out in batches:
        # The accuracies as the op gives them: 2 of 4 ordered pairs, 1 of 2 top-1 in batch 1; no ordered pair in 2.
        accuracies = (0.5, 0.5) if len(sizes) == 2 else (0.0, 0.0)
        values = metrics.values(fake_output(rewards, sizes, left_out, *accuracies),
                                {"group": GroupInfo(sizes, torch.tensor(scores, dtype=torch.float64))})
        weighted = [v * len(sizes) for v in values]
        total = weighted if total is None else [a + b for a, b in zip(total, weighted, strict=True)]
        groups += len(sizes)
    record = metrics.record([v / groups for v in total], groups)
    # Group (3): rewards by rank 0.1, 0.3, 0.2; group (2): 2.0 (score 1) ranks below -1.0 (score 5); group (4):
    # scores all tied, ranks in given order, tau undefined.
    assert record["rewards/rank_1"] == pytest.approx((0.1 - 1.0 + 0.4) / 3)
    assert record["rewards/rank_2"] == pytest.approx((0.3 + 2.0 + 0.0) / 3)
    assert record["rewards/rank_3"] == pytest.approx((0.2 + 0.0) / 2)
    assert record["rewards/rank_4"] == pytest.approx(0.0)
    assert record["rewards/kendall_tau"] == pytest.approx((brute_force_tau_b([0.1, 0.3, 0.2], [2, 1, 0]) - 1.0) / 2)
    assert record["groups_left_out"] == 1
    assert record["loss"] == pytest.approx(0.5)
    assert record["rewards/ranking_accuracy"] == 0.5 and record["rewards/top1_accuracy"] == 0.5


def test_a_rank_no_group_has_and_an_undefined_tau_are_nan():
    metrics = GroupMetrics(max_size=5)
    values = metrics.values(fake_output([0.0, 0.0], (2,)),
                            {"group": GroupInfo((2,), torch.tensor([1.0, 0.0], dtype=torch.float64))})
    record = metrics.record(values, 1)
    assert math.isnan(record["rewards/kendall_tau"]) and math.isnan(record["rewards/rank_5"])
    assert record["rewards/rank_1"] == 0.0
