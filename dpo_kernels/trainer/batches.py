"""The trainer's batches in either layout: unshared rows (`trainer.data.collate`) or one shared-prompt row per pair.

Both give the dict the trainer's step reads: `input_ids`, `attention_mask`, `labels`, `num_tokens` (the pairs' real
tokens, counted as the unshared rows hold them, so tokens/s compares across layouts). In the shared layout `labels`
is the `SharedPromptBatch` itself and `attention_mask` is None: `trainer.forward` runs the model on it with its
own mask and position ids. `input_ids.numel()` is the positions the backbone runs on, padding included, in both.
"""
from __future__ import annotations

import torch
from torch import nn

from dpo_kernels.hf.shared_prompt import SharedPromptUnsupported, check_shared_prompt_support
from dpo_kernels.shared_prompt.batch import build_shared_batch, pairs_from_examples
from dpo_kernels.trainer.data import collate, to_device

__all__ = ["collate_pairs", "shared_prompt_problem"]


def collate_pairs(examples, pad_id: int, device: torch.device, *, share_prompt: bool) -> dict:
    """The batch of the trainer's tokenized pairs (`trainer.data.Example`) on `device`, in the shared-prompt layout
    when `share_prompt`, else as unshared rows."""
    if not share_prompt:
        return to_device(collate(examples, pad_id), device)
    batch = build_shared_batch(pairs_from_examples(examples), pad_id=pad_id, device=device)
    real = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return {"input_ids": batch.input_ids, "attention_mask": None, "labels": batch,
            "num_tokens": torch.tensor(real, device=device)}


def shared_prompt_problem(*models: nn.Module | None) -> SharedPromptUnsupported | None:
    """Why the shared-prompt layout cannot run on one of `models` (None entries skipped; its message says why, its
    `model` names the model's class), or None when it can."""
    for model in models:
        if model is None:
            continue
        try:
            check_shared_prompt_support(model)
        except SharedPromptUnsupported as e:
            return e
    return None
