"""The trainer's path record (`dpo_kernels.paths`): the first step prints which paths it took, once, and returns
their records; `--strict` turns the Triton -> PyTorch fallback of CPU tensors into a one-line error before the
models load."""
import pytest

from dpo_kernels import paths
from dpo_kernels.cli import main
from dpo_kernels.trainer import train
from dpo_kernels.trainer.config import check_config
from tests.tiny_models import train_config

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_first_step_prints_and_returns_its_paths_once(tiny, tmp_path, capsys, force_backend):
    force_backend("torch")
    result = train(train_config(tiny, tmp_path / "run", max_steps=2, grad_accum=2, memory_budget="low"))
    records = result.path_records
    # Each micro-batch: the reference's log-probs, then the policy's fused step.
    assert [r.entry for r in records] == ["trainer"] + ["linear_sequence_logprobs", "fused_linear_dpo"] * 2
    assert records[0] == paths.PathRecord("trainer", shared_prompt=False)
    for record in records[1:]:
        assert (record.backend, record.recompute, record.fallbacks) == ("torch", True, ())
    assert [r.passes for r in records[1:]] == [1.0, 2.0, 1.0, 2.0], "the reference pass has no backward"
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dpo_kernels path: ")]
    assert printed == [f"dpo_kernels path: {line}" for line in paths.summary_lines(records)]


def test_strict_runs_when_nothing_falls_back(tiny, tmp_path, force_backend):
    force_backend("torch")
    result = train(train_config(tiny, tmp_path / "run", max_steps=1, strict=True))
    assert result.global_step == 1
    assert not any(r.fallbacks for r in result.path_records)


def test_strict_flag_makes_the_cpu_fallback_a_one_line_error(tiny, tmp_path, capsys, force_backend):
    force_backend("auto")
    code = main(["train", "--model", tiny["model"], "--data", tiny["data"], "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--batch-size", "2", "--no-progress", "--no-plot", "--strict"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpo-kernels train: error: strict mode refuses the fallback "
                                               "Triton -> PyTorch caused by cpu tensors"), err
    assert "DPO_KERNELS_BACKEND=torch" in err[0]
    assert not (tmp_path / "run").exists(), "the run claimed its output directory before refusing"


@pytest.mark.parametrize("strict_by", ["setting", "environment"])
def test_strict_refuses_the_cpu_fallback_in_check_config(tiny, tmp_path, force_backend, monkeypatch, strict_by):
    force_backend("auto")
    if strict_by == "environment":
        monkeypatch.setenv("DPO_KERNELS_STRICT", "1")
    config = train_config(tiny, tmp_path / "run", device="cpu", strict=strict_by == "setting")
    with pytest.raises(paths.StrictModeError, match="Triton -> PyTorch caused by cpu tensors"):
        check_config(config)
    for backend in ("fused-linear", "logits"):
        with pytest.raises(paths.StrictModeError):
            check_config(train_config(tiny, tmp_path / "run", device="cpu", strict=True, loss_backend=backend))
    force_backend("torch")
    check_config(config)


def test_strict_trains_the_reference_backend_on_cpu(tiny, tmp_path, force_backend):
    force_backend("auto")
    result = train(train_config(tiny, tmp_path / "run", device="cpu", max_steps=1, strict=True,
                                loss_backend="reference"))
    assert result.global_step == 1
    assert not any(r.fallbacks for r in result.path_records)
