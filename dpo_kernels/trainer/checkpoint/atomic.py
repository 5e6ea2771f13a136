"""Writing files so that a kill or a full disk at any moment leaves the old data or the new, never a mix.

The primitives the checkpoint writer and the metrics log build on: create-and-write (`write_file`), `torch.save`
that reports a full disk as the OSError it is (`torch_save`), replacing a directory by renames only (`replace_dir`),
making a write durable (`fsync_file`, `fsync_dir`) and recognising a full disk whatever raised it (`no_space`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import torch


def write_file(path: Path, write) -> None:
    """Creates `path` and calls `write(binary file)`; every checkpoint file but the model's is written here."""
    with open(path, "wb") as f:
        write(f)


def torch_save(obj, f) -> None:
    """`torch.save(obj, f)` into an open binary file, raising the OSError of a failed write (a full disk) itself."""
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


def replace_dir(new: Path, final: Path, old: Path) -> None:
    """Puts `new` at `final` by renames; a kill at any moment leaves a complete copy under `final`, `new` or `old`."""
    if final.exists():
        os.rename(final, old)
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(old, final)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed at the next start
    else:
        os.rename(new, final)
        fsync_dir(final.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is synced; some filesystems cannot sync a directory.
    with contextlib.suppress(OSError):
        fsync_file(path)


_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file-size limit is reached (ulimit -f)"}
# safetensors reports a failed write only in its message.
_NO_ROOM_TEXT = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
                 "Disk quota exceeded": errno.EDQUOT, "os error 122": errno.EDQUOT,
                 "File too large": errno.EFBIG, "os error 27": errno.EFBIG}


def no_space(error: BaseException | None) -> str | None:
    """Why `error` (or an error it was raised from) is a write that ran out of room (a full disk, a quota, the
    file-size limit), or None when it is another error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            return _NO_ROOM[error.errno]
        for text, code in _NO_ROOM_TEXT.items():
            if text in str(error):
                return _NO_ROOM[code]
        error = error.__cause__ or error.__context__
    return None
