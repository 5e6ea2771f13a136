"""Which run an output dir holds: a fresh start never silently mixes with an earlier run's checkpoints, a resume only
continues the run that wrote them, and resuming on another number of processes is refused."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.cli import main as cli_main
from dpo_kernels.trainer import checkpoint, distributed, train
from dpo_kernels.trainer.errors import InputFileError, UserInputError
from tests.tiny_models import train_config

pytestmark = pytest.mark.usefixtures("single_thread")


def weights(checkpoint_dir) -> dict:
    return load_file(str(Path(checkpoint_dir) / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_fresh_start_over_another_runs_checkpoints_is_refused_and_resume_continues_only_its_run(tiny, tmp_path,
                                                                                                  capsys):
    out = tmp_path / "out"
    run = dict(max_steps=4, save_every=1)
    train(train_config(tiny, out, seed=1, **run))  # run A: checkpoints 1-4
    a_state = checkpoint.read_state(out / "checkpoint-4")

    # A fresh run B over A's checkpoints: one line, exit 2, naming the directory and both ways on.
    argv = ["train", "--model", tiny["model"], "--data", tiny["data"], "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "4", "--save-every", "1", "--max-length", "32", "--max-prompt-length", "24",
            "--lr", "5e-3", "--warmup-ratio", "0", "--seed", "2", "--no-progress", "--no-plot",
            "--stop-after-steps", "2"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite-output-dir" in err, err
    assert checkpoint.read_state(out / "checkpoint-4").run_id == a_state.run_id  # untouched

    # With --overwrite-output-dir, B stops after step 2; its --resume continues B, never A's checkpoint-4.
    assert cli_main([*argv, "--overwrite-output-dir"]) == 0
    capsys.readouterr()
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2"]
    b_id = checkpoint.read_state(out / "checkpoint-2").run_id
    assert b_id != a_state.run_id
    resumed = train(train_config(tiny, out, seed=2, resume="latest", **run))
    assert resumed.history[0]["step"] == 3

    uninterrupted = train(train_config(tiny, tmp_path / "b", seed=2, **run))
    assert_same_weights(resumed.final_checkpoint, uninterrupted.final_checkpoint)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_an_overwrite_killed_before_it_deleted_the_old_checkpoints_never_resumes_them(tiny, tmp_path):
    out = tmp_path / "out"
    train(train_config(tiny, out, max_steps=2, save_every=1))
    ctx = distributed.setup("none", "cpu")
    # The new run's id is written first: a kill right after it leaves the old checkpoints behind, disowned.
    checkpoint.output_dir._write_run_id(out, "a-run-that-saved-nothing")
    with pytest.raises(InputFileError, match="no complete checkpoint"):
        checkpoint.own_output_dir(out, ctx, resume="latest", overwrite=False)
    # A fresh start needs no --overwrite-output-dir for them, and finishes deleting them.
    run_id = checkpoint.own_output_dir(out, ctx, resume=None, overwrite=False)
    assert run_id != "a-run-that-saved-nothing" and checkpoint.checkpoint_dirs(out) == []


def test_resuming_a_checkpoint_of_another_run_into_a_dir_that_holds_one_is_refused(tiny, tmp_path):
    train(train_config(tiny, tmp_path / "a", max_steps=2))
    train(train_config(tiny, tmp_path / "b", max_steps=2, seed=3))
    with pytest.raises(UserInputError, match="another run"):
        train(train_config(tiny, tmp_path / "b", max_steps=3, resume=str(tmp_path / "a" / "checkpoint-2")))
    # Into a dir of its own (or an empty one) the checkpoint's run goes on.
    result = train(train_config(tiny, tmp_path / "c", max_steps=3, resume=str(tmp_path / "a" / "checkpoint-2")))
    assert result.global_step == 3
    assert checkpoint.read_state(result.final_checkpoint).run_id == checkpoint.read_run_id(
        tmp_path / "a" / "checkpoint-2")


def test_resuming_on_fewer_processes_than_saved_the_checkpoint_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    train(train_config(tiny, out, max_steps=2))
    # Make checkpoint-2 look saved by two processes (each process's RNG states, as save_state gathers them).
    ckpt = out / "checkpoint-2"
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    state["rng"] = state["rng"] * 2
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps(state))
    rng = torch.load(ckpt / "rng_state.pt", weights_only=True)
    torch.save(rng * 2, ckpt / "rng_state.pt")
    with pytest.raises(InputFileError, match=r"saved by 2 process\(es\); this run has 1"):
        train(train_config(tiny, out, max_steps=3, resume="latest"))


def test_resume_checks_the_saved_settings(tiny, tmp_path):
    out = tmp_path / "out"
    train(train_config(tiny, out, max_steps=2))
    path = out / "checkpoint-2" / checkpoint.STATE_FILE
    state = json.loads(path.read_text())
    state["config"]["lr"] = "abc"
    path.write_text(json.dumps(state))
    with pytest.raises(UserInputError, match=rf"{path}: lr must be a number, got 'abc'"):
        train(train_config(tiny, out, max_steps=3, resume="latest"))


def test_empty_output_dir_is_refused(tiny):
    with pytest.raises(UserInputError, match="output_dir is empty"):
        train(train_config(tiny, ""))
