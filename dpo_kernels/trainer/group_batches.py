"""The trainer's group batches: one `[prompt | response 1 | ... | response K]` row per group (`build_group_batch`)
where the model runs the shared layout, else one unshared row `[prompt | response]` per response
(`unshared_group_rows`).

Both give the dict the trainer's step reads, as `trainer.batches.collate_pairs` does: `input_ids`, `attention_mask`
(None in the shared layout, whose `labels` is the `GroupBatch`), `labels`, `num_tokens` (the groups' real tokens as
the unshared rows hold them, so tokens/s compares across layouts), and `group`, the `GroupInfo` the loss reads (or
`pairs`, the `PairIndex` of `--group-by-prompt` batches).
`input_ids.numel()` is the positions the backbone runs on (`tokens/backbone`). Responses are numbered group by
group in both layouts, the order of the `[R]` log-probs.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from dpo_kernels.shared_prompt.groups import build_group_batch, unshared_group_rows


class GroupInfo(NamedTuple):
    """What the group loss reads beside the log-probs: `sizes`, each group's K as host ints, and `scores` `[R]`
    float64 (higher is better), group by group."""

    sizes: tuple[int, ...]
    scores: torch.Tensor


class PairIndex(NamedTuple):
    """The pairs of a `--group-by-prompt` batch: `chosen` and `rejected` `[P]` int64, each pair's responses as
    indices into the batch's `[R]` log-probs; the same pairs as host ints (`pairs`), and each group's number of
    distinct responses (`sizes`), which the fused engine reads without a device read."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    pairs: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]


def _rows(examples, pad_id: int, device, share_prompt: bool, packing: bool, max_row_tokens: int | None) -> dict:
    """The batch tensors of groups (anything with `prompt_ids` and `response_ids`, truncated already); with
    `packing` (shared layout only: the model that cannot share a prompt cannot keep packed documents apart either)
    several groups per row, up to `max_row_tokens`, a longer group in a row of its own."""
    groups = [(e.prompt_ids, e.response_ids) for e in examples]
    real = sum(len(e.prompt_ids) * e.size + sum(map(len, e.response_ids)) for e in examples)
    if share_prompt:
        batch = build_group_batch(groups, pad_id=pad_id, device=device, pack=packing, max_row_tokens=max_row_tokens,
                                  oversized_own_row=True)
        return {"input_ids": batch.input_ids, "attention_mask": None, "labels": batch,
                "num_tokens": torch.tensor(real, device=device)}
    input_ids, attention_mask, labels = unshared_group_rows(groups, pad_id=pad_id, device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "num_tokens": torch.tensor(real, device=device)}


def collate_groups(examples, pad_id: int, device: torch.device, *, share_prompt: bool, packing: bool = False,
                   max_row_tokens: int | None = None) -> dict:
    """The batch of the trainer's tokenized groups (`trainer.group_data.GroupExample`, truncated already) on
    `device`, in the shared layout when `share_prompt`, else as unshared rows."""
    scores = torch.tensor([s for e in examples for s in e.scores], dtype=torch.float64, device=device)
    return {**_rows(examples, pad_id, device, share_prompt, packing, max_row_tokens),
            "group": GroupInfo(tuple(e.size for e in examples), scores)}


def collate_prompt_groups(examples, pad_id: int, device: torch.device, *, share_prompt: bool, packing: bool = False,
                          max_row_tokens: int | None = None) -> dict:
    """The batch of `--group-by-prompt` groups (`trainer.group_data.PromptGroup`): the groups' rows as
    `collate_groups` lays them out, and `pairs`, the `PairIndex` of their pairs, group by group."""
    starts = list(itertools.accumulate((e.size for e in examples), initial=0))
    chosen = [start + c for start, e in zip(starts, examples, strict=False) for c, _ in e.pairs]
    rejected = [start + r for start, e in zip(starts, examples, strict=False) for _, r in e.pairs]
    index = PairIndex(torch.tensor(chosen, device=device), torch.tensor(rejected, device=device),
                      tuple(zip(chosen, rejected, strict=True)), tuple(e.size for e in examples))
    return {**_rows(examples, pad_id, device, share_prompt, packing, max_row_tokens), "pairs": index}


def collate_any_groups(examples, pad_id: int, device: torch.device, *, share_prompt: bool, packing: bool = False,
                       max_row_tokens: int | None = None) -> dict:
    """`collate_prompt_groups` for `PromptGroup`s, else `collate_groups`."""
    collate = collate_prompt_groups if hasattr(examples[0], "pairs") else collate_groups
    return collate(examples, pad_id, device, share_prompt=share_prompt, packing=packing,
                   max_row_tokens=max_row_tokens)
