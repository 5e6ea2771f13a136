"""dpo_kernels.trainer on a tiny Llama: backends agree, exact resume, atomic checkpoints, the reference cache,
metrics and plot, non-finite losses, an unwritable output dir."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.trainer import NonFiniteLossError, checkpoint, train
from dpo_kernels.trainer import forward as dpo_forward
from dpo_kernels.trainer import loop as trainer
from dpo_kernels.trainer.errors import UserInputError
from tests.helpers import assert_within_rule
from tests.tiny_models import build_llama, build_tokenizer, tiny_setup, train_config

STANDARD_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected", "grad_norm", "lr")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), rows=12)


def final_weights(result):
    return load_file(str(Path(result.final_checkpoint) / "model.safetensors"))


RUNS = [  # name, loss backend, precision, extra settings
    ("truth", "reference", "fp64", {}),
    ("baseline", "reference", "fp32", {}),
    ("fused-linear", "fused-linear", "fp32", {}),
    ("logits", "logits", "fp32", {}),
    ("fused-linear+checkpointing", "fused-linear", "fp32", {"gradient_checkpointing": True}),
    ("fused-linear-recompute", "fused-linear", "fp32", {"memory_budget": "low"}),
    ("baseline-bf16", "reference", "bf16", {}),  # CPU bf16 autocast: the eager error the bf16 runs may double
    ("fused-linear-bf16", "fused-linear", "bf16", {}),
    ("logits-bf16", "logits", "bf16", {}),
]


def test_backends_match_the_float64_reference_on_the_first_step(tiny, tmp_path):
    runs = {}
    for name, backend, precision, extra in RUNS:
        runs[name] = train(train_config(tiny, tmp_path / name, loss_backend=backend, precision=precision, max_steps=1,
                                  loss_type="sigmoid,sft", loss_weights=[1.0, 0.5], **extra)).history[0]
    for name, _, precision, _ in RUNS[2:]:
        baseline = "baseline-bf16" if precision == "bf16" else "baseline"
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            got, truth, base = (torch.tensor(runs[n][key], dtype=torch.float64) for n in (name, "truth", baseline))
            assert_within_rule(got, truth, base, atol=1e-5, name=f"{name} {key}")


def test_resume_reproduces_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(max_steps=4, grad_accum=2, batch_size=1, lr_scheduler="linear", warmup_steps=1)
    full = train(train_config(tiny, tmp_path / "full", **kw))
    first = train(train_config(tiny, tmp_path / "split", stop_after_steps=2, **kw))
    assert first.global_step == 2 and Path(first.final_checkpoint).name == "checkpoint-2"
    second = train(train_config(tiny, tmp_path / "split", resume="latest", **kw))
    assert second.global_step == 4

    losses = lambda history: [r["loss"] for r in history if "loss" in r]  # noqa: E731
    assert losses(first.history) + losses(second.history) == losses(full.history)
    lrs = [r["lr"] for r in first.history + second.history]
    assert lrs == [r["lr"] for r in full.history]
    a, b = final_weights(full), final_weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl reads as one run.
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_contents_load_without_pickle(tiny, tmp_path):
    result = train(train_config(tiny, tmp_path / "out", max_steps=1))
    ckpt = Path(result.final_checkpoint)
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pt",
            "trainer_state.json", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(ckpt / name, weights_only=True)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["total_steps"] == 1


def test_precomputed_reference_is_cached_and_reused(tiny, tmp_path, monkeypatch):
    live = train(train_config(tiny, tmp_path / "live", max_steps=1))
    cache = tmp_path / "cache"
    first = train(train_config(tiny, tmp_path / "pre1", max_steps=1, precompute_ref=True, ref_cache_dir=str(cache)))
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    # The cached log-probs are the frozen model's: same first step as the live reference.
    for key in ("loss", "rewards/margins"):
        assert math.isclose(first.history[0][key], live.history[0][key], rel_tol=1e-5, abs_tol=1e-7)

    def no_model(*args, **kwargs):
        raise AssertionError("the reference model was loaded although its log-probs are cached")

    monkeypatch.setattr(trainer.Reference, "_load", no_model)
    second = train(train_config(tiny, tmp_path / "pre2", max_steps=1, precompute_ref=True, ref_cache_dir=str(cache)))
    assert second.history[0]["loss"] == first.history[0]["loss"]
    assert list(cache.glob("*.safetensors")) == files


def test_reference_free_loss_loads_no_reference(tiny, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a reference model was loaded for a reference-free loss")

    monkeypatch.setattr(trainer.Reference, "_load", no_model)
    result = train(train_config(tiny, tmp_path / "simpo", loss_type="simpo", gamma=0.5, max_steps=1))
    r = result.history[0]
    # Reference-free rewards are beta * policy log-probs.
    assert math.isclose(r["rewards/chosen"], 0.1 * r["logps/chosen"], rel_tol=1e-5)


def test_metrics_jsonl_eval_and_plot(tiny, tmp_path):
    result = train(train_config(tiny, tmp_path / "out", max_steps=2, eval_data=tiny["data"], eval_every=1, plot=True))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert [r["step"] for r in eval_records] == [1, 2]
    for r in train_records:
        assert set(STANDARD_NAMES) <= set(r) and all(math.isfinite(r[k]) for k in STANDARD_NAMES)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert math.isclose(r["rewards/margins"], r["rewards/chosen"] - r["rewards/rejected"], abs_tol=1e-6)
    assert {"eval/" + k for k in STANDARD_NAMES[:7]} <= set(eval_records[-1])
    assert result.eval_metrics == {k: v for k, v in eval_records[-1].items() if k != "step"}
    png = Path(result.plot_path)
    assert png.name == "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _nan_on_calls(monkeypatch, bad_calls):
    real = dpo_forward.DPOForward.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and (bad_calls == "all" or calls["n"] in bad_calls):
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(dpo_forward.DPOForward, "forward", forward)


def test_non_finite_loss_skips_the_step(tiny, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {2})
    result = train(train_config(tiny, tmp_path / "out", max_steps=3))
    assert result.skipped_steps == 1 and result.global_step == 3
    assert result.history[1]["loss"] is None and result.history[1]["skipped_steps"] == 1
    assert all(math.isfinite(result.history[i]["loss"]) for i in (0, 2))
    # The skipped step changed nothing: same weights as a run that stops before it.
    monkeypatch.undo()
    one = train(train_config(tiny, tmp_path / "one", max_steps=3, stop_after_steps=1))
    two_skipped = final_weights(result)
    # After one good step and one skipped step, the third step starts from the one-step weights; compare via a
    # fresh run whose second step is skipped and which stops right after it.
    _nan_on_calls(monkeypatch, {2})
    stopped = train(train_config(tiny, tmp_path / "stopped", max_steps=3, stop_after_steps=2))
    a, b = final_weights(one), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], two_skipped[k]) for k in a)


def test_a_run_of_non_finite_losses_stops_training(tiny, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, "all")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train(train_config(tiny, tmp_path / "out", max_steps=6, max_nonfinite_steps=3))


def test_unwritable_output_dir_fails_before_loading(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the output dir was checked")

    monkeypatch.setattr(trainer, "load_model", no_load)
    with pytest.raises(ValueError, match="not writable"):
        train(train_config(tiny, blocker / "out"))


@pytest.mark.parametrize("change,message", [
    (dict(batch_size=0), "batch_size"),
    (dict(loss_type="nope"), "unknown loss_type"),
    (dict(loss_backend="cuda-magic"), "loss_backend"),
    (dict(loss_type="robust", label_smoothing=0.7), "robust"),
    (dict(batch_size=64), "fewer than one optimizer step"),
    (dict(resume="latest"), "no complete checkpoint"),
])
def test_bad_settings_raise_value_error(tiny, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train(train_config(tiny, tmp_path / "out", **change))


def test_skip_bad_rows_reports_dropped(tiny, tmp_path):
    data = tmp_path / "mixed.jsonl"
    shutil.copy(tiny["data"], data)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "what is the sky ?", "chosen": " blue ."}) + "\n")
        f.write(json.dumps({"prompt": "", "chosen": " blue .", "rejected": " red ."}) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl: line 13: "):
        train(train_config(tiny, tmp_path / "strict", data=str(data)))
    result = train(train_config(tiny, tmp_path / "skip", data=str(data), skip_bad_rows=True, max_steps=1))
    assert result.dropped_rows == 2


def test_a_step_that_leaves_non_finite_weights_stops_without_saving(tiny, tmp_path):
    # lr * weight_decay overflows float32: the first step's loss and gradients are finite, its update is not.
    with pytest.raises(NonFiniteLossError, match=r"step 1: its optimizer step left non-finite weights \(model\."):
        train(train_config(tiny, tmp_path / "out", max_steps=2, save_every=1, lr=1e30, weight_decay=1e30))
    assert checkpoint.latest_checkpoint(tmp_path / "out") is None


def test_resume_with_other_settings_warns_naming_each_and_the_value_used(tiny, tmp_path):
    kw = dict(max_steps=3, lr_scheduler="constant")
    full = train(train_config(tiny, tmp_path / "full", **kw))
    train(train_config(tiny, tmp_path / "split", stop_after_steps=1, **kw))
    with pytest.warns(UserWarning, match="differ from its run") as caught:
        second = train(train_config(tiny, tmp_path / "split", resume="latest", lr=5e-2, batch_size=3, **kw))
    message = str(next(w.message for w in caught if "differ from its run" in str(w.message)))
    assert "lr 0.05 (the checkpoint's 0.005 is used" in message
    assert "batch_size 3 (used; the checkpoint's run had 2)" in message
    assert "max_steps" not in message and "stop_after_steps" not in message
    # The checkpoint's learning rate is what runs, and what the next checkpoint records.
    assert [r["lr"] for r in second.history] == [r["lr"] for r in full.history[1:]]
    saved = json.loads((Path(second.final_checkpoint) / "trainer_state.json").read_text())["config"]
    assert (saved["lr"], saved["batch_size"]) == (5e-3, 3)


def test_a_model_the_fused_head_cannot_run_fails_before_training(tiny, tmp_path):
    tok = build_tokenizer()
    build_llama(tok, save_dir=tmp_path / "capped", final_logit_softcapping=30.0)
    tok.save_pretrained(str(tmp_path / "capped"))
    with pytest.raises(UserInputError, match="loss_backend fused-linear cannot train .*soft-caps its logits"):
        train(train_config(tiny, tmp_path / "out", model=str(tmp_path / "capped")))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
