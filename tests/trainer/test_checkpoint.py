"""dpo_kernels.trainer.checkpoint: save and restore, the resume state checked field by field, every corrupt file of a
checkpoint one error naming it, a full disk."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from dpo_kernels.cli import main as cli_main
from dpo_kernels.trainer import checkpoint, train
from dpo_kernels.trainer.errors import DiskFullError, InputFileError
from tests.tiny_models import train_config


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """An output dir holding checkpoint-1 and checkpoint-2 of a 2-step run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train(train_config(tiny, out, save_every=1))
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_state_file_round_trips_with_the_config(trained):
    state = checkpoint.read_state(trained / "checkpoint-2")
    assert (state.step, state.total_steps, state.skipped_steps, state.nonfinite_run) == (2, 2, 0, 0)
    assert state.config["max_steps"] == 2 and state.config["lr"] == 5e-3
    assert len(state.rng) == 1 and set(state.rng[0]) == {"python", "numpy"}
    assert [p.name for p in checkpoint.checkpoint_dirs(trained)] == ["checkpoint-1", "checkpoint-2"]


def test_restore_state_sets_optimizer_scheduler_and_rng(tiny, trained, tmp_path):
    # Resuming from checkpoint-1 and running on gives checkpoint-2 again, bit for bit.
    out = tmp_path / "out"
    shutil.copytree(trained / "checkpoint-1", out / "checkpoint-1")
    train(train_config(tiny, out, resume="latest"))
    got, want = out / "checkpoint-2", trained / "checkpoint-2"
    assert (got / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    a, b = (checkpoint.load_tensors(d / "optimizer.pt")["state"] for d in (got, want))
    assert a.keys() == b.keys() and all(torch.equal(a[k][s], b[k][s]) for k in a for s in a[k])
    assert checkpoint.load_tensors(got / "scheduler.pt") == checkpoint.load_tensors(want / "scheduler.pt")
    assert checkpoint.read_state(got).rng == checkpoint.read_state(want).rng


def _set_state(out, step_dir="checkpoint-2", **changes):
    path = out / step_dir / checkpoint.STATE_FILE
    state = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del state[key]
        else:
            state[key] = value
    path.write_text(json.dumps(state))


_DELETE = object()


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CORRUPTIONS = {  # name: (how to damage OUT, the file the error names, words of the message)
    "step -2": (lambda out: _set_state(out, step=-2), "trainer_state.json", "'step' must be >= 0"),
    "step past max_steps": (lambda out: _set_state(out, step=99), "trainer_state.json", "disagrees"),
    "step as a string": (lambda out: _set_state(out, step="2"), "trainer_state.json", "'step' must be an integer"),
    "step as a bool": (lambda out: _set_state(out, step=True), "trainer_state.json", "'step' must be an integer"),
    "state is a list": (lambda out: (out / "checkpoint-2" / "trainer_state.json").write_text("[1, 2]"),
                        "trainer_state.json", "expected a JSON object"),
    "state lacks rng": (lambda out: _set_state(out, rng=_DELETE), "trainer_state.json", "lacks field(s) rng"),
    "state not JSON": (lambda out: (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2,'),
                       "trainer_state.json", "not valid JSON"),
    "state empty": (lambda out: (out / "checkpoint-2" / "trainer_state.json").write_text(""),
                    "trainer_state.json", "not valid JSON"),
    "rng state garbage": (lambda out: _set_state(out, rng=[{"python": [3, [1, 2], None], "numpy": []}]),
                          "trainer_state.json", "'rng'[0] is not a saved Python/NumPy RNG state"),
    "skipped past step": (lambda out: _set_state(out, skipped_steps=5), "trainer_state.json", "'skipped_steps'"),
    "weights truncated": (lambda out: _truncate(out / "checkpoint-2" / "model.safetensors"), "model.safetensors",
                          "truncated"),
    "weights deleted": (lambda out: (out / "checkpoint-2" / "model.safetensors").unlink(), "checkpoint-2",
                        "holds no model weights"),
    "config.json corrupt": (lambda out: (out / "checkpoint-2" / "config.json").write_text("{oops"), "config.json",
                            "not valid JSON"),
    "optimizer truncated": (lambda out: _truncate(out / "checkpoint-2" / "optimizer.pt"), "optimizer.pt",
                            "truncated or not written by torch.save"),
    "optimizer deleted": (lambda out: (out / "checkpoint-2" / "optimizer.pt").unlink(), "optimizer.pt", "missing"),
    "scheduler deleted": (lambda out: (out / "checkpoint-2" / "scheduler.pt").unlink(), "scheduler.pt", "missing"),
    "rng file deleted": (lambda out: (out / "checkpoint-2" / "rng_state.pt").unlink(), "rng_state.pt", "missing"),
    "rng file garbage": (lambda out: (out / "checkpoint-2" / "rng_state.pt").write_bytes(b"\x00garbage" * 50),
                         "rng_state.pt", "truncated or not written by torch.save"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_one_error_naming_the_file_before_anything_is_written(tiny, run_copy, name):
    damage, file, words = CORRUPTIONS[name]
    damage(run_copy)
    before = snapshot(run_copy)
    with pytest.raises(InputFileError) as info:
        train(train_config(tiny, run_copy, resume="latest", save_every=1))
    message = str(info.value)
    assert file in message and words in message and "\n" not in message
    assert snapshot(run_copy) == before


def test_a_step_past_max_steps_is_refused_before_anything_is_written(tiny, run_copy):
    # checkpoint-2 resumed by a run of max_steps 1.
    before = snapshot(run_copy)
    with pytest.raises(InputFileError, match=r"trainer_state.json: step 2 is past this run's last step 1"):
        train(train_config(tiny, run_copy, resume="latest", max_steps=1, save_every=1))
    assert snapshot(run_copy) == before


def test_a_negative_step_in_an_explicit_checkpoint_is_refused(tiny, run_copy, tmp_path):
    # A checkpoint moved to a directory of another name is checked field by field all the same.
    moved = tmp_path / "elsewhere"
    shutil.move(run_copy / "checkpoint-2", moved)
    _set_state(tmp_path, step_dir="elsewhere", step=-2)
    before = snapshot(run_copy)
    with pytest.raises(InputFileError, match=r"elsewhere/trainer_state.json: 'step' must be >= 0, got -2"):
        train(train_config(tiny, run_copy, resume=str(moved), save_every=1))
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("payload,words", [
    (lambda: {"state": {"when": __import__("datetime").date(2020, 1, 1)}}, "holds objects other than tensors"),
    (lambda: [1, 2, 3], "does not fit this model's parameters"),
])
def test_an_optimizer_file_that_does_not_load_or_fit_is_named(tiny, run_copy, payload, words):
    torch.save(payload(), run_copy / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(InputFileError, match="optimizer.pt") as info:
        train(train_config(tiny, run_copy, resume="latest"))
    assert words in str(info.value)


def test_the_cli_prints_one_line_and_exits_2(tiny, run_copy, capsys):
    _truncate(run_copy / "checkpoint-2" / "optimizer.pt")
    code = cli_main(["train", "--model", tiny["model"], "--data", tiny["data"], "--output-dir", str(run_copy),
                     "--batch-size", "2", "--max-steps", "2", "--max-length", "32", "--no-progress", "--no-plot",
                     "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(run_copy / "checkpoint-2" / "optimizer.pt") in err and "truncated" in err


def _fail_writing(monkeypatch, name, error):
    real = checkpoint.write_file

    def write_file(path, write):
        if Path(path).name == name:
            raise error
        return real(path, write)

    monkeypatch.setattr(checkpoint, "write_file", write_file)


def test_an_interrupted_save_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    _fail_writing(monkeypatch, "scheduler.pt", OSError("simulated failure"))
    with pytest.raises(OSError, match="simulated"):
        train(train_config(tiny, tmp_path / "out", max_steps=1))
    assert [p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name] == []


def test_a_full_disk_says_so_and_keeps_the_existing_checkpoint(tiny, run_copy, monkeypatch):
    before = snapshot(run_copy / "checkpoint-2")
    _fail_writing(monkeypatch, "optimizer.pt", OSError(errno.ENOSPC, "No space left on device"))
    # Resuming the finished run re-saves checkpoint-2: the failed re-save must leave the old copy as it was.
    with pytest.raises(DiskFullError) as info:
        train(train_config(tiny, run_copy, resume="latest"))
    assert str(info.value).startswith(f"no space left writing {run_copy / 'checkpoint-2'}")
    assert snapshot(run_copy / "checkpoint-2") == before
    assert sorted(p.name for p in run_copy.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]


def test_torch_save_reports_a_full_disk_as_enospc():
    # torch.save swallows the writer's OSError and raises "unexpected pos"; the checkpoint writer recovers it.
    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    with pytest.raises(OSError) as info:
        checkpoint.atomic.torch_save({"w": torch.zeros(1000)}, FullDisk())
    assert info.value.errno == errno.ENOSPC


def test_cuda_rng_states_are_restored_by_device_index(monkeypatch):
    """Saved CUDA states go back to their own device (cuda10 after cuda9, not after cuda1), and states of devices no
    longer visible are skipped rather than failing the resume."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 11)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    states = {"cpu": torch.get_rng_state()}
    states.update({f"cuda{i}": torch.full((4,), i, dtype=torch.uint8) for i in range(12)})
    checkpoint.set_rng_tensors(states)
    assert sorted(restored) == list(range(11))
    assert all(int(state[0]) == device for device, state in restored.items())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="sets a file-size limit in the child only")
def test_a_file_size_limit_is_reported_like_a_full_disk(tiny, tmp_path):
    import resource
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "dpo_kernels", "train", "--model", tiny["model"], "--data", tiny["data"],
            "--output-dir", str(out), "--batch-size", "2", "--max-steps", "1", "--max-length", "32",
            "--no-progress", "--no-plot"]
    # model.safetensors (about 100 kB) passes the limit; every smaller file of the run fits under it.
    limit = 60_000
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith("dpo-kernels train: error: the file-size limit is reached (ulimit -f) writing "
                           f"{out / 'checkpoint-1'}"), last
    assert "Traceback" not in proc.stderr
    assert checkpoint.checkpoint_dirs(out) == []


def test_a_tensor_shape_that_disagrees_with_config_json_is_named(run_copy):
    from safetensors.torch import load_file, save_file

    ckpt = run_copy / "checkpoint-2"
    state = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    rows, cols = state[name].shape
    state[name] = torch.zeros(rows + 3, cols)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputFileError, match=rf"model.safetensors: tensor {name} has shape \[{rows + 3}, {cols}\], "
                                             rf"but config.json gives it \[{rows}, {cols}\]"):
        checkpoint.read_state(ckpt)


def test_a_metrics_log_that_is_a_directory_is_named(tiny, run_copy):
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").mkdir()
    with pytest.raises(InputFileError, match="metrics.jsonl: is not a file; move it out of the output dir"):
        train(train_config(tiny, run_copy, max_steps=3, resume="latest"))
