"""A group step under all_pairs is the mean over the step's kept groups (those with two different scores), however
its groups are split into micro-batches, a micro-batch that keeps none included; an evaluation's loss is the mean
over the kept groups whatever the eval batch size."""
from functools import partial

import pytest
import torch

from dpo_kernels.trainer import train
from dpo_kernels.trainer.loop import Plan
from tests.helpers import assert_within_rule
from tests.tiny_models import tiny_setup, train_config, write_jsonl
from tests.trainer.group_rows import tied_group_rows

pytestmark = pytest.mark.usefixtures("single_thread")

GROUPS, BATCH, ACCUM = 12, 2, 3  # two steps of six groups, split into three micro-batches of two
TIED = {0, 1, 2, 5, 8, 9}        # the groups whose scores all tie


def kept_per_micro_batch(seed: int) -> list[int]:
    """The kept groups of each micro-batch of the run's two steps under `seed` (the trainer's `Plan`)."""
    plan = Plan(GROUPS, BATCH, 1, ACCUM, seed)
    return [sum(i not in TIED for i in plan.indices(m, 0)) for m in range(2 * ACCUM)]


def seed_with_uneven_micro_batches() -> int:
    """A seed whose micro-batches keep 0, 1 and 2 groups, so that a mean of their means differs from the mean over
    the step's kept groups."""
    return next(s for s in range(200) if {0, 1, 2} <= set(kept_per_micro_batch(s)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    setup = tiny_setup(root, rows=4)
    setup["data"] = str(write_jsonl(root / "tied.jsonl", tied_group_rows(GROUPS, TIED)))
    return setup


def steps_of(result) -> list[dict]:
    return [r for r in result.history if "loss" in r]


def test_a_step_is_the_mean_over_its_kept_groups_however_they_are_split(tiny, tmp_path):
    seed = seed_with_uneven_micro_batches()
    run = partial(train_config, tiny, seed=seed, max_steps=2, loss_type="all_pairs", eval_data=tiny["data"])
    whole = train(run(tmp_path / "whole", batch_size=BATCH * ACCUM, eval_batch_size=GROUPS))
    split = train(run(tmp_path / "split", batch_size=BATCH, grad_accum=ACCUM, eval_batch_size=1))
    truth = train(run(tmp_path / "truth", batch_size=BATCH * ACCUM, loss_backend="reference", precision="fp64"))
    for step, (w, s, t) in enumerate(zip(steps_of(whole), steps_of(split), steps_of(truth), strict=True), start=1):
        assert s["groups_left_out"] == t["groups_left_out"] == sum(i in TIED for i in Plan(
            GROUPS, BATCH * ACCUM, 1, 1, seed).indices(step - 1, 0))
        for key in ("loss", "grad_norm", "rewards/ranking_accuracy", "rewards/rank_1"):
            got, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (s, t, w))
            assert_within_rule(got, want, baseline, atol=1e-5, name=f"step {step} {key}")
    # Every evaluation batch of one group that ties keeps none: it weighs nothing in the loss.
    assert split.eval_metrics["eval/groups_left_out"] == len(TIED)
    for key, value in whole.eval_metrics.items():
        assert split.eval_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_step_that_keeps_no_group_has_a_zero_loss_and_gradient(tiny, tmp_path):
    rows = [row for i, row in enumerate(tied_group_rows(GROUPS, TIED)) if i in TIED]
    data = str(write_jsonl(tmp_path / "all-tied.jsonl", rows))
    result = train(train_config(tiny, tmp_path / "out", data=data, loss_type="best_vs_worst", batch_size=1,
                                grad_accum=3, max_steps=2, eval_data=data, eval_batch_size=4))
    for record in steps_of(result):
        assert (record["loss"], record["grad_norm"], record["groups_left_out"]) == (0.0, 0.0, 3)
    assert result.eval_metrics["eval/loss"] == 0.0 and result.skipped_steps == 0
