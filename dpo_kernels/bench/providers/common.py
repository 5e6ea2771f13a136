"""What every provider shares: the provider record, the availability check and the eager DPO head.

A provider turns one op's inputs into a `forward()` closure returning the scalar DPO loss; the harness calls
`forward().backward()` and reads the gradients of the inputs' leaves. Every provider computes the same thing: the
summed label log-probs of the 2B sequences (chosen rows first), a sigmoid DPO loss with beta 0.1, reference-free
(the reference log-probs are 0 for all, as in the peers' reference measurements: docs/design.md, "Benchmarks"), and
the backward into the leaves.
"""
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_kernels.constants import IGNORE_INDEX

BETA = 0.1


@dataclass(frozen=True)
class Provider:
    """`build(inputs) -> forward` where `forward() -> loss` (a scalar tensor)."""

    name: str
    description: str
    build: Callable
    requires: tuple = ()
    devices: tuple = ("cpu", "cuda")
    not_applicable: str | None = None
    install_hint: str = ""


def _importable(requirement: str) -> bool:
    """`"module"` is importable, or for `"module:attr"`, the module imports and has the attribute."""
    module, _, attr = requirement.partition(":")
    try:
        if not attr:
            return importlib.util.find_spec(module) is not None
        return hasattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001  (a broken install is "not available", whatever it raises)
        return False


def unavailable_reason(provider: Provider, device: torch.device) -> str | None:
    """None when `provider` can run on `device`, else a one-line note saying why it is skipped."""
    if provider.not_applicable:
        return f"not applicable: {provider.not_applicable}"
    for requirement in provider.requires:
        if not _importable(requirement):
            hint = f" ({provider.install_hint})" if provider.install_hint else ""
            return f"not available: {requirement}{hint}"
    if device.type not in provider.devices:
        return f"needs {' or '.join(d.upper() for d in provider.devices)}; this run is on {device.type}"
    return None


def dpo_head(seq_logps: torch.Tensor) -> torch.Tensor:
    """Reference-free sigmoid DPO over `[2B]` sequence log-probs (chosen rows first): the mean over pairs."""
    pairs = seq_logps.shape[0] // 2
    margin = BETA * (seq_logps[:pairs] - seq_logps[pairs:])
    return -F.logsigmoid(margin).mean()


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or as it is when wider: eager on float64 copies is the truth the errors are measured against."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def masked_token_sum(token_logps: torch.Tensor, targets: torch.Tensor,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over positions of `token_logps` `[R, T]` where `targets != ignore_index`: `[R]`."""
    return token_logps.masked_fill(targets == ignore_index, 0.0).sum(-1)


def compiled(fn, compile_backend: str = "inductor"):
    """`torch.compile(fn)`; the CPU tests pick the cheaper "aot_eager" backend (inductor compiles for ~25 s there)."""
    return torch.compile(fn, backend=compile_backend, dynamic=False)
