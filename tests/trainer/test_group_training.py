"""Group runs against pair runs and against float64: a file of K = 2 groups trains exactly like the same pairs
(plackett_luce as sigmoid, all_pairs with X as X: the same bits where the layout and the arithmetic are the same,
else within the accuracy rule), and a mixed-K file trains on every backend within the rule of a float64 run."""
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.trainer import train
from dpo_kernels.trainer.data import load_preference_data
from tests.helpers import assert_within_rule
from tests.tiny_models import tiny_setup, train_config, write_jsonl
from tests.trainer.group_rows import as_ranking_rows, group_rows

pytestmark = pytest.mark.usefixtures("single_thread")

config = partial(train_config, max_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    setup = tiny_setup(root, rows=12)
    pairs = [json.loads(line) for line in Path(setup["data"]).read_text().splitlines()]
    setup["pairs_as_groups"] = str(write_jsonl(root / "k2.jsonl", as_ranking_rows(pairs)))
    setup["groups"] = str(write_jsonl(root / "groups.jsonl", group_rows(12)))
    return setup


def steps(result) -> list[dict]:
    return [r for r in result.history if "loss" in r]


def weights(result) -> dict:
    return load_file(str(Path(result.final_checkpoint) / "model.safetensors"))


@pytest.mark.parametrize("pair_type, group_kw", [
    ("sigmoid", {"loss_type": "plackett_luce"}),
    ("ipo", {"loss_type": "all_pairs", "pair_loss": "ipo"}),
    ("hinge", {"loss_type": "all_pairs", "pair_loss": "hinge"}),
])
def test_k2_groups_train_bit_for_bit_like_the_shared_pairs(tiny, tmp_path, pair_type, group_kw):
    # The logits backend in the shared layout: the same logits, the same log-probs, and the group op at K = 2 does
    # the pairwise op's arithmetic.
    pairs = train(config(tiny, tmp_path / "pairs", loss_backend="logits", share_prompt=True, loss_type=pair_type))
    groups = train(config(tiny, tmp_path / "groups", loss_backend="logits", data=tiny["pairs_as_groups"],
                          **group_kw))
    for p, g in zip(steps(pairs), steps(groups), strict=True):
        assert (p["loss"], p["grad_norm"], p["lr"]) == (g["loss"], g["grad_norm"], g["lr"]), (p, g)
        assert p["rewards/accuracies"] == g["rewards/ranking_accuracy"] == g["rewards/top1_accuracy"]
        assert g["rewards/rank_1"] == pytest.approx(p["rewards/chosen"], rel=1e-6, abs=1e-9)
        assert g["rewards/rank_2"] == pytest.approx(p["rewards/rejected"], rel=1e-6, abs=1e-9)
        assert p["tokens/backbone"] == g["tokens/backbone"]
    a, b = weights(pairs), weights(groups)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pair_type, group_kw", [
    ("sigmoid", {"loss_type": "plackett_luce"}),
    ("ipo", {"loss_type": "all_pairs", "pair_loss": "ipo"}),
])
def test_k2_groups_match_unshared_pairs_within_the_accuracy_rule(tiny, tmp_path, pair_type, group_kw):
    truth = steps(train(config(tiny, tmp_path / "truth", loss_backend="reference", precision="fp64",
                               loss_type=pair_type)))
    base = steps(train(config(tiny, tmp_path / "base", loss_backend="reference", loss_type=pair_type)))
    groups = steps(train(config(tiny, tmp_path / "groups", data=tiny["pairs_as_groups"], **group_kw)))
    for step, (g, t, b) in enumerate(zip(groups, truth, base, strict=True), start=1):
        for key in ("loss", "grad_norm"):
            got, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (g, t, b))
            assert_within_rule(got, want, baseline, atol=1e-5, name=f"step {step} {key}")
        assert g["rewards/ranking_accuracy"] == t["rewards/accuracies"]
        # The groups run in the shared layout: one prompt per pair.
        assert g["tokens/backbone"] < t["tokens/backbone"]


def test_mixed_k_groups_train_on_every_backend_within_the_rule_of_float64(tiny, tmp_path):
    kw = {"data": tiny["groups"], "loss_type": "plackett_luce", "batch_size": 4}
    truth = steps(train(config(tiny, tmp_path / "truth", loss_backend="reference", precision="fp64", **kw)))
    base = steps(train(config(tiny, tmp_path / "base", loss_backend="reference", **kw)))
    for backend in ("fused-linear", "logits"):
        got = steps(train(config(tiny, tmp_path / backend, loss_backend=backend, **kw)))
        for step, (g, t, b) in enumerate(zip(got, truth, base, strict=True), start=1):
            keys = ["loss", "grad_norm"] + [k for k in t if k.startswith("rewards/rank_") and t[k] is not None]
            for key in keys:
                value, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (g, t, b))
                assert_within_rule(value, want, baseline, atol=1e-5, name=f"{backend} step {step} {key}")
    assert {k for k in truth[0] if k.startswith("rewards/rank_")} == {f"rewards/rank_{k}" for k in range(1, 6)}


def test_the_shared_layout_saves_backbone_tokens(tiny, tmp_path):
    result = train(config(tiny, tmp_path / "out", data=tiny["groups"], loss_type="plackett_luce", max_steps=1))
    data = load_preference_data(tiny["groups"], tiny["tokenizer"], max_length=32, max_prompt_length=24)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(42)).tolist()[:2]
    groups = [data.examples[i] for i in order]
    shared = len(groups) * max(len(g.prompt_ids) + sum(map(len, g.response_ids)) for g in groups)
    unshared = sum(g.size for g in groups) * max(len(g.prompt_ids) + len(r) for g in groups for r in g.response_ids)
    record = steps(result)[0]
    assert record["tokens/backbone"] == shared < unshared
