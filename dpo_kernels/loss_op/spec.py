"""The DPO loss's public types and input validation, shared by the C++ op wrapper and the PyTorch reference.

Kept free of the extension so that `dpo_kernels.reference` imports without `dpo_kernels._C` being built.
"""
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dpo_kernels.loss_op.loss_types import (
    LOSS_TYPES,
    LOSSES,
    couples_batch,
    is_tied,
    loss_names,
)

DEFAULT_LOSS_PARAMS = {"gamma": 0.5, "tau": 0.05, "dpop_lambda": 50.0}
_KNOWN_LOSS_PARAMS = frozenset(DEFAULT_LOSS_PARAMS) | {"loss_weights"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DPOLossOutput(NamedTuple):
    """Result of `dpo_loss`. Only `loss` carries gradient; everything else is detached.

    loss:             `[]` mean over pairs of the (weighted sum of the) per-pair losses.
    chosen_rewards:   `[B]` `beta * (policy_chosen - ref_chosen)` (ref 0 when reference-free).
    rejected_rewards: `[B]` `beta * (policy_rejected - ref_rejected)`.
    reward_accuracy:  `[]` fraction of pairs with `chosen_rewards > rejected_rewards` (strict).
    reward_margin:    `[]` mean of `chosen_rewards - rejected_rewards`.
    losses:           `[B]` per-pair loss whose mean is `loss` (for aot/aot_unpaired the i-th entry is the i-th
                      sorted position, as in TRL; for sft every entry is the batch's sft loss).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    losses: torch.Tensor


class LossTraits(NamedTuple):
    tied: bool
    couples_batch: bool


class LossSpec(NamedTuple):
    """Validated, normalized hyper-parameters of one call."""

    loss_types: tuple
    loss_weights: tuple
    label_smoothing: tuple
    beta: float
    gamma: float
    tau: float
    dpop_lambda: float


def loss_traits(loss_type) -> LossTraits:
    """Structural facts about a loss (or a list of losses combined) that kernels may exploit."""
    return LossTraits(tied=is_tied(loss_type), couples_batch=couples_batch(loss_type))


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _per_loss(name: str, value, count: int) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries but there are {count} loss types")
        return tuple(_real(name, v) for v in value)
    return (_real(name, value),) * count


def validate_spec(loss_type, beta, label_smoothing, chosen_lengths, rejected_lengths, loss_params) -> LossSpec:
    unknown = set(loss_params) - _KNOWN_LOSS_PARAMS
    if unknown:
        raise ValueError(f"unknown loss parameter(s) {sorted(unknown)}; expected some of {sorted(_KNOWN_LOSS_PARAMS)}")
    names = loss_names(loss_type)
    beta = _real("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    weights = loss_params.get("loss_weights")
    weights = (1.0,) * len(names) if weights is None else _per_loss("loss_weights", list(weights), len(names))
    smoothing = _per_loss("label_smoothing", label_smoothing, len(names))
    params = {k: _real(k, loss_params.get(k, v)) for k, v in DEFAULT_LOSS_PARAMS.items()}
    for name, eps in zip(names, smoothing, strict=True):
        if name == "robust" and not 0.0 <= eps < 0.5:
            raise ValueError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
        if name == "exo_pair" and not 0.0 < eps < 1.0:
            raise ValueError(
                f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper suggests 1e-3), got {eps}"
            )
        if LOSSES[name].reads_label_smoothing and not 0.0 <= eps <= 1.0:
            raise ValueError(f"loss_type {name!r} needs 0 <= label_smoothing <= 1, got {eps}")
        if name == "discopop" and params["tau"] <= 0:
            raise ValueError(f"loss_type 'discopop' needs tau > 0, got {params['tau']}")
        if name == "simpo" and params["gamma"] < 0:
            raise ValueError(f"loss_type 'simpo' needs gamma >= 0, got {params['gamma']}")
        if name == "dpop" and params["dpop_lambda"] < 0:
            raise ValueError(f"loss_type 'dpop' needs dpop_lambda >= 0, got {params['dpop_lambda']}")
        if LOSSES[name].needs_rejected_lengths and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"loss_type {name!r} is length-normalized: pass chosen_lengths and rejected_lengths")
        if LOSSES[name].needs_chosen_lengths and chosen_lengths is None:
            raise ValueError(f"loss_type {name!r} averages over chosen tokens: pass chosen_lengths")
    return LossSpec(names, weights, smoothing, beta, params["gamma"], params["tau"], params["dpop_lambda"])


class OpConstants(NamedTuple):
    """The C++ op's non-tensor arguments for one validated spec, and which lengths its terms read."""

    op_args: tuple  # (loss_type codes, loss_weights, label_smoothing, beta, gamma, tau, dpop_lambda)
    reads_chosen_lengths: bool
    reads_rejected_lengths: bool


_MAX_CACHED_SPECS = 256
_op_constants_cache: dict = {}


_CACHEABLE_TYPES = frozenset({str, int, float, bool, type(None)})


def _cache_key(value):
    """A key that tells apart values which compare equal across types (True == 1 == 1.0), so that a cached spec
    never skips a check (beta=True must still raise). Only plain Python values and lists/tuples of them are cached:
    anything else (numpy scalars, iterators, whose hash may be an id) raises TypeError and is validated afresh."""
    kind = type(value)
    if kind in _CACHEABLE_TYPES:
        return (kind, value)
    if kind is list or kind is tuple:
        return (tuple,) + tuple(_cache_key(v) for v in value)
    raise TypeError(f"not cached: {type(value).__name__}")


def _build_op_constants(loss_type, beta, label_smoothing, has_chosen_lengths, has_rejected_lengths, loss_params):
    # validate_spec only asks whether lengths were passed.
    spec = validate_spec(loss_type, beta, label_smoothing, True if has_chosen_lengths else None,
                         True if has_rejected_lengths else None, loss_params)
    infos = [LOSSES[name] for name in spec.loss_types]
    op_args = (tuple(LOSS_TYPES.index(name) for name in spec.loss_types), spec.loss_weights, spec.label_smoothing,
               spec.beta, spec.gamma, spec.tau, spec.dpop_lambda)
    return OpConstants(op_args, any(i.needs_chosen_lengths for i in infos),
                       any(i.needs_rejected_lengths for i in infos))


def op_constants(loss_type, beta, label_smoothing, has_chosen_lengths, has_rejected_lengths,
                 loss_params) -> OpConstants:
    """`validate_spec` for the C++ op, cached: a training loop passes the same hyper-parameters every step.

    Invalid specs are never cached (they raise every time); other argument types skip the cache, and so does
    torch.compile's tracing (it runs once per graph, and a global dict would only add guards)."""
    if torch.compiler.is_compiling():
        return _build_op_constants(loss_type, beta, label_smoothing, has_chosen_lengths, has_rejected_lengths,
                                   loss_params)
    try:
        params = tuple(sorted((k, _cache_key(v)) for k, v in loss_params.items())) if loss_params else ()
        key = (_cache_key(loss_type), _cache_key(beta), _cache_key(label_smoothing), has_chosen_lengths,
               has_rejected_lengths, params)
        cached = _op_constants_cache.get(key)
    except TypeError:
        return _build_op_constants(loss_type, beta, label_smoothing, has_chosen_lengths, has_rejected_lengths,
                                   loss_params)
    if cached is None:
        cached = _build_op_constants(loss_type, beta, label_smoothing, has_chosen_lengths, has_rejected_lengths,
                                     loss_params)
        if len(_op_constants_cache) >= _MAX_CACHED_SPECS:
            _op_constants_cache.clear()
        _op_constants_cache[key] = cached
    return cached


def _check_tensor(name: str, t, shape, device, *, lengths: bool = False) -> torch.dtype:
    """Checks one input against policy_chosen_logps's `shape` and `device` (None for that tensor itself)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = t.dtype
    if lengths:
        if dtype == torch.bool or dtype.is_complex:
            raise ValueError(f"{name} must hold integer or floating token counts, got dtype {dtype}")
    elif dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
    if shape is not None:
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but policy_chosen_logps has {tuple(shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but policy_chosen_logps is on {device}")
    return dtype


def validate_tensors(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                     rejected_lengths) -> torch.dtype:
    """Raises ValueError for bad tensor inputs; returns the compute dtype (see `compute_dtype`)."""
    dtypes = [_check_tensor("policy_chosen_logps", policy_chosen, None, None)]
    shape = policy_chosen.shape
    if shape[0] == 0:
        raise ValueError("policy_chosen_logps is empty: the batch needs at least one pair")
    device = policy_chosen.device
    dtypes.append(_check_tensor("policy_rejected_logps", policy_rejected, shape, device))
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if ref_chosen is not None:
        dtypes.append(_check_tensor("ref_chosen_logps", ref_chosen, shape, device))
        dtypes.append(_check_tensor("ref_rejected_logps", ref_rejected, shape, device))
    if chosen_lengths is not None:
        _check_tensor("chosen_lengths", chosen_lengths, shape, device, lengths=True)
    if rejected_lengths is not None:
        _check_tensor("rejected_lengths", rejected_lengths, shape, device, lengths=True)
    return torch.float64 if torch.float64 in dtypes else torch.float32


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any log-prob input is float64, else float32 (fp16/bf16 are upcast, as in the reference)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
