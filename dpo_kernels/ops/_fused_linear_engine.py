"""The chunk loops of the fused linear engine (DESIGN.md 4.2). No autograd here: callers pass flattened tensors.

Every loop reuses one `[C, V]` buffer: `Z = h_c @ W^T (+ b)` (cuBLAS on CUDA), then `logsoftmax_pass` reads Z once
and, when gradients are wanted, leaves `D = scale * (onehot - softmax(Z))` in the same buffer; then
`U = D @ W` (hidden-state gradient, fp32) and `acc += D^T [h | 1]` (weight and bias gradient, fp32).

- `sequence_logps`: steps 1-2 only (2NHV): log-probs for eval, the reference model, and recompute forwards.
- `recompute_grads`: every token's coefficient is known, so it goes straight into D's scale (6NHV).
- `fused_dpo`: DPO forward that forms the gradients for an upstream gradient of 1 while it computes the loss
  (6NHV), pair by pair: resident groups of whole pairs, or one long pair streamed through a per-pair accumulator.
"""
import torch

from dpo_kernels.ops._chunking import even_chunks, plan_pairs
from dpo_kernels.ops._fp32_gemm import addmm_fp32_, mm_fp32
from dpo_kernels.ops.logsoftmax_pass import logsoftmax_pass

# Extra columns of the weight-gradient GEMM's right operand when the bias needs a gradient: the per-token
# coefficient c, split as c_hi + c_lo in the operand's dtype so that bf16 does not round c (D^T c_hi + D^T c_lo is
# the bias gradient); the remaining zero columns keep rows 16-byte aligned for cuBLAS.
_BIAS_COLUMNS = 8


class Grads:
    """Gradient buffers of one engine run; `None` where that gradient is not wanted."""

    def __init__(self, hidden2d, weight, need_h, need_w, need_b):
        V, H = weight.shape
        self.hidden = torch.zeros_like(hidden2d) if need_h else None
        self.need_w, self.need_b = need_w, need_b
        self.width = (H if need_w else 0) + (_BIAS_COLUMNS if need_b else 0)
        # Left uninitialized: the first GEMM into it runs with beta = 0, which saves a zero-fill of [V, H] fp32.
        self.acc = torch.empty(V, self.width, dtype=torch.float32, device=weight.device) if self.width else None
        self.acc_started = False
        self.H = H

    def operand(self, h, coef):
        """`[h * coef | coef | 0...]` in h's dtype, the right operand of `acc += D^T @ operand` (coef None = 1).

        Scaling the `[C, H]` rows of h by the per-token coefficient, rather than the `[C, V]` rows of D, keeps D
        untouched after the pass; `h * coef` is formed in fp32 and rounded once."""
        if not self.need_b:
            return h if coef is None else (h.float() * coef.unsqueeze(1)).to(h.dtype)
        out = h.new_zeros(h.shape[0], self.width)
        if self.need_w:
            out[:, : self.H] = h if coef is None else h.float() * coef.unsqueeze(1)
        col = self.width - _BIAS_COLUMNS
        if coef is None:
            out[:, col] = 1.0
        else:
            out[:, col] = coef
            out[:, col + 1] = coef - out[:, col].float()
        return out

    def add_weight_gemm(self, d, operand):
        addmm_fp32_(self.acc, d.t(), operand, accumulate=self.acc_started)
        self.acc_started = True

    def add_scaled(self, partial, coef):
        """`acc += coef * partial` for an fp32 `[V, width]` partial and a 0-dim coefficient (no host sync)."""
        if not self.acc_started:
            self.acc.zero_()
            self.acc_started = True
        self.acc.addcmul_(partial, coef)

    def weight_bias(self, weight_dtype):
        grad_w = grad_b = None
        if self.acc is not None and not self.acc_started:  # no token was scored
            self.acc.zero_()
        if self.need_w:
            grad_w = self.acc[:, : self.H].to(weight_dtype).contiguous()
        if self.need_b:
            col = self.width - _BIAS_COLUMNS
            grad_b = (self.acc[:, col] + self.acc[:, col + 1]).to(weight_dtype)
        return grad_w, grad_b


def _project(h, weight, bias, zbuf):
    z = zbuf[: h.shape[0]]
    if bias is None:
        torch.mm(h, weight.t(), out=z)
    else:
        torch.addmm(bias, h, weight.t(), out=z)
    return z


def _new_buffer(hidden2d, weight, chunk, total):
    """The reused `[C, V]` logits buffer. Its rows start on 16-element boundaries even when V does not divide
    (32003, 50257): cuBLAS takes the padded leading dimension, and the pass keeps its 16-byte vector accesses."""
    vocab = weight.shape[0]
    padded = -(-vocab // 16) * 16
    rows = max(1, min(chunk, total))
    return torch.empty(rows, padded, dtype=hidden2d.dtype, device=hidden2d.device)[:, :vocab]


def reduce_sequences(tok, layout, num_seqs, average):
    """Per-sequence sums (means) of token log-probs, in a fixed order: bitwise reproducible."""
    table = tok.new_zeros(num_seqs, max(layout.max_count, 1))
    table[layout.seq, layout.slot] = tok
    total = table.sum(1)
    if average:
        total = torch.where(layout.counts > 0, total / layout.counts.clamp_min(1), torch.zeros_like(total))
    return total


def sequence_logps(hidden2d, weight, bias, layout, num_seqs, average, chunk):
    """`[R]` float32 sequence log-probs (forward only, 2NHV)."""
    total = layout.rows.numel()
    tok = torch.empty(total, dtype=torch.float32, device=hidden2d.device)
    zbuf = _new_buffer(hidden2d, weight, chunk, total)
    for s, e in even_chunks(total, chunk):
        z = _project(hidden2d.index_select(0, layout.rows[s:e]), weight, bias, zbuf)
        tok[s:e] = logsoftmax_pass(z, layout.targets[s:e])
    return reduce_sequences(tok, layout, num_seqs, average)


def recompute_grads(hidden2d, weight, bias, layout, token_coef, chunk, grads: Grads):
    """Gradients for known per-token coefficients `token_coef [N]` (d out / d token log-prob), 6NHV."""
    total = layout.rows.numel()
    zbuf = _new_buffer(hidden2d, weight, chunk, total)
    for s, e in even_chunks(total, chunk):
        rows = layout.rows[s:e]
        h = hidden2d.index_select(0, rows)
        d = _project(h, weight, bias, zbuf)
        logsoftmax_pass(d, layout.targets[s:e], scale=token_coef[s:e], write_grad=True)
        if grads.hidden is not None:
            grads.hidden.index_copy_(0, rows, torch.mm(d, weight))
        if grads.acc is not None:
            grads.add_weight_gemm(d, grads.operand(h, None))


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


def fused_dpo(hidden2d, weight, bias, layout, num_pairs, average, chunk, tied, loss_fn, grads: Grads | None):
    """DPO forward over pair-ordered tokens, forming the gradients for an upstream gradient of 1.

    `loss_fn(chosen_logps [B], rejected_logps [B]) -> (DPOLossOutput, grad_chosen [B], grad_rejected [B])`.
    Returns `(DPOLossOutput, logps [2B] float32)`; `grads` (if given) is filled.
    """
    B, counts = num_pairs, layout.counts_host
    total = layout.rows.numel()
    tok = torch.empty(total, dtype=torch.float32, device=hidden2d.device)
    pair_loss = _PairLoss(layout, B, average, loss_fn)
    want = grads is not None and (grads.hidden is not None or grads.acc is not None)
    zbuf = _new_buffer(hidden2d, weight, chunk, total)
    for group in plan_pairs([counts[i] + counts[B + i] for i in range(B)], chunk):
        if group.streaming:
            _stream_pair(hidden2d, weight, bias, layout, group, B, average, tied, tok, zbuf, pair_loss, grads, want)
            continue
        s, e = group.chunks[0]
        rows = layout.rows[s:e]
        h = d = None
        if e > s:
            h = hidden2d.index_select(0, rows)
            d = _project(h, weight, bias, zbuf)
            tok[s:e] = logsoftmax_pass(d, layout.targets[s:e], write_grad=want)
        g = pair_loss.complete(tok, group.pairs, s, e)
        if want and e > s:
            seq = layout.seq[s:e]
            c = g[seq] / layout.counts[seq] if average else g[seq]
            if grads.hidden is not None:
                grads.hidden.index_copy_(0, rows, (mm_fp32(d, weight) * c.unsqueeze(1)).to(hidden2d.dtype))
            if grads.acc is not None:
                grads.add_weight_gemm(d, grads.operand(h, c))
    return pair_loss.out, pair_loss.logps


def _stream_pair(hidden2d, weight, bias, layout, group, B, average, tied, tok, zbuf, pair_loss, grads, want):
    """One pair longer than a chunk: D carries each row's known factor (the rejected rows' sign for tied losses,
    1/len in average mode); the pair's `D^T h` sums wait in fp32 accumulators until its coefficient is known."""
    s0, e0 = group.start, group.end
    seq = layout.seq[s0:e0]
    rejected = seq >= B
    scale = torch.ones(e0 - s0, dtype=torch.float32, device=hidden2d.device)
    if tied:
        scale = torch.where(rejected, -scale, scale)
    if average:
        scale = scale / layout.counts[seq].clamp_min(1)
    n_chosen = layout.counts_host[group.pairs[0]]
    u = None
    if want and grads.hidden is not None:
        u = torch.empty(e0 - s0, weight.shape[1], dtype=torch.float32, device=hidden2d.device)
    acc_c = acc_r = None
    if want and grads.acc is not None:
        acc_c = torch.empty_like(grads.acc)
        acc_r = None if tied else torch.empty_like(grads.acc)
    started = {"c": False, "r": False}
    for s, e in group.chunks:
        h = hidden2d.index_select(0, layout.rows[s:e])
        d = _project(h, weight, bias, zbuf)
        tok[s:e] = logsoftmax_pass(d, layout.targets[s:e], scale=scale[s - s0 : e - s0], write_grad=want)
        if not want:
            continue
        if grads.hidden is not None:
            u[s - s0 : e - s0] = mm_fp32(d, weight)
        if acc_c is None:
            continue
        operand = grads.operand(h, None)
        # Without tied coefficients the chosen rows (first in the pair) and the rejected rows go to separate sums.
        k = e - s if tied else min(max(n_chosen - (s - s0), 0), e - s)
        if k:
            addmm_fp32_(acc_c, d[:k].t(), operand[:k], accumulate=started["c"])
            started["c"] = True
        if k < e - s:
            addmm_fp32_(acc_r, d[k:].t(), operand[k:], accumulate=started["r"])
            started["r"] = True
    g = pair_loss.complete(tok, group.pairs, s0, e0)
    if not want:
        return
    i = group.pairs[0]
    row_g = g[i].expand(e0 - s0) if tied else torch.where(rejected, g[B + i], g[i])
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, layout.rows[s0:e0], (u * row_g.unsqueeze(1)).to(hidden2d.dtype))
    if acc_c is not None:
        if started["c"]:
            grads.add_scaled(acc_c, g[i])
        if started["r"]:
            grads.add_scaled(acc_r, g[B + i])
