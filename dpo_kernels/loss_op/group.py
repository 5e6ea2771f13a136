"""The group (ranked-list) DPO loss as one C++/CUDA op (`torch.ops.dpo_kernels.group_loss_forward`): for every
group of the batch at once, the mean loss, each group's loss, each response's reward, the ranking metrics, the count
of groups left out and the per-response coefficients dloss/dlogp; the backward (`group_loss_backward`, one launch)
scales those coefficients by the upstream gradient, with the autograd formula registered in C++
(csrc/group_loss_autograd.cpp) as the pairwise op's is.

The formulas and their papers are in the header comment of csrc/group_loss_math.h; `dpo_kernels.reference.
group_dpo_loss` is the plain-PyTorch oracle with the same signature.
"""
import itertools

import torch

from dpo_kernels.loss_op.group_spec import (
    GROUP_LOSS_TYPES,
    GroupDPOLossOutput,
    check_group_settings,
    validate_group_inputs,
)
from dpo_kernels.loss_op.loss_types import LOSS_TYPES
from dpo_kernels.loss_op.op import _require_cuda_kernel
from dpo_kernels.loss_op.spec import op_params

__all__ = ["GroupDPOLossOutput", "group_dpo_loss", "group_dpo_loss_and_grads"]

_FORWARD_NAME = "dpo_kernels::group_loss_forward"
_BACKWARD_NAME = "dpo_kernels::group_loss_backward"
_forward_op = torch.ops.dpo_kernels.group_loss_forward.default


@torch.library.register_fake(_FORWARD_NAME)
def _group_loss_forward_fake(policy, ref, offsets, scores, lengths, group_loss, pair_loss, top_k, score_gap, params,
                             average=False):
    scalar = policy.new_empty(())
    vector = torch.empty_like(policy, memory_format=torch.contiguous_format)
    losses = policy.new_empty((offsets.shape[0] - 1,))
    count = policy.new_empty((), dtype=torch.int64)
    return scalar, losses, vector, scalar.clone(), scalar.clone(), count, vector.clone()


@torch.library.register_fake(_BACKWARD_NAME)
def _group_loss_backward_fake(grad_loss, grad):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _call_op(policy_logps, ref_logps, group_sizes, scores, *, loss_type, beta, top_k, pair_loss, pair_weighting,
             lengths, sft_weight, label_smoothing, average, **loss_params):
    if not isinstance(average, bool):
        raise ValueError(f"average must be True or False, got {average!r}")
    spec = check_group_settings(loss_type, beta=beta, pair_loss=pair_loss, top_k=top_k,
                                pair_weighting=pair_weighting, sft_weight=sft_weight,
                                label_smoothing=label_smoothing, loss_params=loss_params)
    sizes, dtype = validate_group_inputs(policy_logps, ref_logps, group_sizes, scores, lengths, spec)
    device = policy_logps.device
    if policy_logps.is_cuda:
        _require_cuda_kernel()
    offsets = torch.tensor((0, *itertools.accumulate(sizes)), dtype=torch.int64, device=device)
    policy = policy_logps if policy_logps.dtype == dtype else policy_logps.to(dtype)
    ref = None if ref_logps is None else ref_logps.to(dtype)
    # Scores keep float64 in the op, so that distinct scores never tie by rounding.
    scores = None if scores is None else scores.to(torch.float64)
    lengths = lengths.to(dtype) if spec.reads_lengths else None
    return _forward_op(policy, ref, offsets, scores, lengths, GROUP_LOSS_TYPES.index(spec.loss_type),
                       LOSS_TYPES.index(spec.pair_loss), spec.top_k, spec.score_gap, op_params(spec.terms), average)


def group_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    group_sizes,
    scores: torch.Tensor | None = None,
    *,
    loss_type: str = "plackett_luce",
    beta: float = 0.1,
    top_k: int | None = None,
    pair_loss: str = "sigmoid",
    pair_weighting: str | None = None,
    lengths: torch.Tensor | None = None,
    sft_weight: float = 0.0,
    label_smoothing: float = 0.0,
    average: bool = False,
    **loss_params,
) -> GroupDPOLossOutput:
    r"""DPO on groups of K ranked responses per prompt, loss and metrics in one fused op (C++ on CPU, one CUDA
    launch on GPU). It works like `dpo_loss`, for groups.

    With r = beta (policy - ref) and each group's responses ordered best first (by descending score, ties keeping
    their given order; without scores, as given):

    - `plackett_luce` (DPO paper, Appendix A.3): a group's loss is
      :math:`\sum_{k=1}^{m} [\log \sum_{j=k}^{K} e^{r_j} - r_k]`, m = K - 1, or min(top_k, K - 1).
    - `all_pairs`: the pairwise loss `pair_loss` on every ordered pair (i scored above j; tied pairs skipped),
      averaged over the group's pairs (weighted by the score gap with `pair_weighting="score_gap"`). A group without
      an ordered pair is left out of the batch mean and counted in `groups_left_out`.
    - `best_vs_worst`: `pair_loss` on the best and the worst response by score (left out likewise when tied).

    At K = 2, plackett_luce is sigmoid DPO and all_pairs with `pair_loss` X is `dpo_loss` with X.

    Args:
        policy_logps: `[R]` float16/bfloat16/float32/float64, differentiable: each response's summed log-prob,
            group by group.
        ref_logps: `[R]` float, or None (reference-free: 0). Constant: no gradient flows into it.
        group_sizes: `[G]` ints (a sequence, or an integer tensor: on a GPU, reading it synchronizes once), each
            from 2 to 16, summing to R.
        scores: `[R]` integer or float, higher is better (compared in float64), or None: each group is ordered
            best first already.
        loss_type: one of `GROUP_LOSS_TYPES`.
        beta: > 0, the KL coefficient.
        top_k: plackett_luce's number of places scored (1 to 15), None for the full ranking.
        pair_loss: a pairwise loss type of `PAIR_LOSS_TYPES` for all_pairs and best_vs_worst (reference-free ones,
            simpo, need no `ref_logps`).
        pair_weighting: None or "score_gap" (all_pairs).
        lengths: `[R]` integer or float token counts, needed by the length-normalized pair losses (ipo,
            sigmoid_norm, simpo) and by the sft term.
        sft_weight: the weight of the NLL of each kept group's best response (mean over those responses' tokens),
            added as the pairwise `sft` term is; 0 leaves it out.
        label_smoothing, average, loss_params (`gamma`, `tau`, `dpop_lambda`): as `dpo_loss`, for the pair loss
            (`average`: the log-probs are per-token means).
    Returns:
        `GroupDPOLossOutput(loss [], losses [G], rewards [R], ranking_accuracy [], top1_accuracy [],
        groups_left_out [] int64)` in float32 (float64 if a log-prob input is float64). Only `loss` has a gradient.
    """
    out = _call_op(policy_logps, ref_logps, group_sizes, scores, loss_type=loss_type, beta=beta, top_k=top_k,
                   pair_loss=pair_loss, pair_weighting=pair_weighting, lengths=lengths, sft_weight=sft_weight,
                   label_smoothing=label_smoothing, average=average, **loss_params)
    return GroupDPOLossOutput(*out[:6])


def group_dpo_loss_and_grads(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, group_sizes,
                             scores: torch.Tensor | None = None, **settings):
    """`group_dpo_loss` without autograd, plus dloss/dlogp `[R]` for an upstream gradient of 1 (float32, float64 for
    float64 inputs), for the fused linear engine, which forms its own backward. Same arguments as `group_dpo_loss`:
    `settings` are its keyword arguments, with its defaults. Returns `(GroupDPOLossOutput, grad)`, all detached."""
    detach = (lambda t: t.detach() if isinstance(t, torch.Tensor) else t)
    out = _call_op(detach(policy_logps), detach(ref_logps), group_sizes, scores,
                   **{**group_dpo_loss.__kwdefaults__, **settings})
    return GroupDPOLossOutput(*out[:6]), out[6]
