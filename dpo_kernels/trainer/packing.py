"""Padding-free pair batches for `--packing`: the 2B unshared sequences of a micro-batch packed into rows.

Each sequence `[prompt | response]` is its own document, packed one after another into rows of at most
`max_row_tokens` tokens (a sequence longer than the cap gets a row of its own):

    tokens     p0 p1 c0 c1 | p0 p1 r0 | q0 d0 d1 d2 | pad
    positions   0  1  2  3 |  0  1  2 |  0  1  2  3 |  0      positions restart at each document
    document    0  0  0  0 |  1  1  1 |  2  2  2  2 |  -1

This is the shared-prompt layout (docs/design.md, "Data flow") with one response per document, where its attention
rule (same document, key not after the query, key in the prompt or in the query's own response) is plain causal
attention within each document. So the batch is a `SharedPromptBatch` with the unshared rows' numbering (chosen i is
sequence i, rejected i is B + i), and the policy and the reference run it as they run a shared-prompt batch: the
same masks for eager, SDPA and FlexAttention, the same attribution for the fused head, the same gathered logits for
the logits and reference backends, and the same models (`hf.shared_prompt.SUPPORTED_MODELS`). Every token sees the
context it has in its padded row at the same positions, so the numbers are the padded rows' within rounding.
"""
from __future__ import annotations

import torch

from dpo_kernels.shared_prompt.batch import SharedPromptBatch, lay_out

__all__ = ["build_packed_pairs"]


def build_packed_pairs(examples, pad_id: int, max_row_tokens: int | None,
                       device: torch.device | str | None = None) -> SharedPromptBatch:
    """The trainer's B tokenized pairs (`trainer.data.Example`, already truncated) as 2B packed documents.

    Args:
        examples: B pairs; `chosen_ids` and `rejected_ids` each hold the prompt then the response.
        pad_id: the id written into the padding at the end of the shorter rows.
        max_row_tokens: the most tokens of one row (None: every sequence in one row).
        device: where the tensors go.
    Returns:
        a `SharedPromptBatch` with `num_pairs` B: `input_ids` `[rows, T]`, T the longest row; sequences chosen
        0..B-1 then rejected 0..B-1, the order of the padded rows (`trainer.data.collate`).
    """
    if not examples:
        raise ValueError("build_packed_pairs needs at least one pair")
    rows = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    prompt_lens = [e.prompt_len for e in examples] * 2
    prompts = [list(ids[:p]) for ids, p in zip(rows, prompt_lens, strict=True)]
    responses = [[list(ids[p:])] for ids, p in zip(rows, prompt_lens, strict=True)]
    layout = lay_out(prompts, responses, [[s] for s in range(len(rows))], pad_id=pad_id, pack=True,
                     max_row_tokens=max_row_tokens, pad_to_multiple_of=1, device=device, unit="sequence",
                     oversized_own_row=True)
    return SharedPromptBatch(**layout, num_pairs=len(examples))
