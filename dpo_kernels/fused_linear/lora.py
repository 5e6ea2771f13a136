"""A LoRA adapter on the lm_head, inside the fused engine (docs/design.md, "The fused linear engine", LoRA heads).

The head's logits are `h W^T (+ b) + s (h A^T) B^T`, with A `[r, H]` and B `[V, r]` (PEFT's `lora_A` and `lora_B`
weights) and s PEFT's `scaling`. The engine never forms the `[V, H]` sum `W + s B A`: per chunk it adds the rank-r
terms to the `[C, V]` buffer and to the gradients, with D the chunk's `d loss / d Z`:

    forward    P = h_c A^T [C, r];  Z += s P B^T
    backward   Q = D B [C, r];  grad_h += s Q A;  grad_A += s Q^T h_c;  grad_B += s D^T P

which adds `2 N r (H + V)` FLOPs to the forward and `4 N r (H + V)` to the gradients. Each GEMM reports itself to
`trace`, so the memory and cost models count the adapter.
"""
import math
import numbers
from typing import NamedTuple

import torch

from dpo_kernels.fused_linear import trace
from dpo_kernels.fused_linear.fp32_gemm import addmm_fp32_, mm_fp32
from dpo_kernels.validation import check_ndim


class LoraHead(NamedTuple):
    """A LoRA adapter on the `[V, H]` lm_head: logits `h W^T + scaling * (h A^T) B^T`.

    a: `[r, H]` (PEFT's `lora_A` weight); b: `[V, r]` (`lora_B` weight), both in the head's dtype and device;
    scaling: the float s (PEFT's `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA). Gradients reach `a`
    and `b` when they require them.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def with_factors(self, a: torch.Tensor, b: torch.Tensor) -> "LoraHead":
        """The adapter with factors `a [r, H]` and `b [V, r]` and the same scaling, built by the constructor, not
        `_replace`, which torch 2.11's dynamo returns empty inside a compiled model's forward (docs/design.md,
        "Where code runs", Compilation)."""
        return LoraHead(a, b, self.scaling)

    def delta_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., V]` the adapter's term of the logits of `hidden [..., H]`, materialized: for checks and small
        batches only."""
        return (hidden @ self.a.t()) @ self.b.t() * self.scaling


def check_lora(lora, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """ValueError unless the `LoraHead` `lora` fits the `[V, H]` `weight` (shape, dtype, device)."""
    check_ndim(lora.a, 2, "lora.a", "[r, H]")
    check_ndim(lora.b, 2, "lora.b", "[V, r]")
    V, H = weight.shape
    r = lora.a.shape[0]
    if lora.a.shape[1] != H or lora.b.shape != (V, r):
        raise ValueError(f"lora.a [r, H] = {tuple(lora.a.shape)} and lora.b [V, r] = {tuple(lora.b.shape)} do not fit "
                         f"the weight [V, H] = {tuple(weight.shape)}")
    for name, t in (("lora.a", lora.a), ("lora.b", lora.b)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; the weight is {weight.dtype} on {weight.device}")
    scaling = lora.scaling
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise ValueError(f"lora.scaling must be a finite number, got {scaling!r}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device}, the LoRA head on {weight.device}")


def project(lora: LoraHead, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`z += s (h A^T) B^T` in place, for the `[C, V]` logits `z` of the hidden rows `h [C, H]`; returns
    `P = h A^T` `[C, r]` in h's dtype, which the gradients reuse."""
    p = torch.mm(h, lora.a.t())
    trace.gemm("LoRA down GEMM", h, lora.a.t(), p)
    z.addmm_(p, lora.b.t(), alpha=float(lora.scaling))
    trace.gemm("LoRA logits GEMM", p, lora.b.t(), z, accumulate=True)
    return p


class LoraGrads:
    """fp32 accumulators of the adapter's gradients over chunks: `[r, H]` for A and `[V, r]` for B (None where not
    wanted). Each is allocated by its first GEMM (beta = 0)."""

    def __init__(self, need_a: bool, need_b: bool):
        self.need_a, self.need_b = need_a, need_b
        self.a = self.b = None

    @property
    def wanted(self) -> bool:
        return self.need_a or self.need_b

    def add(self, name, x, y):
        """`acc_<name> += x @ y`."""
        acc = getattr(self, name)
        if acc is None:
            acc = torch.empty(x.shape[0], y.shape[1], dtype=torch.float32, device=x.device)
            addmm_fp32_(acc, x, y, accumulate=False)
            setattr(self, name, acc)
            trace.gemm(f"LoRA {name.upper()}-gradient GEMM", x, y, acc)
        else:
            addmm_fp32_(acc, x, y)
            trace.gemm(f"LoRA {name.upper()}-gradient GEMM", x, y, acc, accumulate=True)

    def scale_(self, coef: torch.Tensor) -> None:
        """Both accumulators times the 0-dim `coef` (a streamed pair's coefficient, known after its last chunk)."""
        for acc in (self.a, self.b):
            if acc is not None:
                acc.mul_(coef)
                trace.kernel("LoRA accumulator scale", reads=(acc,), writes=(acc,))

    def results(self, lora: LoraHead, scale=None):
        """`(grad_a [r, H], grad_b [V, r])` in the adapter's dtype, times the 0-dim `scale` (None: 1); zeros when no
        token was scored, None where not wanted."""
        out = []
        for need, acc, param in ((self.need_a, self.a, lora.a), (self.need_b, self.b, lora.b)):
            if not need:
                out.append(None)
                continue
            if acc is None:
                grad = torch.zeros_like(param)
            else:
                grad = (acc if scale is None else acc * scale).to(param.dtype)
            trace.kernel("LoRA gradient conversion", writes=(grad,))
            out.append(grad)
        return tuple(out)


def add_gradients(lora: LoraHead, grads: LoraGrads | None, d, h, p, coef=None, u=None) -> None:
    """The adapter's part of one chunk's gradients.

    d: `[C, V]` the pass's gradient of the logits, times `coef [C]` per row when given (None: d already carries
    every factor); h: `[C, H]` the chunk's hidden rows; p: their `P = h A^T` (`project`). Adds `s Q A` into the
    fp32 hidden-gradient rows `u [C, H]` (None: not wanted) and `s Q^T h`, `s D^T P` into `grads`. The row factors
    `s * coef` scale the `[C, r]` operands, never the `[C, V]` D; each is rounded once to the operands' dtype.
    """
    if u is None and (grads is None or not grads.wanted):
        return
    factor = float(lora.scaling) if coef is None else coef.unsqueeze(1) * float(lora.scaling)
    if u is not None or grads.need_a:
        q = mm_fp32(d, lora.b)
        trace.gemm("LoRA D B GEMM", d, lora.b, q)
        qs = (q * factor).to(d.dtype)
        if u is not None:
            addmm_fp32_(u, qs, lora.a)
            trace.gemm("LoRA hidden-gradient GEMM", qs, lora.a, u, accumulate=True)
        if grads is not None and grads.need_a:
            grads.add("a", qs.t(), h)
    if grads is not None and grads.need_b:
        grads.add("b", d.t(), (p * factor).to(p.dtype))
