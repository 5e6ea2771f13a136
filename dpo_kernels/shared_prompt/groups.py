"""The group batch: one prompt and its K responses in one row, the prompt run once for all of them.

    tokens     p0 p1 p2 | a0 a1 | b0 b1 b2 | c0
    positions   0  1  2 |  3  4 |  3  4  5 |  3      each response's positions continue from the prompt's end
    segment     P  P  P |  1  1 |  2  2  2 |  3

This is the shared-prompt layout (`shared_prompt/batch.py`) with K response segments instead of two: each response
sees the prompt and its own earlier tokens, never another response; groups packed in one row never see each other;
the last prompt position scores the first label of all K responses. Sequences are numbered group by group: group g's
response k is sequence `sum(K_0 .. K_{g-1}) + k`, the order `dpo_kernels.group_dpo_loss` reads `[R]` log-probs in.

Truncation is the trainer's: the prompt keeps its last `max_prompt_length` tokens (and its BOS), then each response
keeps its first `max_length - len(prompt)` tokens. A response that truncation cuts to zero tokens (which happens when
the prompt leaves no room) is dropped, and a group left with fewer than two responses is skipped and counted
(`GroupBatch.skipped_groups`) rather than refused, since one long prompt should not stop a batch. A response that
is empty as given stays in its group (its log-prob is 0, as an empty response of a pair).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.shared_prompt.batch import (
    SharedBatch,
    check_ids,
    check_layout_options,
    check_truncation_options,
    lay_out,
    truncate_prompt,
)

__all__ = ["MAX_GROUP_SIZE", "MIN_GROUP_SIZE", "GroupBatch", "build_group_batch", "truncate_group",
           "unshared_group_rows"]

MIN_GROUP_SIZE, MAX_GROUP_SIZE = 2, 16


@dataclass(frozen=True)
class GroupBatch(SharedBatch):
    """G groups laid out with one copy of each prompt (`SharedBatch`, S = R = sum of the group sizes), sequences
    numbered group by group.

    Attributes (beside `SharedBatch`'s):
        group_sizes: `[G]` int64, the responses of each group (each in [2, 16]); `document_ids` number the groups.
        sizes: the same sizes as host ints, so that code splitting `[R]` by group takes no device sync.
        kept_groups: the index in the builder's input of each of the G groups.
        skipped_groups: how many input groups truncation left with fewer than two responses.
    """

    group_sizes: torch.Tensor
    sizes: tuple[int, ...]
    kept_groups: tuple[int, ...]
    skipped_groups: int

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def group_starts(self) -> tuple[int, ...]:
        """The sequence number of each group's first response."""
        return tuple(accumulate(self.sizes, initial=0))[:-1]


def _check_groups(groups) -> list[tuple[list[int], list[list[int]]]]:
    checked = []
    for g, group in enumerate(groups):
        if not (isinstance(group, (tuple, list)) and len(group) == 2):
            raise ValueError(f"group {g} must be a (prompt_ids, [response_ids, ...]) pair, got {group!r}")
        prompt, responses = group
        responses = list(responses)
        if not MIN_GROUP_SIZE <= len(responses) <= MAX_GROUP_SIZE:
            raise ValueError(f"group {g} has {len(responses)} responses; a group holds {MIN_GROUP_SIZE} to "
                             f"{MAX_GROUP_SIZE}")
        check_ids(prompt, f"group {g}'s prompt")
        for k, ids in enumerate(responses):
            check_ids(ids, f"group {g}'s response {k}")
        checked.append((list(prompt), [list(ids) for ids in responses]))
    return checked


def truncate_group(prompt: Sequence[int], responses: Sequence[Sequence[int]], *, max_length: int | None = None,
                   max_prompt_length: int | None = None,
                   bos_token_id: int | None = None) -> tuple[list[int], list[list[int]]] | None:
    """Cuts one tokenized group as the trainer cuts its unshared rows (see the module docstring).

    Returns `(prompt, responses)` as lists, without the responses cut to zero tokens; or None when fewer than two
    responses are left (the group is skipped).
    """
    check_truncation_options(max_length, max_prompt_length, bos_token_id)
    prompt = truncate_prompt(prompt, max_prompt_length, bos_token_id)
    responses = [list(ids) for ids in responses]
    if max_length is not None:
        room = max(0, max_length - len(prompt))
        responses = [ids[:room] for ids in responses if not (ids and room == 0)]
    return (prompt, responses) if len(responses) >= MIN_GROUP_SIZE else None


def _truncated(groups, max_length, max_prompt_length, bos_token_id):
    """The groups that survive truncation, and their indices in `groups`."""
    kept, index = [], []
    for g, (prompt, responses) in enumerate(_check_groups(groups)):
        cut = truncate_group(prompt, responses, max_length=max_length, max_prompt_length=max_prompt_length,
                             bos_token_id=bos_token_id)
        if cut is not None:
            kept.append(cut)
            index.append(g)
    return kept, index


def build_group_batch(
    groups: Iterable[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    pad_id: int = 0,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    bos_token_id: int | None = None,
    pack: bool = False,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int = 1,
    device: torch.device | str | None = None,
    oversized_own_row: bool = False,
) -> GroupBatch:
    """Builds the shared-prompt batch of tokenized groups, one prompt with K responses each (K may differ).

    Args:
        groups: tuples `(prompt_ids, [response_ids, ...])` with 2 to 16 responses, without the prompt in them. A
            prompt or a response may be empty.
        pad_id: the id written into padding positions (never attended to by real tokens, never scored).
        max_length, max_prompt_length, bos_token_id: truncation, as the unshared rows (`truncate_group`).
        pack: several groups per row (padding-free), each its own document in the mask; `max_row_tokens` caps a
            row (default: all groups in one row). Without `pack`, one group per row, right-padded.
        pad_to_multiple_of: round T up (e.g. 128, FlexAttention's block size, or to reuse compiled shapes).
        device: where the tensors go (default CPU).
        oversized_own_row: a group longer than `max_row_tokens` gets a row of its own (default: ValueError).
    Returns:
        a `GroupBatch`; its `attribution` scores R = sum K sequences, group by group. Raises ValueError when no
        group is left after truncation.
    """
    check_layout_options(pad_id, pack, max_row_tokens, pad_to_multiple_of)
    check_truncation_options(max_length, max_prompt_length, bos_token_id)
    groups = list(groups)
    if not groups:
        raise ValueError("build_group_batch needs at least one group")
    kept, index = _truncated(groups, max_length, max_prompt_length, bos_token_id)
    if not kept:
        raise ValueError(f"all {len(groups)} groups were skipped: truncation left each with fewer than two responses")
    sizes = [len(responses) for _, responses in kept]
    starts = list(accumulate(sizes, initial=0))
    layout = lay_out([p for p, _ in kept], [rs for _, rs in kept],
                     [list(range(starts[g], starts[g + 1])) for g in range(len(kept))], pad_id=pad_id, pack=pack,
                     max_row_tokens=max_row_tokens, pad_to_multiple_of=pad_to_multiple_of, device=device,
                     unit="group", oversized_own_row=oversized_own_row)
    return GroupBatch(**layout, group_sizes=torch.tensor(sizes, dtype=torch.long, device=device), sizes=tuple(sizes),
                      kept_groups=tuple(index), skipped_groups=len(groups) - len(kept))


def unshared_group_rows(
    groups: Iterable[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    pad_id: int = 0,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    bos_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same groups as unshared rows `[prompt | response]`, for models that cannot run the shared layout.

    Truncation, dropped responses and skipped groups are `build_group_batch`'s, and row r is its sequence r.
    Returns `(input_ids [R, L], attention_mask [R, L], labels [R, L])` int64, right-padded with `pad_id`; labels
    hold the response tokens (IGNORE_INDEX elsewhere) for the HuggingFace shift by one
    (`dpo_kernels.hf.sequence_logprobs(model, input_ids, attention_mask, labels)` gives the `[R]` log-probs).
    """
    check_truncation_options(max_length, max_prompt_length, bos_token_id)
    check_layout_options(pad_id, False, None, 1)
    kept, _ = _truncated(list(groups), max_length, max_prompt_length, bos_token_id)
    if not kept:
        raise ValueError("no group left after truncation")
    rows = [(prompt, response) for prompt, responses in kept for response in responses]
    L = max(1, max(len(p) + len(r) for p, r in rows))
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r, dtype=torch.long)
    return input_ids.to(device), mask.to(device), labels.to(device)
