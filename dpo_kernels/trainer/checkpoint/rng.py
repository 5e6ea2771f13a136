"""The torch RNG states a checkpoint stores per process (`rng_state.pt`) and the Python/NumPy ones
(`trainer_state.json`'s "rng"): reading, restoring and validating them without touching the global generators."""
from __future__ import annotations

import random

import numpy as np
import torch


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


def is_torch_rng_state(states) -> bool:
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


def check_python_rng_state(state: dict) -> None:
    # Throwaway generators validate the states exactly, without touching the global ones.
    python, numpy = _python_rng_tuples(state)
    random.Random().setstate(python)
    np.random.RandomState().set_state(numpy)


def set_python_rng_state(state: dict) -> None:
    python, numpy = _python_rng_tuples(state)
    random.setstate(python)
    np.random.set_state(numpy)
