"""Non-finite weights are never trained on and never saved: checked when a model or checkpoint loads and before
every save, whether or not an optimizer step ran."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_kernels.trainer import checkpoint, loop, train
from dpo_kernels.trainer.errors import InputFileError
from dpo_kernels.trainer.loop import NonFiniteLossError
from tests.tiny_models import tiny_setup, train_config

pytestmark = pytest.mark.usefixtures("single_thread")

BROKEN = "model.layers.1.self_attn.v_proj.weight"


def poison(model_dir, name=BROKEN):
    path = f"{model_dir}/model.safetensors"
    state = load_file(path)
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})


def test_a_model_with_nan_weights_is_refused_at_load(tmp_path):
    tiny = tiny_setup(tmp_path / "tiny", rows=8)
    poison(tiny["model"])
    with pytest.raises(InputFileError, match=rf"parameter {BROKEN} holds NaN or inf"):
        train(train_config(tiny, tmp_path / "out", max_steps=3))
    assert checkpoint.checkpoint_dirs(tmp_path / "out") == []


def test_a_checkpoint_with_nan_weights_is_refused_at_resume(tiny, tmp_path):
    out = tmp_path / "out"
    train(train_config(tiny, out, max_steps=2))
    poison(out / "checkpoint-2")
    with pytest.raises(InputFileError, match=rf"checkpoint-2: parameter {BROKEN} holds NaN or inf"):
        train(train_config(tiny, out, max_steps=3, resume="latest"))
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["checkpoint-2"]


def test_weights_that_turn_non_finite_without_a_step_are_not_saved(tiny, tmp_path, monkeypatch):
    # Skipped steps (non-finite losses) run no optimizer step, so no post-step check sees the weights.
    build_run = loop.build_run

    def broken_after_load(*args, **kwargs):
        run = build_run(*args, **kwargs)
        with torch.no_grad():
            dict(run.dpo.model.named_parameters())[BROKEN][0, 0] = float("nan")
        return run

    monkeypatch.setattr(loop, "build_run", broken_after_load)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=rf"not saving checkpoint-3: parameter \S*{BROKEN} holds NaN"):
        train(train_config(tiny, out, max_steps=3, max_nonfinite_steps=5))
    assert checkpoint.checkpoint_dirs(out) == []
