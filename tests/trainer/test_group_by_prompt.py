"""`--group-by-prompt`: pair rows that share a prompt run as one group (each distinct response once); the loss is
the pairwise loss of the same pairs, so one step over the whole data equals the unshared pairs' step within the
accuracy rule, on fewer backbone tokens."""
from functools import partial
from pathlib import Path

import pytest
import torch

from dpo_kernels.trainer import train
from dpo_kernels.trainer.data import load_preference_data
from dpo_kernels.trainer.errors import UserInputError
from dpo_kernels.trainer.group_data import group_by_prompt
from tests.helpers import assert_within_rule
from tests.tiny_models import build_tokenizer, preference_rows, tiny_setup, train_config, write_jsonl
from tests.trainer.group_rows import COLORS, group_rows, repeated_prompt_rows

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = 6  # 1 + 2 + 3 + 4 + 1 + 2 = 13 pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    setup = tiny_setup(root, rows=4)
    setup["data"] = str(write_jsonl(root / "pairs.jsonl", repeated_prompt_rows(PROMPTS)))
    return setup


def load(path, tok):
    return load_preference_data(path, tok, max_length=32, max_prompt_length=24)


def test_pairs_sharing_a_prompt_become_one_group_with_each_response_once(tiny):
    pairs = load(tiny["data"], tiny["tokenizer"])
    groups = group_by_prompt(pairs)
    assert groups.kind == "prompt_group" and len(groups) == PROMPTS
    assert sum(len(g.pairs) for g in groups.examples) == len(pairs) == 13
    rebuilt = sorted((g.prompt_ids + g.response_ids[c], g.prompt_ids + g.response_ids[r])
                     for g in groups.examples for c, r in g.pairs)
    assert rebuilt == sorted((e.chosen_ids, e.rejected_ids) for e in pairs.examples)
    for g in groups.examples:
        assert len(set(g.response_ids)) == g.size <= 4
    # Prompts in the order of their first pair.
    firsts = list(dict.fromkeys(e.chosen_ids[:e.prompt_len] for e in pairs.examples))
    assert [g.prompt_ids for g in groups.examples] == firsts


def test_a_prompt_with_more_than_sixteen_responses_makes_several_groups(tmp_path):
    tok = build_tokenizer()
    words = [f" the sky is {a} and {b} ." for a in COLORS for b in COLORS]  # 36 distinct responses
    rows = [{"prompt": "what is the color of the sky ?", "chosen": words[i], "rejected": words[i + 1]}
            for i in range(0, 24, 2)]  # 12 pairs, 24 distinct responses
    groups = group_by_prompt(load(write_jsonl(tmp_path / "many.jsonl", rows), tok))
    assert [g.size for g in groups.examples] == [16, 8]
    assert [len(g.pairs) for g in groups.examples] == [8, 4]


@pytest.mark.parametrize("packing", [{}, {"packing": True, "max_row_tokens": 40}], ids=["rows", "packed"])
@pytest.mark.parametrize("backend", ["fused-linear", "logits"])
@pytest.mark.parametrize("loss", [{"loss_type": "sigmoid,sft", "loss_weights": [1.0, 0.5]}, {"loss_type": "ipo"}])
def test_one_step_over_all_pairs_equals_the_unshared_pairs(tiny, tmp_path, backend, loss, packing):
    run = partial(train_config, tiny, max_steps=1, **loss)
    truth = train(run(tmp_path / "truth", batch_size=13, loss_backend="reference", precision="fp64")).history[0]
    base = train(run(tmp_path / "base", batch_size=13, loss_backend="reference")).history[0]
    grouped = train(run(tmp_path / "grouped", batch_size=PROMPTS, loss_backend=backend, group_by_prompt=True,
                        **packing)).history[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "grad_norm"):
        got, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (grouped, truth, base))
        assert_within_rule(got, want, baseline, atol=1e-5, name=f"{backend} {key}")
    assert grouped["tokens/backbone"] < truth["tokens/backbone"] / 2


@pytest.mark.parametrize("backend", ["fused-linear", "logits"])
def test_pairs_whose_chosen_and_rejected_are_the_same_text(tiny, tmp_path, backend):
    # Prompt 0: only such pairs (its group holds the response and a copy); prompt 1: one beside distinct pairs.
    prompts = [r["prompt"] for r in preference_rows(2, seed=9)]
    same, other = " the thing is blue .", " the thing is red ."
    rows = [{"prompt": prompts[0], "chosen": same, "rejected": same}] * 2 + [
        {"prompt": prompts[1], "chosen": same, "rejected": same},
        {"prompt": prompts[1], "chosen": same, "rejected": other},
        {"prompt": prompts[1], "chosen": other, "rejected": same}]
    data = str(write_jsonl(tmp_path / "same.jsonl", rows))
    groups = group_by_prompt(load(data, tiny["tokenizer"]))
    assert [(g.size, g.pairs) for g in groups.examples] == [(2, ((0, 1), (0, 1))), (2, ((0, 0), (0, 1), (1, 0)))]
    run = partial(train_config, tiny, data=data, max_steps=2, loss_type="sigmoid,sft", loss_weights=[1.0, 0.5])
    truth = train(run(tmp_path / "truth", batch_size=5, loss_backend="reference", precision="fp64")).history
    base = train(run(tmp_path / "base", batch_size=5, loss_backend="reference")).history
    grouped = train(run(tmp_path / "grouped", batch_size=2, loss_backend=backend, group_by_prompt=True)).history
    for step, (g, t, b) in enumerate(zip(grouped, truth, base, strict=True), start=1):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            got, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (g, t, b))
            assert_within_rule(got, want, baseline, atol=1e-5, name=f"{backend} step {step} {key}")


def test_a_step_is_the_mean_over_its_pairs_however_its_prompts_are_split(tiny, tmp_path):
    # Prompts hold 1 to 4 pairs, so the micro-batches of a step, and the evaluation batches, hold different numbers
    # of pairs: each must count as its pairs, as one micro-batch of all the step's prompts does.
    run = partial(train_config, tiny, max_steps=2, group_by_prompt=True, eval_data=tiny["data"])
    whole = train(run(tmp_path / "whole", batch_size=PROMPTS // 2, eval_batch_size=PROMPTS))
    split = train(run(tmp_path / "split", batch_size=1, grad_accum=PROMPTS // 2, eval_batch_size=1))
    truth = train(run(tmp_path / "truth", batch_size=PROMPTS // 2, loss_backend="reference", precision="fp64"))
    for step, (w, s, t) in enumerate(zip(steps_of(whole), steps_of(split), steps_of(truth), strict=True), start=1):
        for key in ("loss", "grad_norm", "rewards/accuracies", "logps/chosen"):
            got, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (s, t, w))
            assert_within_rule(got, want, baseline, atol=1e-5, name=f"step {step} {key}")
    for key, value in whole.eval_metrics.items():
        assert split.eval_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def steps_of(result) -> list[dict]:
    return [r for r in result.history if "loss" in r]


def test_group_by_prompt_trains_resumes_and_evaluates(tiny, tmp_path):
    kw = dict(batch_size=2, max_steps=3, group_by_prompt=True, eval_data=tiny["data"], precompute_ref=True,
              ref_cache_dir=str(tmp_path / "cache"))
    full = train(train_config(tiny, tmp_path / "full", **kw))
    train(train_config(tiny, tmp_path / "split", stop_after_steps=1, **kw))
    second = train(train_config(tiny, tmp_path / "split", resume="latest", **kw))
    losses = [r["loss"] for r in full.history if "loss" in r]
    assert len(losses) == 3 and [r["loss"] for r in second.history if "loss" in r] == losses[1:]
    assert {"eval/loss", "eval/rewards/accuracies"} <= set(full.eval_metrics)
    # The eval file is the train file: one table serves both.
    assert len(list(Path(tmp_path / "cache").glob("*.safetensors"))) == 1


def test_too_few_prompts_for_a_step_are_counted_as_prompts(tiny, tmp_path):
    with pytest.raises(UserInputError, match=f"has {PROMPTS} usable prompts"):
        train(train_config(tiny, tmp_path / "out", batch_size=13, group_by_prompt=True))


def test_group_by_prompt_needs_pair_rows_and_a_pairwise_loss(tiny, tmp_path):
    with pytest.raises(UserInputError, match="group_by_prompt groups pair rows for a pairwise loss"):
        train(train_config(tiny, tmp_path / "a", group_by_prompt=True, loss_type="plackett_luce"))
    data = write_jsonl(tmp_path / "groups.jsonl", group_rows(4))
    with pytest.raises(UserInputError, match="--loss-type all_pairs --pair-loss sigmoid"):
        train(train_config(tiny, tmp_path / "b", data=str(data), group_by_prompt=True))
