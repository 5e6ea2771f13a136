"""The middle step of the fused linear engine: one pass over a chunk of logits `Z [C, V]`.

Per row it keeps an fp32 online max and sum over `BLOCK_V` tiles, reads the label's logit, and returns the token
log-prob `Z[label] - lse`. With `write_grad` it then overwrites `Z` in place with

    D = scale_row * (onehot(label) - softmax(Z))

(the gradient of the token log-prob w.r.t. its logits, optionally times a per-row factor such as the rejected rows'
sign or `1/len` in average mode), so the `[C, V]` buffer that held the logits is reused for their gradient.
Each program sweeps a row twice (statistics, then the gradient), then moves to its next row. The grid is persistent
(`pass_grid.py`): as many programs as the SMs hold at once, by the compiled variant's own registers, shared memory and
warps, fewer where that keeps the rows in flight within half of L2 (so that the second sweep of a row reads L2 rather
than HBM), but never fewer than one per SM. The plain variants issue the next tile's loads before the current tile's
math, so that each program keeps two tiles of HBM reads in flight; the statistics variants do not, which keeps them
within 128 registers a thread, two programs of 8 warps an SM.
CUDA tensors (or `DPO_KERNELS_BACKEND=triton`) run the Triton kernel; CPU tensors run the PyTorch twin below.

With `stats` the first sweep also yields what TRL logs per token, at no extra read: the entropy of softmax(Z) and
whether the label is the first argmax (torch.argmax's tie rule, which TRL's `mean_token_accuracy` uses). The
entropy keeps `t = sum e^(z-m) (z-m)` beside `s = sum e^(z-m)`, both rescaled when the running max m moves, and is
`log s - t / s`: measured from the max, so large logits do not cancel. Terms with `e^(z-m) = 0` (a -inf logit) add
nothing, the limit of `p log p`. The first argmax moves only to a tile whose max is strictly larger, at the first
column attaining it. The constexpr WITH_STATS compiles all of this out of the plain pass.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dpo_kernels.backend import launch_device, triton_interpreted, use_triton
from dpo_kernels.fused_linear.pass_grid import (
    INTERPRETER_PROGRAM,
    DeviceLimits,
    ProgramResources,
    device_limits,
    pass_grid,
    programs_per_sm_override,
)


@triton.heuristics({
    "HAS_SCALE": lambda args: args["scale_ptr"] is not None,
    "WITH_STATS": lambda args: args["entropy_ptr"] is not None,
})
@triton.jit
def logsoftmax_pass_kernel(
    z_ptr,
    stride_z,
    labels_ptr,
    scale_ptr,
    logp_ptr,
    entropy_ptr,
    top1_ptr,
    num_rows,
    V,
    V_LOAD,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)
    # A persistent grid (`pass_grid`): each program takes every num_programs-th row; int64 rows, as C * V > 2**31.
    for row in range(tl.program_id(0).to(tl.int64), num_rows, tl.num_programs(0)):
        z_row = z_ptr + row * stride_z
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        t = tl.zeros([], tl.float32)
        first = tl.zeros([], tl.int32)
        # Loads are masked at V_LOAD (>= V, a multiple of 16 where the rows have room): a mask at a V that is not one
        # (50257, 32001) makes every access of the row scalar. Columns V..V_LOAD become -inf.
        if not WITH_STATS:
            tile = tl.load(z_row + offs, mask=offs < V_LOAD, other=float("-inf"))
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            if WITH_STATS:
                tile = tl.load(z_row + cols, mask=cols < V_LOAD, other=float("-inf"))
            x = tl.where(cols < V, tile.to(tl.float32), float("-inf"))
            if not WITH_STATS:
                # The next tile's loads go out before this tile's math, so that a program keeps two tiles of HBM
                # reads in flight. The statistics' registers leave no room for a second tile: there a tile's loads
                # wait for the previous tile's math, and a second resident program keeps reads in flight instead.
                tile = tl.load(z_row + BLOCK_V + cols, mask=BLOCK_V + cols < V_LOAD, other=float("-inf"))
            tile_max = tl.max(x, axis=0)
            m_new = tl.maximum(m, tile_max)
            # While every logit so far is -inf, shift by 0: exp(-inf - -inf) would turn s into NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            e = tl.exp(x - shift)
            if WITH_STATS:
                # sum e^(z-m_new)(z-m_new) = alpha * (t + (m - m_new) s); s = 0 (and m = -inf) before any finite
                # logit. The where()s pick 0 before multiplying, so -inf never meets 0.
                moved = tl.where(s > 0, m - shift, 0.0) * s
                t = alpha * (t + moved) + tl.sum(tl.where(e > 0, x - shift, 0.0) * e, axis=0)
                tile_first = tl.min(tl.where(x == tile_max, cols, V), axis=0)
                first = tl.where(tile_max > m, tile_first, first)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(s)

        label = tl.load(labels_ptr + row).to(tl.int64)
        label_logit = tl.load(z_row + label).to(tl.float32)
        tl.store(logp_ptr + row, label_logit - lse)
        if WITH_STATS:
            tl.store(entropy_ptr + row, tl.log(s) - t / s)
            tl.store(top1_ptr + row, first.to(tl.int64) == label)

        if WRITE_GRAD:
            scale = 1.0
            if HAS_SCALE:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                x = tl.load(z_row + cols, mask=cols < V_LOAD, other=0.0).to(tl.float32)
                x = tl.where(cols < V, x, 0.0)
                d = tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse)
                tl.store(z_row + cols, (d * scale).to(z_ptr.dtype.element_ty), mask=cols < V)


def _block_v(vocab: int) -> int:
    # 8192 fp32 values over 8 warps is 32 registers a thread: wide enough to keep H100/H200 loads in flight, small
    # enough not to spill. Narrow vocabularies take one tile.
    return min(8192, triton.next_power_of_2(vocab))


def _load_width(z: torch.Tensor) -> int:
    """V rounded up to a multiple of 16 when every row's storage reaches that far (the engine pads its logits rows
    so), else V: how far the kernel may read a row. The extra columns are read, never used or written."""
    rows, vocab = z.shape
    padded = -(-vocab // 16) * 16
    if padded == vocab or z.stride(0) < padded:
        return vocab
    end = z.storage_offset() + (rows - 1) * z.stride(0) + padded
    return padded if end * z.element_size() <= z.untyped_storage().nbytes() else vocab


class PassLaunch(NamedTuple):
    """The grid a launch of the pass takes (`pass_grid`), and what it was sized from."""

    programs: int
    program: ProgramResources
    limits: DeviceLimits


def _compiled_program(args: tuple, meta: dict) -> ProgramResources:
    """What one program of the variant `args` and `meta` select takes, as its compiled kernel reports it (compiling
    it on the first call; later calls find it in Triton's cache)."""
    kernel = logsoftmax_pass_kernel.warmup(*args, grid=(1,), **meta)
    # The register count is known once the binary is loaded.
    kernel._init_handles()
    return ProgramResources(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps)


def _launch(z, labels, scale, write_grad, stats, programs_per_sm):
    """The outputs, the kernel's arguments and meta-parameters, and the grid of a launch (arguments as
    `logsoftmax_pass_forward`)."""
    rows, vocab = z.shape
    logp = torch.empty(rows, dtype=torch.float32, device=z.device)
    entropy = torch.empty(rows, dtype=torch.float32, device=z.device) if stats else None
    top1 = torch.empty(rows, dtype=torch.bool, device=z.device) if stats else None
    args = (z, z.stride(0), labels, scale, logp, entropy, top1, rows, vocab, _load_width(z))
    block = _block_v(vocab)
    meta = {"BLOCK_V": block, "WRITE_GRAD": bool(write_grad), "num_warps": 8 if block >= 4096 else 4}
    limits = device_limits(z.device)
    per_sm = programs_per_sm_override(programs_per_sm)
    program = INTERPRETER_PROGRAM
    if z.is_cuda and not triton_interpreted():
        with launch_device(z):
            program = _compiled_program(args, meta)
    programs, _ = pass_grid(rows, vocab, z.element_size(), limits, program, per_sm)
    return (logp, entropy, top1), args, meta, PassLaunch(programs, program, limits)


def pass_launch(z, labels, *, scale=None, write_grad=False, stats=False, programs_per_sm=None) -> PassLaunch:
    """The grid `logsoftmax_pass` launches for these arguments (as `logsoftmax_pass`), with the compiled variant's
    resources and the device's limits it comes from; `programs_per_sm` as `logsoftmax_pass_forward`."""
    return _launch(z, labels, scale, write_grad, stats, programs_per_sm)[3]


def logsoftmax_pass_forward(z, labels, scale, write_grad, stats, programs_per_sm=None):
    """The Triton launch behind `logsoftmax_pass` (same arguments, checked there): `z [C, V]`
    float32/bfloat16/float16 with unit stride along V, `labels [C]` int64, `scale` None or `[C]` float32.
    `programs_per_sm`: that many programs per SM instead of `pass_grid`'s choice (default: the
    `DPO_KERNELS_PASS_PROGRAMS_PER_SM` environment variable, if set). Returns `[C]` float32 log-probs, or with
    `stats` `(logp [C] float32, entropy [C] float32, top1 [C] bool)`."""
    outputs, args, meta, launch = _launch(z, labels, scale, write_grad, stats, programs_per_sm)
    if launch.programs > 0:
        with launch_device(z):
            logsoftmax_pass_kernel[(launch.programs,)](*args, **meta)
    return outputs if stats else outputs[0]


def _entropy_and_top1(zf, lse, labels):
    """`[C]` entropy of softmax(zf) (`-sum p log p`, 0 for p = 0) and whether the label is the first argmax."""
    log_p = zf - lse.unsqueeze(1)
    p = log_p.exp()
    # p = 0 where log p = -inf: zero the log first, so that 0 * -inf does not give NaN.
    entropy = -p.mul_(log_p.masked_fill_(p == 0, 0.0)).sum(-1)
    return entropy, zf.argmax(-1) == labels


def logsoftmax_pass_torch(z, labels, scale, write_grad, stats=False):
    """The PyTorch twin of the kernel, for CPU tensors: fp32 math on the chunk, same outputs."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    logp = zf.gather(1, labels.unsqueeze(1)).squeeze(1) - lse
    # Before the gradient: for fp32 chunks it overwrites zf.
    entropy, top1 = _entropy_and_top1(zf, lse, labels) if stats else (None, None)
    if write_grad:
        # For fp32 chunks `zf` is `z` itself, so the gradient is formed in place without a second [C, V] buffer.
        d = zf.sub_(lse.unsqueeze(1)).exp_().neg_()
        d.scatter_add_(1, labels.unsqueeze(1), torch.ones_like(lse).unsqueeze(1))
        if scale is not None:
            d.mul_(scale.unsqueeze(1))
        if d is not z:
            z.copy_(d)
    return (logp, entropy, top1) if stats else logp


def logsoftmax_pass(z, labels, *, scale=None, write_grad=False, stats=False):
    """Token log-probs of a chunk of logits, optionally replacing the logits by their gradient in place.

    Args:
        z: `[C, V]` float32/bfloat16/float16, unit stride along V (any row stride). Overwritten when `write_grad`.
        labels: `[C]` int64, every entry in `[0, V)` (the engine compacts ignored positions away first).
        scale: optional `[C]` float32 per-row factor applied to the written gradient.
        write_grad: write `scale * (onehot(label) - softmax(z))` into `z`, in `z`'s dtype.
        stats: also return each row's entropy and top-1 hit, from the same read of `z`.
    Returns:
        `[C]` float32 token log-probs `z[label] - logsumexp(z)`; non-finite logits give non-finite values.
        With `stats`, a tuple `(logp, entropy, top1)`: `entropy [C]` float32 `-sum softmax(z) log softmax(z)` (in
        nats, computed before `z` is overwritten) and `top1 [C]` bool, whether `label` is the first index of the
        row's maximum (`torch.argmax`'s tie rule: a tie with an earlier column is not a hit).
    """
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"z must be [C, V] with unit stride along V, got shape {tuple(z.shape)}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be [C] = [{z.shape[0]}], got {tuple(labels.shape)}")
    if scale is not None and scale.shape != z.shape[:1]:
        raise ValueError(f"scale must be [C] = [{z.shape[0]}], got {tuple(scale.shape)}")
    if use_triton(z):
        return logsoftmax_pass_forward(z, labels, scale, write_grad, stats)
    return logsoftmax_pass_torch(z, labels, scale, write_grad, stats)
