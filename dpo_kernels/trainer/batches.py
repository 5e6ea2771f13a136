"""The trainer's batches in each layout: unshared rows (`trainer.data.collate`), one shared-prompt row per pair,
and with packing, the unshared sequences (`trainer.packing`) or the shared pairs packed into rows of at most
`max_row_tokens` tokens, each sequence or pair its own document in the attention mask.

All give the dict the trainer's step reads: `input_ids`, `attention_mask`, `labels`, `num_tokens` (the pairs' real
tokens, counted as the unshared rows hold them, so tokens/s compares across layouts). In the shared and packed
layouts `labels` is the `SharedPromptBatch` itself and `attention_mask` is None: `trainer.forward` runs the model on
it with its own mask and position ids. `input_ids.numel()` is the positions the backbone runs on, padding included,
in every layout, so tokens/backbone shows what sharing and packing save.
"""
from __future__ import annotations

import torch
from torch import nn

from dpo_kernels.hf.shared_prompt import SharedPromptUnsupported, check_shared_prompt_support
from dpo_kernels.shared_prompt.batch import build_shared_batch, pairs_from_examples
from dpo_kernels.trainer.data import collate, to_device
from dpo_kernels.trainer.packing import build_packed_pairs

__all__ = ["collate_pairs", "packing_problem", "shared_prompt_problem"]


def collate_pairs(examples, pad_id: int, device: torch.device, *, share_prompt: bool, packing: bool = False,
                  max_row_tokens: int | None = None) -> dict:
    """The batch of the trainer's tokenized pairs (`trainer.data.Example`) on `device`: in the shared-prompt layout
    when `share_prompt`, else as unshared rows; with `packing`, padding-free rows of at most `max_row_tokens` tokens
    (None: one row), where a pair (shared) or a sequence (unshared) longer than the cap gets a row of its own."""
    if not share_prompt and not packing:
        return to_device(collate(examples, pad_id), device)
    if share_prompt:
        batch = build_shared_batch(pairs_from_examples(examples), pad_id=pad_id, device=device, pack=packing,
                                   max_row_tokens=max_row_tokens, oversized_own_row=True)
    else:
        batch = build_packed_pairs(examples, pad_id, max_row_tokens, device)
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


def packing_problem(*models: nn.Module | None) -> SharedPromptUnsupported | None:
    """Why packed rows cannot run on one of `models`, or None when they can: they keep their documents apart with
    the shared-prompt layout's attention mask, so a model runs them exactly where it runs that layout."""
    return shared_prompt_problem(*models)
