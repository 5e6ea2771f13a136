"""The output directory a run owns: its lock, the recovery of saves a kill interrupted, and which run it belongs to.

- A run holds an exclusive lock on `OUTPUT_DIR/.lock` from start to end (`claim_output_dir`), so a second run on the
  same directory stops with a message, and every temporary that start-up finds belongs to a dead run.
- Start-up, with the lock held, finishes a replace a kill interrupted (a missing `checkpoint-STEP` is restored from
  its complete new copy, else from the old one) and only then deletes the dead temporaries.
- `OUTPUT_DIR/run.json` names the run whose checkpoints the directory holds (`own_output_dir`). A fresh start over
  another run's checkpoints is refused unless told to overwrite them; then the new id is written first, by one
  rename, so that from that moment the old checkpoints are never resumed, and they are deleted after it. A resume
  only ever continues the run named there.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

from dpo_kernels.trainer.checkpoint.atomic import fsync_dir, fsync_file
from dpo_kernels.trainer.checkpoint.state import PREFIX, STATE_FILE, TEMPORARY, checkpoint_dirs, read_run_id
from dpo_kernels.trainer.errors import InputFileError, UserInputError

LOCK_FILE = ".lock"
RUN_FILE = "run.json"


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
        m = TEMPORARY.fullmatch(p.name)
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
        fsync_dir(out)
    return restored




def own_output_dir(out: Path, ctx, *, resume: str | None, overwrite: bool) -> str:
    """The id of the run this process starts or continues in the claimed dir `out`, the same on every process.

    Fresh (`resume` None): refused while `out` holds checkpoints, unless `overwrite`; a new id. Resuming the newest
    checkpoint (`resume="latest"`): the run `run.json` names. Resuming a checkpoint dir: the run that wrote it, which
    must be the run `out` holds, if it holds one. Only the main process writes; a refusal reaches every process.
    """
    result, refusal = None, None
    if ctx.is_main:
        try:
            result = _owner(out, resume, overwrite)
        except UserInputError as e:
            refusal = e
    main = ctx.gather_objects((result, None if refusal is None else str(refusal)))[0]
    if refusal is not None:
        raise refusal
    if main[1] is not None:
        raise UserInputError(main[1])
    return main[0]


def _owner(out: Path, resume: str | None, overwrite: bool) -> str:
    held = current_run_id(out)
    if resume == "latest":
        if held is None:
            raise InputFileError(out, "resume=latest but it holds no complete checkpoint-STEP directory")
        return held
    if resume is not None:
        wanted = read_run_id(Path(resume))
        if held is not None and held != wanted and not overwrite:
            raise InputFileError(out, f"holds the checkpoints of another run than {resume}'s; resume that run with "
                                      "--resume alone, choose another output_dir, or pass --overwrite-output-dir to "
                                      "delete them")
    else:
        wanted = uuid.uuid4().hex
        if held is not None and not overwrite:
            latest = checkpoint_dirs(out)[-1].name
            raise InputFileError(out, f"holds the checkpoints of an earlier run (up to {latest}); continue it with "
                                      "--resume, choose another output_dir, or pass --overwrite-output-dir to delete "
                                      "them and start afresh")
    if held != wanted:
        _write_run_id(out, wanted)
    for stale in checkpoint_dirs(out):
        if read_run_id(stale) != wanted:
            shutil.rmtree(stale)
    return wanted


def current_run_id(out: Path) -> str | None:
    """The run whose checkpoints `out` holds: `run.json`'s id; for a dir written before run ids existed, the
    newest checkpoint's; None when it holds no checkpoint of any run."""
    path = Path(out) / RUN_FILE
    if path.exists():
        try:
            run_id = json.loads(path.read_text(encoding="utf-8"))["run_id"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputFileError(path, f"not a run record ({type(e).__name__}); delete it to start afresh") \
                from None
        if not isinstance(run_id, str):
            raise InputFileError(path, "'run_id' must be a string; delete the file to start afresh")
        return run_id if any(read_run_id(p) == run_id for p in checkpoint_dirs(out)) else None
    dirs = checkpoint_dirs(out)
    return read_run_id(dirs[-1]) if dirs else None


def _write_run_id(out: Path, run_id: str) -> None:
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, out / RUN_FILE)
    fsync_dir(out)
