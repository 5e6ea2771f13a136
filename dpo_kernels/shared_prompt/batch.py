"""The shared-prompt batch: each prompt runs through the model once, its responses after it.

One row per pair holds `[prompt | chosen | rejected]` (with packing, several pairs one after another in a row):

    tokens     p0 p1 p2 | c0 c1 | r0 r1 r2
    positions   0  1  2 |  3  4 |  3  4  5      rejected positions continue from the prompt's end
    segment     P  P  P |  C  C |  R  R  R

Chosen tokens attend causally to the prompt and to earlier chosen tokens; rejected tokens attend to the prompt and
to earlier rejected tokens, never to chosen ones; pairs packed in one row never see each other. So every token sees
the same context at the same positions as in the unshared rows `[prompt | chosen]` and `[prompt | rejected]`, and
its hidden state is the same function of its inputs.

A group of K responses (`shared_prompt/groups.py`) is the same layout with K response segments: response k holds
segment k + 1 (CHOSEN and REJECTED are segments 1 and 2), sees the prompt and its own earlier tokens, and its
positions continue from the prompt's end. `SharedBatch` is the layout and its attention rule, whatever the number
of responses; `SharedPromptBatch` numbers the sequences of pairs, `GroupBatch` those of groups.

The first token of each response is predicted from the last prompt position, which therefore scores two labels
(c0 and r0): the batch carries an attribution instead of shift-by-one labels, one entry per scored position:
`token_rows` (the position's row in the flattened `[rows * T, H]` hidden states; the last prompt row appears
twice), `token_targets` (the label it scores) and `token_seqs` (the sequence in the package's convention: chosen i
is i, rejected i is B + i). That costs no extra position; the alternative, repeating the last prompt token at the
start of the rejected segment, costs one position per pair and gains nothing (docs/design.md, "Data flow").

Truncation follows the trainer's unshared rows exactly (`truncate_pair`): the prompt keeps its last
`max_prompt_length` tokens (and its BOS), then each response is cut to `max_length - len(prompt)`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.plan import TokenAttribution

# Segment ids: what part of its pair a position holds (in a group, response k holds segment PROMPT + 1 + k).
PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2

__all__ = [
    "CHOSEN",
    "PAD",
    "PROMPT",
    "REJECTED",
    "SharedBatch",
    "SharedPromptBatch",
    "build_shared_batch",
    "pairs_from_examples",
    "truncate_pair",
]


@dataclass(frozen=True)
class SharedBatch:
    """Prompts laid out once, each followed by its responses. `rows` and `T` below are `input_ids.shape`, S the
    number of sequences (responses), N the number of scored positions. All tensors are int64 on one device.

    Attributes:
        input_ids: `[rows, T]` token ids, `pad_id` in padding.
        position_ids: `[rows, T]` the positions each token has in its unshared row (0 in padding).
        segment_ids: `[rows, T]` PROMPT, the response's segment (k + 1 for response k of its prompt) or PAD.
        document_ids: `[rows, T]` the index of the prompt's pair or group (0..) at each position, -1 in padding.
        labels: `[rows, T]` each response token's own id, IGNORE_INDEX on prompt and padding. Not for a shift by
            one (the first token of a later response has the previous response's last token before it in the row):
            score through the attribution below.
        token_rows: `[N]` row of the flattened `[rows * T, H]` hidden states that scores each label.
        token_targets: `[N]` the label it scores.
        token_seqs: `[N]` its sequence, in the numbering of the subclass. Entries are sequence by sequence, in
            token order within a sequence.
        counts: `[S]` scored positions per sequence (what the unshared rows score).
        max_count: `max(counts)` as a host int (0 when nothing is scored), so that layouts sized by it take no
            device sync.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    document_ids: torch.Tensor
    labels: torch.Tensor
    token_rows: torch.Tensor
    token_targets: torch.Tensor
    token_seqs: torch.Tensor
    counts: torch.Tensor
    max_count: int

    @property
    def num_seqs(self) -> int:
        """S, the number of sequences the attribution scores."""
        return self.counts.numel()

    @property
    def attribution(self) -> TokenAttribution:
        """The scored positions as the fused linear engine takes them in place of labels:
        `linear_sequence_logprobs(hidden, weight, batch.attribution)` with `hidden` `[rows, T, H]` as the model
        gives it (no copy into the unshared `[S, T, H]` layout)."""
        return TokenAttribution(self.token_rows, self.token_targets, self.token_seqs, self.num_seqs)

    @property
    def num_positions(self) -> int:
        """Token positions the backbone runs on, padding included (`rows * T`)."""
        return self.input_ids.numel()

    def attention_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """`[rows, 1, T, T]` bool, True where query position q may attend to key position k.

        `sliding_window` W (HuggingFace's convention) also requires `position(q) - position(k) < W`, measured in
        the unshared rows' positions. A padding position attends to itself (and earlier padding), so no softmax
        row is empty.
        """
        return allowed_pairs(self.document_ids, self.segment_ids, self.position_ids, sliding_window).unsqueeze(1)

    def mask_mod(self, sliding_window: int | None = None):
        """The rule of `attention_mask` as FlexAttention's `mask_mod(b, h, q, kv) -> bool` (row, head, query and key
        index), for `create_block_mask`, which evaluates it block by block without a `[T, T]` tensor."""
        doc, seg, pos = self.document_ids, self.segment_ids, self.position_ids

        def mask_mod(b, h, q, kv):
            return attends(q, kv, doc[b, q], doc[b, kv], seg[b, q], seg[b, kv], pos[b, q], pos[b, kv], sliding_window)

        return mask_mod

    def to(self, device):
        """The same batch (of the same class) with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


@dataclass(frozen=True)
class SharedPromptBatch(SharedBatch):
    """B pairs laid out with one copy of each prompt (`SharedBatch`, S = 2B): chosen i is sequence i, rejected i is
    sequence B + i, as the package's unshared rows. `num_pairs`: B."""

    num_pairs: int


def attends(q, k, doc_q, doc_k, seg_q, seg_k, pos_q, pos_k, sliding_window=None):
    """The attention rule for query index q and key index k of one row (tensors that broadcast): same document,
    key not after the query, key in the prompt or in the query's own segment (never another response), and within
    the sliding window (in the unshared rows' positions) if there is one. Both the dense masks and FlexAttention's
    mask_mod evaluate it."""
    allowed = (doc_q == doc_k) & (q >= k) & ((seg_k == PROMPT) | (seg_q == seg_k))
    if sliding_window is not None:
        allowed = allowed & (pos_q - pos_k < sliding_window)
    return allowed


def allowed_pairs(document_ids, segment_ids, position_ids, sliding_window=None):
    """`attends` for every (query, key) of `[..., T]` ids: `[..., T, T]` bool."""
    index = torch.arange(document_ids.shape[-1], device=document_ids.device)
    ids = [(t.unsqueeze(-1), t.unsqueeze(-2)) for t in (index, document_ids, segment_ids, position_ids)]
    return attends(*(x for pair in ids for x in pair), sliding_window)


def truncate_prompt(prompt: Sequence[int], max_prompt_length: int | None, bos_token_id: int | None) -> list[int]:
    """The prompt's last `max_prompt_length` tokens, and its first token too when that is `bos_token_id` (and
    `max_prompt_length > 1`), as the trainer cuts it."""
    prompt = list(prompt)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        keep_bos = int(bos_token_id is not None and prompt[0] == bos_token_id and max_prompt_length > 1)
        prompt = prompt[:keep_bos] + prompt[len(prompt) - (max_prompt_length - keep_bos):]
    return prompt


def check_truncation_options(max_length, max_prompt_length, bos_token_id) -> None:
    check_int("max_length", max_length, minimum=1, optional=True)
    check_int("max_prompt_length", max_prompt_length, minimum=1, optional=True)
    check_int("bos_token_id", bos_token_id, minimum=0, optional=True)


def truncate_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], *,
                  max_length: int | None = None, max_prompt_length: int | None = None,
                  bos_token_id: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """Cuts one tokenized pair as the trainer cuts its unshared rows (`trainer.data.tokenize_pair`).

    The prompt keeps its last `max_prompt_length` tokens, and its first token too when that is `bos_token_id` (and
    `max_prompt_length > 1`); then each response keeps its first `max_length - len(prompt)` tokens.
    Returns `(prompt, chosen, rejected)` as lists; raises ValueError when the prompt leaves no room for a response.
    """
    check_truncation_options(max_length, max_prompt_length, bos_token_id)
    prompt, chosen, rejected = truncate_prompt(prompt, max_prompt_length, bos_token_id), list(chosen), list(rejected)
    if max_length is not None:
        if len(prompt) >= max_length:
            raise ValueError(f"the prompt alone is {len(prompt)} tokens, which leaves no room for a response "
                             f"within max_length={max_length}")
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected


def pairs_from_examples(examples) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """`(prompt, chosen, rejected)` id tuples from the trainer's tokenized pairs (`trainer.data.Example`, already
    truncated: no cut is needed)."""
    pairs = []
    for e in examples:
        p = e.prompt_len
        pairs.append((e.chosen_ids[:p], e.chosen_ids[p:], e.rejected_ids[p:]))
    return pairs


def check_int(name: str, value, *, minimum: int, optional: bool = False) -> None:
    """An integer setting of the public API: a bool, a float or a value below `minimum` is a ValueError naming it
    (a prompt cut to 0 tokens would silently stop scoring each response's first token)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_ids(ids, what):
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{what} must hold non-negative integer token ids, got {t!r}")


def _rows_of(lengths, pack, max_row_tokens, unit, oversized_own_row=False):
    """Which prompts share each row: one per row, or consecutive ones up to `max_row_tokens` per row. `unit` names
    a prompt with its responses in the error ("pair", "group"); with `oversized_own_row` a unit longer than the cap
    gets a row of its own instead."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if max_row_tokens is not None and n > max_row_tokens and not oversized_own_row:
            raise ValueError(f"{unit} {i} holds {n} tokens (the prompt and its responses), more than "
                             f"max_row_tokens={max_row_tokens}")
        if current and max_row_tokens is not None and used + n > max_row_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def check_layout_options(pad_id, pack, max_row_tokens, pad_to_multiple_of) -> None:
    """The layout settings every builder takes, checked before any work."""
    check_int("pad_id", pad_id, minimum=0)
    check_int("max_row_tokens", max_row_tokens, minimum=1, optional=True)
    check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1)
    if max_row_tokens is not None and not pack:
        raise ValueError("max_row_tokens caps packed rows; pass pack=True with it")


def lay_out(prompts: list[list[int]], responses: list[list[list[int]]], seqs: list[list[int]], *, pad_id: int,
            pack: bool, max_row_tokens: int | None, pad_to_multiple_of: int, device, unit: str,
            oversized_own_row: bool = False) -> dict:
    """The fields of a `SharedBatch` (as keyword arguments) for prompts already truncated and checked.

    Args:
        prompts: D prompts' token ids; document d is prompt d with its responses.
        responses: per prompt, its responses' token ids (response k gets segment k + 1).
        seqs: per prompt, the sequence number of each of its responses (together a permutation of 0..S-1).
        pad_id, pack, max_row_tokens, pad_to_multiple_of, device, oversized_own_row: as `build_shared_batch`;
            `unit` names a prompt with its responses in errors.
    """
    num_seqs = sum(len(r) for r in responses)
    lengths = [len(p) + sum(len(ids) for ids in rs) for p, rs in zip(prompts, responses, strict=True)]
    row_docs = _rows_of(lengths, pack, max_row_tokens, unit, oversized_own_row)
    T = max(1, max(sum(lengths[d] for d in row) for row in row_docs))
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of

    shape = (len(row_docs), T)
    input_ids = [[pad_id] * T for _ in row_docs]
    position_ids = [[0] * T for _ in row_docs]
    segment_ids = [[PAD] * T for _ in row_docs]
    document_ids = [[-1] * T for _ in row_docs]
    labels = [[IGNORE_INDEX] * T for _ in row_docs]
    scored = [[] for _ in range(num_seqs)]  # per sequence: (flat hidden row, target)
    for r, row in enumerate(row_docs):
        at = 0
        for d in row:
            p = prompts[d]
            last_prompt = r * T + at + len(p) - 1 if p else None
            segments = [(PROMPT, p, None)] + [(PROMPT + 1 + k, ids, seq) for k, (ids, seq)
                                               in enumerate(zip(responses[d], seqs[d], strict=True))]
            for seg, ids, seq in segments:
                start_pos = 0 if seg == PROMPT else len(p)
                previous = last_prompt  # the row that predicts this segment's first token
                for j, t in enumerate(ids):
                    input_ids[r][at] = t
                    position_ids[r][at] = start_pos + j
                    segment_ids[r][at] = seg
                    document_ids[r][at] = d
                    if seq is not None:
                        labels[r][at] = t
                        if previous is not None:
                            scored[seq].append((previous, t))
                        previous = r * T + at
                    at += 1

    flat = [(row, target, seq) for seq, entries in enumerate(scored) for row, target in entries]

    def tensor(data):
        return torch.tensor(data, dtype=torch.long, device=device)

    token_rows, token_targets, token_seqs = (tensor([e[k] for e in flat]) for k in range(3))
    return dict(
        input_ids=tensor(input_ids).reshape(shape),
        position_ids=tensor(position_ids).reshape(shape),
        segment_ids=tensor(segment_ids).reshape(shape),
        document_ids=tensor(document_ids).reshape(shape),
        labels=tensor(labels).reshape(shape),
        token_rows=token_rows,
        token_targets=token_targets,
        token_seqs=token_seqs,
        counts=tensor([len(s) for s in scored]),
        max_count=max((len(s) for s in scored), default=0),
    )


def build_shared_batch(
    pairs: Iterable[tuple[Sequence[int], Sequence[int], Sequence[int]]],
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
) -> SharedPromptBatch:
    """Builds the shared-prompt batch of B tokenized pairs.

    Args:
        pairs: B tuples `(prompt_ids, chosen_ids, rejected_ids)`; the responses without the prompt (as
            `pairs_from_examples` gives them from the trainer's tokenized data). Any of the three may be empty.
        pad_id: the id written into padding positions (never attended to by real tokens, never scored).
        max_length, max_prompt_length, bos_token_id: truncation, exactly as the unshared rows (`truncate_pair`).
        pack: several pairs per row (padding-free), each its own document in the mask; `max_row_tokens` caps a
            row (default: all pairs in one row). Without `pack`, one pair per row, right-padded.
        oversized_own_row: a pair longer than `max_row_tokens` gets a row of its own (default: ValueError).
        pad_to_multiple_of: round T up (e.g. 128, FlexAttention's block size, or to reuse compiled shapes).
        device: where the tensors go (default CPU).
    Returns:
        a `SharedPromptBatch`.
    """
    check_layout_options(pad_id, pack, max_row_tokens, pad_to_multiple_of)
    pairs = [truncate_pair(p, c, r, max_length=max_length, max_prompt_length=max_prompt_length,
                           bos_token_id=bos_token_id) for p, c, r in pairs]
    if not pairs:
        raise ValueError("build_shared_batch needs at least one pair")
    for i, (p, c, r) in enumerate(pairs):
        for name, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
            check_ids(ids, f"pair {i}'s {name}")
    B = len(pairs)
    layout = lay_out([p for p, _, _ in pairs], [[c, r] for _, c, r in pairs], [[i, B + i] for i in range(B)],
                     pad_id=pad_id, pack=pack, max_row_tokens=max_row_tokens, pad_to_multiple_of=pad_to_multiple_of,
                     device=device, unit="pair", oversized_own_row=oversized_own_row)
    return SharedPromptBatch(**layout, num_pairs=B)
