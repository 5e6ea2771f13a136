"""`TrainConfig(share_prompt=True)`: the same training run as unshared rows (first step within the accuracy rule
against a float64 unshared run), fewer backbone tokens in metrics.jsonl, and unshared rows with one warning for
a model it does not support."""
from functools import partial

import pytest
import torch

from dpo_kernels import paths
from dpo_kernels.hf import shared_prompt as shared_hf
from dpo_kernels.trainer import train
from dpo_kernels.trainer.data import load_preference_data
from tests.helpers import assert_within_rule
from tests.tiny_models import train_config

KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm")
config = partial(train_config, batch_size=4, max_steps=1, max_length=20, max_prompt_length=12)


def expected_backbone_tokens(tiny, batch_size):
    """Positions of the first step's batch in both layouts: [2B, longest row] and [B, longest prompt + both]."""
    examples = load_preference_data(tiny["data"], tiny["tokenizer"], max_length=20,
                                    max_prompt_length=12).examples[:batch_size]
    unshared = 2 * batch_size * max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    shared = batch_size * max(len(e.chosen_ids) + len(e.rejected_ids) - e.prompt_len for e in examples)
    return unshared, shared


@pytest.mark.parametrize("backend, extra", [("fused-linear", {}), ("logits", {}),
                                            ("fused-linear", {"precompute_ref": True}),
                                            ("logits", {"precompute_ref": True})])
def test_shared_run_matches_the_unshared_run(tiny, tmp_path, backend, extra):
    truth = train(config(tiny, tmp_path / "truth", loss_backend="reference", precision="fp64")).history[0]
    base = train(config(tiny, tmp_path / "base", loss_backend=backend, **extra)).history[0]
    shared = train(config(tiny, tmp_path / "shared", loss_backend=backend, share_prompt=True, **extra)).history[0]
    for key in KEYS:
        got, t, b = (torch.tensor(r[key], dtype=torch.float64) for r in (shared, truth, base))
        assert_within_rule(got, t, b, atol=1e-5, name=f"{backend} {extra} {key}")
    unshared_tokens, shared_tokens = expected_backbone_tokens(tiny, 4)
    assert base["tokens/backbone"] == truth["tokens/backbone"] == unshared_tokens
    assert shared["tokens/backbone"] == shared_tokens < unshared_tokens
    assert shared["tokens_per_sec"] > 0


def test_unsupported_model_trains_on_unshared_rows_with_a_warning(tiny, tmp_path, monkeypatch):
    monkeypatch.delitem(shared_hf.SUPPORTED_MODELS, "LlamaForCausalLM")
    with pytest.warns(UserWarning, match="LlamaForCausalLM is not verified.*Training on unshared rows"):
        record = train(config(tiny, tmp_path / "fallback", share_prompt=True)).history[0]
    assert record["tokens/backbone"] == expected_backbone_tokens(tiny, 4)[0]


def test_the_fallback_is_in_the_runs_path_record_and_strict_mode_refuses_it(tiny, tmp_path, monkeypatch,
                                                                             force_backend):
    monkeypatch.delitem(shared_hf.SUPPORTED_MODELS, "LlamaForCausalLM")
    with pytest.warns(UserWarning, match="LlamaForCausalLM"):
        result = train(config(tiny, tmp_path / "fallback", share_prompt=True, max_steps=1))
    run = result.path_records[0]
    assert (run.entry, run.shared_prompt) == ("trainer", False)
    assert [(f.kind, f.cause) for f in run.fallbacks] == [(paths.SHARED_TO_UNSHARED, "LlamaForCausalLM")]
    assert all(r.shared_prompt is False for r in result.path_records[1:])
    force_backend("torch")  # strict mode refuses CPU tensors' Triton -> PyTorch fallback before the model's
    with pytest.raises(paths.StrictModeError, match="caused by LlamaForCausalLM"):
        train(config(tiny, tmp_path / "strict", share_prompt=True, strict=True))
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()
