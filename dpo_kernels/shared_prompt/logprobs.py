"""Per-sequence log-probs of a shared-prompt batch (pairs or groups), from logits or from hidden states, through
its attribution.

The attribution (`SharedBatch.token_rows/token_targets/token_seqs`) says which position scores which label for
which sequence; the last prompt position scores one label per response (two for a pair, K for a group), so a
gradient reaching it is the sum of theirs, as the unshared rows' copies of the prompt would give after the backbone.
Every function returns `[S]`, one entry per sequence in the batch's numbering: `[2B]` chosen then rejected for a
`SharedPromptBatch`, `[R]` group by group for a `GroupBatch`. Shapes sized by the longest sequence come from the
batch's host-side `max_count`: no call here waits on the device.
"""
from __future__ import annotations

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import linear_sequence_logprobs
from dpo_kernels.logprobs.from_logits import token_logprobs
from dpo_kernels.shared_prompt.batch import SharedBatch

__all__ = ["gather_scored_logits", "sequence_logprobs_from_hidden", "sequence_logprobs_from_logits"]


def _per_sequence(tok: torch.Tensor, batch: SharedBatch, average: bool) -> torch.Tensor:
    """`[S]` sums (means) of the token log-probs `tok [N]` (attribution order) in a fixed order: the same bits on
    every run, as the engine's per-sequence reduction."""
    counts = batch.counts.to(tok.device)
    seqs = batch.token_seqs.to(tok.device)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(seqs.numel(), device=tok.device) - starts[seqs]
    table = tok.new_zeros(counts.numel(), max(batch.max_count, 1))
    table = table.index_put((seqs, slot), tok)
    total = table.sum(1)
    if average:
        total = torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))
    return total


def sequence_logprobs_from_logits(logits: torch.Tensor, batch: SharedBatch, *,
                                  average: bool = False) -> torch.Tensor:
    """`[S]` float32 log-probs of the batch's labels, in its sequence numbering.

    Args:
        logits: `[rows, T, V]` float32/bfloat16/float16, the model's logits on `batch`
            (`dpo_kernels.hf.shared_logits`).
        batch: the `SharedPromptBatch` or `GroupBatch` they were computed on.
        average: per-token means instead of sums (0 for a sequence with no scored token).
    Returns:
        `[S]` float32, differentiable w.r.t. `logits`. Only the N scored rows are read (a `[N, V]` gather).
    """
    rows, T, V = logits.shape
    if (rows, T) != tuple(batch.input_ids.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match the batch's [rows, T] = "
                         f"{tuple(batch.input_ids.shape)}")
    scored = logits.reshape(rows * T, V).index_select(0, batch.token_rows.to(logits.device))
    tok = token_logprobs(scored.unsqueeze(0), batch.token_targets.to(logits.device).unsqueeze(0), shift=False)
    return _per_sequence(tok.reshape(-1), batch, average)


def sequence_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, batch: SharedBatch, *,
                                  bias: torch.Tensor | None = None, average: bool = False,
                                  memory_budget=None) -> torch.Tensor:
    """`[S]` float32 log-probs of the batch's labels under `softmax(hidden @ weight.T + bias)`, by the fused linear
    engine (no `[*, V]` logits).

    Args:
        hidden: `[rows, T, H]` last hidden states of `batch` (`dpo_kernels.hf.shared_backbone_hidden_states`).
        weight: `[V, H]` lm_head weight in hidden's dtype; bias: optional `[V]`.
        average, memory_budget: as `dpo_kernels.linear_sequence_logprobs`.
    Returns:
        `[S]` float32, differentiable w.r.t. hidden, weight and bias.
    """
    if tuple(hidden.shape[:-1]) != tuple(batch.input_ids.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match the batch's [rows, T] = "
                         f"{tuple(batch.input_ids.shape)}")
    return linear_sequence_logprobs(hidden, weight, batch.to(hidden.device).attribution, bias=bias, average=average,
                                    memory_budget=memory_budget)


def gather_scored_logits(logits: torch.Tensor, batch: SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored logits of a shared batch in the unshared layout, for code that takes `(logits, labels)` with the
    HuggingFace shift (`DPOLoss`, `dpo_kernels.sequence_logprobs`, the reference oracle).

    Args:
        logits: `[rows, T, V]`, the model's logits on `batch`.
    Returns:
        `(logits [S, M + 1, V], labels [S, M + 1])`, M the most scored tokens of a sequence: row s holds the logits
        of sequence s's scored positions in order, and `labels[s, t + 1]` the label position t scores
        (IGNORE_INDEX elsewhere; unscored rows of the gathered logits are zeros). Differentiable w.r.t. `logits`.
    """
    rows, T, V = logits.shape
    if (rows, T) != tuple(batch.input_ids.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match the batch's [rows, T] = "
                         f"{tuple(batch.input_ids.shape)}")
    device = logits.device
    counts, seqs = batch.counts.to(device), batch.token_seqs.to(device)
    width = batch.max_count + 1
    slot = torch.arange(seqs.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[seqs]
    scored = logits.reshape(rows * T, V).index_select(0, batch.token_rows.to(device))
    gathered = logits.new_zeros(counts.numel(), width, V).index_put((seqs, slot), scored)
    labels = torch.full((counts.numel(), width), IGNORE_INDEX, dtype=torch.long, device=device)
    labels[seqs, slot + 1] = batch.token_targets.to(device)
    return gathered, labels
