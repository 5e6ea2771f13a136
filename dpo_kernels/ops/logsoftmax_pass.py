"""The middle step of the fused linear engine: one pass over a chunk of logits `Z [C, V]`.

Per row it keeps an fp32 online max and sum over `BLOCK_V` tiles, reads the label's logit, and returns the token
log-prob `Z[label] - lse`. With `write_grad` it then overwrites `Z` in place with

    D = scale_row * (onehot(label) - softmax(Z))

(the gradient of the token log-prob w.r.t. its logits, optionally times a per-row factor such as the rejected rows'
sign or `1/len` in average mode), so the `[C, V]` buffer that held the logits is reused for their gradient.
Each program owns a row and sweeps it twice (statistics, then the gradient); the second sweep mostly hits L2.
CUDA tensors (or `DPO_KERNELS_BACKEND=triton`) run the Triton kernel; CPU tensors run the PyTorch twin below.
"""
import torch
import triton
import triton.language as tl

from dpo_kernels._backend import use_triton


@triton.heuristics({"HAS_SCALE": lambda args: args["scale_ptr"] is not None})
@triton.jit
def logsoftmax_pass_kernel(
    z_ptr,
    stride_z,
    labels_ptr,
    scale_ptr,
    logp_ptr,
    V,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    label = tl.load(labels_ptr + row).to(tl.int64)
    label_logit = tl.load(z_row + label).to(tl.float32)
    tl.store(logp_ptr + row, label_logit - lse)

    if WRITE_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse)
            tl.store(z_row + cols, (d * scale).to(z_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    # 8192 fp32 values over 8 warps is 32 registers a thread: wide enough to keep H100/H200 loads in flight, small
    # enough not to spill. Narrow vocabularies take one tile.
    return min(8192, triton.next_power_of_2(vocab))


def logsoftmax_pass_forward(z, labels, scale, write_grad):
    rows, vocab = z.shape
    logp = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows == 0:
        return logp
    block = _block_v(vocab)
    logsoftmax_pass_kernel[(rows,)](
        z,
        z.stride(0),
        labels,
        scale,
        logp,
        vocab,
        BLOCK_V=block,
        WRITE_GRAD=bool(write_grad),
        num_warps=8 if block >= 4096 else 4,
    )
    return logp


def logsoftmax_pass_torch(z, labels, scale, write_grad):
    """The PyTorch twin of the kernel, for CPU tensors: fp32 math on the chunk, same outputs."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    logp = zf.gather(1, labels.unsqueeze(1)).squeeze(1) - lse
    if write_grad:
        # For fp32 chunks `zf` is `z` itself, so the gradient is formed in place without a second [C, V] buffer.
        d = zf.sub_(lse.unsqueeze(1)).exp_().neg_()
        d.scatter_add_(1, labels.unsqueeze(1), torch.ones_like(lse).unsqueeze(1))
        if scale is not None:
            d.mul_(scale.unsqueeze(1))
        if d is not z:
            z.copy_(d)
    return logp


def logsoftmax_pass(z, labels, *, scale=None, write_grad=False):
    """Token log-probs of a chunk of logits, optionally replacing the logits by their gradient in place.

    Args:
        z: `[C, V]` float32/bfloat16/float16, unit stride along V (any row stride). Overwritten when `write_grad`.
        labels: `[C]` int64, every entry in `[0, V)` (the engine compacts ignored positions away first).
        scale: optional `[C]` float32 per-row factor applied to the written gradient.
        write_grad: write `scale * (onehot(label) - softmax(z))` into `z`, in `z`'s dtype.
    Returns:
        `[C]` float32 token log-probs `z[label] - logsumexp(z)`; non-finite logits give non-finite values.
    """
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"z must be [C, V] with unit stride along V, got shape {tuple(z.shape)}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be [C] = [{z.shape[0]}], got {tuple(labels.shape)}")
    if scale is not None and scale.shape != z.shape[:1]:
        raise ValueError(f"scale must be [C] = [{z.shape[0]}], got {tuple(scale.shape)}")
    if use_triton(z):
        return logsoftmax_pass_forward(z, labels, scale, write_grad)
    return logsoftmax_pass_torch(z, labels, scale, write_grad)
