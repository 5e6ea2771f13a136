"""What one engine call allocates and computes, recorded from the engine's own run (docs/design.md, "The fused linear
engine", Memory).

A `Trace` is one ordered list of events from two sources:
- `Alloc` / `Free`: every tensor storage an op creates, and its release. `LiveTensors`, a `TorchDispatchMode`, sees
  each op's new storages and puts a finalizer on each. It counts tensors only, never a BLAS workspace or the
  allocator's pages, so the count is exact and the same on every machine.
- `Gemm`, `Pass`, `Elementwise`: the engine reports each kernel that touches `[C, V]`, `[V, H]` or `[n, H]` data
  (`gemm`, `pass_`, `kernel` below), with its FLOPs and bytes. Outside `record` these return at once: a real run
  pays a function call per kernel and no host synchronization.
- `Call`: each launch of the DPO loss op, seen by the same dispatch mode.

`dry_run` runs the fused DPO forward and backward of a plan on "meta" tensors inside `record`: the engine's own
code, its mode functions and `functional.FusedLinearDPOFunction`, with no memory and no arithmetic.
`memory_model.py` and `cost_model.py` sum its trace. Two pieces run as on a GPU rather than as on the host: the
logsoftmax pass allocates only what its Triton launcher allocates (`launcher_pass`), and the fp32-result GEMMs take
the branch `fp32_gemm_support` names (default: cuBLAS with `out_dtype`, see `fp32_gemm.py`).
"""
import contextlib
import contextvars
import functools
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpo_kernels.fused_linear import fp32_gemm
from dpo_kernels.fused_linear.logsoftmax_pass import logsoftmax_pass_torch
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions
from dpo_kernels.fused_linear.plan import StepPlan, TokenLayout

# fp32-result GEMMs on CUDA: `(mm with out_dtype, addmm into an fp32 result)` both supported.
CUDA_OUT_DTYPE = (True, True)


class Alloc(NamedTuple):
    nbytes: int
    op: str


class Free(NamedTuple):
    nbytes: int


class Gemm(NamedTuple):
    name: str
    flops: int
    nbytes: int  # operands read, result written (and read when accumulating)


class Pass(NamedTuple):
    """The logsoftmax pass over `rows` rows of `vocab` elements of `itemsize` bytes (the device sets its reads)."""

    rows: int
    vocab: int
    itemsize: int
    write_grad: bool


class Elementwise(NamedTuple):
    name: str
    nbytes: int  # read plus written


class Call(NamedTuple):
    op: str


@dataclass
class Trace:
    """The events of one recorded run, in order."""

    events: list = field(default_factory=list)

    def of(self, *kinds) -> list:
        return [e for e in self.events if isinstance(e, kinds)]

    def peak_bytes(self) -> int:
        """The most bytes of storages created in the run that were alive at once."""
        live = peak = 0
        for e in self.events:
            if isinstance(e, Alloc):
                live += e.nbytes
                peak = max(peak, live)
            elif isinstance(e, Free):
                live -= e.nbytes
        return peak


_RECORDING: contextvars.ContextVar = contextvars.ContextVar("dpo_kernels_trace", default=None)
# Inside `opaque()` the tensors ops create are a kernel's scratch, not the run's memory.
_OPAQUE: contextvars.ContextVar = contextvars.ContextVar("dpo_kernels_trace_opaque", default=False)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gemm(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False) -> None:
    """Records `out (+)= a @ b`: `a [m, k]`, `b [k, n]`, `out [m, n]` (read too when `accumulate`)."""
    trace = _RECORDING.get()
    if trace is None:
        return
    m, k = a.shape
    trace.events.append(Gemm(name, 2 * m * k * b.shape[1],
                             _nbytes(a) + _nbytes(b) + _nbytes(out) * (2 if accumulate else 1)))


def pass_(z: torch.Tensor, write_grad: bool) -> None:
    """Records the logsoftmax pass over the logits `z [rows, V]`."""
    trace = _RECORDING.get()
    if trace is None:
        return
    trace.events.append(Pass(z.shape[0], z.shape[1], z.element_size(), bool(write_grad)))


def kernel(name: str, *, reads=(), writes=()) -> None:
    """Records a kernel that reads each tensor of `reads` and writes each of `writes` once."""
    trace = _RECORDING.get()
    if trace is None:
        return
    trace.events.append(Elementwise(name, sum(_nbytes(t) for t in (*reads, *writes))))


class LiveTensors(TorchDispatchMode):
    """Appends to `trace` an `Alloc` for each storage an op creates (one that none of its inputs holds) and a `Free`
    when the storage is released, and a `Call` for each op of the `dpo_kernels` library."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing compiled runs under this mode; shielding it from dynamo would import torch._dynamo on first use,
        # seconds that a model estimate must not pay.
        return False

    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace
        self.live: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "dpo_kernels":
            self.trace.events.append(Call(func.name()))
        if _OPAQUE.get():
            return out
        held = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            # `_cdata` (the storage's address) keys meta storages too, whose data pointers are all 0.
            key = storage._cdata
            if key in held or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.trace.events.append(Alloc(storage.nbytes(), func.name()))
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.trace.events.append(Free(self.live.pop(key)))


@contextlib.contextmanager
def record():
    """Records the engine's kernels and every tensor allocated inside the block into the `Trace` it yields."""
    trace = Trace()
    token = _RECORDING.set(trace)
    try:
        with LiveTensors(trace):
            yield trace
    finally:
        _RECORDING.reset(token)


@contextlib.contextmanager
def opaque():
    """Tensors created inside the block are scratch of one kernel, not counted (see `launcher_pass`)."""
    token = _OPAQUE.set(True)
    try:
        yield
    finally:
        _OPAQUE.reset(token)


def launcher_pass(z, labels, *, scale=None, write_grad=False, stats=False):
    """The logsoftmax pass as the Triton launcher allocates it: its outputs only, `[C]` fp32 log-probs (and with
    `stats`, `[C]` fp32 entropy and `[C]` bool top-1). The values come from the PyTorch twin run as one opaque
    kernel, whose `[C, V]` temporaries stand for the registers of the Triton kernel (meta tensors: no values to
    compute). Arguments as `logsoftmax_pass`."""
    rows = z.shape[0]
    logp = torch.empty(rows, dtype=torch.float32, device=z.device)
    entropy = torch.empty(rows, dtype=torch.float32, device=z.device) if stats else None
    top1 = torch.empty(rows, dtype=torch.bool, device=z.device) if stats else None
    if z.is_meta:
        return (logp, entropy, top1) if stats else logp
    with opaque():
        values = logsoftmax_pass_torch(z, labels, scale, write_grad, stats)
        if stats:
            for out, value in zip((logp, entropy, top1), values, strict=True):
                out.copy_(value)
        else:
            logp.copy_(values)
    return (logp, entropy, top1) if stats else logp


def _meta_layout(pair_lengths, device) -> TokenLayout:
    """A paired layout of `sum(pair_lengths)` tokens (each pair split evenly between its two responses); meta
    tensors carry shapes only."""
    B = len(pair_lengths)
    counts_host = [n - n // 2 for n in pair_lengths] + [n // 2 for n in pair_lengths]
    total = sum(pair_lengths)
    idx = [torch.empty(total, dtype=torch.long, device=device) for _ in range(4)]
    counts = torch.empty(2 * B, dtype=torch.long, device=device)
    return TokenLayout(*idx, counts, counts_host, max(counts_host, default=0))


def plan_pairs(plan: StepPlan) -> list:
    """Scored tokens per pair in batch order, as far as the plan tells them: each pair group's tokens split evenly
    among its pairs (a recompute plan: one pair of all tokens)."""
    if not plan.groups:
        return [plan.total]
    pairs = [0] * max(g.pairs.stop for g in plan.groups)
    for g in plan.groups:
        share, extra = divmod(g.end - g.start, max(1, len(g.pairs)))
        for k, i in enumerate(g.pairs):
            pairs[i] = share + (k < extra)
    return pairs


class _OneProcessLauncherPass(HeadParallel):
    """No process group, and each chunk's pass allocating what its Triton launcher allocates (`launcher_pass`)."""

    pass_fn = staticmethod(launcher_pass)


def dry_run(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype,
            loss_type: str = "sigmoid", pair_lengths=None, fp32_gemm_support=CUDA_OUT_DTYPE) -> Trace:
    """The trace of one `fused_linear_dpo` forward + backward that runs `plan`, on meta tensors.

    hidden_rows: rows of the flattened hidden states (`[hidden_rows, hidden_size]`, requiring gradients, as the
    `[vocab, hidden_size]` weight; no bias); dtype: theirs. pair_lengths: scored tokens per pair (default
    `plan_pairs(plan)`). fp32_gemm_support: `(mm with out_dtype, addmm into fp32)` of the device modeled.
    Inputs are not counted; the returned gradients are.
    """
    from dpo_kernels.fused_linear import functional
    from dpo_kernels.loss_op.op import dpo_loss_and_grads

    meta = torch.device("meta")
    pairs = list(plan_pairs(plan) if pair_lengths is None else pair_lengths)
    B = len(pairs)
    hidden = torch.empty(hidden_rows, hidden_size, dtype=dtype, device=meta, requires_grad=True)
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=meta, requires_grad=True)
    with fp32_gemm.assume_support(meta, dtype, fp32_gemm_support), record() as trace:
        layout = _meta_layout(pairs, meta)
        loss_fn = functools.partial(dpo_loss_and_grads, loss_type=loss_type, chosen_lengths=layout.counts[:B],
                                    rejected_lengths=layout.counts[B:])
        run = functional._DPORun(layout, plan, B, False, loss_fn, token_stats=False, grad_enabled=True,
                                 par=_OneProcessLauncherPass(ParallelOptions(), shift=False))
        functional.FusedLinearDPOFunction.apply(hidden, weight, None, run).backward()
        del layout, loss_fn, run
    return trace
