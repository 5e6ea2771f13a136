"""Reference log-probs for the trainer: from a frozen model, from a disk cache (`--precompute-ref`), or none.

`Reference` is what the loop asks for each batch's `(ref_chosen, ref_rejected)`, or for a group batch its `[R]`
per-response log-probs (the cache then holds `[R]` in data order, with each group's size). With `--precompute-ref`,
one no-grad pass of the reference model over a dataset gives each pair's `(ref_chosen, ref_rejected)` log-probs;
they are stored as safetensors under a key that hashes the reference model's identity (its config and weight
files' names, sizes and mtimes — cheap for multi-GB checkpoints), the dataset's token fingerprint and the numeric
settings, so that a later run with the same model and data reuses them and any change recomputes them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dpo_kernels.trainer import distributed
from dpo_kernels.trainer.batches import collate_pairs, packing_problem, shared_prompt_problem
from dpo_kernels.trainer.data import PreferenceData
from dpo_kernels.trainer.forward import reference_logps
from dpo_kernels.trainer.group_batches import collate_any_groups
from dpo_kernels.trainer.models import decoder_layer_types, load_model

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


def _read_cache(path) -> dict | None:
    """The tensors of the cache file `path`, or None when it is absent or unreadable (a file truncated by a crash
    or a full disk is recomputed, with a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        warnings.warn(f"{path}: unreadable reference log-prob cache ({e}); recomputing it", stacklevel=3)
        return None


def _write_cache(path, tensors: dict) -> None:
    """Atomic write (temporary file, then rename) so a concurrent or killed run never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_cached(path, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(chosen [N], rejected [N])` fp32 from `path`, or None when absent, unreadable or of another size (an
    unreadable file, truncated by a crash or a full disk, is recomputed with a warning)."""
    tensors = _read_cache(path)
    if tensors is None:
        return None
    chosen, rejected = tensors.get("chosen"), tensors.get("rejected")
    if chosen is None or rejected is None or chosen.numel() != num_pairs or rejected.numel() != num_pairs:
        return None
    return chosen.float(), rejected.float()


def save_cached(path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Atomic write of a pair dataset's `[N]` chosen and rejected log-probs (`_write_cache`)."""
    _write_cache(path, {"chosen": chosen.detach().float().cpu().contiguous(),
                        "rejected": rejected.detach().float().cpu().contiguous()})


def load_cached_groups(path, sizes: list[int]) -> torch.Tensor | None:
    """`logps [R]` fp32 of groups of `sizes` from `path`, or None when absent, unreadable or of other groups."""
    tensors = _read_cache(path)
    if tensors is None:
        return None
    logps, cached_sizes = tensors.get("logps"), tensors.get("group_sizes")
    if logps is None or cached_sizes is None or cached_sizes.tolist() != list(sizes) or logps.numel() != sum(sizes):
        return None
    return logps.float()


def save_cached_groups(path, logps: torch.Tensor, sizes: list[int]) -> None:
    """Atomic write of a group dataset's `[R]` log-probs and its group sizes (`_write_cache`)."""
    _write_cache(path, {"logps": logps.detach().float().cpu().contiguous(),
                        "group_sizes": torch.tensor(sizes, dtype=torch.int64)})


class ReferenceForward(nn.Module):
    """The frozen reference model, whose `forward` gives the per-row log-probs `[2B]` fp32 of a batch.

    Under FSDP2 it is sharded whole (each decoder layer, then this root) like the policy's `DPOForward`: the root's
    hooks gather the parameters outside the layers (embeddings, final norm, lm_head) around the whole call, inside
    which the fused backend reads the backbone and the head weight directly.
    """

    def __init__(self, model: nn.Module, backend: str, autocast_dtype):
        super().__init__()
        self.model, self.backend, self.autocast_dtype = model, backend, autocast_dtype

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        return reference_logps(self.model, self.backend, input_ids, attention_mask, labels, self.autocast_dtype)


class Reference:
    """Reference log-probs for a batch: from a frozen model, from the precomputed cache, or zeros (reference-free).

    `config` is the run's TrainConfig; `free` says the run is reference-free (no model, no cache); `group` that the
    data are groups (`trainer.group_data`, `--group-by-prompt` ones too), which run in the shared layout where the
    model supports it. Under `--distributed fsdp` the reference model is sharded over the processes
    (`distributed.shard_frozen`), so every process runs its forwards together: each runs one per micro-batch, and
    all of them evaluate and precompute in the same order.
    """

    def __init__(self, config, ctx, out_dir: Path, dtype, autocast_dtype, pad_id: int, *, free: bool,
                 group: bool = False):
        self.c, self.ctx, self.pad_id = config, ctx, pad_id
        self.free, self.group = free, group
        self.model_id = config.ref_model or config.model
        self.dtype, self.autocast_dtype = dtype, autocast_dtype
        self.cache_dir = Path(config.ref_cache_dir) if config.ref_cache_dir else Path(out_dir) / "ref-cache"
        self.module = None   # ReferenceForward (sharded under fsdp) around `model`
        self.model = None    # the Hugging Face model
        self.tables: dict[str, tuple[torch.Tensor, ...]] = {}  # (chosen, rejected), or groups' (logps, offsets)
        self.cache_files: dict[str, str] = {}
        if not self.free and not config.precompute_ref:
            self.module = self._load()
            self.model = self.module.model

    def _load(self) -> ReferenceForward:
        what = "reference model" if self.c.ref_model else "model"
        model = load_model(self.model_id, self.dtype, self.ctx.device, what).eval()
        model.requires_grad_(False)
        module = ReferenceForward(model, self.c.loss_backend, self.autocast_dtype)
        return distributed.shard_frozen(module, self.ctx, decoder_layer_types(model))

    def _forward(self, module: ReferenceForward, batch: dict) -> torch.Tensor:
        logps = module(batch["input_ids"], batch["attention_mask"], batch["labels"])
        distributed.reshard_root(module)
        return logps

    def precompute(self, name: str, data: PreferenceData) -> None:
        """Fills the table for `data` from the disk cache when every process finds it there, else computes it
        (`_compute`) and caches it."""
        settings = {"backend": self.c.loss_backend, "dtype": str(self.dtype), "autocast": str(self.autocast_dtype),
                    "pad": self.pad_id}
        path = cache_path(self.cache_dir, cache_key(self.model_id, data.fingerprint, settings))
        self.cache_files[name] = str(path)
        sizes = [e.size for e in data.examples] if self.group else None
        cached = load_cached_groups(path, sizes) if self.group else load_cached(path, len(data))
        # The processes compute together (a sharded reference's forwards are collective): all or none.
        if not self.ctx.all_true(cached is not None):
            cached = self._compute(data)
            if self.ctx.is_main:
                if self.group:
                    save_cached_groups(path, cached, sizes)
                else:
                    save_cached(path, *cached)
            self.ctx.barrier()
        if self.group:
            offsets = torch.tensor([0, *itertools.accumulate(sizes)])
            self.tables[name] = (cached, offsets)
        else:
            self.tables[name] = cached

    def _collate(self, examples, share: bool, pack: bool) -> dict:
        cap = self.c.max_row_tokens if pack else None
        if self.group:
            return collate_any_groups(examples, self.pad_id, self.ctx.device, share_prompt=share, packing=pack,
                                      max_row_tokens=cap)
        return collate_pairs(examples, self.pad_id, self.ctx.device, share_prompt=share, packing=pack,
                             max_row_tokens=cap)

    def _compute(self, data: PreferenceData):
        """`(chosen [N], rejected [N])` fp32 of `data` (groups: `logps [R]`, group by group): process r scores
        batches r, r + P, r + 2P, ... (batches cut as one process cuts them, so the numbers do not depend on P), and
        one all-gather gives every process the whole table."""
        module = self._load()
        # The reference pass shares the prompt and packs too, where the model supports it (else unshared or padded
        # rows, silently: the policy's check warns once).
        share = (self.group or self.c.share_prompt) and shared_prompt_problem(module.model) is None
        pack = self.c.packing and packing_problem(module.model) is None
        bs = self.c.eval_batch_size or self.c.batch_size
        starts = range(0, len(data), bs)
        rounds = -(-len(starts) // self.ctx.world)
        sharded = self.ctx.mode == "fsdp"
        mine = {}
        for k in range(rounds):
            i = k * self.ctx.world + self.ctx.rank
            if i >= len(starts) and not sharded:
                break
            # A sharded reference runs each forward on every process: one without a batch left repeats the last.
            start = starts[min(i, len(starts) - 1)]
            batch = self._collate(data.examples[start:start + bs], share, pack)
            logps = self._forward(module, batch).cpu()
            if i < len(starts):
                mine[i] = logps
        del module
        parts = {i: logps for part in self.ctx.gather_objects(mine) for i, logps in part.items()}
        logps = [parts[i] for i in range(len(starts))]
        if self.group:
            return torch.cat(logps)
        return (torch.cat([x[:x.shape[0] // 2] for x in logps]), torch.cat([x[x.shape[0] // 2:] for x in logps]))

    def logps(self, name: str, indices: list[int], batch: dict):
        """`(ref_chosen [B], ref_rejected [B])` fp32, or `(None, None)` when reference-free; for groups
        `(ref_logps [R],)` group by group, or `(None,)`."""
        if self.group:
            return (self._group_logps(name, indices, batch),)
        if self.free:
            return None, None
        if self.module is None:
            chosen, rejected = self.tables[name]
            idx = torch.tensor(indices)
            return chosen[idx].to(self.ctx.device), rejected[idx].to(self.ctx.device)
        logps = self._forward(self.module, batch)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    def _group_logps(self, name: str, indices: list[int], batch: dict) -> torch.Tensor | None:
        if self.free:
            return None
        if self.module is None:
            logps, offsets = self.tables[name]
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
            return logps[rows].to(self.ctx.device)
        return self._forward(self.module, batch)
