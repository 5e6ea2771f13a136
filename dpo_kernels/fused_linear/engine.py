"""The chunk loops that execute a `plan.StepPlan` (docs/design.md, "The fused linear engine"). No autograd here.

Every loop reuses one `[C, V]` buffer: `Z = h_c @ W^T (+ b)` (cuBLAS on CUDA), then `logsoftmax_pass` reads Z once
and, when gradients are wanted, leaves `D = scale * (onehot - softmax(Z))` in the same buffer; then
`U = D @ W` (hidden-state gradient) and `acc += D^T [h | 1]` (weight and bias gradient, fp32).

- `forward_logps`: steps 1-2 only (2NHV): log-probs for eval, the reference model, and recompute forwards.
- `recompute_grads`: every token's coefficient is known, so it goes straight into D's scale (6NHV).
- `fused_dpo`: DPO forward that forms the gradients for an upstream gradient of 1 while it computes the loss
  (6NHV), group by group in the plan's order and mode: `resident` groups of whole units (pairs, or groups of K
  responses: `units.py`), or one long unit streamed `once` or `twice`. `SequenceLoss` calls the loss over the
  batch's `[R]` log-probs as units complete.

Each takes a `ChunkLoop`: the operands, the token layout, the plan, and the buffers the loops fill (gradients and
the optional per-token entropy and top-1 `TokenStats`, filled by the pass that first reads a token's logits).

Each GEMM, pass and `[n, H]` kernel reports itself to `trace` (a no-op outside `trace.record`): the byte and cost
models (`memory_model.py`, `cost_model.py`) sum the trace of these same loops run on meta tensors.

With a LoRA adapter on the head (`lora.LoraHead`), each projection adds its rank-r term to the buffer and each
chunk's gradients add the adapter's (`lora.project`, `lora.add_gradients`); the hidden-state gradient then stays fp32
until both terms are in.

Memory: at most one `[V, H]` fp32 buffer ever lives, the weight-gradient accumulator, and none when one GEMM forms
the whole weight gradient (a single chunk without bias: cuBLAS accumulates in fp32 and rounds once into the weight's
dtype, as the fp32 buffer's final conversion would). The unscaled hidden-state gradient `U` of a streaming pair stays
fp32 (`[n, H]`, n its tokens).
"""
import functools
from dataclasses import dataclass, field

import torch

from dpo_kernels.fused_linear import lora as lora_terms
from dpo_kernels.fused_linear import trace
from dpo_kernels.fused_linear.fp32_gemm import addmm_fp32_, mm_fp32
from dpo_kernels.fused_linear.logsoftmax_pass import logsoftmax_pass
from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_ONCE, StepPlan, TokenLayout

# Extra columns of the weight-gradient GEMM's right operand when the bias needs a gradient: the per-token
# coefficient c, split as c_hi + c_lo in the operand's dtype so that bf16 does not round c (D^T c_hi + D^T c_lo is
# the bias gradient); the remaining zero columns keep rows 16-byte aligned for cuBLAS.
_BIAS_COLUMNS = 8


def _explicit_dtypes(fn):
    """Runs an engine entry point with autocast off on the operands' device.

    The entry (`functional.head_operands`) picked the dtypes; autocast (a bf16 region in a training loop, or a
    backward called inside one) would otherwise turn the fp32 products that keep U and the weight gradient
    unrounded into bf16 ones, and make `torch.mm(D, W)` return bf16 for fp32 operands, which `index_copy_` into
    the fp32 hidden-state gradient then refuses."""

    @functools.wraps(fn)
    def run(loop, *args, **kwargs):
        device_type = loop.hidden2d.device.type
        if not torch.amp.is_autocast_available(device_type):  # e.g. "meta": no autocast to turn off
            return fn(loop, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(loop, *args, **kwargs)

    return run


class Grads:
    """Gradient buffers of one engine run; `None` where that gradient is not wanted.

    The fp32 weight/bias accumulator is allocated by the first GEMM into it (beta = 0, so no zero-fill of [V, H]);
    `add_weight_gemm(..., only=True)` instead writes the weight gradient in the weight's dtype with one GEMM.
    """

    def __init__(self, hidden2d, weight, need_h, need_w, need_b, lora=None):
        V, H = weight.shape
        self.lora = lora  # a `lora.LoraGrads` when the head carries an adapter whose gradients are wanted
        self.hidden = torch.zeros_like(hidden2d) if need_h else None
        if need_h:
            trace.kernel("zero hidden gradient", writes=(self.hidden,))
        self.need_w, self.need_b = need_w, need_b
        self.width = (H if need_w else 0) + (_BIAS_COLUMNS if need_b else 0)
        self.acc = None
        self.direct = None
        self.owed = None  # a 0-dim factor the accumulator still owes (`defer_scale`)
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
            if coef is None:
                return h
            product = h * coef.unsqueeze(1)
            trace.kernel("weight operand h * c", reads=(h,), writes=(product,))
            out = product.to(h.dtype)
            if out is not product:
                trace.kernel("weight operand round", reads=(product,), writes=(out,))
            return out
        out = h.new_zeros(h.shape[0], self.width)
        trace.kernel("weight operand with bias columns", reads=(h,), writes=(out,))
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
            trace.gemm("weight-gradient GEMM", d.t(), operand, self.direct)
            return
        if self.acc is None:
            self.acc = torch.empty(self.V, self.width, dtype=torch.float32, device=self.device)
            addmm_fp32_(self.acc, d.t(), operand, accumulate=False)
            trace.gemm("weight-gradient GEMM", d.t(), operand, self.acc)
        else:
            if self.owed is not None:
                self.acc.mul_(self.owed)
                trace.kernel("accumulator scale", reads=(self.acc,), writes=(self.acc,))
                self.owed = None
            addmm_fp32_(self.acc, d.t(), operand)
            trace.gemm("weight-gradient GEMM", d.t(), operand, self.acc, accumulate=True)

    def defer_scale(self, coef):
        """`acc *= coef` for a 0-dim coefficient (no host sync), applied when more tokens are added, or else folded
        into the one pass of `weight_bias` that converts the accumulator: no pass of its own over `[V, H]`."""
        self.owed = coef

    def weight_bias(self, weight_dtype, scale=None):
        """The weight and bias gradients in the weight's dtype, times `scale` (a 0-dim tensor such as the upstream
        gradient; None: 1) and any factor the accumulator owes, converted in one pass over it."""
        if self.direct is not None:
            if scale is None:
                return self.direct, None
            trace.kernel("weight-gradient scale", reads=(self.direct,), writes=(self.direct,))
            return self.direct.mul_(scale), None
        grad_w = grad_b = None
        if self.acc is None:  # no token was scored
            grad_w = torch.zeros(self.V, self.H, dtype=weight_dtype, device=self.device) if self.need_w else None
            grad_b = torch.zeros(self.V, dtype=weight_dtype, device=self.device) if self.need_b else None
            trace.kernel("zero weight gradient", writes=[t for t in (grad_w, grad_b) if t is not None])
            return grad_w, grad_b
        if self.owed is not None:
            scale = self.owed if scale is None else self.owed * scale
            self.owed = None
        if self.need_w:
            acc = self.acc[:, : self.H]
            if scale is None:
                grad_w = acc.to(weight_dtype).contiguous()
            elif weight_dtype == torch.float32 and acc.is_contiguous():
                grad_w = acc.mul_(scale)
            else:
                grad_w = _scaled_into(torch.empty(self.V, self.H, dtype=weight_dtype, device=self.device), acc,
                                      scale)
            if grad_w is not acc or scale is not None:
                trace.kernel("accumulator conversion", reads=(acc,), writes=(grad_w,))
        if self.need_b:
            col = self.width - _BIAS_COLUMNS
            hi, lo = self.acc[:, col], self.acc[:, col + 1]
            grad_b = (hi + lo if scale is None else hi * scale + lo * scale).to(weight_dtype)
            trace.kernel("bias gradient", reads=(hi, lo), writes=(grad_b,))
        return grad_w, grad_b

    def scaled_hidden(self, scale):
        """The hidden-state gradient times the 0-dim `scale` (the upstream gradient), in place: the buffer belongs
        to this call, and a second copy would cost memory."""
        trace.kernel("hidden-gradient scale", reads=(self.hidden,), writes=(self.hidden,))
        return self.hidden.mul_(scale)


def _scaled_into(out, src, scale):
    """`out = src * scale`, computed in src's dtype and rounded once into out's: the product and the conversion in
    one pass. A CPU tensor iterator stages an output of another dtype in a temporary as large as the output, so
    the CPU converts in row blocks."""
    if out.device.type != "cpu":
        return torch.mul(src, scale, out=out)
    step = max(1, (1 << 18) // max(1, src.shape[1]))
    for r in range(0, src.shape[0], step):
        torch.mul(src[r : r + step], scale, out=out[r : r + step])
    return out


class TokenStats:
    """Per-token entropy (`[N]` float32) and top-1 hit (`[N]` bool) of the scored tokens, in the layout's order."""

    def __init__(self, total, device):
        self.entropy = torch.empty(total, dtype=torch.float32, device=device)
        self.top1 = torch.empty(total, dtype=torch.bool, device=device)

    def per_sequence(self, layout, num_seqs):
        """`[R]` float32 entropy sums and `[R]` int64 top-1 counts per sequence, in a fixed order."""
        return (reduce_sequences(self.entropy, layout, num_seqs, False),
                reduce_sequences(self.top1.long(), layout, num_seqs, False))


def _new_buffer(hidden2d, vocab, rows):
    """The reused logits buffer `[rows, V]`. Its rows start on 16-element boundaries even when V does not divide
    (32003, 50257): cuBLAS takes the padded leading dimension, and the pass keeps its 16-byte vector accesses.
    The padding columns are zeroed once and never written again: CPU bf16 GEMMs (oneDNN) read a row past K up to
    its stride, where a NaN left in freed memory would reach `D @ W`."""
    padded = -(-vocab // 16) * 16
    buffer = torch.empty(rows, padded, dtype=hidden2d.dtype, device=hidden2d.device)
    buffer[:, vocab:].zero_()
    return buffer[:, :vocab]


@dataclass
class ChunkLoop:
    """One engine call, passed whole to the chunk loops.

    hidden2d: `[rows, H]` hidden states; weight: `[V, H]`; bias: `[V]` or None (one dtype, chosen by the caller);
    lora: a `lora.LoraHead` on the weight, or None.
    layout: the scored tokens (`plan.compact_tokens`); plan: their chunks and modes (`plan.StepPlan`).
    grads: the gradient buffers to fill, or None (forward only); stats: per-token entropy and top-1, or None.
    Allocated with the loop: `zbuf`, the reused `[C, V]` logits buffer, and `tok`, the `[N]` fp32 token log-probs.
    With an adapter, `lora_down` holds the last projected chunk's `P = h A^T`, as `zbuf` holds its logits.
    """

    hidden2d: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: TokenLayout
    plan: StepPlan
    grads: Grads | None = None
    stats: TokenStats | None = None
    # The pass over a chunk's logits in place of `logsoftmax_pass` (None): a vocabulary-sharded head's
    # `parallel.VocabParallelPass`.
    pass_fn: object = None
    lora: lora_terms.LoraHead | None = None
    tok: torch.Tensor = field(init=False, repr=False)
    lora_down: torch.Tensor | None = field(init=False, repr=False, default=None)
    zbuf: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.tok = torch.empty(self.plan.total, dtype=torch.float32, device=self.hidden2d.device)
        self.zbuf = _new_buffer(self.hidden2d, self.weight.shape[0], self.plan.buffer_rows)

    def pass_over(self, z, targets, **kwargs):
        trace.pass_(z, kwargs.get("write_grad", False))
        return (logsoftmax_pass if self.pass_fn is None else self.pass_fn)(z, targets, **kwargs)

    def hidden_rows(self, s, e):
        """`[e - s, H]` hidden states of tokens `s:e` (a copy: the rows are scattered)."""
        h = self.hidden2d.index_select(0, self.layout.rows[s:e])
        trace.kernel("gather hidden rows", reads=(h,), writes=(h,))
        return h


def _project(loop, h):
    """`Z = h @ W^T (+ b)` into the first rows of the logits buffer."""
    z = loop.zbuf[: h.shape[0]]
    if loop.bias is None:
        torch.mm(h, loop.weight.t(), out=z)
    else:
        torch.addmm(loop.bias, h, loop.weight.t(), out=z)
    trace.gemm("logits GEMM", h, loop.weight.t(), z)
    if loop.lora is not None:
        loop.lora_down = lora_terms.project(loop.lora, h, z)
    return z


def _score(loop, z, s, e, **kwargs):
    """The pass over the logits `z` of tokens `s:e`: log-probs into `loop.tok` (and entropy, top-1 into `stats`)."""
    targets = loop.layout.targets[s:e]
    if loop.stats is None:
        loop.tok[s:e] = loop.pass_over(z, targets, **kwargs)
    else:
        loop.tok[s:e], loop.stats.entropy[s:e], loop.stats.top1[s:e] = loop.pass_over(z, targets, stats=True,
                                                                                    **kwargs)


def reduce_sequences(tok, layout, num_seqs, average):
    """Per-sequence sums (means) of token log-probs, in a fixed order: bitwise reproducible."""
    table = tok.new_zeros(num_seqs, max(layout.max_count, 1))
    table[layout.seq, layout.slot] = tok
    total = table.sum(1)
    if average:
        total = torch.where(layout.counts > 0, total / layout.counts.clamp_min(1), torch.zeros_like(total))
    return total


def _forward_chunks(loop, chunks):
    """Token log-probs of `chunks` into `loop.tok` (2NHV); the last chunk's logits stay in the buffer."""
    for s, e in chunks:
        _score(loop, _project(loop, loop.hidden_rows(s, e)), s, e)


@_explicit_dtypes
def forward_logps(loop: ChunkLoop, num_seqs: int, average: bool) -> torch.Tensor:
    """`[R]` float32 sequence log-probs (forward only, 2NHV); `loop.stats` (if given) is filled."""
    _forward_chunks(loop, loop.plan.chunks)
    return reduce_sequences(loop.tok, loop.layout, num_seqs, average)


def _gradient_chunk(loop, s, e, coef, *, projected=False):
    """Gradients of tokens `s:e` whose coefficients `coef [e - s]` are known; `projected`: their logits are already
    in the buffer."""
    grads = loop.grads
    h = loop.hidden_rows(s, e)
    d = loop.zbuf[: e - s] if projected else _project(loop, h)
    loop.pass_over(d, loop.layout.targets[s:e], scale=coef, write_grad=True)
    if loop.lora is not None:
        _adapter_chunk_grads(loop, d, h, s, e)
    elif grads.hidden is not None:
        _put_hidden_grad(grads.hidden, loop.layout, s, e, _hidden_gemm(d, loop.weight))
    if grads.width:
        grads.add_weight_gemm(d, grads.operand(h, None), only=loop.plan.one_weight_gemm)


def _adapter_chunk_grads(loop, d, h, s, e, coef=None):
    """With an adapter on the head: the hidden-gradient rows of tokens `s:e` get `coef * (D W) + s (coef * D B) A`,
    summed in fp32 and rounded once, and the adapter's gradients get the chunk's terms (`lora.add_gradients`).
    `coef [e - s]`: the rows' coefficients, None when D already carries them."""
    grads = loop.grads
    u = None
    if grads.hidden is not None:
        u = mm_fp32(d, loop.weight)
        trace.gemm("hidden-gradient GEMM", d, loop.weight, u)
        if coef is not None:
            u.mul_(coef.unsqueeze(1))
            trace.kernel("hidden-gradient scale", reads=(u,), writes=(u,))
    lora_terms.add_gradients(loop.lora, grads.lora, d, h, loop.lora_down, coef, u)
    if u is not None:
        _put_hidden_grad(grads.hidden, loop.layout, s, e, _rounded(u, grads.hidden.dtype))


def _hidden_gemm(d, weight):
    """`D @ W` in D's dtype."""
    u = torch.mm(d, weight)
    trace.gemm("hidden-gradient GEMM", d, weight, u)
    return u


@_explicit_dtypes
def recompute_grads(loop: ChunkLoop, token_coef: torch.Tensor) -> None:
    """Gradients into `loop.grads` for known per-token coefficients `token_coef [N]` (d out / d token log-prob),
    6NHV."""
    for s, e in loop.plan.chunks:
        _gradient_chunk(loop, s, e, token_coef[s:e])


class SequenceLoss:
    """Calls a loss over the batch's sequence log-probs as units (pairs or groups, `units.py`) complete; sequences
    not yet seen hold placeholder zeros.

    `loss_fn(logps [R] float32) -> (out, grad [R])`, `grad` being d loss / d logp for an upstream gradient of 1.
    A unit's coefficients depend only on its own log-probs and on batch facts known up front (lengths, reference
    log-probs, scores), except for pair losses that couple pairs through their log-probs (the plan never gives
    those more than one group), so the placeholders do not change the coefficients of the completed units.
    """

    def __init__(self, layout, units, average, loss_fn):
        self.logps = torch.zeros(units.num_seqs, dtype=torch.float32, device=layout.counts.device)
        self.units, self.average, self.loss_fn, self.layout = units, average, loss_fn, layout
        self.out = None

    def complete(self, tok, units, start, end):
        """Records the log-probs of the units `units` (a range) from their tokens `tok[start:end]`; returns `[R]`
        float32 d loss / d logp per sequence (valid for the completed units)."""
        # Built on the device: a host list copied over would wait for every kernel queued before it.
        seqs = self.units.sequences(units, self.logps.device)
        self.logps[seqs] = _group_sums(tok, self.layout, seqs, start, end, self.average)
        self.out, grad = self.loss_fn(self.logps)
        return grad.float()

    def token_coefficients(self, g, start, end):
        """d loss / d token log-prob of tokens `start:end` from the per-sequence `g [R]`."""
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
def fused_dpo(loop: ChunkLoop, seq_loss: SequenceLoss):
    """DPO forward over unit-ordered tokens (each unit's tokens contiguous), forming the gradients (into
    `loop.grads`, if any) for an upstream gradient of 1. Returns `(the loss's output, logps [R] float32)`;
    `loop.stats` (if given) is filled."""
    for group in loop.plan.groups:
        if group.mode == RESIDENT:
            _resident_group(loop, group, seq_loss)
        elif group.mode == STREAM_ONCE:
            _stream_once(loop, group, seq_loss)
        else:
            _stream_twice(loop, group, seq_loss)
    return seq_loss.out, seq_loss.logps


def _resident_group(loop, group, seq_loss):
    """Whole units in one chunk: their coefficients are known after the pass, so D is used at once."""
    grads = loop.grads
    s, e = group.start, group.end
    if e == s:
        seq_loss.complete(loop.tok, group.units, s, e)
        return
    h = loop.hidden_rows(s, e)
    d = _project(loop, h)
    _score(loop, d, s, e, write_grad=grads is not None)
    g = seq_loss.complete(loop.tok, group.units, s, e)
    if grads is None:
        return
    c = seq_loss.token_coefficients(g, s, e)
    if loop.lora is not None:
        _adapter_chunk_grads(loop, d, h, s, e, c)
    elif grads.hidden is not None:
        _scaled_hidden_grad(d, loop.weight, c, grads.hidden, loop.layout, s, e)
    if grads.width:
        grads.add_weight_gemm(d, grads.operand(h, c), only=loop.plan.one_weight_gemm)


def _scaled_hidden_grad(d, weight, c, out, layout, s, e):
    """The rows of tokens `s:e` get `c * (D @ W)`, rounded once to out's dtype; the fp32 product is freed on
    return."""
    u = mm_fp32(d, weight)
    trace.gemm("hidden-gradient GEMM", d, weight, u)
    u.mul_(c.unsqueeze(1))
    trace.kernel("hidden-gradient scale", reads=(u,), writes=(u,))
    _put_hidden_grad(out, layout, s, e, _rounded(u, out.dtype))


def _put_hidden_grad(out, layout, s, e, values):
    """`out[rows of tokens s:e] = values`; where rows may repeat (`layout.rows_repeat`) the values add instead. A
    shared prompt's last row gets exactly two addends (one per response), and 0 + a + b is the same sum in either
    order, so the result does not depend on the order of CUDA's atomic adds."""
    if layout.rows_repeat:
        out.index_add_(0, layout.rows[s:e], values)
    else:
        out.index_copy_(0, layout.rows[s:e], values)
    trace.kernel("hidden-gradient scatter", reads=(values,), writes=(values,))


def _rounded(u, dtype):
    """`u.to(dtype)`, recorded as a kernel when it copies."""
    out = u.to(dtype)
    if out is not u:
        trace.kernel("hidden-gradient round", reads=(u,), writes=(out,))
    return out


def _stream_once(loop, group, seq_loss):
    """One unit longer than a chunk, in one pass: D carries each row's known factor (a tied pair's rejected rows'
    sign, 1/len in average mode); the unit's `D^T h` sums go straight into the (still empty) weight-gradient
    accumulator, and `U = D @ W` into an fp32 `[n, H]` buffer, both scaled once the unit's coefficients are known.

    The plan takes this mode with a weight gradient (the adapter's included) only for tied pairs while the
    accumulators are unused: one coefficient then scales the whole accumulator. Without one, only U is scaled, row
    by row with its sequence's coefficient.
    """
    grads, layout, units = loop.grads, loop.layout, seq_loss.units
    s0, e0 = group.start, group.end
    seq = layout.seq[s0:e0]
    scale = torch.ones(e0 - s0, dtype=torch.float32, device=loop.hidden2d.device)
    if loop.plan.tied:
        scale = torch.where(units.negated(seq), -scale, scale)
    if seq_loss.average:
        scale = scale / layout.counts[seq].clamp_min(1)
    u = None
    if grads is not None and grads.hidden is not None:
        u = torch.empty(e0 - s0, loop.weight.shape[1], dtype=torch.float32, device=loop.hidden2d.device)
    for s, e in group.chunks:
        h = loop.hidden_rows(s, e)
        d = _project(loop, h)
        _score(loop, d, s, e, scale=scale[s - s0 : e - s0], write_grad=grads is not None)
        if grads is None:
            continue
        if u is not None:
            addmm_fp32_(u[s - s0 : e - s0], d, loop.weight, accumulate=False)
            trace.gemm("hidden-gradient GEMM", d, loop.weight, u[s - s0 : e - s0])
        if loop.lora is not None:
            lora_terms.add_gradients(loop.lora, grads.lora, d, h, loop.lora_down, None,
                                     None if u is None else u[s - s0 : e - s0])
        if grads.width:
            grads.add_weight_gemm(d, grads.operand(h, None))
    del h
    g = seq_loss.complete(loop.tok, group.units, s0, e0)
    if grads is None:
        return
    if grads.width or grads.lora is not None:
        lead = units.lead(group.units[0])
        if grads.width:
            grads.defer_scale(g[lead])
        if grads.lora is not None:
            grads.lora.scale_(g[lead])
    if u is not None:
        row_g = g[units.lead(group.units[0])].expand(e0 - s0) if loop.plan.tied else g[seq]
        u.mul_(row_g.unsqueeze(1))
        trace.kernel("hidden-gradient scale", reads=(u,), writes=(u,))
        # Rounded chunk by chunk: a [C, H] temporary rather than a second [n, H] one.
        for s, e in group.chunks:
            _put_hidden_grad(grads.hidden, layout, s, e, _rounded(u[s - s0 : e - s0], loop.hidden2d.dtype))


def _stream_twice(loop, group, seq_loss):
    """One unit longer than a chunk whose weight-gradient sums cannot go straight into the accumulator: a forward
    pass through `group.chunks` gives its log-probs and coefficients, then a gradient pass adds into the
    accumulator (no second `[V, H]` buffer), in reverse from the last chunk, whose logits are still in the buffer.
    Token statistics come from the forward pass."""
    s0, e0 = group.start, group.end
    _forward_chunks(loop, group.chunks)
    g = seq_loss.complete(loop.tok, group.units, s0, e0)
    coef = seq_loss.token_coefficients(g, s0, e0)
    for k, (s, e) in enumerate(reversed(group.chunks)):
        _gradient_chunk(loop, s, e, coef[s - s0 : e - s0], projected=k == 0)
