"""The group (ranked-list) DPO loss's public types and input validation, shared by the C++ op wrapper
(`loss_op/group.py`) and the PyTorch reference; free of the extension, as `spec.py` is.

A batch holds G groups of K responses each (2 <= K <= `MAX_GROUP_SIZE`, K may differ between groups): the
per-response vectors are `[R]`, group by group, and `group_sizes` gives each group's K (docs/design.md, "The DPO loss
op"). The formulas and their papers are in the header comment of csrc/group_loss_math.h.
"""
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dpo_kernels.loss_op.loss_types import LOSS_TYPES, LOSSES
from dpo_kernels.loss_op.spec import LossSpec, check_loss_settings

# The order is the integer code the C++ op receives (`enum GroupLossType` in csrc/group_loss_math.h).
GROUP_LOSS_TYPES = ("plackett_luce", "all_pairs", "best_vs_worst")
# csrc/group_loss_math.h kMaxGroupSize: one thread holds a group in local arrays.
MAX_GROUP_SIZE = 16
# The pairwise loss types all_pairs and best_vs_worst apply to a pair: those that read the pair alone (aot and
# aot_unpaired sort the batch; sft is the group loss's own `sft_weight`).
PAIR_LOSS_TYPES = tuple(name for name, info in LOSSES.items() if not info.couples_logps and not info.couples_lengths)
PAIR_WEIGHTINGS = (None, "score_gap")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GroupDPOLossOutput(NamedTuple):
    """Result of `group_dpo_loss`. Only `loss` carries gradient; everything else is detached.

    loss:             `[]` the mean of `losses` over the groups kept (0 when none is), float32 (float64 inputs:
                      float64).
    losses:           `[G]` each group's loss (with the sft term's share); 0 for a group left out.
    rewards:          `[R]` `beta * (policy_logps - ref_logps)` (ref 0 when reference-free).
    ranking_accuracy: `[]` over the batch's ordered pairs (a strictly higher score), the fraction whose rewards are
                      ordered the same way (strictly); 0 without any ordered pair.
    top1_accuracy:    `[]` over the groups with an ordered pair, the fraction whose best-scored responses hold a
                      reward above every lower-scored response's (strictly).
    groups_left_out:  `[]` int64, the groups left out of the mean: all_pairs or best_vs_worst groups without an
                      ordered pair (every score tied).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    ranking_accuracy: torch.Tensor
    top1_accuracy: torch.Tensor
    groups_left_out: torch.Tensor


class GroupSpec(NamedTuple):
    """Validated, normalized settings of one call.

    loss_type:  a name of `GROUP_LOSS_TYPES`.
    pair_loss:  the pairwise loss type of all_pairs and best_vs_worst (validated, unused by plackett_luce).
    top_k:      plackett_luce's number of terms m, 0 for the full ranking (K - 1).
    score_gap:  all_pairs weighs each pair by its score gap.
    terms:      the `LossSpec` of the ranking term (the pair loss's hyper-parameters, weight 1) and the sft term
                (weight `sft_weight`), whose rows are the op's `params`.
    """

    loss_type: str
    pair_loss: str
    top_k: int
    score_gap: bool
    terms: LossSpec

    @property
    def beta(self) -> float:
        return self.terms.beta

    @property
    def sft_weight(self) -> float:
        return self.terms.terms[1]["loss_weights"]

    @property
    def reads_lengths(self) -> bool:
        """The pair loss divides by the lengths, or the sft term averages over them."""
        pairwise = self.loss_type != "plackett_luce"
        return (pairwise and LOSSES[self.pair_loss].needs_rejected_lengths) or self.sft_weight != 0.0


def check_group_settings(loss_type="plackett_luce", *, beta=0.1, pair_loss="sigmoid", top_k=None,
                         pair_weighting=None, sft_weight=0.0, label_smoothing=0.0, loss_params=None) -> GroupSpec:
    """Validates every group-loss setting that needs no tensor; raises ValueError naming the setting.

    `loss_params` are the pair loss's other hyper-parameters (`gamma`, `tau`, `dpop_lambda`), as `dpo_loss` takes
    them; `loss_weights` is not one of them here (the sft term's weight is `sft_weight`).
    """
    if loss_type not in GROUP_LOSS_TYPES:
        raise ValueError(f"unknown group loss_type {loss_type!r}; expected one of {GROUP_LOSS_TYPES}")
    if pair_loss not in PAIR_LOSS_TYPES:
        why = (" (it couples the batch; the sft term is sft_weight)" if pair_loss in LOSS_TYPES else "")
        raise ValueError(f"pair_loss {pair_loss!r} is not a pairwise loss type of one pair{why}; expected one of "
                         f"{PAIR_LOSS_TYPES}")
    if top_k is not None:
        if loss_type != "plackett_luce":
            raise ValueError(f"top_k applies to loss_type 'plackett_luce', not {loss_type!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k < MAX_GROUP_SIZE:
            raise ValueError(f"top_k must be an integer from 1 to {MAX_GROUP_SIZE - 1} (a group of K responses uses "
                             f"min(top_k, K - 1) terms), got {top_k!r}")
    if pair_weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"pair_weighting must be one of {PAIR_WEIGHTINGS}, got {pair_weighting!r}")
    if pair_weighting is not None and loss_type != "all_pairs":
        raise ValueError(f"pair_weighting applies to loss_type 'all_pairs', not {loss_type!r}")
    loss_params = {} if loss_params is None else dict(loss_params)
    if "loss_weights" in loss_params:
        raise ValueError("group_dpo_loss takes no loss_weights: the ranking term has weight 1, the sft term "
                         "sft_weight")
    if isinstance(sft_weight, bool) or not isinstance(sft_weight, numbers.Real) or not math.isfinite(sft_weight):
        raise ValueError(f"sft_weight must be a finite real number, got {sft_weight!r}")
    if isinstance(label_smoothing, Sequence):
        raise ValueError("label_smoothing must be one number here (the pair loss's), got a sequence")
    terms = check_loss_settings([pair_loss, "sft"], beta=beta, label_smoothing=[label_smoothing, 0.0],
                                loss_params={**loss_params, "loss_weights": [1.0, float(sft_weight)]})
    return GroupSpec(loss_type, pair_loss, 0 if top_k is None else int(top_k), pair_weighting == "score_gap", terms)


def check_group_sizes(group_sizes, num_responses: int) -> tuple:
    """`group_sizes` (a sequence of ints or a 1-D integer tensor; on a GPU, reading it synchronizes once) as a tuple
    of ints, each from 2 to `MAX_GROUP_SIZE`, summing to `num_responses`."""
    if isinstance(group_sizes, torch.Tensor):
        if group_sizes.dim() != 1 or group_sizes.dtype.is_floating_point or group_sizes.dtype.is_complex \
                or group_sizes.dtype == torch.bool:
            raise ValueError(f"group_sizes must be a 1-D integer tensor [G], got shape {tuple(group_sizes.shape)} "
                             f"of {group_sizes.dtype}")
        if group_sizes.is_meta:
            raise ValueError("group_sizes is a meta tensor: the group sizes are read on the host")
        sizes = tuple(group_sizes.tolist())
    elif isinstance(group_sizes, Sequence) and not isinstance(group_sizes, str):
        sizes = tuple(group_sizes)
        if not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in sizes):
            raise ValueError(f"group_sizes must hold integers, got {list(sizes)[:8]}")
        sizes = tuple(int(k) for k in sizes)
    else:
        raise ValueError(f"group_sizes must be a sequence of ints or a 1-D integer tensor, got "
                         f"{type(group_sizes).__name__}")
    if not sizes:
        raise ValueError("group_sizes is empty: the batch needs at least one group")
    for g, k in enumerate(sizes):
        if not 2 <= k <= MAX_GROUP_SIZE:
            raise ValueError(f"group {g} has {k} responses; a group needs between 2 and {MAX_GROUP_SIZE}")
    if sum(sizes) != num_responses:
        raise ValueError(f"group_sizes sum to {sum(sizes)} but policy_logps holds R = {num_responses} responses")
    return sizes


def _check_vector(name: str, t, like, *, real: bool):
    """`t` is a 1-D tensor of `like`'s shape and device: floating log-probs, or (real) any integer or float."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if real:
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise ValueError(f"{name} must hold integer or floating values, got dtype {t.dtype}")
    elif t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [R], got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but policy_logps has {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but policy_logps is on {like.device}")


def validate_group_inputs(policy_logps, ref_logps, group_sizes, scores, lengths, spec: GroupSpec):
    """Raises ValueError for bad tensor inputs; returns (group sizes as a tuple of ints, the compute dtype: float64
    when a log-prob input is float64, else float32)."""
    _check_vector("policy_logps", policy_logps, None, real=False)
    if ref_logps is not None:
        _check_vector("ref_logps", ref_logps, policy_logps, real=False)
    if scores is not None:
        _check_vector("scores", scores, policy_logps, real=True)
    elif spec.score_gap:
        raise ValueError("pair_weighting='score_gap' needs scores")
    if lengths is not None:
        _check_vector("lengths", lengths, policy_logps, real=True)
    elif spec.reads_lengths:
        what = "sft_weight != 0 averages over the best responses' tokens" if spec.sft_weight != 0.0 else \
            f"pair_loss {spec.pair_loss!r} is length-normalized"
        raise ValueError(f"{what}: pass lengths")
    sizes = check_group_sizes(group_sizes, policy_logps.shape[0])
    double = policy_logps.dtype == torch.float64 or (ref_logps is not None and ref_logps.dtype == torch.float64)
    return sizes, (torch.float64 if double else torch.float32)
