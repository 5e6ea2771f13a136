"""Training checkpoints: `OUTPUT_DIR/checkpoint-STEP/`, saved (`save_state`) and restored (`restore_state`) here.

A checkpoint holds the policy (`save_pretrained`, safetensors) and tokenizer, `optimizer.pt` and `scheduler.pt`
(tensors and plain containers, loaded with `torch.load(weights_only=True)`: nothing is unpickled), `rng_state.pt`
(each rank's torch RNG states) and `trainer_state.json` (a `TrainState`: step, counters, each rank's Python and NumPy
RNG states, the data fingerprint and the run's settings under "config").

Crash safety (docs/design.md, "Crash safety"):
- A run holds an exclusive lock on `OUTPUT_DIR/.lock` from start to end (`claim_output_dir`), so a second run on the
  same directory stops with a message, and every temporary that start-up finds belongs to a dead run.
- A save writes `.tmp-checkpoint-STEP-ID/`, `trainer_state.json` last (its presence marks a complete copy), syncs it
  to disk and renames it into place. Re-saving a step renames the existing copy to `.old-checkpoint-STEP-ID` first and
  deletes it only once the new copy is in place: at every moment a complete copy exists under one of the names.
- Start-up, with the lock held, finishes a replace a kill interrupted (a missing `checkpoint-STEP` is restored from
  its complete new copy, else from the old one) and only then deletes the dead temporaries.
- `read_state` checks every field of `trainer_state.json` and that every file is present and whole before the run
  loads anything, so a corrupt checkpoint is one line naming the file, never a traceback or a wrong resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import random
import re
import shutil
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpo_kernels.trainer.errors import DiskFullError, InputFileError, UserInputError
from dpo_kernels.trainer.models import check_model_dir

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TENSOR_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt")
LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-checkpoint-"
_OLD_PREFIX = ".old-checkpoint-"
_TEMPORARY = re.compile(r"\.(tmp|old)-checkpoint-(\d+)-[0-9a-f]+")


@dataclass
class TrainState:
    """Where a run is, as `trainer_state.json` stores it (field names are the file's keys)."""

    step: int                     # optimizer steps taken (the checkpoint's STEP)
    total_steps: int              # steps the learning-rate schedule spans
    skipped_steps: int = 0        # steps skipped for a non-finite loss, in all
    nonfinite_run: int = 0        # of which the latest ones in a row
    data_fingerprint: str = ""    # the training data's token fingerprint (resuming on other data is refused)
    config: dict = field(default_factory=dict)  # the run's TrainConfig as a dict (resume compares settings)
    rng: list = field(default_factory=list)     # per rank: {"python": ..., "numpy": ...} (filled by save_state)


# ------------------------------------------------------------------------------------------------- finding them
def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = re.fullmatch(PREFIX + r"(\d+)", p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


# ----------------------------------------------------------------------------------------------- the output dir
@contextlib.contextmanager
def claim_output_dir(path, ctx):
    """Creates the output dir, proves it writable, locks it for the run and finishes interrupted saves; yields it.

    Only the main process touches the directory; the others learn whether it may be used (and why not) from it. The
    lock is released on exit, and by the kernel if the process dies.
    """
    out = Path(path)
    lock, refusal = None, None
    try:
        if ctx.is_main:
            try:
                _prove_writable(out)
                lock = _lock(out)
                if lock is not None:
                    recover_interrupted_saves(out)
            except UserInputError as e:
                refusal = e
        main_refusal = ctx.gather_objects(None if refusal is None else str(refusal))[0]
        if refusal is not None:
            raise refusal
        if main_refusal is not None:
            raise UserInputError(main_refusal)
        yield out
    finally:
        if lock is not None:
            os.close(lock)


def _prove_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputFileError(out, f"output_dir is not writable: {e.strerror or e}") from None


def _lock(out: Path) -> int | None:
    """A descriptor holding an exclusive flock on OUT/.lock, or None where the filesystem has no locks."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputFileError(out, f"in use by another training run (process {holder} holds {LOCK_FILE}); wait for "
                                  "it to end or choose another output_dir") from None
    except OSError as e:
        os.close(fd)
        warnings.warn(f"{out}: cannot lock the output dir ({e.strerror or e}); make sure no other run uses it. "
                      "Temporaries of interrupted saves are left in place", stacklevel=3)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{os.uname().nodename}\n".encode(), 0)
    return fd


def recover_interrupted_saves(output_dir) -> list[Path]:
    """Finishes replaces a kill interrupted and deletes the dead temporaries; returns the restored checkpoints.

    Call only with the output dir locked: then no live process writes any temporary here.
    """
    out = Path(output_dir)
    temporaries = []
    for p in out.iterdir():
        m = _TEMPORARY.fullmatch(p.name)
        if m and p.is_dir():
            # For each step, the new copy (tmp) is preferred to the old one: it is what the run was saving.
            temporaries.append((int(m.group(2)), m.group(1) == "old", p))
    restored = []
    for step, _, p in sorted(temporaries):
        final = out / f"{PREFIX}{step}"
        if not final.exists() and (p / STATE_FILE).is_file():
            os.rename(p, final)
            restored.append(final)
            warnings.warn(f"{final}: restored from {p.name}, a complete copy left by an interrupted save",
                          stacklevel=2)
    for _, _, p in temporaries:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    if temporaries:
        _fsync_dir(out)
    return restored


# --------------------------------------------------------------------------------------------------------- saving
def save_state(output_dir, state: TrainState, *, ctx, dpo, optimizer, scheduler, tokenizer,
               sharded: bool = False) -> Path:
    """Writes `output_dir/checkpoint-{state.step}` and returns its path (call on every rank).

    Gathers the full (unsharded when `sharded`) model and optimizer states and every rank's RNG states; rank 0
    writes. `dpo` is the module the optimizer was built on; its `.model` is the policy that is saved.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    model_state = get_model_state_dict(dpo.model, options=options) if sharded else None
    optim_state = get_optimizer_state_dict(dpo, optimizer, options=options)
    rng = ctx.gather_objects(rng_tensors())
    py_rng = ctx.gather_objects(python_rng_state())
    path = Path(output_dir) / f"{PREFIX}{state.step}"
    failure = None
    if ctx.is_main:
        try:
            write_checkpoint(output_dir, state.step, model=dpo.model, tokenizer=tokenizer,
                             model_state_dict=model_state, optimizer_state=optim_state,
                             scheduler_state=scheduler.state_dict(), rng_per_rank=rng,
                             trainer_state=dataclasses.asdict(dataclasses.replace(state, rng=py_rng)))
        except Exception as e:
            failure = e
    # Every process learns whether the write succeeded (rather than waiting for process 0 at a barrier).
    main_failure = ctx.gather_objects(None if failure is None else (isinstance(failure, UserInputError),
                                                                    str(failure)))[0]
    if failure is not None:
        raise failure
    if main_failure is not None:
        user_error, message = main_failure
        raise (UserInputError if user_error else RuntimeError)(f"process 0 could not save {path}: {message}")
    return path


def write_checkpoint(output_dir, step: int, *, model, tokenizer, model_state_dict, optimizer_state, scheduler_state,
                     rng_per_rank: list[dict], trainer_state: dict) -> Path:
    """Writes `output_dir/checkpoint-{step}` by renames only (rank 0) and returns its path.

    `model_state_dict` is the full state dict to save, or None for `model.state_dict()`. Raises DiskFullError when
    the device fills up; the partial copy is removed either way and an existing checkpoint-STEP stays as it was.
    """
    out = Path(output_dir)
    final = out / f"{PREFIX}{step}"
    tag = uuid.uuid4().hex[:8]
    tmp = out / f"{_TMP_PREFIX}{step}-{tag}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), state_dict=model_state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, obj in zip(TENSOR_FILES, (optimizer_state, scheduler_state, rng_per_rank), strict=True):
            write_file(tmp / name, lambda f, obj=obj: _torch_save(obj, f))
        for p in tmp.iterdir():
            if p.is_file():
                _fsync_file(p)
        # Written last, once the rest is on disk: its presence is what marks the copy complete.
        write_file(tmp / STATE_FILE, lambda f: f.write(json.dumps(trainer_state, indent=1).encode()))
        _fsync_file(tmp / STATE_FILE)
        _fsync_dir(tmp)
        _replace_dir(tmp, final, out / f"{_OLD_PREFIX}{step}-{tag}")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise DiskFullError(final, "the partial copy is removed and earlier checkpoints are intact; free "
                                       "space and continue with --resume") from None
        raise
    return final


def write_file(path: Path, write) -> None:
    """Creates `path` and calls `write(binary file)`; every checkpoint file but the model's is written here."""
    with open(path, "wb") as f:
        write(f)


def _torch_save(obj, f) -> None:
    # torch.save through a plain path reports a full disk as "unexpected pos"; through a Python file object the
    # OSError it swallowed can be recovered and raised instead.
    sink = _RecordingWriter(f)
    try:
        torch.save(obj, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


class _RecordingWriter:
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _replace_dir(new: Path, final: Path, old: Path) -> None:
    """Puts `new` at `final` by renames; a kill at any moment leaves a complete copy under `final`, `new` or `old`."""
    if final.exists():
        os.rename(final, old)
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(old, final)
            raise
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed at the next start
    else:
        os.rename(new, final)
        _fsync_dir(final.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is synced; some filesystems cannot sync a directory.
    with contextlib.suppress(OSError):
        _fsync_file(path)


def _no_space(error: BaseException | None) -> bool:
    """Whether `error` (or an error it was raised from) is a full disk; safetensors reports it in its message."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# -------------------------------------------------------------------------------------------------------- reading
def read_state(checkpoint) -> TrainState:
    """The validated TrainState of a checkpoint dir, after checking that all its files are present and whole.

    Raises InputFileError naming the file and the problem. Cheap (no tensor is loaded): the trainer calls it before
    loading any model.
    """
    root = Path(checkpoint)
    path = root / STATE_FILE
    if not root.is_dir():
        raise InputFileError(root, "no such checkpoint directory")
    if not path.is_file():
        raise InputFileError(root, f"not a complete checkpoint (no {STATE_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(path, f"not valid JSON ({e})") from None
    state = _state_from_json(raw, path)
    m = re.fullmatch(PREFIX + r"(\d+)", root.name)
    if m and int(m.group(1)) != state.step:
        raise InputFileError(path, f"step {state.step} disagrees with the directory name {root.name}")
    check_model_dir(root)
    for name in TENSOR_FILES:
        _check_torch_file(root / name)
    return state


def _state_from_json(raw, path: Path) -> TrainState:
    if not isinstance(raw, dict):
        raise InputFileError(path, f"expected a JSON object, got {type(raw).__name__}")
    required = ("step", "total_steps", "skipped_steps", "nonfinite_run", "data_fingerprint", "rng")
    missing = [k for k in required if k not in raw]
    if missing:
        raise InputFileError(path, f"lacks field(s) {', '.join(missing)}")
    for name in ("step", "total_steps", "skipped_steps", "nonfinite_run"):
        value = raw[name]
        if type(value) is not int:
            raise InputFileError(path, f"'{name}' must be an integer, got {type(value).__name__} {value!r}")
    ranges = [("step", raw["step"] >= 0, ">= 0"), ("total_steps", raw["total_steps"] >= 1, ">= 1"),
              ("skipped_steps", 0 <= raw["skipped_steps"] <= raw["step"], "in [0, step]"),
              ("nonfinite_run", 0 <= raw["nonfinite_run"] <= raw["skipped_steps"], "in [0, skipped_steps]")]
    for name, ok, rule in ranges:
        if not ok:
            raise InputFileError(path, f"'{name}' must be {rule}, got {raw[name]}")
    if not isinstance(raw["data_fingerprint"], str) or not raw["data_fingerprint"]:
        raise InputFileError(path, "'data_fingerprint' must be a non-empty string")
    config = raw.get("config", {})
    if not isinstance(config, dict):
        raise InputFileError(path, f"'config' must be an object, got {type(config).__name__}")
    rng = raw["rng"]
    if not isinstance(rng, list) or not rng:
        raise InputFileError(path, "'rng' must be a non-empty list (one entry per process)")
    for i, entry in enumerate(rng):
        try:
            _check_python_rng_state(entry)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise InputFileError(path, f"'rng'[{i}] is not a saved Python/NumPy RNG state ({e})") from None
    return TrainState(step=raw["step"], total_steps=raw["total_steps"], skipped_steps=raw["skipped_steps"],
                      nonfinite_run=raw["nonfinite_run"], data_fingerprint=raw["data_fingerprint"], config=config,
                      rng=rng)


def _check_torch_file(path: Path) -> None:
    # torch.save writes a zip archive whose directory is at the end: a truncated file has none.
    if not path.is_file():
        raise InputFileError(path, "missing from the checkpoint")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError):
        raise InputFileError(path, "truncated or not written by torch.save") from None


def load_tensors(path):
    """A torch-saved file, loaded without unpickling arbitrary objects; InputFileError when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise InputFileError(path, f"cannot be loaded: {str(e).strip().splitlines()[0]}") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain containers (UnpicklingError)
        raise InputFileError(path, f"holds objects other than tensors and plain containers ({type(e).__name__}); "
                                   "not loaded") from None


# ------------------------------------------------------------------------------------------------------ restoring
def restore_state(checkpoint, *, ctx, dpo, optimizer, scheduler, total_steps: int, data_fingerprint: str,
                  data_source: str = "the training data") -> TrainState:
    """Restores the optimizer, scheduler and this rank's RNG states from a checkpoint dir and returns its TrainState.

    The weights are loaded separately (the policy is built from the checkpoint dir). Raises InputFileError, before
    changing any state, for a step past `total_steps`, other data, another number of processes or a file that does
    not load or fit.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    root = Path(checkpoint)
    state = read_state(root)
    state_file = root / STATE_FILE
    if state.step > total_steps:
        raise InputFileError(state_file, f"step {state.step} is past this run's last step {total_steps} "
                                         "(raise max_steps to continue it)")
    if state.data_fingerprint != data_fingerprint:
        raise InputFileError(root, f"was trained on other data (token fingerprint differs from {data_source})")
    if ctx.rank >= len(state.rng):
        raise InputFileError(state_file, f"saved by {len(state.rng)} process(es); this run has {ctx.world}")
    optimizer_state = load_tensors(root / "optimizer.pt")
    scheduler_state = load_tensors(root / "scheduler.pt")
    rng = load_tensors(root / "rng_state.pt")
    if not isinstance(rng, list) or len(rng) <= ctx.rank or not _is_torch_rng_state(rng[ctx.rank]):
        raise InputFileError(root / "rng_state.pt", "not a list of per-process torch RNG states for this run")

    try:
        set_optimizer_state_dict(dpo, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        raise InputFileError(root / "optimizer.pt", f"does not fit this model's parameters ({type(e).__name__}: "
                                                    f"{e})") from None
    try:
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputFileError(root / "scheduler.pt", f"not a learning-rate scheduler state ({e})") from None
    set_rng_tensors(rng[ctx.rank])
    set_python_rng_state(state.rng[ctx.rank])
    return state


# ------------------------------------------------------------------------------------------------------------- RNG
def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and every visible CUDA device)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_tensors(states: dict[str, torch.Tensor]) -> None:
    """Restores `rng_tensors`' states: CPU, and each saved CUDA device by its index (`cuda10` after `cuda9`) where
    that device is visible now; a device that is no longer visible held no state this process can use."""
    torch.set_rng_state(states["cpu"])
    if not torch.cuda.is_available():
        return
    visible = torch.cuda.device_count()
    for key, state in states.items():
        if key.startswith("cuda") and int(key[4:]) < visible:
            torch.cuda.set_rng_state(state, int(key[4:]))


def _is_torch_rng_state(states) -> bool:
    if not isinstance(states, dict) or not isinstance(states.get("cpu"), torch.Tensor):
        return False
    try:
        torch.Generator().set_state(states["cpu"])
    except (RuntimeError, TypeError):
        return False
    names_ok = all(k == "cpu" or (k.startswith("cuda") and k[4:].isdigit()) for k in states)
    return names_ok and all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in states.values())


def python_rng_state() -> dict:
    version, inner, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(inner), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _python_rng_tuples(state: dict) -> tuple[tuple, tuple]:
    version, inner, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return (version, tuple(inner), gauss), (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def _check_python_rng_state(state: dict) -> None:
    # Throwaway generators validate the states exactly, without touching the global ones.
    python, numpy = _python_rng_tuples(state)
    random.Random().setstate(python)
    np.random.RandomState().set_state(numpy)


def set_python_rng_state(state: dict) -> None:
    python, numpy = _python_rng_tuples(state)
    random.setstate(python)
    np.random.set_state(numpy)
