"""The chunk loops of the fused linear engine (DESIGN.md 4.2). No autograd here: callers pass flattened tensors.

Every loop reuses one `[C, V]` buffer: `Z = h_c @ W^T (+ b)` (cuBLAS on CUDA), then `logsoftmax_pass` reads Z once
and, when gradients are wanted, leaves `D = scale * (onehot - softmax(Z))` in the same buffer; then
`U = D @ W` (hidden-state gradient) and `acc += D^T [h | 1]` (weight and bias gradient, fp32).

- `sequence_logps`: steps 1-2 only (2NHV): log-probs for eval, the reference model, and recompute forwards.
- `recompute_grads`: every token's coefficient is known, so it goes straight into D's scale (6NHV).
- `fused_dpo`: DPO forward that forms the gradients for an upstream gradient of 1 while it computes the loss
  (6NHV), pair by pair: resident groups of whole pairs, or one long pair streamed through chunks.

`sequence_logps` and `fused_dpo` optionally fill a `TokenStats` (each token's entropy and top-1 hit) from the pass
that first reads the token's logits: no extra GEMM, no extra read of the buffer.

Memory (the byte model is `_memory_model.py`): at most one `[V, H]` fp32 buffer ever lives, the weight-gradient
accumulator, and none when one GEMM forms the whole weight gradient (a single resident chunk without bias: cuBLAS
accumulates in fp32 and rounds once into the weight's dtype, as the fp32 buffer's final conversion would).
A streaming pair streams into that accumulator while nothing else is in it and scales it by the pair's coefficient
at the end (tied losses); the longest streaming pair runs first for that. Otherwise (the accumulator already holds
other pairs, or the chosen and rejected coefficients are not tied) the pair runs twice: a forward pass for its
log-probs, then, its coefficients known, a gradient pass that adds straight into the accumulator (no second
`[V, H]` buffer; the pair's tokens outside its last chunk are projected twice: 8 instead of 6 units of GEMM work
for those). The unscaled hidden-state gradient `U` of a
streaming pair stays fp32 (`[n, H]`, n its tokens).
"""
import functools

import torch

from dpo_kernels.fused_linear.fp32_gemm import addmm_fp32_, mm_fp32
from dpo_kernels.fused_linear.logsoftmax_pass import logsoftmax_pass
from dpo_kernels.fused_linear.plan import even_chunks, longest_streaming_first, plan_pairs

# Extra columns of the weight-gradient GEMM's right operand when the bias needs a gradient: the per-token
# coefficient c, split as c_hi + c_lo in the operand's dtype so that bf16 does not round c (D^T c_hi + D^T c_lo is
# the bias gradient); the remaining zero columns keep rows 16-byte aligned for cuBLAS.
_BIAS_COLUMNS = 8


def _explicit_dtypes(fn):
    """Runs an engine entry point with autocast off on the hidden states' device.

    The caller picked the dtypes; autocast (a bf16 region in a training loop) would otherwise turn the fp32
    products that keep U and the weight gradient unrounded into bf16 ones, and make `torch.mm(D, W)` return bf16
    for fp32 operands, which `index_copy_` into the fp32 hidden-state gradient then refuses."""

    @functools.wraps(fn)
    def run(hidden2d, *args, **kwargs):
        device_type = hidden2d.device.type
        if not torch.amp.is_autocast_available(device_type):  # e.g. "meta": no autocast to turn off
            return fn(hidden2d, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(hidden2d, *args, **kwargs)

    return run


class Grads:
    """Gradient buffers of one engine run; `None` where that gradient is not wanted.

    The fp32 weight/bias accumulator is allocated by the first GEMM into it (beta = 0, so no zero-fill of [V, H]);
    `add_weight_gemm(..., only=True)` instead writes the weight gradient in the weight's dtype with one GEMM.
    """

    def __init__(self, hidden2d, weight, need_h, need_w, need_b):
        V, H = weight.shape
        self.hidden = torch.zeros_like(hidden2d) if need_h else None
        self.need_w, self.need_b = need_w, need_b
        self.width = (H if need_w else 0) + (_BIAS_COLUMNS if need_b else 0)
        self.acc = None
        self.direct = None
        self.V, self.H, self.device = V, H, weight.device

    @property
    def started(self) -> bool:
        """Whether some tokens' weight/bias gradient is already in the accumulator."""
        return self.acc is not None or self.direct is not None

    def operand(self, h, coef):
        """`[h * coef | coef | 0...]` in h's dtype, the right operand of `acc += D^T @ operand` (coef None = 1).

        Scaling the `[C, H]` rows of h by the per-token coefficient, rather than the `[C, V]` rows of D, keeps D
        untouched after the pass; `h * coef` is formed in fp32 (type promotion with the fp32 coef) and rounded
        once."""
        if not self.need_b:
            return h if coef is None else (h * coef.unsqueeze(1)).to(h.dtype)
        out = h.new_zeros(h.shape[0], self.width)
        if self.need_w:
            out[:, : self.H] = h if coef is None else h * coef.unsqueeze(1)
        col = self.width - _BIAS_COLUMNS
        if coef is None:
            out[:, col] = 1.0
        else:
            out[:, col] = coef
            out[:, col + 1] = coef - out[:, col].float()
        return out

    def add_weight_gemm(self, d, operand, *, only=False):
        """`acc += D^T operand`; with `only` (this GEMM is the run's whole weight gradient, no bias) the product is
        written in the weight's dtype instead, and no fp32 `[V, H]` buffer exists."""
        if only and not self.need_b and not self.started:
            self.direct = torch.mm(d.t(), operand)
            return
        if self.acc is None:
            self.acc = torch.empty(self.V, self.width, dtype=torch.float32, device=self.device)
            addmm_fp32_(self.acc, d.t(), operand, accumulate=False)
        else:
            addmm_fp32_(self.acc, d.t(), operand)

    def scale_(self, coef):
        """`acc *= coef` for a 0-dim coefficient (no host sync)."""
        self.acc.mul_(coef)

    def weight_bias(self, weight_dtype):
        if self.direct is not None:
            return self.direct, None
        grad_w = grad_b = None
        if self.acc is None:  # no token was scored
            grad_w = torch.zeros(self.V, self.H, dtype=weight_dtype, device=self.device) if self.need_w else None
            grad_b = torch.zeros(self.V, dtype=weight_dtype, device=self.device) if self.need_b else None
            return grad_w, grad_b
        if self.need_w:
            grad_w = self.acc[:, : self.H].to(weight_dtype).contiguous()
        if self.need_b:
            col = self.width - _BIAS_COLUMNS
            grad_b = (self.acc[:, col] + self.acc[:, col + 1]).to(weight_dtype)
        return grad_w, grad_b


class TokenStats:
    """Per-token entropy (`[N]` float32) and top-1 hit (`[N]` bool) of the scored tokens, in the layout's order."""

    def __init__(self, total, device):
        self.entropy = torch.empty(total, dtype=torch.float32, device=device)
        self.top1 = torch.empty(total, dtype=torch.bool, device=device)

    def per_sequence(self, layout, num_seqs):
        """`[R]` float32 entropy sums and `[R]` int64 top-1 counts per sequence, in a fixed order."""
        return (reduce_sequences(self.entropy, layout, num_seqs, False),
                reduce_sequences(self.top1.long(), layout, num_seqs, False))


def _score(z, layout, s, e, tok, stats, **kwargs):
    """The pass over the logits `z` of tokens `s:e`: log-probs into `tok` (and entropy, top-1 into `stats`)."""
    if stats is None:
        tok[s:e] = logsoftmax_pass(z, layout.targets[s:e], **kwargs)
    else:
        tok[s:e], stats.entropy[s:e], stats.top1[s:e] = logsoftmax_pass(z, layout.targets[s:e], stats=True,
                                                                        **kwargs)


def _project(h, weight, bias, zbuf):
    z = zbuf[: h.shape[0]]
    if bias is None:
        torch.mm(h, weight.t(), out=z)
    else:
        torch.addmm(bias, h, weight.t(), out=z)
    return z


def _new_buffer(hidden2d, weight, chunks):
    """The reused logits buffer, as many rows as the longest of `chunks` (at most C). Its rows start on 16-element
    boundaries even when V does not divide (32003, 50257): cuBLAS takes the padded leading dimension, and the pass
    keeps its 16-byte vector accesses."""
    vocab = weight.shape[0]
    padded = -(-vocab // 16) * 16
    rows = max([1] + [e - s for s, e in chunks])
    return torch.empty(rows, padded, dtype=hidden2d.dtype, device=hidden2d.device)[:, :vocab]


def reduce_sequences(tok, layout, num_seqs, average):
    """Per-sequence sums (means) of token log-probs, in a fixed order: bitwise reproducible."""
    table = tok.new_zeros(num_seqs, max(layout.max_count, 1))
    table[layout.seq, layout.slot] = tok
    total = table.sum(1)
    if average:
        total = torch.where(layout.counts > 0, total / layout.counts.clamp_min(1), torch.zeros_like(total))
    return total


def _forward_chunks(hidden2d, weight, bias, layout, chunks, zbuf, tok, stats=None):
    """Token log-probs of `chunks` into `tok` (2NHV); the last chunk's logits stay in `zbuf`."""
    for s, e in chunks:
        z = _project(hidden2d.index_select(0, layout.rows[s:e]), weight, bias, zbuf)
        _score(z, layout, s, e, tok, stats)


@_explicit_dtypes
def sequence_logps(hidden2d, weight, bias, layout, num_seqs, average, chunk, stats: TokenStats | None = None):
    """`[R]` float32 sequence log-probs (forward only, 2NHV); `stats` (if given) is filled."""
    total = layout.rows.numel()
    tok = torch.empty(total, dtype=torch.float32, device=hidden2d.device)
    chunks = even_chunks(total, chunk)
    _forward_chunks(hidden2d, weight, bias, layout, chunks, _new_buffer(hidden2d, weight, chunks), tok, stats)
    return reduce_sequences(tok, layout, num_seqs, average)


def _gradient_chunk(hidden2d, weight, bias, layout, s, e, coef, zbuf, grads, *, projected=False, only=False):
    """Gradients of tokens `s:e` whose coefficients `coef [e - s]` are known; `projected`: their logits are already
    in `zbuf`."""
    rows = layout.rows[s:e]
    h = hidden2d.index_select(0, rows)
    d = zbuf[: e - s] if projected else _project(h, weight, bias, zbuf)
    logsoftmax_pass(d, layout.targets[s:e], scale=coef, write_grad=True)
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, rows, torch.mm(d, weight))
    if grads.width:
        grads.add_weight_gemm(d, grads.operand(h, None), only=only)


@_explicit_dtypes
def recompute_grads(hidden2d, weight, bias, layout, token_coef, chunk, grads: Grads):
    """Gradients for known per-token coefficients `token_coef [N]` (d out / d token log-prob), 6NHV."""
    total = layout.rows.numel()
    chunks = even_chunks(total, chunk)
    zbuf = _new_buffer(hidden2d, weight, chunks)
    for s, e in chunks:
        _gradient_chunk(hidden2d, weight, bias, layout, s, e, token_coef[s:e], zbuf, grads, only=len(chunks) == 1)


class _PairLoss:
    """Calls the DPO loss op on the whole batch as pairs complete; pairs not yet seen hold placeholder zeros.

    A pair's coefficient depends only on its own log-probs and on batch facts known up front (lengths, reference
    log-probs), except for losses that couple pairs through their log-probs (those never get here with more than
    one group), so the placeholders do not change the coefficients of the completed pairs.
    """

    def __init__(self, layout, num_pairs, average, loss_fn):
        self.logps = torch.zeros(2 * num_pairs, dtype=torch.float32, device=layout.counts.device)
        self.B, self.average, self.loss_fn, self.layout = num_pairs, average, loss_fn, layout
        self.out = None

    def complete(self, tok, pairs, start, end):
        """Records the pairs' log-probs from their tokens `tok[start:end]`; returns `[2B]` float32 d loss / d logp
        per sequence (valid for the completed pairs)."""
        # Built on the device: a host list copied over would wait for every kernel queued before it.
        chosen = torch.arange(pairs.start, pairs.stop, device=self.logps.device)
        seqs = torch.cat([chosen, chosen + self.B])
        self.logps[seqs] = _group_sums(tok, self.layout, seqs, start, end, self.average)
        self.out, grad_c, grad_r = self.loss_fn(self.logps[: self.B], self.logps[self.B :])
        return torch.cat([grad_c, grad_r]).float()

    def token_coefficients(self, g, start, end):
        """d loss / d token log-prob of tokens `start:end` from the per-sequence `g [2B]`."""
        seq = self.layout.seq[start:end]
        return g[seq] / self.layout.counts[seq] if self.average else g[seq]


def _group_sums(tok, layout, seqs, start, end, average):
    """Sums (means) of the group's sequences from its own tokens, in a fixed order."""
    local = torch.full((layout.counts.numel(),), -1, dtype=torch.long, device=tok.device)
    local[seqs] = torch.arange(seqs.numel(), device=tok.device)
    table = tok.new_zeros(seqs.numel(), max(layout.max_count, 1))
    table[local[layout.seq[start:end]], layout.slot[start:end]] = tok[start:end]
    total = table.sum(1)
    if average:
        n = layout.counts[seqs]
        total = torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))
    return total


@_explicit_dtypes
def fused_dpo(hidden2d, weight, bias, layout, num_pairs, average, chunk, tied, loss_fn, grads: Grads | None,
              stats: TokenStats | None = None):
    """DPO forward over pair-ordered tokens, forming the gradients for an upstream gradient of 1.

    `loss_fn(chosen_logps [B], rejected_logps [B]) -> (DPOLossOutput, grad_chosen [B], grad_rejected [B])`.
    Returns `(DPOLossOutput, logps [2B] float32)`; `grads` and `stats` (if given) are filled.
    """
    B, counts = num_pairs, layout.counts_host
    total = layout.rows.numel()
    tok = torch.empty(total, dtype=torch.float32, device=hidden2d.device)
    pair_loss = _PairLoss(layout, B, average, loss_fn)
    want = grads is not None and (grads.hidden is not None or grads.width > 0)
    groups = longest_streaming_first(plan_pairs([counts[i] + counts[B + i] for i in range(B)], chunk))
    zbuf = _new_buffer(hidden2d, weight, [c for group in groups for c in group.chunks])
    only = len(groups) == 1
    for group in groups:
        if not group.streaming:
            _resident_group(hidden2d, weight, bias, layout, group, tok, zbuf, pair_loss, grads if want else None,
                            only, stats)
        elif want and grads.width and (grads.started or not tied):
            _stream_pair_twice(hidden2d, weight, bias, layout, group, tok, zbuf, pair_loss, grads, stats)
        else:
            _stream_pair(hidden2d, weight, bias, layout, group, B, average, tied, tok, zbuf, pair_loss,
                         grads if want else None, stats)
    return pair_loss.out, pair_loss.logps


def _resident_group(hidden2d, weight, bias, layout, group, tok, zbuf, pair_loss, grads, only, stats):
    """Whole pairs in one chunk: their coefficients are known after the pass, so D is used at once."""
    s, e = group.chunks[0]
    if e == s:
        pair_loss.complete(tok, group.pairs, s, e)
        return
    rows = layout.rows[s:e]
    h = hidden2d.index_select(0, rows)
    d = _project(h, weight, bias, zbuf)
    _score(d, layout, s, e, tok, stats, write_grad=grads is not None)
    g = pair_loss.complete(tok, group.pairs, s, e)
    if grads is None:
        return
    c = pair_loss.token_coefficients(g, s, e)
    if grads.hidden is not None:
        _scaled_hidden_grad(d, weight, c, grads.hidden, rows)
    if grads.width:
        grads.add_weight_gemm(d, grads.operand(h, c), only=only)


def _scaled_hidden_grad(d, weight, c, out, rows):
    """`out[rows] = (c * (D @ W))` rounded once to out's dtype; the fp32 product is freed on return."""
    u = mm_fp32(d, weight)
    u.mul_(c.unsqueeze(1))
    out.index_copy_(0, rows, u.to(out.dtype))


def _stream_pair(hidden2d, weight, bias, layout, group, B, average, tied, tok, zbuf, pair_loss, grads, stats):
    """One pair longer than a chunk, in one pass: D carries each row's known factor (the rejected rows' sign for
    tied losses, 1/len in average mode); the pair's `D^T h` sums go straight into the (still empty) weight-gradient
    accumulator, and `U = D @ W` into an fp32 `[n, H]` buffer, both scaled once the pair's coefficient is known.

    Reached with gradients only when the accumulator is unused or not wanted, and for tied losses when it is used.
    """
    s0, e0 = group.start, group.end
    seq = layout.seq[s0:e0]
    rejected = seq >= B
    scale = torch.ones(e0 - s0, dtype=torch.float32, device=hidden2d.device)
    if tied:
        scale = torch.where(rejected, -scale, scale)
    if average:
        scale = scale / layout.counts[seq].clamp_min(1)
    u = None
    if grads is not None and grads.hidden is not None:
        u = torch.empty(e0 - s0, weight.shape[1], dtype=torch.float32, device=hidden2d.device)
    for s, e in group.chunks:
        h = hidden2d.index_select(0, layout.rows[s:e])
        d = _project(h, weight, bias, zbuf)
        _score(d, layout, s, e, tok, stats, scale=scale[s - s0 : e - s0], write_grad=grads is not None)
        if grads is None:
            continue
        if u is not None:
            addmm_fp32_(u[s - s0 : e - s0], d, weight, accumulate=False)
        if grads.width:
            grads.add_weight_gemm(d, grads.operand(h, None))
    del h
    g = pair_loss.complete(tok, group.pairs, s0, e0)
    if grads is None:
        return
    i = group.pairs[0]
    if grads.width:
        grads.scale_(g[i])
    if u is not None:
        row_g = g[i].expand(e0 - s0) if tied else torch.where(rejected, g[B + i], g[i])
        u.mul_(row_g.unsqueeze(1))
        # Rounded chunk by chunk: a [C, H] temporary rather than a second [n, H] one.
        for s, e in group.chunks:
            grads.hidden.index_copy_(0, layout.rows[s:e], u[s - s0 : e - s0].to(hidden2d.dtype))


def _stream_pair_twice(hidden2d, weight, bias, layout, group, tok, zbuf, pair_loss, grads, stats):
    """One pair longer than a chunk when its weight-gradient sums cannot go straight into the accumulator: a
    forward pass gives its log-probs and coefficients, then a gradient pass adds into the accumulator (no second
    `[V, H]` buffer). The forward pass takes the short remainder chunk first, and the gradient pass runs backwards
    from the last, full chunk, whose logits are still in the buffer: the extra GEMM work is the projection of the
    pair's tokens outside its last chunk. Token statistics come from the forward pass."""
    s0, e0 = group.start, group.end
    sizes = [e - s for s, e in reversed(group.chunks)]
    starts = [s0 + sum(sizes[:k]) for k in range(len(sizes))]
    chunks = [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    _forward_chunks(hidden2d, weight, bias, layout, chunks, zbuf, tok, stats)
    g = pair_loss.complete(tok, group.pairs, s0, e0)
    coef = pair_loss.token_coefficients(g, s0, e0)
    for k, (s, e) in enumerate(reversed(chunks)):
        _gradient_chunk(hidden2d, weight, bias, layout, s, e, coef[s - s0 : e - s0], zbuf, grads, projected=k == 0)
