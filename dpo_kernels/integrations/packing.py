"""Padding-free batches: pack right-padded rows into one `[1, N]` row with `cu_seqlens`, and next-token labels."""
from __future__ import annotations

from typing import NamedTuple

import torch

from dpo_kernels.constants import IGNORE_INDEX


class PackedBatch(NamedTuple):
    input_ids: torch.Tensor  # [1, N] the real tokens of every row, row after row
    position_ids: torch.Tensor  # [1, N] restarting at 0 per row: how transformers recognizes packed sequences
    labels: torch.Tensor  # [N]
    cu_seqlens: torch.Tensor  # [R+1] int32, flash-attention's varlen convention


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> PackedBatch:
    """Packs a right-padded batch (TRL's collator pads on the right).

    Args:
        input_ids, attention_mask, labels: `[R, T]`; each row's real tokens are its first `attention_mask.sum()`.
    Returns:
        a `PackedBatch`; row order is kept, so chosen rows stay first.
    """
    if input_ids.shape != attention_mask.shape or labels.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
            f"{tuple(labels.shape)} must have the same [R, T] shape"
        )
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if not torch.equal(keep, positions < lengths.unsqueeze(1)):
        raise ValueError("padding-free packing needs right-padded rows (attention_mask of ones, then zeros)")
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return PackedBatch(
        input_ids=input_ids[keep].unsqueeze(0),
        position_ids=positions[keep].unsqueeze(0),
        labels=labels[keep],
        cu_seqlens=cu_seqlens,
    )


def next_token_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX):
    """The label each position predicts (the HF shift), flattened, and the row of each position.

    Args:
        labels: `[R, T]` padded, or `[N]` packed with `cu_seqlens` `[R+1]`.
    Returns:
        `(next_labels [R*T] or [N] int64, row [same] int64)`: `next_labels[i]` is the label of the token after
        position i in the same sequence, `ignore_index` at each sequence's last position.
    """
    if cu_seqlens is None:
        rows, length = labels.shape
        shifted = torch.full_like(labels, ignore_index)
        shifted[:, :-1] = labels[:, 1:]
        row = torch.arange(rows, device=labels.device).repeat_interleave(length)
        return shifted.reshape(-1), row
    labels = labels.reshape(-1)
    shifted = torch.full_like(labels, ignore_index)
    shifted[:-1] = labels[1:]
    ends = cu_seqlens[1:].long()
    lengths = ends - cu_seqlens[:-1].long()
    last = ends[lengths > 0] - 1
    shifted[last] = ignore_index
    row = torch.arange(lengths.numel(), device=labels.device).repeat_interleave(lengths)
    return shifted, row
