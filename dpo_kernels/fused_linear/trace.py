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

`dry_run.py` runs the engine on "meta" tensors inside `record`; `memory_model.py` and `cost_model.py` sum that
trace. This module imports nothing of the engine, so the engine can report to it.
"""
import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
