"""The fused linear engine's plan: which tokens it projects, in which order, in which chunks, in which mode.

Whatever the caller scores (padded or packed labels, a `TokenAttribution`) becomes one `ScoredPositions` at the
API's edge: only the positions that score a valid label, sequence by sequence; its `layout` orders them for the
engine, sequence by sequence (`paired=False`) or pair by pair (`paired=True`: chosen i, rejected B+i, chosen i+1,
...). A `StepPlan` is then built once from the scored-token counts alone (`plan_dpo_step`, `plan_group_step`,
`plan_logps`): the engine executes it and the memory model (`memory_model.estimate_peak_bytes`) and the cost model
(`cost_model.plan_cost`) count the bytes and FLOPs of the same object, so the mode decisions exist only here. See
docs/design.md, "The fused linear engine".

Chunk size C (`memory_budget`, checked by `parse_memory_budget`):
    None     the logits buffer `[C, V]` in the input dtype may take 2 GiB, and C <= 8192 tokens
             (C = 8192 at V = 128256 in bf16, where the buffer is 1.96 GiB).
    bytes    what the `[C, V]` buffer may take: C = min(8192, budget // (V * itemsize)), at least 1.
    "low"    a 512 MiB buffer (C = 2048 at V = 128256 in bf16), and the DPO loss takes the recompute path.
C of 128 tokens or more is rounded down to a multiple of 128 (whole GEMM tiles).

Modes of a DPO step. The engine's unit of completion is a set of sequences whose loss coefficients are known once
all of their tokens are scored: a pair (sequences i and B+i, in the paired layout) or a group of K responses (its K
consecutive sequences, whose tokens are contiguous in the natural layout). Below, "pair" stands for either; group
losses are neither tied nor coupled.
    recompute   the forward keeps nothing and the backward recomputes each chunk's logits (8NHV, no `[V, H]`
                accumulator while streaming): `memory_budget="low"`, and losses that couple pairs through their
                log-probs (aot, aot_unpaired) unless the whole batch fits in one chunk.
    otherwise   the forward forms the gradients as pairs complete (6NHV). Pairs are grouped greedily in batch order:
                whole pairs fill a `resident` chunk of at most C tokens (their coefficients are known after the chunk's
                pass); a pair longer than C streams through chunks. The longest streaming pair runs first: while the one
                fp32 `[V, H]` weight-gradient accumulator is still empty it is a `stream once` pair (tied losses: the
                accumulator owes the pair's coefficient, applied at the end). A streaming pair that finds the
                accumulator in use, or whose chosen and rejected coefficients are not tied, is a `stream twice` pair (a
                forward pass for its log-probs, then a gradient pass: its tokens outside the last chunk are projected
                twice), rather than hold a second `[V, H]` buffer; without a weight gradient every streaming pair takes
                one pass. With the default budget, a step that would run a pair twice takes a 2.5 GiB buffer instead (C
                up to the longest such pair, without the 8192 cap: 10368 at V = 128256 in bf16), so that the pair's last
                chunk keeps more of it: at 2 x 8192 (pairs of 12288 tokens) 1920 instead of 4096 tokens are projected
                twice, and the step's peak is 4.97 GiB (`memory_model.py`). No exact schedule avoids the second
                projection there within the memory target: the buffer for a whole pair (2.94 GiB), the accumulator
                (1.96) and grad_h (0.25) alone would exceed 5.1 GiB.
"""
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dpo_kernels.loss_op.loss_types import couples_logps, is_tied
from dpo_kernels.validation import check_labels_in_range

DEFAULT_BUFFER_BYTES = 2 << 30
TWICE_BUFFER_BYTES = 5 << 29  # 2.5 GiB: the default buffer of a step that would run a pair twice
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
    # Rows may repeat (an attribution where one hidden row scores several labels, as a shared prompt's last row
    # scores both responses' first tokens): the hidden-state gradient adds into a row instead of writing it.
    rows_repeat: bool = False


class TokenAttribution(NamedTuple):
    """Scored positions given directly instead of by labels: token k scores `targets[k]` from row `rows[k]` of the
    flattened hidden states, for sequence `seqs[k]`. Rows may repeat. Tokens of one sequence keep their order."""

    rows: torch.Tensor  # [N] int64
    targets: torch.Tensor  # [N] int64, each in [0, V)
    seqs: torch.Tensor  # [N] int64, each in [0, num_seqs)
    num_seqs: int


def scored_counts(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    """`[R]` int64 scored tokens per row of padded `labels [R, T]`: positions whose label is not `ignore_index`
    (with `shift`, position t scores label t + 1, so label 0 never counts). The response lengths the DPO loss
    reads."""
    scored = labels[:, 1:] if shift else labels
    return (scored != ignore_index).sum(-1)


def _scored_labels(labels, cu_seqlens, ignore_index, shift):
    """The label each position scores (`ignore_index` where none), and for packed sequences each position's
    sequence (`[N]`; None when padded)."""
    if cu_seqlens is None:
        return (labels[:, 1:] if shift else labels), None
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    seq_of_pos = torch.repeat_interleave(torch.arange(lengths.numel(), device=labels.device), lengths,
                                         output_size=labels.numel())
    if not shift:
        return labels, seq_of_pos
    # Position p scores labels[p + 1] when p + 1 is in the same sequence; a sequence's last position scores nothing.
    same = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    same[:-1] = seq_of_pos[1:] == seq_of_pos[:-1]
    return torch.where(same, labels.roll(-1), ignore_index), seq_of_pos


class ScoredPositions(NamedTuple):
    """The one form in which the engine takes what a batch scores, whatever the caller started from (padded labels,
    packed labels, a `TokenAttribution`): the scored tokens in natural order (sequence by sequence, each
    sequence's tokens in order), their counts, and the facts the later checks need without reading the device
    again. Built once at the API's edge (`positions_of_labels`, `positions_of_attribution`); `layout` orders
    them for the engine."""

    rows: torch.Tensor  # [N] int64: row of the flattened hidden states that scores the token
    targets: torch.Tensor  # [N] int64: the label it scores
    seqs: torch.Tensor  # [N] int64: its sequence
    counts: torch.Tensor  # [R] int64: scored tokens per sequence
    counts_host: list  # the same as Python ints
    rows_repeat: bool  # one row may score several labels (see `TokenLayout.rows_repeat`)
    # The smallest and largest label given (`ignore_index` aside, scored or not), or None when there is none: the
    # vocabulary check runs on the host from these.
    label_range: tuple | None
    # What the caller gave and its name: a failed vocabulary check reads it once more to name the first bad label.
    labels: torch.Tensor
    labels_name: str
    ignore_index: int

    @property
    def num_seqs(self) -> int:
        return self.counts.numel()

    def check_vocab(self, vocab: int) -> None:
        """ValueError naming the first label outside `[0, vocab)` (that is not `ignore_index`)."""
        if self.label_range is not None and (self.label_range[0] < 0 or self.label_range[1] >= vocab):
            check_labels_in_range(self.labels, vocab, self.ignore_index, self.labels_name)

    def layout(self, paired: bool) -> TokenLayout:
        """The engine's layout: sequence by sequence, or pair by pair when `paired` (chosen i, rejected B+i, ...)."""
        return _layout(self.rows, self.targets, self.seqs, self.counts, self.counts_host, paired, self.rows_repeat)


def _label_range_facts(labels, ignore_index):
    """`[2]` int64 on the device: the smallest and largest label that is not `ignore_index` (the int64 extremes,
    reversed, when there is none)."""
    labels = labels.long()
    given = labels != ignore_index
    info = torch.iinfo(torch.int64)
    return torch.stack([torch.where(given, labels, info.max).min(), torch.where(given, labels, info.min).max()])


def _host_range(lo_hi):
    lo, hi = lo_hi
    return None if lo > hi else (lo, hi)


def positions_of_labels(labels, cu_seqlens, num_seqs, ignore_index, shift) -> ScoredPositions:
    """The scored tokens of `labels` (`[R, T]`, or `[N]` packed by `cu_seqlens`).

    The tokens per sequence and the labels' range reach the host in one synchronization, the only one here: the
    positions are then gathered to the known count without another (`nonzero_static`)."""
    scored, seq_of_pos = _scored_labels(labels, cu_seqlens, ignore_index, shift)
    valid = scored != ignore_index
    if cu_seqlens is None:
        counts = valid.sum(1)
    else:
        counts = torch.zeros(num_seqs, dtype=torch.long, device=labels.device)
        counts.index_add_(0, seq_of_pos, valid.long())
    facts = [counts]
    if labels.numel():
        facts.append(_label_range_facts(labels, ignore_index))
    host = torch.cat(facts).tolist()
    counts_host = host[:num_seqs]
    positions = torch.nonzero_static(valid, size=sum(counts_host))
    if cu_seqlens is None:
        seq, pos = positions.unbind(1)
        rows, targets = seq * labels.shape[1] + pos, scored[seq, pos]
        # A storage of its own: as a column of `positions` it would keep both columns alive for as long as a
        # natural-order layout (which takes these tensors as they are) lives, beyond what the memory model counts.
        seq = seq.contiguous()
    else:
        rows = positions[:, 0]
        targets, seq = scored[rows], seq_of_pos[rows]
    label_range = _host_range(host[num_seqs:]) if labels.numel() else None
    return ScoredPositions(rows, targets, seq, counts, counts_host, False, label_range, labels, "labels",
                           ignore_index)


def positions_of_attribution(attribution: TokenAttribution, ignore_index) -> ScoredPositions:
    """The scored tokens of an attribution, grouped by sequence (a stable sort keeps each sequence's order); its
    counts and targets' range reach the host in one synchronization."""
    order = torch.sort(attribution.seqs, stable=True).indices
    rows, targets, seq = attribution.rows[order], attribution.targets[order], attribution.seqs[order]
    counts = torch.bincount(seq, minlength=attribution.num_seqs)
    facts = [counts]
    if targets.numel():
        facts.append(_label_range_facts(targets, ignore_index))
    host = torch.cat(facts).tolist()
    counts_host = host[: attribution.num_seqs]
    label_range = _host_range(host[attribution.num_seqs :]) if targets.numel() else None
    return ScoredPositions(rows, targets, seq, counts, counts_host, True, label_range, attribution.targets,
                           "attribution.targets", ignore_index)


def compact_tokens(labels, cu_seqlens, num_seqs, ignore_index, shift, paired, vocabs=()) -> TokenLayout:
    """The engine's layout of `labels` (`positions_of_labels`), after checking that every label is `ignore_index`
    or inside each vocabulary size of `vocabs` (ValueError naming the first that is not)."""
    positions = positions_of_labels(labels, cu_seqlens, num_seqs, ignore_index, shift)
    for vocab in vocabs:
        positions.check_vocab(vocab)
    return positions.layout(paired)


def _layout(rows, targets, seq, counts, counts_host, paired, rows_repeat) -> TokenLayout:
    """Natural-order scored tokens (grouped by sequence) into a layout, pair by pair when `paired`."""
    num_seqs = counts.numel()
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[seq]
    if paired:
        half = num_seqs // 2
        key = (seq % half) * 2 + (seq >= half).long()
        order = torch.sort(key, stable=True).indices
        rows, targets, seq, slot = rows[order], targets[order], seq[order], slot[order]
    return TokenLayout(rows, targets, seq, slot, counts, counts_host, max(counts_host, default=0), rows_repeat)


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
    return _whole_tiles(max(1, min(MAX_CHUNK_TOKENS, budget // (vocab * itemsize))))


def _whole_tiles(tokens: int) -> int:
    """`tokens` rounded down to a multiple of 128 (whole GEMM tiles) when it is 128 or more."""
    return tokens - tokens % 128 if tokens >= 128 else tokens


def even_chunks(total: int, chunk: int) -> tuple:
    """(start, end) of consecutive chunks of at most `chunk` tokens."""
    return tuple((s, min(total, s + chunk)) for s in range(0, total, chunk))


RESIDENT, STREAM_ONCE, STREAM_TWICE = "resident", "stream once", "stream twice"


@dataclass(frozen=True)
class UnitGroup:
    """Consecutive tokens `start:end` of whole units (pairs, or groups of K responses), and how the engine runs them.

    `resident`: units whose tokens fit one chunk. `stream once`: one unit longer than a chunk, streamed through
    `chunks` in one pass. `stream twice`: such a unit run as a forward pass through `chunks` (the short remainder
    first), then a gradient pass through them in reverse, starting from the last chunk, whose logits are still in
    the buffer. See the module docstring for when each applies.
    """

    start: int
    end: int
    units: range
    chunks: tuple
    mode: str

    @property
    def streaming(self) -> bool:
        return self.mode != RESIDENT

    @property
    def projected_tokens(self) -> int:
        """Token rows the group projects: a `stream twice` unit projects all but its last chunk again."""
        tokens = self.end - self.start
        if self.mode != STREAM_TWICE or not self.chunks:
            return tokens
        last_start, last_end = self.chunks[-1]
        return 2 * tokens - (last_end - last_start)


@dataclass(frozen=True)
class StepPlan:
    """One engine call, decided before any tensor work: chunk size, run order and mode of every token.

    chunk:      C, the most tokens one chunk projects.
    total:      N, the scored tokens.
    recompute:  chunks of the flat token list (`chunks`); the gradients, if any, are formed by recomputing them.
    tied:       the loss's chosen and rejected coefficients of a pair are negatives of each other (never for
                groups of K responses).
    groups:     the unit groups in run order (DPO steps that form gradients in the forward); empty otherwise.
    """

    chunk: int
    total: int
    recompute: bool
    tied: bool = False
    groups: tuple = ()

    @property
    def chunks(self) -> tuple:
        """Every chunk, in the order the first pass over the tokens meets them."""
        if self.recompute:
            return even_chunks(self.total, self.chunk)
        return tuple(c for group in self.groups for c in group.chunks)

    @property
    def buffer_rows(self) -> int:
        """Rows of the reused `[rows, V]` logits buffer: the longest chunk (at least 1)."""
        return max([1] + [e - s for s, e in self.chunks])

    @property
    def one_weight_gemm(self) -> bool:
        """One GEMM forms the whole weight gradient (no fp32 `[V, H]` accumulator): a single chunk."""
        if self.recompute:
            return len(self.chunks) == 1
        return len(self.groups) == 1 and not self.groups[0].streaming


def group_units(unit_counts, chunk: int) -> list:
    """Greedy, in batch order: whole units fill a resident chunk up to `chunk` tokens; a longer unit gets a group
    of its own, streamed through chunks. Returns `(start, end, units, streaming)` per group, in token order."""
    groups, start, first, size = [], 0, 0, 0
    for i, n in enumerate(unit_counts):
        if n > chunk:
            if first < i:  # the units before it, even without tokens: every unit is in one group
                groups.append((start, start + size, range(first, i), False))
                start += size
            groups.append((start, start + n, range(i, i + 1), True))
            start, first, size = start + n, i + 1, 0
            continue
        if size + n > chunk:
            groups.append((start, start + size, range(first, i), False))
            start, first, size = start + size, i, 0
        size += n
    if size or first < len(unit_counts):
        groups.append((start, start + size, range(first, len(unit_counts)), False))
    return groups


def longest_streaming_first(groups: list) -> list:
    """The groups in run order: the longest streaming unit first (the first longest on a tie), then the others in
    batch order."""
    streaming = [g for g in groups if g[3]]
    if not streaming:
        return groups
    first = max(streaming, key=lambda g: g[1] - g[0])
    return [first] + [g for g in groups if g is not first]


def plan_dpo_step(pair_counts, vocab: int, itemsize: int, memory_budget, loss_type, *,
                  weight_grad: bool = True) -> StepPlan:
    """The plan of one `fused_linear_dpo` call from its scored tokens per pair (chosen plus rejected, in batch order).

    `weight_grad`: the weight (or bias) gradient is formed in this call; without it no streaming pair runs twice.
    With the default budget, a step that would run a pair twice takes a larger buffer (see the module docstring).
    """
    return plan_units_step(pair_counts, vocab, itemsize, memory_budget, tied=is_tied(loss_type),
                           couples=couples_logps(loss_type), weight_grad=weight_grad)


def plan_group_step(group_counts, vocab: int, itemsize: int, memory_budget, *, weight_grad: bool = True) -> StepPlan:
    """The plan of one `fused_linear_group_dpo` call from its scored tokens per group (its K responses together, in
    batch order). A group's loss reads only its own log-probs and its coefficients are not tied, so a long group
    streams once only without a weight gradient."""
    return plan_units_step(group_counts, vocab, itemsize, memory_budget, tied=False, couples=False,
                           weight_grad=weight_grad)


def plan_units_step(unit_counts, vocab: int, itemsize: int, memory_budget, *, tied: bool, couples: bool,
                    weight_grad: bool = True) -> StepPlan:
    """The plan of a loss over units (pairs or groups) from their scored tokens, in batch order. `tied`: a pair's
    chosen and rejected coefficients are negatives of each other; `couples`: the loss couples units through their
    log-probs (recompute unless the batch is one chunk)."""
    memory_budget = parse_memory_budget(memory_budget)
    chunk = chunk_tokens(vocab, itemsize, memory_budget)
    total = int(sum(unit_counts))
    if memory_budget == "low" or (couples and total > chunk):
        return StepPlan(chunk, total, recompute=True, tied=tied)
    groups = _unit_groups(unit_counts, chunk, tied, weight_grad)
    twice = [g.end - g.start for g in groups if g.mode == STREAM_TWICE]
    if memory_budget is None and twice:
        limit = _whole_tiles(TWICE_BUFFER_BYTES // (vocab * itemsize))
        grown = max(twice) if max(twice) <= limit else limit
        if grown > chunk:
            chunk, groups = grown, _unit_groups(unit_counts, grown, tied, weight_grad)
    return StepPlan(chunk, total, recompute=False, tied=tied, groups=tuple(groups))


def _unit_groups(unit_counts, chunk, tied, weight_grad) -> list:
    """The unit groups in run order with their modes and chunks."""
    groups, accumulating = [], False
    for start, end, units, streaming in longest_streaming_first(group_units(unit_counts, chunk)):
        if not streaming:
            mode, chunks = RESIDENT, ((start, end),)
        elif weight_grad and (accumulating or not tied):
            mode, sizes = STREAM_TWICE, [e - s for s, e in reversed(even_chunks(end - start, chunk))]
            ends = [start + sum(sizes[: k + 1]) for k in range(len(sizes))]
            chunks = tuple((e - n, e) for n, e in zip(sizes, ends, strict=True))
        else:
            mode = STREAM_ONCE
            chunks = tuple((start + s, start + e) for s, e in even_chunks(end - start, chunk))
        groups.append(UnitGroup(start, end, units, chunks, mode))
        accumulating = accumulating or end > start
    return groups


def plan_logps(total: int, vocab: int, itemsize: int, memory_budget) -> StepPlan:
    """The plan of per-sequence log-probs (`linear_sequence_logprobs`, a reference model's pass): `total` scored
    tokens in even chunks; a backward, if any, recomputes them."""
    return StepPlan(chunk_tokens(vocab, itemsize, memory_budget), int(total), recompute=True)
