"""Training checkpoints: `OUTPUT_DIR/checkpoint-STEP/`, written atomically, read without unpickling.

A checkpoint holds the policy (`save_pretrained`, safetensors) and tokenizer, `optimizer.pt` and `scheduler.pt`
(tensors and plain containers: loaded with `torch.load(weights_only=True)`), `rng_state.pt` (each rank's torch RNG
states) and `trainer_state.json` (step, data position, Python/NumPy RNG states, counters). It is written into a
hidden temporary directory which is renamed into place only when complete, so a crash mid-save leaves no
`checkpoint-STEP` behind (and the temporary directory is removed).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"


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


def remove_stale_temporaries(output_dir) -> None:
    """Temporary dirs left by a process killed mid-save (a clean failure removes its own)."""
    out = Path(output_dir)
    if out.is_dir():
        for p in out.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------- RNG
def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and every visible CUDA device)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_tensors(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def python_rng_state() -> dict:
    version, inner, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(inner), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_python_rng_state(state: dict) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -------------------------------------------------------------------------------------------------------- save/load
def save_checkpoint(output_dir, step: int, *, model, tokenizer, model_state_dict, optimizer_state, scheduler_state,
                    rng_per_rank: list[dict], trainer_state: dict) -> Path:
    """Writes `output_dir/checkpoint-{step}` atomically (call on rank 0 only) and returns its path.

    `model_state_dict` is the full (unsharded) state dict to save, or None for `model.state_dict()`.
    """
    out = Path(output_dir)
    final = out / f"{PREFIX}{step}"
    tmp = out / f"{_TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), state_dict=model_state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng_per_rank, tmp / "rng_state.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1)
        if final.exists():
            # Re-saving a step (a run resumed from it ends there again): replace the old copy.
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_trainer_state(checkpoint) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    with open(path) as f:
        return json.load(f)


def load_tensors(checkpoint, name: str):
    """A torch-saved file of the checkpoint, loaded without unpickling arbitrary objects."""
    return torch.load(Path(checkpoint) / name, map_location="cpu", weights_only=True)
