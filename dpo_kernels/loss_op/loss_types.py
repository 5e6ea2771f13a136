"""The one table of DPO loss types: every fact about a loss that code anywhere in the package needs.

The order of `LOSSES` is the integer code the C++ op receives (`csrc/dpo_loss_math.h`, `enum LossType`), and the
order of `HYPER_PARAMS` the order in which it reads each loss type's hyper-parameters (`enum HyperParam`); tests
check that both agree. Adding a loss type touches this table, `csrc/dpo_loss_math.h` and `dpo_kernels/reference.py`;
adding a hyper-parameter touches those and the trainer's config, nothing else (docs/design.md, "Adding a loss type").
"""
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

# csrc/dpo_loss_math.h kMaxTerms: the most loss types one call may combine.
MAX_LOSS_TERMS = 16


def _number(x: float) -> str:
    return f"{x:g}"


class Range(NamedTuple):
    """The valid values of one hyper-parameter: `low <= x <= high`, an open end excluding its bound.

    note: a hint appended to the error message (a suggested value).
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def contains(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def describe(self, name: str) -> str:
        """`0 <= label_smoothing < 0.5`, `tau > 0`, ... ('any finite value' when unbounded)."""
        low = (" < " if self.low_open else " <= ") if math.isfinite(self.low) else None
        high = (" < " if self.high_open else " <= ") if math.isfinite(self.high) else None
        if low and high:
            return f"{_number(self.low)}{low}{name}{high}{_number(self.high)}"
        if low:
            return f"{name} {'>' if self.low_open else '>='} {_number(self.low)}"
        if high:
            return f"{name}{high}{_number(self.high)}"
        return f"{name} finite"


class HyperParam(NamedTuple):
    """One hyper-parameter of the loss.

    default:  the value when the caller passes none.
    help:     what it does, for help texts.
    valid:    the values it accepts: checked on every call for `beta`, which every loss reads; the others are
              checked against the range each loss that reads them gives in `LossInfo.params`.
    per_loss: the caller may pass one value per loss type (a list) instead of one for all.
    """

    default: float
    help: str
    valid: Range = Range()
    per_loss: bool = False


_PROBABILITY = Range(0.0, 1.0)
# Every hyper-parameter `dpo_loss` takes besides the tensors and `loss_type`. `beta` and `loss_weights` apply to
# every loss; the others only to the losses that list them in `LossInfo.params`. The op receives every one for every
# loss type, in this order (`enum HyperParam` in csrc/dpo_loss_math.h): append a new one at the end.
HYPER_PARAMS: dict[str, HyperParam] = {
    "beta": HyperParam(0.1, "the KL coefficient scaling every log-ratio (IPO's tau, SimPO's beta)",
                       Range(0.0, low_open=True)),
    "label_smoothing": HyperParam(0.0, "the assumed rate of flipped preference labels (cDPO, robust, EXO, AOT, "
                                       "SimPO); ignored by the other losses", _PROBABILITY, per_loss=True),
    "loss_weights": HyperParam(1.0, "the weight of each loss type in a combined loss", per_loss=True),
    "gamma": HyperParam(0.5, "SimPO's target reward margin"),
    "tau": HyperParam(0.05, "DiscoPOP's temperature of the log-ratio modulation"),
    "dpop_lambda": HyperParam(50.0, "DPO-Positive's weight of the penalty on chosen log-probs below the reference"),
}

# The hyper-parameters a loss reads, besides beta and loss_weights, with the values it accepts.
_SMOOTHED = {"label_smoothing": _PROBABILITY}


class LossInfo(NamedTuple):
    """Structural facts about one loss type.

    summary:               what it computes, for help texts.
    params:                the hyper-parameters it reads besides `beta` and `loss_weights` (names of
                           `HYPER_PARAMS`), each with the values this loss accepts.
    tied:                  the loss reads only the chosen-minus-rejected margin: d loss / d rejected log-prob is the
                           negation of d loss / d chosen log-prob for every pair (the fused engine streams such pairs
                           in one pass).
    couples_logps:         one pair's loss or gradient depends on other pairs' log-probs (the batch is sorted): the
                           fused engine needs the whole batch's log-probs before any gradient.
    couples_lengths:       the loss averages over the whole batch's chosen tokens (only the lengths couple pairs,
                           and they are known before any chunk runs).
    needs_chosen_lengths:  the loss divides by the chosen responses' token counts.
    needs_rejected_lengths: likewise for the rejected responses.
    reference_free:        the loss never reads reference log-probs (a reference model is not needed).
    trl_smoothed:          TRL 1.16's DPOTrainer reads its `label_smoothing` in this loss (its sigmoid does not,
                           where dpo_kernels' sigmoid would: the TRL drop-in passes 0 there).
    trl_unshifted_lengths: TRL normalizes this loss by `completion_mask.sum()` (unshifted tokens).
    """

    summary: str
    params: Mapping[str, Range] = MappingProxyType({})
    tied: bool = False
    couples_logps: bool = False
    couples_lengths: bool = False
    needs_chosen_lengths: bool = False
    needs_rejected_lengths: bool = False
    reference_free: bool = False
    trl_smoothed: bool = False
    trl_unshifted_lengths: bool = False

    @property
    def reads_label_smoothing(self) -> bool:
        """The loss reads `label_smoothing` (the others ignore it, as TRL does)."""
        return "label_smoothing" in self.params


# The formulas, with their papers, are in csrc/dpo_loss_math.h (docs/design.md, "The DPO loss op").
LOSSES: dict[str, LossInfo] = {
    "sigmoid": LossInfo("the original DPO loss -logsigmoid(beta * margin); label_smoothing > 0 gives cDPO",
                        _SMOOTHED, tied=True),
    "hinge": LossInfo("SLiC hinge relu(1 - beta * margin)", tied=True),
    "ipo": LossInfo("IPO squared loss on the length-normalized margin", needs_chosen_lengths=True,
                    needs_rejected_lengths=True, trl_unshifted_lengths=True),
    "exo_pair": LossInfo("EXO reverse-KL pairwise loss",
                         {"label_smoothing": Range(0.0, 1.0, True, True, "the EXO paper suggests 1e-3")},
                         tied=True, trl_smoothed=True),
    "nca_pair": LossInfo("NCA pairwise loss on the chosen and rejected rewards"),
    "robust": LossInfo("robust DPO, unbiased under label noise", {"label_smoothing": Range(0.0, 0.5, high_open=True)},
                       tied=True, trl_smoothed=True),
    "bco_pair": LossInfo("BCO pairwise loss (reward shift not applied)"),
    "sppo_hard": LossInfo("SPPO with hard labels: squared distance of each reward to +-1/(2 beta)"),
    "aot": LossInfo("AOT: distributional alignment of sorted policy and reference margins", _SMOOTHED, tied=True,
                    couples_logps=True, trl_smoothed=True),
    "aot_unpaired": LossInfo("AOT unpaired: sorted chosen and rejected rewards aligned", _SMOOTHED,
                             couples_logps=True, trl_smoothed=True),
    "apo_zero": LossInfo("APO-zero: raise chosen, lower rejected likelihood"),
    "apo_down": LossInfo("APO-down: lower both, the rejected more"),
    "discopop": LossInfo("DiscoPOP log-ratio modulated loss", {"tau": Range(0.0, low_open=True)}, tied=True),
    "sigmoid_norm": LossInfo("sigmoid loss on length-normalized log-prob ratios", needs_chosen_lengths=True,
                             needs_rejected_lengths=True, trl_unshifted_lengths=True),
    "sft": LossInfo("negative log-likelihood of the chosen responses (mean over the batch's chosen tokens)",
                    couples_lengths=True, needs_chosen_lengths=True),
    "simpo": LossInfo("SimPO: length-normalized, reference-free, with target margin gamma",
                      {**_SMOOTHED, "gamma": Range(0.0)}, needs_chosen_lengths=True, needs_rejected_lengths=True,
                      reference_free=True),
    "dpop": LossInfo("DPO-Positive: sigmoid loss with a penalty when the chosen log-prob falls below the "
                     "reference", {"dpop_lambda": Range(0.0)}),
}

LOSS_TYPES = tuple(LOSSES)


def loss_names(loss_type) -> tuple:
    """`loss_type` (a name or a non-empty list of names) as a validated tuple of names."""
    names = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(names, Sequence) or isinstance(names, str) or len(names) == 0:
        raise ValueError(f"loss_type must be a loss name or a non-empty list of names from {LOSS_TYPES}")
    if len(names) > MAX_LOSS_TERMS:
        raise ValueError(f"at most {MAX_LOSS_TERMS} loss types can be combined, got {len(names)}")
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}; expected one of {LOSS_TYPES}")
    return tuple(names)


def is_tied(loss_type) -> bool:
    """Every term reads only the margin: chosen and rejected coefficients of a pair are negatives."""
    return all(LOSSES[name].tied for name in loss_names(loss_type))


def couples_logps(loss_type) -> bool:
    """Some term makes one pair's gradient depend on other pairs' log-probs."""
    return any(LOSSES[name].couples_logps for name in loss_names(loss_type))


def couples_batch(loss_type) -> bool:
    """Some term couples pairs, through their log-probs or the batch's lengths."""
    return any(LOSSES[n].couples_logps or LOSSES[n].couples_lengths for n in loss_names(loss_type))


def is_reference_free(loss_type) -> bool:
    """No term reads reference log-probs."""
    return all(LOSSES[name].reference_free for name in loss_names(loss_type))


def loss_type_help() -> str:
    """Every loss type with its summary and the hyper-parameters it reads, one line each, for a CLI's help.

    Lines are preformatted: show them verbatim (argparse: `RawDescriptionHelpFormatter` in an epilog).
    """
    width = max(map(len, LOSSES))
    lines = ["loss types (several, comma-separated, are summed with loss_weights):"]
    for name, info in LOSSES.items():
        reads = ", ".join(info.params[p].describe(p) for p in info.params)
        lines.append(f"  {name:<{width}}  {info.summary}" + (f" [{reads}]" if reads else ""))
    return "\n".join(lines)


def hyper_param_help() -> str:
    """Every hyper-parameter with its default, its valid values and what it does, one line each."""
    width = max(map(len, HYPER_PARAMS))
    lines = ["loss hyper-parameters:"]
    for name, param in HYPER_PARAMS.items():
        each = ", one per loss type or one for all" if param.per_loss else ""
        valid = "" if param.valid == Range() else f"; {param.valid.describe(name)}"
        lines.append(f"  {name:<{width}}  {param.help} (default {_number(param.default)}{valid}{each})")
    return "\n".join(lines)
