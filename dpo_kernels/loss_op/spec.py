"""The DPO loss's public types and input validation, shared by the C++ op wrapper and the PyTorch reference.

Kept free of the extension so that `dpo_kernels.reference` imports without `dpo_kernels._C` being built.
"""
import math
import numbers
from collections.abc import Sequence
from types import MappingProxyType
from typing import NamedTuple

import torch

from dpo_kernels.loss_op.loss_types import (
    HYPER_PARAMS,
    LOSS_TYPES,
    LOSSES,
    couples_batch,
    is_tied,
    loss_names,
)

# `dpo_loss`'s `**loss_params`: every hyper-parameter but the two it names, `beta` and `label_smoothing`.
LOSS_PARAM_NAMES = tuple(name for name in HYPER_PARAMS if name not in ("beta", "label_smoothing"))
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
    """Validated, normalized hyper-parameters of one call.

    loss_types: the loss names, one per term.
    terms:      one mapping per term, from every name of `HYPER_PARAMS` (in its order) to the float the term reads;
                a hyper-parameter that is not per loss type has the call's one value in every term.
    """

    loss_types: tuple
    terms: tuple

    @property
    def beta(self) -> float:
        """The call's one beta (every term has the same), which the rewards read."""
        return self.terms[0]["beta"]

    def values(self, name: str) -> tuple:
        """The hyper-parameter `name` of each term, in term order."""
        return tuple(term[name] for term in self.terms)


def loss_traits(loss_type) -> LossTraits:
    """Structural facts about a loss (or a list of losses combined) that kernels may exploit."""
    return LossTraits(tied=is_tied(loss_type), couples_batch=couples_batch(loss_type))


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _per_loss(name: str, value, count: int) -> tuple:
    if value is None:
        value = HYPER_PARAMS[name].default
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries but there are {count} loss types")
        return tuple(_real(name, v) for v in value)
    return (_real(name, value),) * count


def check_loss_settings(loss_type, *, beta=HYPER_PARAMS["beta"].default,
                        label_smoothing=HYPER_PARAMS["label_smoothing"].default, loss_params=None) -> LossSpec:
    """Validates every loss setting that needs no tensor, against the ranges of the loss table
    (`dpo_kernels.loss_op.loss_types`: `HYPER_PARAMS` and each loss's `params`).

    Args:
        loss_type: a name of `LOSS_TYPES` or a non-empty list of them.
        beta, label_smoothing: as `dpo_kernels.dpo_loss` (label_smoothing: one value or one per loss type).
        loss_params: a dict of `dpo_loss`'s other keyword hyper-parameters (names of `LOSS_PARAM_NAMES`), or None.
    Returns:
        the normalized `LossSpec`. Raises ValueError naming the setting (and the loss type that rejects it).
    """
    loss_params = {} if loss_params is None else loss_params
    unknown = set(loss_params) - set(LOSS_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown loss parameter(s) {sorted(unknown)}; expected some of {sorted(LOSS_PARAM_NAMES)}")
    names = loss_names(loss_type)
    beta = _real("beta", beta)
    if not HYPER_PARAMS["beta"].valid.contains(beta):
        raise ValueError(f"beta = {beta} is invalid: needs {HYPER_PARAMS['beta'].valid.describe('beta')}")
    given = {**loss_params, "beta": beta, "label_smoothing": label_smoothing}
    # Each hyper-parameter's value in every term: a per-loss one may differ between terms, the others repeat.
    per_term = {}
    for param, info in HYPER_PARAMS.items():
        value = given.get(param, info.default)
        per_term[param] = (_per_loss(param, value, len(names)) if info.per_loss
                           else (_real(param, value),) * len(names))
    terms = tuple(MappingProxyType({param: values[index] for param, values in per_term.items()})
                  for index in range(len(names)))
    for name, term in zip(names, terms, strict=True):
        for param, valid in LOSSES[name].params.items():
            if not valid.contains(term[param]):
                note = f" ({valid.note})" if valid.note else ""
                raise ValueError(f"{param} = {term[param]} is invalid for loss_type {name!r}: needs "
                                 f"{valid.describe(param)}{note}")
    return LossSpec(names, terms)


def op_params(spec: LossSpec) -> tuple:
    """The C++ op's `params`: every term's hyper-parameters in turn, each in `HYPER_PARAMS`' order, which is the order
    of `enum HyperParam` in csrc/dpo_loss_math.h (a test checks that the two agree)."""
    return tuple(term[param] for term in spec.terms for param in HYPER_PARAMS)


def validate_spec(loss_type, beta, label_smoothing, chosen_lengths, rejected_lengths, loss_params) -> LossSpec:
    """`check_loss_settings`, and that the lengths the loss types divide by were passed (not None)."""
    spec = check_loss_settings(loss_type, beta=beta, label_smoothing=label_smoothing, loss_params=loss_params)
    for name in spec.loss_types:
        if LOSSES[name].needs_rejected_lengths and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"loss_type {name!r} is length-normalized: pass chosen_lengths and rejected_lengths")
        if LOSSES[name].needs_chosen_lengths and chosen_lengths is None:
            raise ValueError(f"loss_type {name!r} averages over chosen tokens: pass chosen_lengths")
    return spec


def check_average(average) -> bool:
    """`average` (the log-probs are per-token means) is a bool."""
    if not isinstance(average, bool):
        raise ValueError(f"average must be True or False, got {average!r}")
    return average


class OpConstants(NamedTuple):
    """The C++ op's non-tensor arguments for one validated spec, and which lengths its terms read."""

    op_args: tuple  # (loss_type codes, params)
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
    op_args = (tuple(LOSS_TYPES.index(name) for name in spec.loss_types), op_params(spec))
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


def check_reference_logps(ref_chosen, ref_rejected, num_pairs: int, device, source: str) -> None:
    """Both None, or both float `[num_pairs]` tensors on `device`, the device of the input named `source`.

    For callers that get the reference log-probs beside a batch they have not reduced yet (logits, hidden states):
    a bad reference fails before the pass over the batch. The dtype is checked before the shape."""
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    for name, t in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
        if t is None:
            continue
        _check_tensor(name, t, None, None)
        if t.shape[0] != num_pairs:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the batch has B = {num_pairs} pairs")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {source} is on {device}")


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
