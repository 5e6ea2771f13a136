"""The `dpo-kernels` command: --help, config file precedence, a real run through main(), errors as exit codes."""
import json
import subprocess
import sys

import pytest

from dpo_kernels import cli
from dpo_kernels.trainer.errors import UserInputError
from tests.tiny_models import preference_rows, write_jsonl

REQUIRED_FLAGS = ["--model", "--data", "--eval-data", "--output-dir", "--config", "--max-steps", "--epochs",
                  "--batch-size", "--grad-accum", "--lr", "--beta", "--loss-type", "--loss-weights",
                  "--label-smoothing", "--gamma", "--tau", "--dpop-lambda", "--max-length", "--max-prompt-length",
                  "--save-every", "--resume", "--seed", "--loss-backend", "--precompute-ref", "--ref-model",
                  "--distributed", "--skip-bad-rows", "--gradient-checkpointing", "--loss-param"]


def parse(argv):
    return cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_python_m_dpo_kernels_train_help():
    proc = subprocess.run([sys.executable, "-m", "dpo_kernels", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in REQUIRED_FLAGS:
        assert flag in proc.stdout, f"{flag} missing from --help"
    assert "default: fused-linear" in proc.stdout.replace("\n", " ").replace("  ", " ")


def test_top_level_help_lists_train(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "train" in capsys.readouterr().out
    assert cli.main([]) == 2  # no subcommand: help and a usage error


def test_config_file_values_are_overridden_by_flags(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "m", "data": "d.jsonl", "lr": 1e-4, "beta": 0.3, "max-steps": 7,
                               "loss_type": "sigmoid,sft", "loss_weights": "1,0.25", "precompute_ref": True}))
    c = parse(["--config", str(cfg), "--lr", "2e-5", "--no-precompute-ref", "--loss-param", "gamma=0.7"])
    assert (c.model, c.data, c.beta, c.max_steps) == ("m", "d.jsonl", 0.3, 7)
    assert c.lr == 2e-5 and c.precompute_ref is False
    assert c.loss_weights == [1.0, 0.25] and c.loss_params == {"gamma": 0.7}
    defaults = parse(["--model", "m", "--data", "d"])
    assert defaults.loss_backend == "fused-linear" and defaults.lr == cli_default("lr")


def test_a_bad_file_value_that_a_flag_overrides_is_not_an_error(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "m", "data": "d.jsonl", "lr": "abc", "seed": -1, "beta": 0.3}))
    c = parse(["--config", str(cfg), "--lr", "2e-5", "--seed", "3"])
    assert (c.lr, c.seed, c.beta) == (2e-5, 3, 0.3)
    with pytest.raises(UserInputError, match=rf"{cfg}: seed must be in"):
        parse(["--config", str(cfg), "--lr", "2e-5"])


def cli_default(name):
    from dpo_kernels.trainer import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def test_yaml_config_and_resume_forms(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\ndata: d.jsonl\nbatch-size: 3\n")
    assert parse(["--config", str(cfg)]).batch_size == 3
    assert parse(["--config", str(cfg), "--resume"]).resume == "latest"
    assert parse(["--config", str(cfg), "--resume", "out/checkpoint-4"]).resume == "out/checkpoint-4"


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "m", "data": "d", "learning_rate": 1e-3}))
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_train_through_main(tiny, tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"max_length": 32, "max_prompt_length": 24, "lr": 1e-3, "batch_size": 2}))
    out = tmp_path / "out"
    rc = cli.main(["train", "--config", str(cfg), "--model", tiny["model"], "--data", tiny["data"],
                   "--eval-data", tiny["data"], "--output-dir", str(out), "--max-steps", "2", "--save-every", "1",
                   "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5", "--no-progress", "--no-plot"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["global_step"] == 2 and "eval/loss" in summary
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert "step 2/2 | loss" in printed
    # Continue from an explicit checkpoint path with a longer schedule.
    rc = cli.main(["train", "--config", str(cfg), "--model", tiny["model"], "--data", tiny["data"],
                   "--output-dir", str(out), "--max-steps", "3", "--resume", str(out / "checkpoint-2"),
                   "--no-progress", "--no-plot"])
    assert rc == 0 and (out / "checkpoint-3").is_dir()


def test_bad_row_exits_with_file_and_row(tiny, tmp_path, capsys):
    rows = preference_rows(4)
    rows[3] = {"prompt": "what ?", "chosen": None, "rejected": " red ."}
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    rc = cli.main(["train", "--model", tiny["model"], "--data", str(data), "--output-dir", str(tmp_path / "o"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl: line 4: " in err and "missing field" in err


@pytest.mark.parametrize("name, text, message", [
    ("run.json", '{"batch_size": "four"}', "run.json: batch_size must be an integer, got 'four'"),
    ("run.json", '{"lr": "1e-3"}', "run.json: lr must be a number, got '1e-3' (a number in quotes is text"),
    ("run.json", '{"save_every": "1"}', "run.json: save_every must be an integer, got '1'"),
    ("run.json", '{"max_steps": 1.5}', "run.json: max_steps must be an integer, got 1.5"),
    ("run.json", '{"loss_params": "gamma=1"}', "run.json: loss_params must be a mapping of keyword to number"),
    ("run.json", '{"loss_weights": "1,x"}', "run.json: loss_weights must be comma-separated numbers"),
    ("run.yaml", "lr: 1e-3\n", "run.yaml: lr must be a number, got '1e-3' (YAML reads 1e-3 as text: write 1.0e-3)"),
    ("run.yaml", "batch_size: [1,\n", "run.yaml, line 2: not valid YAML (expected the node content"),
    ("run.yaml", "!!python/object:os.system x\n", "run.yaml, line 1: not valid YAML (could not determine"),
    ("run.json", '{"seed": 1', "run.json: not valid JSON"),
])
def test_config_file_values_are_checked_before_anything_runs(tiny, tmp_path, capsys, name, text, message):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    cfg = tmp_path / name
    cfg.write_text(text)
    out = tmp_path / "out"
    rc = cli.main(["train", "--config", str(cfg), "--model", tiny["model"], "--data", tiny["data"],
                   "--output-dir", str(out), "--max-length", "32", "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"dpo-kernels train: error: {tmp_path}/{message}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "seed must be in [0, 2**32 - 1], got -1"),
    (["--precision", "fp64"], "precision fp64 needs loss_backend reference"),
    (["--model-dtype", "float64", "--loss-backend", "logits"], "model_dtype float64 needs loss_backend reference"),
    (["--model-dtype", "float16"], "model_dtype float16 cannot be trained here"),
])
def test_settings_that_cannot_train_fail_before_any_work(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", tiny["model"], "--data", tiny["data"], "--output-dir", str(out),
                   "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "--no-progress", "--no-plot",
                   *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import dpo_kernels.trainer as trainer
    from dpo_kernels.trainer.errors import InputFileError

    argv = ["train", "--model", "m", "--data", "d.jsonl", "--output-dir", str(tmp_path / "out")]

    def missing_file(config):
        raise InputFileError(tmp_path / "model.safetensors", "truncated safetensors file")

    monkeypatch.setattr(trainer, "train", missing_file)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"dpo-kernels train: error: {tmp_path}/model.safetensors: truncated " \
                                      "safetensors file\n"

    def bug(config):
        raise ValueError("an internal invariant broke")  # not a UserInputError: the package's bug, not the user's

    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(argv)
