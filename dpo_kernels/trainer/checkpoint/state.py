"""What a checkpoint directory holds and how it is read back: the names on disk, `TrainState` (the schema of
`trainer_state.json`), and `read_state`, which checks every field and file before the run loads anything, so that a
corrupt checkpoint is one line naming the file, never a traceback or a wrong resume."""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpo_kernels.trainer.checkpoint.rng import check_python_rng_state
from dpo_kernels.trainer.errors import InputFileError
from dpo_kernels.trainer.models import check_model_dir

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TENSOR_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt")
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
TEMPORARY = re.compile(r"\.(tmp|old)-checkpoint-(\d+)-[0-9a-f]+")


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
    run_id: str = ""              # the run that wrote it ("" before runs had ids): a resume continues only that run


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


def latest_checkpoint(output_dir, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint in `output_dir`, of the run `run_id` when given."""
    dirs = [p for p in checkpoint_dirs(output_dir) if run_id is None or read_run_id(p) == run_id]
    return dirs[-1] if dirs else None


def read_run_id(checkpoint) -> str:
    """The id of the run that wrote a checkpoint dir (`TrainState.run_id`), from its validated state file alone."""
    return _state_from_json(_read_state_json(Path(checkpoint)), Path(checkpoint) / STATE_FILE).run_id


# -------------------------------------------------------------------------------------------------------- reading
def read_state(checkpoint) -> TrainState:
    """The validated TrainState of a checkpoint dir, after checking that all its files are present and whole.

    Raises InputFileError naming the file and the problem. Cheap (no tensor is loaded): the trainer calls it before
    loading any model.
    """
    root = Path(checkpoint)
    path = root / STATE_FILE
    state = _state_from_json(_read_state_json(root), path)
    m = re.fullmatch(PREFIX + r"(\d+)", root.name)
    if m and int(m.group(1)) != state.step:
        raise InputFileError(path, f"step {state.step} disagrees with the directory name {root.name}")
    check_model_dir(root)
    for name in TENSOR_FILES:
        _check_torch_file(root / name)
    return state


def _read_state_json(root: Path):
    path = root / STATE_FILE
    if not root.is_dir():
        raise InputFileError(root, "no such checkpoint directory")
    if not path.is_file():
        raise InputFileError(root, f"not a complete checkpoint (no {STATE_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(path, f"not valid JSON ({e})") from None
    except OSError as e:
        raise InputFileError(path, f"cannot be read ({e.strerror or e})") from None


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
            check_python_rng_state(entry)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise InputFileError(path, f"'rng'[{i}] is not a saved Python/NumPy RNG state ({e})") from None
    run_id = raw.get("run_id", "")
    if not isinstance(run_id, str):
        raise InputFileError(path, f"'run_id' must be a string, got {type(run_id).__name__}")
    return TrainState(step=raw["step"], total_steps=raw["total_steps"], skipped_steps=raw["skipped_steps"],
                      nonfinite_run=raw["nonfinite_run"], data_fingerprint=raw["data_fingerprint"], config=config,
                      rng=rng, run_id=run_id)


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


