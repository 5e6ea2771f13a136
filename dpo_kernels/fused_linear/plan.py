"""Which tokens the fused linear engine projects, in which order, in which chunks.

Compaction keeps only the positions that score a valid label. Tokens are then laid out sequence by sequence
(`natural` order) or pair by pair (`paired`: chosen i, rejected B+i, chosen i+1, ...), and the chunk planner cuts
that list into chunks of at most `C` tokens.

Chunk-size and mode rule (`memory_budget`):
    None     the logits buffer `[C, V]` in the input dtype may take 2 GiB, and C <= 8192 tokens
             (C = 8192 at V = 128256 in bf16, where the buffer is 1.96 GiB).
    bytes    what the `[C, V]` buffer may take: C = min(8192, budget // (V * itemsize)), at least 1.
    "low"    a 512 MiB buffer (C = 2048 at V = 128256 in bf16), and the DPO loss takes the recompute path:
             the forward saves nothing and the backward recomputes each chunk's logits (8NHV in all, no [V, H]
             streaming accumulators): the least memory.
C of 128 tokens or more is rounded down to a multiple of 128 (whole GEMM tiles). "low" pays in FLOPs (the
recompute); its GEMMs (2048 x 4096 x 128256 at the Llama-3 head) are still large ones for H100/H200 (not timed here).
A pair whose tokens fit in C is handled in a resident chunk; a longer pair streams through chunks. Besides the
`[C, V]` buffer the engine holds at most one fp32 `[V, H]` buffer, the weight-gradient accumulator (none when a
single resident chunk forms the whole weight gradient); streaming pairs that cannot use it alone run twice rather
than add a second one (`_fused_linear_engine.py`). Losses that couple pairs through their log-probs (aot,
aot_unpaired) take the recompute path unless the whole batch fits in one chunk. The peak of a whole step is
`_memory_model.estimate_peak_bytes` (its docstring has the issue-4 table: 2.6 / 4.5 / 5.3 GiB by default,
3.0 / 3.2 / 3.4 GiB "low", at B x T = 2 x 2048 / 2 x 8192 / 1 x 32768, H = 4096, V = 128256 bf16).
"""
import math
import numbers
from typing import NamedTuple

import torch

DEFAULT_BUFFER_BYTES = 2 << 30
LOW_BUFFER_BYTES = 512 << 20
MAX_CHUNK_TOKENS = 8192


class TokenLayout(NamedTuple):
    """The valid (scored) tokens of a batch, in engine order. `N` below is their number."""

    rows: torch.Tensor  # [N] int64: row of the flattened hidden states that scores the token
    targets: torch.Tensor  # [N] int64: the label it scores
    seq: torch.Tensor  # [N] int64: its sequence
    slot: torch.Tensor  # [N] int64: its index among its sequence's valid tokens
    counts: torch.Tensor  # [R] int64: valid tokens per sequence
    counts_host: list  # the same as Python ints
    max_count: int


def _scored_positions(labels, cu_seqlens, ignore_index, shift):
    """Natural-order (row index, target, sequence) of every position that scores a valid label."""
    if cu_seqlens is None:
        R, T = labels.shape
        scored = labels[:, 1:] if shift else labels
        seq, pos = (scored != ignore_index).nonzero(as_tuple=True)
        return seq * T + pos, scored[seq, pos], seq
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    seq_of_pos = torch.repeat_interleave(torch.arange(lengths.numel(), device=labels.device), lengths,
                                         output_size=labels.numel())
    scored = labels
    if shift:
        # Position p scores labels[p + 1] when p + 1 is in the same sequence; a sequence's last position scores
        # nothing.
        same = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        same[:-1] = seq_of_pos[1:] == seq_of_pos[:-1]
        scored = torch.where(same, labels.roll(-1), ignore_index)
    (rows,) = (scored != ignore_index).nonzero(as_tuple=True)
    return rows, scored[rows], seq_of_pos[rows]


def compact_tokens(labels, cu_seqlens, num_seqs, ignore_index, shift, paired) -> TokenLayout:
    rows, targets, seq = _scored_positions(labels, cu_seqlens, ignore_index, shift)
    counts = torch.bincount(seq, minlength=num_seqs)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[seq]
    if paired:
        half = num_seqs // 2
        key = (seq % half) * 2 + (seq >= half).long()
        order = torch.sort(key, stable=True).indices
        rows, targets, seq, slot = rows[order], targets[order], seq[order], slot[order]
    counts_host = counts.tolist()
    return TokenLayout(rows, targets, seq, slot, counts, counts_host, max(counts_host, default=0))


def parse_memory_budget(value):
    """The `memory_budget` setting, checked: None, "low", or a positive number of bytes (returned as an int).

    Raises ValueError for anything else; the trainer, the TRL drop-in and the engine all check it here."""
    if value is None or (isinstance(value, str) and value == "low"):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 1 <= value < math.inf:
        return int(value)
    raise ValueError(f"memory_budget must be None, 'low' or a positive number of bytes, got {value!r}")


def chunk_tokens(vocab: int, itemsize: int, memory_budget) -> int:
    """C, the most tokens one chunk projects (see the module docstring)."""
    memory_budget = parse_memory_budget(memory_budget)
    if memory_budget is None:
        budget = DEFAULT_BUFFER_BYTES
    elif memory_budget == "low":
        budget = LOW_BUFFER_BYTES
    else:
        budget = memory_budget
    tokens = max(1, min(MAX_CHUNK_TOKENS, budget // (vocab * itemsize)))
    return tokens - tokens % 128 if tokens >= 128 else tokens


def even_chunks(total: int, chunk: int):
    """(start, end) of consecutive chunks of at most `chunk` tokens."""
    return [(s, min(total, s + chunk)) for s in range(0, total, chunk)]


class PairGroup(NamedTuple):
    """Consecutive tokens of whole pairs: resident (one chunk) or, for one long pair, streaming (several)."""

    start: int
    end: int
    pairs: range
    chunks: list
    streaming: bool


def plan_pairs(pair_counts, chunk: int):
    """Greedy: whole pairs fill a resident chunk up to `chunk` tokens; a longer pair becomes a streaming group."""
    groups, start, first = [], 0, 0
    size = 0
    for i, n in enumerate(pair_counts):
        if n > chunk:
            if size:
                groups.append(PairGroup(start, start + size, range(first, i), [(start, start + size)], False))
                start += size
            groups.append(PairGroup(start, start + n, range(i, i + 1), _offset(even_chunks(n, chunk), start), True))
            start, first, size = start + n, i + 1, 0
            continue
        if size + n > chunk:
            groups.append(PairGroup(start, start + size, range(first, i), [(start, start + size)], False))
            start, first, size = start + size, i, 0
        size += n
    if size or first < len(pair_counts):
        groups.append(PairGroup(start, start + size, range(first, len(pair_counts)), [(start, start + size)], False))
    return groups


def longest_streaming_first(groups):
    """The groups in the order the engine runs them: the longest streaming pair first (while the weight-gradient
    accumulator is still empty it streams in one pass), then the others in batch order."""
    streaming = [g for g in groups if g.streaming]
    if not streaming:
        return groups
    first = max(streaming, key=lambda g: g.end - g.start)
    return [first] + [g for g in groups if g is not first]


def _offset(chunks, base):
    return [(base + s, base + e) for s, e in chunks]
