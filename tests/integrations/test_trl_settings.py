"""FusedDPOTrainer and patch_dpo_trainer check their own settings when built, not at the first training step: a bad
memory_budget raises, and loss settings the fused loss refuses make the trainer use TRL's computation (an error in
strict mode). The first step prints and keeps which paths it took (`dpo_kernels.paths`)."""
import warnings

import pytest

from dpo_kernels import paths
from tests.integrations.requires_trl import FusedDPOTrainer, datasets, patch_dpo_trainer, trl
from tests.tiny_models import build_llama, build_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    return tok, datasets.Dataset.from_list(preference_rows(4))


def _build(cls, tiny, tmp_path, quiet=True, **kwargs):
    tok, data = tiny
    config = {key: kwargs.pop(key) for key in ("loss_type", "label_smoothing", "ld_alpha") if key in kwargs}
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", per_device_train_batch_size=2,
                         max_steps=1, use_cpu=True, bf16=False, disable_tqdm=True, **config)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return cls(model=build_llama(tok), ref_model=build_llama(tok, seed=1), args=args, train_dataset=data,
                   processing_class=tok, **kwargs)


@pytest.mark.parametrize("budget", ["bogus", 0, -5, True, float("nan")])
def test_bad_memory_budget_raises_at_construction(tiny, tmp_path, monkeypatch, budget):
    built = []
    monkeypatch.setattr(trl.DPOTrainer, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(ValueError, match="memory_budget"):
        _build(FusedDPOTrainer, tiny, tmp_path, memory_budget=budget)
    assert not built, "the check must come before TRL's own (slow) setup"


def test_patch_with_a_bad_memory_budget_leaves_the_trainer_alone(tiny, tmp_path):
    stock = _build(trl.DPOTrainer, tiny, tmp_path)
    with pytest.raises(ValueError, match="memory_budget"):
        patch_dpo_trainer(stock, memory_budget="bogus")
    assert type(stock) is trl.DPOTrainer


def test_loss_settings_the_fused_loss_refuses_fall_back_to_trl(tiny, tmp_path):
    """Robust DPO divides by 1 - 2 label_smoothing (TRL accepts 0.5); the loss table's check names the setting in the
    warning."""
    with pytest.warns(UserWarning, match=r"label_smoothing = 0.5 is invalid for loss_type 'robust'"):
        trainer = _build(FusedDPOTrainer, tiny, tmp_path, quiet=False, loss_type=["robust"], label_smoothing=0.5)
    assert trainer._dk_unsupported
    ok = _build(FusedDPOTrainer, tiny, tmp_path, loss_type=["robust"], label_smoothing=0.1)
    assert not ok._dk_unsupported


def test_strict_mode_refuses_an_option_the_engine_lacks_naming_it(tiny, tmp_path, monkeypatch):
    with pytest.raises(paths.StrictModeError, match=r"fused engine -> TRL's own computation caused by ld_alpha=0.5"):
        _build(FusedDPOTrainer, tiny, tmp_path, ld_alpha=0.5, strict=True)
    with pytest.raises(ValueError, match="strict must be True or False"):
        _build(FusedDPOTrainer, tiny, tmp_path, strict="yes")
    stock = _build(trl.DPOTrainer, tiny, tmp_path, ld_alpha=0.5)
    monkeypatch.setenv("DPO_KERNELS_STRICT", "1")
    with pytest.raises(paths.StrictModeError, match="ld_alpha=0.5"):
        patch_dpo_trainer(stock)


def _first_steps(trainer, steps=2):
    batch = next(iter(trainer.get_train_dataloader()))
    for _ in range(steps):
        trainer.compute_loss(trainer.model, batch)


def test_the_first_step_prints_and_keeps_its_paths(tiny, tmp_path, capsys, force_backend):
    force_backend("torch")
    trainer = _build(FusedDPOTrainer, tiny, tmp_path)
    _first_steps(trainer)
    records = trainer.dpo_kernels_paths
    assert [r.entry for r in records] == ["trl", "linear_sequence_logprobs", "fused_linear_dpo"]
    assert records[0] == paths.PathRecord("trl", shared_prompt=False)
    assert records[2].backend == "torch" and records[2].modes == ("resident",)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dpo_kernels path: ")]
    assert printed == [f"dpo_kernels path: {line}" for line in paths.summary_lines(records)], "printed once"


def test_a_step_on_trls_computation_records_the_fallback(tiny, tmp_path, force_backend):
    force_backend("torch")
    trainer = _build(FusedDPOTrainer, tiny, tmp_path, ld_alpha=0.5)
    _first_steps(trainer, steps=1)
    (record,) = trainer.dpo_kernels_paths
    assert record.entry == "trl"
    assert [(f.kind, f.cause) for f in record.fallbacks] == [(paths.FUSED_TO_TRL, "ld_alpha=0.5")]
