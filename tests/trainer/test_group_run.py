"""A group run's life: the precomputed reference equals the live one and is reused, resume reproduces an
uninterrupted run, evaluation and the plot, the unshared fallback with one warning, reference-free pair losses."""
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.hf import shared_prompt as shared_hf
from dpo_kernels.trainer import group_forward, train
from dpo_kernels.trainer import loop as trainer
from dpo_kernels.trainer.metrics_log import step_line
from tests.helpers import assert_within_rule
from tests.tiny_models import tiny_setup, train_config, write_jsonl
from tests.trainer.group_rows import group_rows

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    setup = tiny_setup(root, rows=4)
    setup["data"] = str(write_jsonl(root / "groups.jsonl", group_rows(12)))
    setup["eval"] = str(write_jsonl(root / "eval.jsonl", group_rows(5, seed=7, sizes=(3, 6))))
    return setup


config = partial(train_config, loss_type="plackett_luce", max_steps=2)


def steps(result) -> list[dict]:
    return [r for r in result.history if "loss" in r]


@pytest.mark.parametrize("backend", ["fused-linear", "logits"])
def test_precomputed_reference_equals_the_live_one_and_is_reused(tiny, tmp_path, monkeypatch, backend):
    kw = {"loss_backend": backend, "loss_type": "all_pairs", "pair_loss": "sigmoid", "max_steps": 3}
    live = steps(train(config(tiny, tmp_path / "live", **kw)))
    cache = tmp_path / "cache"
    first = steps(train(config(tiny, tmp_path / "pre1", precompute_ref=True, ref_cache_dir=str(cache), **kw)))
    # The first step is the same computation; later steps see the same reference log-probs.
    for a, b in zip(live, first, strict=True):
        for key in ("loss", "grad_norm", "rewards/rank_1"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (key, a[key], b[key])
    assert first[0]["loss"] == live[0]["loss"]
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and load_file(str(files[0]))["logps"].numel() == 42  # sum of K over 12 groups

    def no_model(*args, **kwargs):
        raise AssertionError("the reference model was loaded although its log-probs are cached")

    monkeypatch.setattr(trainer.Reference, "_load", no_model)
    second = steps(train(config(tiny, tmp_path / "pre2", precompute_ref=True, ref_cache_dir=str(cache), **kw)))
    assert [r["loss"] for r in second] == [r["loss"] for r in first]


def test_resume_reproduces_an_uninterrupted_group_run(tiny, tmp_path):
    kw = dict(max_steps=4, grad_accum=2, batch_size=1, lr_scheduler="linear", warmup_steps=1, sft_weight=0.3)
    full = train(config(tiny, tmp_path / "full", **kw))
    first = train(config(tiny, tmp_path / "split", stop_after_steps=2, **kw))
    second = train(config(tiny, tmp_path / "split", resume="latest", **kw))
    assert second.global_step == 4
    # Every metric but the timing, bit for bit.
    untimed = (lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rs])  # noqa: E731
    assert untimed(steps(first) + steps(second)) == untimed(steps(full))
    a = load_file(str(Path(full.final_checkpoint) / "model.safetensors"))
    b = load_file(str(Path(second.final_checkpoint) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", ["fused-linear", "logits"])
def test_packed_groups_train_as_one_group_per_row(tiny, tmp_path, backend):
    """`--packing` puts several groups in a row under the cap (100 tokens; the groups hold 25 to 59) and a group
    longer than the cap in a row of its own (40): the numbers of one group per row, within the accuracy rule of a
    float64 run, on fewer backbone positions where groups share rows."""
    kw = dict(batch_size=4, max_steps=2, loss_type="all_pairs", pair_loss="ipo")
    truth = steps(train(config(tiny, tmp_path / "truth", loss_backend="reference", precision="fp64", **kw)))
    rows = steps(train(config(tiny, tmp_path / "rows", loss_backend=backend, **kw)))
    for cap in (100, 40):
        packed = steps(train(config(tiny, tmp_path / f"packed{cap}", loss_backend=backend, packing=True,
                                    max_row_tokens=cap, **kw)))
        for t, a, b in zip(truth, rows, packed, strict=True):
            for key in ("loss", "grad_norm", "rewards/ranking_accuracy", "rewards/rank_1"):
                got, want, baseline = (torch.tensor(r[key], dtype=torch.float64) for r in (b, t, a))
                assert_within_rule(got, want, baseline, atol=1e-5, name=f"cap {cap} {key}")
            if cap == 100:
                assert b["tokens/backbone"] < a["tokens/backbone"]


def test_eval_metrics_plot_and_step_line(tiny, tmp_path):
    result = train(config(tiny, tmp_path / "out", eval_data=tiny["eval"], eval_every=1, plot=True))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    # Ranks up to the largest K of the train (5) and eval (6) files.
    expected = {"eval/loss", "eval/rewards/ranking_accuracy", "eval/rewards/top1_accuracy",
                "eval/rewards/kendall_tau", "eval/groups_left_out"} | {f"eval/rewards/rank_{k}" for k in range(1, 7)}
    assert expected <= set(evals[-1]) and result.eval_metrics == {k: v for k, v in evals[-1].items() if k != "step"}
    assert all(math.isfinite(evals[-1][k]) for k in expected)
    train_record = steps(result)[-1]
    assert "rewards/rank_6" in train_record and train_record["groups_left_out"] == 0
    line = step_line(train_record, 2)
    assert "rank acc" in line and "tau" in line and "margin" not in line
    assert Path(result.plot_path).stat().st_size > 0


def test_all_pairs_counts_groups_with_every_score_tied(tiny, tmp_path):
    tied = [{"prompt": "what is the color of the sky ?", "responses": [" blue .", " red ."], "scores": [1, 1]}] * 4
    data = write_jsonl(tmp_path / "tied.jsonl", tied)
    record = steps(train(config(tiny, tmp_path / "out", data=str(data), loss_type="all_pairs", max_steps=1)))[0]
    assert record["groups_left_out"] == 2 and record["loss"] == 0.0


def test_a_model_without_the_shared_layout_trains_groups_on_unshared_rows_with_one_warning(tiny, tmp_path,
                                                                                              monkeypatch):
    shared = steps(train(config(tiny, tmp_path / "shared", max_steps=1)))[0]
    monkeypatch.delitem(shared_hf.SUPPORTED_MODELS, "LlamaForCausalLM")
    with pytest.warns(UserWarning, match="LlamaForCausalLM is not verified.*Training on unshared rows") as caught:
        fallback = steps(train(config(tiny, tmp_path / "fallback", max_steps=1)))[0]
    assert sum("Training on unshared rows" in str(w.message) for w in caught) == 1
    assert fallback["tokens/backbone"] > shared["tokens/backbone"]
    assert math.isclose(fallback["loss"], shared["loss"], rel_tol=1e-5)


def test_a_reference_free_pair_loss_loads_no_reference(tiny, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a reference model was loaded for a reference-free loss")

    monkeypatch.setattr(trainer.Reference, "_load", no_model)
    record = steps(train(config(tiny, tmp_path / "simpo", loss_type="best_vs_worst", pair_loss="simpo", gamma=0.5,
                                max_steps=1)))[0]
    # Reference-free rewards are beta * the policy's log-probs: negative from the first step.
    assert math.isfinite(record["loss"]) and record["rewards/rank_1"] < 0


@pytest.mark.parametrize("backend", ["fused-linear", "logits"])
def test_compiled_group_step_matches_the_float64_reference(tiny, tmp_path, monkeypatch, backend):
    """`--compile` on a group run: the policy compiles (the fused group call runs eagerly behind a graph break) and
    the first step stays within the accuracy rule of float64, as the eager run does. "aot_eager", as
    test_compile_flag.py compiles."""
    compiled = []
    original = group_forward.GroupDPOForward.compile

    def record(self):
        compiled.append(self)
        return original(self, backend="aot_eager")

    monkeypatch.setattr(group_forward.GroupDPOForward, "compile", record, raising=False)
    kw = dict(max_steps=1, loss_type="all_pairs", pair_loss="sigmoid")
    settings = {"compiled": {"compile": True, "precision": "fp32", "loss_backend": backend},
                "truth": {"loss_backend": "reference", "precision": "fp64"},
                "baseline": {"loss_backend": "reference", "precision": "fp32"}}
    runs = {name: steps(train(config(tiny, tmp_path / name, **kw, **extra)))[0] for name, extra in settings.items()}
    assert len(compiled) == 1
    for key in ("loss", "rewards/rank_1", "rewards/rank_2", "grad_norm"):
        got, truth, base = (torch.tensor(runs[n][key], dtype=torch.float64) for n in ("compiled", "truth", "baseline"))
        assert_within_rule(got, truth, base, atol=1e-5, name=f"compiled {key}")
