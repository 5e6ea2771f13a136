"""Precomputed reference log-probs, cached on disk (`--precompute-ref`).

One no-grad pass of the reference model over a dataset gives each pair's `(ref_chosen, ref_rejected)` log-probs;
they are stored as safetensors under a key that hashes the reference model's identity (its config and weight
files' names, sizes and mtimes — cheap for multi-GB checkpoints), the dataset's token fingerprint and the numeric
settings, so that a later run with the same model and data reuses them and any change recomputes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


def _model_dir(model_id: str) -> Path | None:
    if os.path.isdir(model_id):
        return Path(model_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not in the local cache: the id alone keys the cache
        return None


def model_identity(model_id: str) -> dict:
    """What identifies a model's weights without reading them."""
    root = _model_dir(model_id)
    if root is None:
        return {"id": model_id}
    files = []
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    return {"path": str(root.resolve()), "files": files}


def cache_key(model_id: str, data_fingerprint: str, settings: dict) -> str:
    blob = json.dumps({"model": model_identity(model_id), "data": data_fingerprint, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"ref-logps-{key}.safetensors"


def load_cached(path, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(chosen [N], rejected [N])` fp32 from `path`, or None when absent or of another size."""
    path = Path(path)
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    chosen, rejected = tensors.get("chosen"), tensors.get("rejected")
    if chosen is None or rejected is None or chosen.numel() != num_pairs or rejected.numel() != num_pairs:
        return None
    return chosen.float(), rejected.float()


def save_cached(path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Atomic write (temporary file, then rename) so a concurrent or killed run never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({"chosen": chosen.detach().float().cpu().contiguous(),
                   "rejected": rejected.detach().float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
