"""Per-token and per-sequence log-probabilities of labels, computed from logits with one read of the logits.

Forward (`token_logprobs_fwd_kernel`, one program per scored token row): stream the row in `BLOCK_V` tiles with an
fp32 online max and sum-exp, read the label's logit, store `lse` and the token log-prob. Rows whose label is
ignored are not read at all. Per-sequence values are a fixed-order `sum` of the `[R, T']` token buffer, so repeated
runs give the same bits (no float atomics anywhere).

Backward (`token_logprobs_bwd_kernel`, 2-D grid of logits rows x vocab tiles): one pass that writes
`g * (onehot(label) - exp(x - lse))` in the logits' dtype, zeros for ignored rows and, with `shift`, for the last
position (which scores nothing). Optionally the result overwrites the logits' own buffer.

`shift` is applied by indexing (position t reads `labels[:, t + 1]`), never by slicing a `[*, V]` tensor, and the
logits are addressed through their row strides, so views such as `logits[:, :-1]` or a transposed batch are read in
place. All offsets are int64 (`N * V` exceeds 2**31 for real shapes).

Inputs are validated before any launch; the label range check is one small reduction per call (one device sync
on CUDA), chosen over a device-side assert that would poison the CUDA context.

CPU tensors take a chunked PyTorch fallback that holds at most `_CHUNK_ELEMENTS` fp32 values of `[*, V]` at a time;
`DPO_KERNELS_BACKEND=triton|torch` forces one path (see `dpo_kernels.backend`).
"""

import torch
import triton
import triton.language as tl

from dpo_kernels import paths
from dpo_kernels.backend import launch_device, use_triton
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.validation import check_labels_in_range, check_logits_labels

# Fallback chunk: 4 Mi fp32 values (16 MiB) of [*, V] at a time.
_CHUNK_ELEMENTS = 1 << 22


def _fwd_block_v(vocab: int) -> int:
    # One program streams a whole row. 8192-wide tiles at 16 warps are two 16-byte loads per thread; ptxas gives
    # 40 registers (sm_90), so 3 programs share an SM and keep ~48 KiB of loads in flight, enough to cover HBM
    # latency on H100/H200, while the two per-tile reductions are amortized over 8192 elements.
    return min(8192, triton.next_power_of_2(vocab))


def _fwd_num_warps(block_v: int) -> int:
    return 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def _bwd_block_v(vocab: int) -> int:
    # The backward has no reduction: many small independent tiles (16 bf16 values per thread at 8 warps) give the
    # scheduler the most parallelism; 128256 / 4096 = 32 tiles per row.
    return min(4096, triton.next_power_of_2(vocab))


def _bwd_num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _vocab_tiling(block_v, num_warps):
    """The kernel's `BLOCK_V = block_v(V)` and `num_warps = num_warps(BLOCK_V)`, derived from its argument V."""
    return triton.heuristics({
        "BLOCK_V": lambda args: block_v(args["V"]),
        "num_warps": lambda args: num_warps(block_v(args["V"])),
    })


@_vocab_tiling(_fwd_block_v, _fwd_num_warps)
@triton.jit
def token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, tok_ptr, lse_ptr,
    T_OUT, V,
    stride_lr, stride_lt, stride_yr, stride_yt,
    ignore_index,
    SHIFT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r = row // T_OUT
    t = row - r * T_OUT
    label = tl.load(labels_ptr + r * stride_yr + (t + SHIFT) * stride_yt).to(tl.int64)
    valid = label != ignore_index
    row_ptr = logits_ptr + r * stride_lr + t * stride_lt
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    # Ignored rows (prompt, padding: often a third of all rows) are never read.
    if valid:
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(row_ptr + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # A tile of all -inf (masked vocabulary) must not produce exp(-inf - -inf) = NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
    lse = m + tl.log(tl.where(valid, s, 1.0))
    x_label = tl.load(row_ptr + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(tok_ptr + row, tl.where(valid, x_label - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@_vocab_tiling(_bwd_block_v, _bwd_num_warps)
@triton.jit
def token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_ptr, dlogits_ptr,
    T, T_OUT, V,
    stride_lr, stride_lt, stride_yr, stride_yt, stride_gr, stride_gt, stride_dr, stride_dt,
    ignore_index,
    SHIFT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r = row // T
    t = row - r * T
    # With SHIFT the last position scores nothing (t == T_OUT), so its gradient is zero.
    scores = t < T_OUT
    label = tl.load(labels_ptr + r * stride_yr + (t + SHIFT) * stride_yt, mask=scores, other=ignore_index)
    label = label.to(tl.int64)
    valid = scores & (label != ignore_index)
    lse = tl.load(lse_ptr + r * T_OUT + t, mask=valid, other=0.0)
    g = tl.load(grad_ptr + r * stride_gr + t * stride_gt, mask=valid, other=0.0).to(tl.float32)

    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < V
    # Ignored rows are written (zeros) but never read. (`where` rather than `&`: the interpreter mis-types a
    # scalar-and-vector `&` of booleans.)
    x = tl.load(logits_ptr + r * stride_lr + t * stride_lt + cols, mask=tl.where(valid, in_vocab, False), other=0.0)
    d = -g * tl.exp(x.to(tl.float32) - lse)
    d = tl.where(cols == label, d + g, d)
    d = tl.where(valid, d, 0.0)
    tl.store(dlogits_ptr + r * stride_dr + t * stride_dt + cols, d.to(dlogits_ptr.dtype.element_ty), mask=in_vocab)


def token_logprobs_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    """Launches the forward kernel. `logits [R, T, V]` with unit last stride, `labels [R, T]` integer.

    Returns `(tok, lse)`, both `[R, T']` float32 contiguous (`T' = T - 1` with shift): the label log-prob (0 where
    ignored) and the row's log-sum-exp (0 where ignored).
    """
    R, T, V = logits.shape
    t_out = max(T - 1, 0) if shift else T
    tok = torch.empty(R, t_out, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(tok)
    if tok.numel() == 0:
        return tok, lse
    with launch_device(logits):
        token_logprobs_fwd_kernel[(R * t_out,)](
            logits, labels, tok, lse, t_out, V,
            logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            ignore_index, SHIFT=bool(shift),
        )  # fmt: skip
    return tok, lse


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    shift: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launches the backward kernel: `dlogits = grad * (onehot(label) - softmax(logits))` per scored row.

    `grad` is `[R, T']` (any float dtype and strides, e.g. an expanded per-sequence weight), `lse` the forward's.
    Writes into `out` (any strides with unit last stride, may be `logits` itself) or a new contiguous tensor of
    the logits' shape and dtype, and returns it.
    """
    R, T, V = logits.shape
    t_out = lse.shape[1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.numel() == 0:
        return out
    grid = lambda meta: (R * T, triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
    with launch_device(logits):
        token_logprobs_bwd_kernel[grid](
            logits, labels, lse, grad, out, T, t_out, V,
            logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            grad.stride(0), grad.stride(1), out.stride(0), out.stride(1),
            ignore_index, SHIFT=bool(shift),
        )  # fmt: skip
    return out


def _chunks(rows: int, cols: int, vocab: int):
    """(row slice, column slice) blocks of `[rows, cols]` positions holding at most `_CHUNK_ELEMENTS` logits."""
    per_chunk = max(1, _CHUNK_ELEMENTS // vocab)
    if cols >= per_chunk:
        for r in range(rows):
            for c0 in range(0, cols, per_chunk):
                yield slice(r, r + 1), slice(c0, min(cols, c0 + per_chunk))
    elif cols > 0:
        rows_per_chunk = per_chunk // cols
        for r0 in range(0, rows, rows_per_chunk):
            yield slice(r0, min(rows, r0 + rows_per_chunk)), slice(0, cols)


def _forward_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    """PyTorch twin of `token_logprobs_forward`, chunked over positions."""
    R, T, V = logits.shape
    t_out = max(T - 1, 0) if shift else T
    tok = torch.zeros(R, t_out, dtype=torch.float32, device=logits.device)
    lse = torch.zeros_like(tok)
    scored = labels[:, 1:] if shift else labels
    for rs, ts in _chunks(R, t_out, V):
        x = logits[rs, ts].float()
        lab = scored[rs, ts]
        valid = lab != ignore_index
        # Not torch.logsumexp: a +inf logit must give NaN, as log_softmax and the kernel do, not +inf.
        m = x.amax(dim=-1, keepdim=True)
        chunk_lse = (x - m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        picked = x.gather(-1, lab.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
        lse[rs, ts] = chunk_lse.masked_fill(~valid, 0.0)
        tok[rs, ts] = (picked - chunk_lse).masked_fill(~valid, 0.0)
    return tok, lse


def _backward_torch(logits, labels, lse, grad, ignore_index, shift, out=None):
    """PyTorch twin of `token_logprobs_backward`, chunked over positions."""
    R, T, V = logits.shape
    t_out = lse.shape[1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if t_out < T:
        out[:, t_out:].zero_()
    scored = labels[:, 1:] if shift else labels
    for rs, ts in _chunks(R, t_out, V):
        lab = scored[rs, ts]
        valid = lab != ignore_index
        g = grad[rs, ts].float().masked_fill(~valid, 0.0)
        d = torch.exp(logits[rs, ts].float() - lse[rs, ts].unsqueeze(-1)).mul_(-g.unsqueeze(-1))
        d.scatter_add_(-1, lab.masked_fill(~valid, 0).unsqueeze(-1), g.unsqueeze(-1))
        out[rs, ts] = d.masked_fill_(~valid.unsqueeze(-1), 0.0).to(out.dtype)
    return out


# The kernels as custom ops, for torch.compile (docs/design.md, "Where code runs"): the label range check reads the
# device, so it runs inside the op; eager calls take `TokenLogprobsFunction`, which also serves `inplace_backward`.
@torch.library.custom_op("dpo_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                      shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(tok, lse)` as `token_logprobs_forward` (or its PyTorch twin) returns them, after the label range check.
    `logits [R, T, V]` with unit last stride, `labels [R, T]` int64."""
    check_labels_in_range(labels, logits.shape[2], ignore_index)
    forward = token_logprobs_forward if use_triton(logits) else _forward_torch
    return forward(logits, labels, ignore_index, shift)


@token_logprobs_op.register_fake
def _token_logprobs_fake(logits, labels, ignore_index, shift):
    R, T, _ = logits.shape
    tok = logits.new_empty(R, max(T - 1, 0) if shift else T, dtype=torch.float32)
    return tok, torch.empty_like(tok)


@torch.library.custom_op("dpo_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                               ignore_index: int, shift: bool) -> torch.Tensor:
    """`dlogits [R, T, V]` in the logits' dtype, as `token_logprobs_backward` (or its twin) writes it."""
    backward = token_logprobs_backward if use_triton(logits) else _backward_torch
    return backward(logits, labels, lse, grad, ignore_index, shift)


@token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(logits, labels, lse, grad, ignore_index, shift):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _token_logprobs_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, shift = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.args = (ignore_index, shift)


def _token_logprobs_op_backward(ctx, grad_tok, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    return token_logprobs_backward_op(logits, labels, lse, grad_tok, *ctx.args), None, None, None


torch.library.register_autograd("dpo_kernels::token_logprobs", _token_logprobs_op_backward,
                                setup_context=_token_logprobs_setup_context)


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, shift, inplace_backward):
        triton_path = use_triton(logits)
        forward = token_logprobs_forward if triton_path else _forward_torch
        tok, lse = forward(logits, labels, ignore_index, shift)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (ignore_index, shift, inplace_backward, triton_path)
        ctx.overwritten = False
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        ignore_index, shift, inplace, triton_path = ctx.args
        if inplace and ctx.overwritten:
            raise RuntimeError(
                "token_logprobs/sequence_logprobs with inplace_backward=True: backward ran a second time (e.g. "
                "retain_graph=True), but the first one overwrote the logits with their gradient; use "
                "inplace_backward=False to backpropagate more than once"
            )
        logits, labels, lse = ctx.saved_tensors
        backward = token_logprobs_backward if triton_path else _backward_torch
        out = logits.detach() if inplace else None
        dlogits = backward(logits, labels, lse, grad_tok, ignore_index, shift, out)
        if inplace:
            ctx.overwritten = True
            # The kernel writes through a raw pointer, which autograd does not see: bump the version as an in-place
            # op would, so that a node that saved these logits (e.g. the `exp` that made them) fails its version
            # check instead of using the gradient as if it were the logits.
            torch.autograd.graph.increment_version(logits)
        return dlogits, None, None, None, None


def _rows_overlap(logits: torch.Tensor) -> bool:
    """Whether two positions of `logits [R, T, V]` (unit V stride) share memory, as in an expanded tensor."""
    R, T, V = logits.shape
    dims = sorted((stride, size) for stride, size in zip(logits.stride()[:2], (R, T), strict=True) if size > 1)
    span = V
    for stride, size in dims:
        if stride < span:
            break
        span += stride * (size - 1)
    else:
        return False
    # Not nested: the positions overlap, or their strides interleave. Compare the sorted row starts (R * T integers).
    starts = torch.arange(R, device="cpu").mul_(logits.stride(0)).unsqueeze(1)
    starts = starts + torch.arange(T, device="cpu").mul_(logits.stride(1))
    return bool((starts.flatten().sort().values.diff() < V).any())


def _check_inplace_backward(logits: torch.Tensor) -> None:
    """The backward may overwrite `logits` only where no two positions share a row."""
    if logits.requires_grad and torch.is_grad_enabled() and logits.numel() and _rows_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose positions do not share memory, got strides "
            f"{tuple(logits.stride())} for shape {tuple(logits.shape)} (an expanded tensor?): the gradients of "
            "positions sharing a row would overwrite each other; pass .contiguous() logits or use "
            "inplace_backward=False"
        )


def _prepare(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool):
    check_logits_labels(logits, labels, ignore_index, labels_in_range=not _traced(inplace_backward))
    if logits.stride(-1) != 1:
        # The kernels vectorize along the vocabulary; only a non-unit vocabulary stride forces a copy.
        logits = logits.contiguous()
    if inplace_backward:
        _check_inplace_backward(logits)
    if labels.dtype != torch.int64:
        labels = labels.long()
    return logits, labels


def _traced(inplace_backward: bool) -> bool:
    """Whether torch.compile is tracing a call that takes the custom op (`inplace_backward` writes into the
    logits, which the compiler's functional graph would copy: it runs eagerly, a graph break)."""
    return torch.compiler.is_compiling() and not inplace_backward


def _token_logprobs(logits, labels, ignore_index, shift, inplace_backward):
    if _traced(inplace_backward):
        return token_logprobs_op(logits, labels, ignore_index, bool(shift))[0]
    return TokenLogprobsFunction.apply(logits, labels, ignore_index, bool(shift), bool(inplace_backward))


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Log-probability of each label under `softmax(logits)`, differentiable w.r.t. `logits`.

    Args:
        logits: `[R, T, V]` float32, bfloat16 or float16, on CUDA (Triton) or CPU (chunked PyTorch fallback). Any
            strides for R and T (e.g. the `[:, :-1]` view of HuggingFace logits); a non-unit V stride is copied.
        labels: `[R, T]` integer (int64), each in `[0, V)` or equal to `ignore_index`. The range is checked with one
            small reduction per call (one device sync on CUDA).
        ignore_index: label value of positions that are not scored (prompt, padding).
        shift: position t of the logits scores `labels[:, t + 1]` (HuggingFace causal-LM convention); the last
            position scores nothing and gets a zero gradient.
        inplace_backward: the backward writes dlogits into the logits' own buffer instead of allocating one. The
            logits are DESTROYED by the backward: use it only when nothing else reads them afterwards, and call
            backward once. Misuse is an error on both backends: logits whose positions share memory (expanded)
            raise ValueError here; a second backward raises RuntimeError, and so does the backward of any op that
            saved these logits (autograd's in-place version check).
    Returns:
        `[R, T - 1]` if shift else `[R, T]`, float32; 0 where the label is ignored. Gradients come back in the
        logits' dtype.
    """
    logits, labels = _prepare(logits, labels, ignore_index, inplace_backward)
    paths.record_logits_call("token_logprobs", logits)
    return _token_logprobs(logits, labels, ignore_index, shift, inplace_backward)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    average: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-sequence sum (or, with `average`, mean) of the label log-probabilities.

    `logp[r] = sum_t log softmax(logits[r, t])[labels[r, t + shift]]` over positions whose label is not
    `ignore_index`; with `average` divided by that count. Arguments as `token_logprobs`.

    Returns:
        `[R]` float32; a row with no valid label gives 0 in both modes (never NaN). Differentiable w.r.t. `logits`
        for any upstream gradient (e.g. a different weight per row); gradients in the logits' dtype.
    """
    logits, labels = _prepare(logits, labels, ignore_index, inplace_backward)
    paths.record_logits_call("sequence_logprobs", logits)
    tok = _token_logprobs(logits, labels, ignore_index, shift, inplace_backward)
    total = tok.sum(-1)
    if not average:
        return total
    scored = labels[:, 1:] if shift else labels
    count = (scored != ignore_index).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1).to(total.dtype), torch.zeros_like(total))
