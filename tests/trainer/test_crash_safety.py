"""Crash safety of the trainer's files: a kill at the worst moment of a checkpoint replace, a second run on a live
output dir, the start-up recovery, a torn or half-rewritten metrics.jsonl."""
import builtins
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.cli import main as cli_main
from dpo_kernels.trainer import checkpoint, distributed, train
from dpo_kernels.trainer.errors import InputFileError, UserInputError
from dpo_kernels.trainer.metrics_log import METRICS_FILE, MetricsLog
from tests.tiny_models import train_config


def cli_args(tiny, out, *extra):
    return ["train", "--model", tiny["model"], "--data", tiny["data"], "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "2", "--max-length", "32", "--max-prompt-length", "24", "--lr", "5e-3",
            "--warmup-ratio", "0", "--no-progress", "--no-plot", *extra]


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-")))


# ------------------------------------------------------------------------------ a kill while a checkpoint is replaced
def _killed_child(moment: str, argv: list[str]) -> None:
    """Runs the CLI and kills this process with SIGKILL at `moment` of the checkpoint replace."""
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst, *args, **kwargs):
        if moment == "moving the new copy into place" and Path(dst).name.startswith(checkpoint.PREFIX):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if moment == "deleting the old copy" and Path(path).name.startswith(".old-checkpoint-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    os.rename, shutil.rmtree = rename, rmtree
    sys.exit(cli_main(argv))


MOMENTS = ("moving the new copy into place", "deleting the old copy")


def test_a_kill_while_a_checkpoint_is_replaced_leaves_one_that_resume_uses(tiny, tmp_path):
    # Resuming a finished run re-saves its last checkpoint: the replace of an existing checkpoint-2.
    outs = {moment: tmp_path / f"out{i}" for i, moment in enumerate(MOMENTS)}
    for out in outs.values():
        train(train_config(tiny, out))
    weights = load_file(str(outs[MOMENTS[0]] / "checkpoint-2" / "model.safetensors"))

    # Real processes killed at the moment, forked from this one so that they import nothing.
    ctx = multiprocessing.get_context("fork")
    children = {m: ctx.Process(target=_killed_child, args=(m, cli_args(tiny, out, "--resume"))) for m, out in
                outs.items()}
    for child in children.values():
        child.start()
    for child in children.values():
        child.join(timeout=120)
    for moment, child in children.items():
        assert child.exitcode == -signal.SIGKILL, f"the child was not killed while {moment}"

    after_kill = {m: (sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)) for m, out in outs.items()}
    assert "checkpoint-2" not in after_kill[MOMENTS[0]], "set-up: the kill came after the replace"
    for moment, out in outs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "restored from ..." and "already holds checkpoints"
            result = train(train_config(tiny, out, resume="latest"))
        assert result.global_step == 2, moment
        assert temporaries(out) == [], moment
        restored = load_file(str(out / "checkpoint-2" / "model.safetensors"))
        assert all((restored[k] == weights[k]).all() for k in weights), moment


# ---------------------------------------------------------------------------------- start-up recovery, in-process
def _fake_copy(path: Path, step: int, complete: bool, tag: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"copy": tag}))
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


@pytest.mark.parametrize("layout,expected", [
    # (temporaries left by a kill, the checkpoint-3 present or not) -> which copy becomes checkpoint-3
    ({"new": True, "old": True, "final": False}, "new"),     # killed between the two renames
    ({"new": False, "old": True, "final": False}, "old"),    # the new copy was incomplete
    ({"new": False, "old": True, "final": True}, "final"),   # killed while deleting the old copy
    ({"new": True, "old": False, "final": False}, "new"),    # killed before a first save's rename
    ({"new": False, "old": False, "final": True}, "final"),  # killed while writing the new copy
])
def test_start_up_restores_a_half_done_replace_and_deletes_the_rest(tmp_path, layout, expected):
    out = tmp_path / "out"
    out.mkdir()
    _fake_copy(out / ".tmp-checkpoint-3-0000000a", 3, layout["new"], "new")
    if layout["old"]:
        _fake_copy(out / ".old-checkpoint-3-0000000a", 3, True, "old")
    if layout["final"]:
        _fake_copy(out / "checkpoint-3", 3, True, "final")
    _fake_copy(out / ".tmp-checkpoint-1-0000000b", 1, False, "dead")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with checkpoint.claim_output_dir(out, distributed.setup("none", "cpu")):
            pass
    assert temporaries(out) == []
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "config.json").read_text()) == {"copy": expected}


# ---------------------------------------------------------------------------------------------- the output dir lock
def test_a_second_run_on_a_live_output_dir_stops_and_deletes_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    with checkpoint.claim_output_dir(out, distributed.setup("none", "cpu")):
        # The live run is writing a checkpoint right now.
        live = _fake_copy(out / ".tmp-checkpoint-5-0000000c", 5, False, "live")
        with pytest.raises(InputFileError, match=rf"in use by another training run \(process {os.getpid()}@"):
            train(train_config(tiny, out))
        assert live.is_dir() and (live / "config.json").is_file()
    # The lock goes with the run: the next one starts, and then the dead temporary is removed.
    train(train_config(tiny, out, max_steps=1))
    assert temporaries(out) == []


class _OtherRank:
    """A non-main process of a run whose main process found the output dir in use."""

    is_main = False

    def gather_objects(self, obj):
        return ["/runs/out: in use by another training run (process 7@host holds .lock)", obj]


def test_every_process_stops_when_the_main_one_may_not_use_the_dir(tmp_path):
    # Rank 0's refusal reaches the other ranks, which would otherwise wait for it at a barrier.
    with pytest.raises(UserInputError, match=r"/runs/out: in use by another training run"):
        with checkpoint.claim_output_dir(tmp_path / "out", _OtherRank()):
            pass
    assert not (tmp_path / "out").exists()


class _NonMainSaver:
    """A non-main process whose main process failed to write the checkpoint."""

    is_main, rank, world = False, 1, 2

    def __init__(self, main_failure):
        self.main_failure = main_failure

    def gather_objects(self, obj):
        return [self.main_failure if obj is None else obj, obj]  # None: this process's "no failure"


@pytest.mark.parametrize("main_failure,error", [
    ((True, "no space left writing /runs/out/checkpoint-3"), UserInputError),
    ((False, "OSError: [Errno 5] Input/output error"), RuntimeError),
])
def test_every_process_learns_that_the_main_one_could_not_save(tmp_path, main_failure, error):
    dpo = torch.nn.Module()
    dpo.model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(dpo.parameters())
    state = checkpoint.TrainState(3, 4, data_fingerprint="f")
    with pytest.raises(error, match=rf"process 0 could not save .*checkpoint-3: {re.escape(main_failure[1])}"):
        checkpoint.save_state(tmp_path, state, ctx=_NonMainSaver(main_failure), dpo=dpo, optimizer=optimizer,
                              scheduler=None, tokenizer=None)
    assert list(tmp_path.iterdir()) == []


def test_the_lock_is_released_when_a_run_fails(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputFileError):
        train(train_config(tiny, out, tokenizer=str(tmp_path / "no-such-tokenizer")))
    assert train(train_config(tiny, out, max_steps=1)).global_step == 1


# ------------------------------------------------------------------------------------------------------ metrics.jsonl
def _write_metrics(out: Path, text: str) -> Path:
    out.mkdir(exist_ok=True)
    path = out / METRICS_FILE
    path.write_text(text)
    return path


RECORDS = "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3))


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = _write_metrics(tmp_path, RECORDS + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 4 is torn"):
        MetricsLog(tmp_path, resume_step=3, enabled=True)
    assert path.read_text() == RECORDS


def test_a_bad_line_inside_metrics_names_file_and_line(tmp_path):
    _write_metrics(tmp_path, RECORDS.replace('{"step": 2', '{"step" 2') + RECORDS)
    with pytest.raises(InputFileError, match=r"metrics.jsonl: line 2: not valid JSON"):
        MetricsLog(tmp_path, resume_step=3, enabled=True)


class Crash(BaseException):
    pass


def test_a_crash_while_metrics_are_rewritten_keeps_the_history(tmp_path, monkeypatch):
    path = _write_metrics(tmp_path, RECORDS + json.dumps({"step": 4, "loss": 0.5}) + "\n")
    real_open = builtins.open

    def crash_after_opening_for_write(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).parent == tmp_path:
            f.close()
            raise Crash("killed right after the file was opened for writing")
        return f

    monkeypatch.setattr(builtins, "open", crash_after_opening_for_write)
    monkeypatch.setattr(io, "open", crash_after_opening_for_write)
    with pytest.raises(Crash):
        MetricsLog(tmp_path, resume_step=3, enabled=True)
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
