"""The one table of DPO loss types: every fact about a loss that code anywhere in the package needs.

The order of `LOSSES` is the integer code the C++ op receives (`csrc/dpo_loss_math.h`, `enum LossType`); a test
checks that the two agree. Adding a loss type touches this table, `csrc/dpo_loss_math.h` and
`dpo_kernels/reference.py`, nothing else (docs/design.md, "Adding a loss type").
"""
from collections.abc import Sequence
from typing import NamedTuple

# csrc/dpo_loss_math.h kMaxTerms: the most loss types one call may combine.
MAX_LOSS_TERMS = 16


class LossInfo(NamedTuple):
    """Structural facts about one loss type.

    summary:               what it computes, for help texts.
    tied:                  the loss reads only the chosen-minus-rejected margin: d loss / d rejected log-prob is the
                           negation of d loss / d chosen log-prob for every pair (the fused engine streams such pairs
                           in one pass).
    couples_logps:         one pair's loss or gradient depends on other pairs' log-probs (the batch is sorted): the
                           fused engine needs the whole batch's log-probs before any gradient.
    couples_lengths:       the loss averages over the whole batch's chosen tokens (only the lengths couple pairs,
                           and they are known before any chunk runs).
    reads_label_smoothing: the loss reads `label_smoothing` (the others ignore it, as TRL does).
    needs_chosen_lengths:  the loss divides by the chosen responses' token counts.
    needs_rejected_lengths: likewise for the rejected responses.
    reference_free:        the loss never reads reference log-probs (a reference model is not needed).
    trl_smoothed:          TRL 1.16's DPOTrainer reads its `label_smoothing` in this loss (its sigmoid does not,
                           where dpo_kernels' sigmoid would: the TRL drop-in passes 0 there).
    trl_unshifted_lengths: TRL normalizes this loss by `completion_mask.sum()` (unshifted tokens).
    """

    summary: str
    tied: bool = False
    couples_logps: bool = False
    couples_lengths: bool = False
    reads_label_smoothing: bool = False
    needs_chosen_lengths: bool = False
    needs_rejected_lengths: bool = False
    reference_free: bool = False
    trl_smoothed: bool = False
    trl_unshifted_lengths: bool = False


LOSSES: dict[str, LossInfo] = {
    "sigmoid": LossInfo("the original DPO loss -logsigmoid(beta * margin); label_smoothing > 0 gives cDPO",
                        tied=True, reads_label_smoothing=True),
    "hinge": LossInfo("SLiC hinge relu(1 - beta * margin)", tied=True),
    "ipo": LossInfo("IPO squared loss on the length-normalized margin", needs_chosen_lengths=True,
                    needs_rejected_lengths=True, trl_unshifted_lengths=True),
    "exo_pair": LossInfo("EXO reverse-KL pairwise loss (0 < label_smoothing < 1)", tied=True,
                         reads_label_smoothing=True, trl_smoothed=True),
    "nca_pair": LossInfo("NCA pairwise loss on the chosen and rejected rewards"),
    "robust": LossInfo("robust DPO, unbiased under label noise (0 <= label_smoothing < 0.5)", tied=True,
                       reads_label_smoothing=True, trl_smoothed=True),
    "bco_pair": LossInfo("BCO pairwise loss (reward shift not applied)"),
    "sppo_hard": LossInfo("SPPO with hard labels: squared distance of each reward to +-1/(2 beta)"),
    "aot": LossInfo("AOT: distributional alignment of sorted policy and reference margins", tied=True,
                    couples_logps=True, reads_label_smoothing=True, trl_smoothed=True),
    "aot_unpaired": LossInfo("AOT unpaired: sorted chosen and rejected rewards aligned", couples_logps=True,
                             reads_label_smoothing=True, trl_smoothed=True),
    "apo_zero": LossInfo("APO-zero: raise chosen, lower rejected likelihood"),
    "apo_down": LossInfo("APO-down: lower both, the rejected more"),
    "discopop": LossInfo("DiscoPOP log-ratio modulated loss (tau > 0)", tied=True),
    "sigmoid_norm": LossInfo("sigmoid loss on length-normalized log-prob ratios", needs_chosen_lengths=True,
                             needs_rejected_lengths=True, trl_unshifted_lengths=True),
    "sft": LossInfo("negative log-likelihood of the chosen responses (mean over the batch's chosen tokens)",
                    couples_lengths=True, needs_chosen_lengths=True),
    "simpo": LossInfo("SimPO: length-normalized, reference-free, with margin gamma", reads_label_smoothing=True,
                      needs_chosen_lengths=True, needs_rejected_lengths=True, reference_free=True),
    "dpop": LossInfo("DPO-Positive: sigmoid loss with a penalty when the chosen log-prob falls below the "
                     "reference (dpop_lambda)"),
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
