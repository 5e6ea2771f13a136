"""Which path each call took, in one record, and the strict mode that turns every fallback into an error.

Every public entry adds one `PathRecord` when it runs (docs/design.md, "Where code runs"):

    fused_linear_dpo, fused_linear_group_dpo,    the backend of the logsoftmax pass and the engine's plan
    linear_sequence_logprobs
    token_logprobs, sequence_logprobs            the backend of the log-prob kernels
    the trainer, the TRL drop-in                 shared prompt or not, and their own fallbacks

(`FusedLinearDPOLoss`, `FusedLinearGroupLoss`, `DPOLoss` and `GroupDPOLoss` record through the first two.)
`last_run()` is the newest record of the calling context (each thread has its own); `collect()` gathers every record
made inside its block, in order. A record holds host values the call already has: recording adds no device
synchronization, and nothing is recorded while torch.compile traces a call.

A fallback runs another path than the fast one: the PyTorch twin of the Triton kernels (tensors that are not on
CUDA under `DPO_KERNELS_BACKEND=auto`, or a vocabulary-sharded head), TRL's own computation in the drop-in (an option
the engine does not implement), unshared rows instead of the shared-prompt layout (a model or a batch it cannot
run), padded rows instead of the trainer's packed rows (a model that cannot keep packed sequences apart).
`fallback()` warns where the path has always warned and returns the `Fallback` that joins the record. In strict
mode it raises `StrictModeError` instead, naming the option, model or device that caused it. Strict mode is
on under `DPO_KERNELS_STRICT=1` and inside `strict_mode(True)`, which the trainer's `--strict` and the drop-in's
`strict=True` enter.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from dataclasses import dataclass

import torch

from dpo_kernels.backend import torch_fallback_reason, use_triton

__all__ = [
    "FUSED_TO_TRL",
    "PACKED_TO_PADDED",
    "SHARED_TO_UNSHARED",
    "TRITON_TO_TORCH",
    "Fallback",
    "PathRecord",
    "StrictModeError",
    "collect",
    "fallback",
    "last_run",
    "strict_enabled",
    "strict_mode",
    "summary_lines",
]

# What falls back to what: a `Fallback`'s kind.
TRITON_TO_TORCH = "Triton -> PyTorch"
FUSED_TO_TRL = "fused engine -> TRL's own computation"
SHARED_TO_UNSHARED = "shared prompt -> unshared rows"
PACKED_TO_PADDED = "packed rows -> padded rows"

_last: contextvars.ContextVar[PathRecord | None] = contextvars.ContextVar("dpo_kernels_last_run", default=None)
_collectors: contextvars.ContextVar[tuple] = contextvars.ContextVar("dpo_kernels_collectors", default=())
_strict: contextvars.ContextVar[bool] = contextvars.ContextVar("dpo_kernels_strict", default=False)


@dataclass(frozen=True)
class Fallback:
    """One path that ran instead of the fast one."""

    kind: str  # TRITON_TO_TORCH, FUSED_TO_TRL, SHARED_TO_UNSHARED or PACKED_TO_PADDED
    cause: str  # the option, model, device or batch that caused it
    reason: str  # the whole explanation, as warned


class StrictModeError(RuntimeError):
    """A fallback in strict mode. `fallback` is the `Fallback` that was refused; the message names its cause."""

    def __init__(self, fallback: Fallback):
        self.fallback = fallback
        super().__init__(f"strict mode refuses the fallback {fallback.kind} caused by {fallback.cause}: "
                         f"{fallback.reason} (strict mode: DPO_KERNELS_STRICT=1, strict=True or --strict)")


@dataclass(frozen=True)
class PathRecord:
    """What one call ran. Fields that do not apply to its entry are None (or empty).

    entry:             `fused_linear_dpo`, `fused_linear_group_dpo`, `linear_sequence_logprobs`, `token_logprobs`,
                       `sequence_logprobs`, `trainer` or `trl`.
    backend:           "triton" or "torch": what ran the logsoftmax pass (engine) or the log-prob kernels (logits).
    chunk:             C, the most tokens one chunk projects (`plan.StepPlan.chunk`).
    modes:             the mode of each unit group (of pairs, or of groups of K responses) in run order
                       (`resident`, `stream once`, `stream twice`); empty for a recompute plan.
    recompute:         the gradients, if any, come from recomputing every chunk in the backward.
    tokens:            N, the scored tokens.
    projected_tokens:  token rows projected through the head in the forward and the backward (`passes` = this / N).
    shared_prompt:     the call scored the shared-prompt layout (one row per pair or group) rather than unshared
                       rows.
    fallbacks:         every `Fallback` of the call, in the order met.
    """

    entry: str
    backend: str | None = None
    chunk: int | None = None
    modes: tuple[str, ...] = ()
    recompute: bool | None = None
    tokens: int | None = None
    projected_tokens: int | None = None
    shared_prompt: bool | None = None
    fallbacks: tuple[Fallback, ...] = ()

    @property
    def passes(self) -> float | None:
        """Projections per scored token: 1 when the forward forms every gradient, 2 for a recompute plan with a
        backward, in between when a pair streams twice (its tokens outside its last chunk are projected again)."""
        if self.projected_tokens is None or not self.tokens:
            return None
        return self.projected_tokens / self.tokens

    def summary(self) -> str:
        """One line: the record's fields that apply, and its fallbacks with their causes."""
        parts = [self.entry]
        if self.backend is not None:
            parts.append(f"backend={self.backend}")
        if self.chunk is not None:
            modes = "recompute" if self.recompute else ",".join(_counted(self.modes)) or "none"
            parts.append(f"chunk={self.chunk} modes={modes} passes={self.passes or 0:.2f}")
        if self.shared_prompt is not None:
            parts.append(f"shared_prompt={self.shared_prompt}")
        parts += [f"fallback {f.kind} ({f.cause})" for f in self.fallbacks]
        return " ".join(parts)


def _counted(modes) -> list[str]:
    """`["resident x3", "stream twice"]` from the modes in run order."""
    counts = {}
    for mode in modes:
        counts[mode] = counts.get(mode, 0) + 1
    return [mode if n == 1 else f"{mode} x{n}" for mode, n in counts.items()]


def summary_lines(records) -> list[str]:
    """One line per distinct `PathRecord.summary()` of `records`, in first-seen order, with how many calls gave it
    (the lines the trainer and the TRL drop-in print once, at their first step)."""
    counts = {}
    for entry in records:
        line = entry.summary()
        counts[line] = counts.get(line, 0) + 1
    return [line if n == 1 else f"{line} (x{n} calls)" for line, n in counts.items()]


def last_run() -> PathRecord | None:
    """The newest record made in the calling context, or None before the first."""
    return _last.get()


@contextlib.contextmanager
def collect():
    """`with collect() as records:` gathers, in order, every `PathRecord` made inside the block (blocks nest)."""
    records: list[PathRecord] = []
    token = _collectors.set(_collectors.get() + (records,))
    try:
        yield records
    finally:
        _collectors.reset(token)


def record(entry: PathRecord) -> PathRecord:
    """Makes `entry` the newest record and hands it to every open `collect()` block; returns it."""
    _last.set(entry)
    for records in _collectors.get():
        records.append(entry)
    return entry


def strict_enabled() -> bool:
    """Whether fallbacks raise here: `DPO_KERNELS_STRICT=1`, or inside `strict_mode(True)`."""
    return _strict.get() or os.environ.get("DPO_KERNELS_STRICT", "0").strip() == "1"


@contextlib.contextmanager
def strict_mode(enabled: bool = True):
    """Within the block, every fallback raises `StrictModeError` when `enabled` (`DPO_KERNELS_STRICT=1` applies
    everywhere regardless)."""
    token = _strict.set(bool(enabled) or _strict.get())
    try:
        yield
    finally:
        _strict.reset(token)


def fallback(kind: str, cause: str, reason: str, *, warn: str | None = None, stacklevel: int = 2) -> Fallback:
    """A fallback about to run: raises `StrictModeError` in strict mode, else warns `warn` (if given) and returns
    the `Fallback` for the caller's record."""
    found = Fallback(kind, cause, reason)
    if strict_enabled():
        raise StrictModeError(found)
    if warn is not None:
        warnings.warn(warn, stacklevel=stacklevel + 1)
    return found


def _backend(tensor: torch.Tensor, sharded_pass: bool) -> tuple[str, tuple[Fallback, ...]]:
    """The backend an op on `tensor` runs, and the Triton -> PyTorch fallback when it is one."""
    reason = torch_fallback_reason(tensor)
    if reason is not None:
        return "torch", (fallback(TRITON_TO_TORCH, f"{tensor.device.type} tensors", reason),)
    if not sharded_pass:
        return ("triton" if use_triton(tensor) else "torch"), ()
    if not use_triton(tensor):
        return "torch", ()
    reason = ("a vocabulary-sharded head runs the logsoftmax pass as PyTorch ops (docs/design.md, \"The fused "
              "linear engine\", Across processes)")
    return "torch", (fallback(TRITON_TO_TORCH, "vocab_parallel_group", reason),)


def record_logits_call(entry: str, logits: torch.Tensor) -> PathRecord | None:
    """The record of a log-probs-from-logits call (`token_logprobs`, `sequence_logprobs`) on `logits`."""
    if torch.compiler.is_compiling():
        return None
    backend, fallbacks = _backend(logits, sharded_pass=False)
    return record(PathRecord(entry, backend=backend, fallbacks=fallbacks))


def record_engine_call(entry: str, plan, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                       shared_prompt: bool, sharded_pass: bool = False) -> PathRecord | None:
    """The record of a fused linear engine call that runs `plan` (`plan.StepPlan`) on `hidden`, `weight`, `bias`
    (a recompute plan projects every token again in the backward when one of them requires grad in grad mode).

    shared_prompt:  the call scores a `TokenAttribution` (the shared-prompt layout).
    sharded_pass:   the head is vocabulary-sharded, whose pass runs as PyTorch ops.
    """
    if torch.compiler.is_compiling():
        return None
    backend, fallbacks = _backend(hidden, sharded_pass)
    if plan.recompute:
        backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        projected = plan.total * (2 if backward else 1)
    else:
        projected = sum(g.projected_tokens for g in plan.groups)
    return record(PathRecord(entry, backend=backend, chunk=plan.chunk, modes=tuple(g.mode for g in plan.groups),
                             recompute=plan.recompute, tokens=plan.total, projected_tokens=projected,
                             shared_prompt=shared_prompt, fallbacks=fallbacks))
