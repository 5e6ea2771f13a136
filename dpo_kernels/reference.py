"""Plain-PyTorch references of every op and loss: the oracle for tests and benchmarks.

They favour clarity over memory: `[*, V]` tensors are materialized. Inputs in float64 give float64 results (the
truth the kernels are judged against); float32 inputs compute in float32; fp16/bf16 inputs are upcast to float32 the
way eager training code does (`log_softmax(logits.float())`).
"""
import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.outputs import DPOOutput
from dpo_kernels.validation import check_ndim


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    if shift:
        return logits[:, :-1, :], labels[:, 1:]
    return logits, labels


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, shift: bool = True):
    """Per-token log-probabilities of the labels.

    Args:
        logits: `[R, T, V]` float tensor.
        labels: `[R, T]` int64; `ignore_index` marks positions that are not scored.
        shift: position t of the logits scores `labels[:, t+1]` (HuggingFace causal-LM convention).
    Returns:
        `[R, T-1]` if shift else `[R, T]`, float32 (float64 for float64 logits), 0 where ignored.
    """
    logits, labels = _shifted(logits, labels, shift)
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~valid, 0.0)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    average: bool = False,
):
    """Per-sequence sum (or, with `average`, mean) of the label log-probabilities.

    Args and shapes as `token_logprobs`. Returns `[R]`; a row with no valid label gives 0 in both modes.
    """
    tok = token_logprobs(logits, labels, ignore_index=ignore_index, shift=shift)
    total = tok.sum(-1)
    if not average:
        return total
    _, shifted_labels = _shifted(logits, labels, shift)
    count = (shifted_labels != ignore_index).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1).to(total.dtype), torch.zeros_like(total))


# ---------------------------------------------------------------------------------------------------------------------
# DPO loss. The formulas, their papers and where this package departs from TRL 1.16's DPOTrainer._compute_loss
# (sigmoid's label smoothing, simpo, dpop) are stated in the header comment of csrc/dpo_loss_math.h.
# ---------------------------------------------------------------------------------------------------------------------
from dpo_kernels.loss_op.spec import (  # noqa: E402  (kept beside the loss it serves)
    DPOLossOutput,
    check_average,
    compute_dtype,
    validate_spec,
    validate_tensors,
)


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    loss = -torch.nn.functional.logsigmoid(z) * (1 - eps)
    return loss - torch.nn.functional.logsigmoid(-z) * eps if eps != 0 else loss


def _pair_loss(name, params, pc, pr, rc, rr, lc, lr, average):
    """One term's per-pair loss `[B]`; `params` maps every name of `HYPER_PARAMS` to the term's value."""
    logsigmoid = torch.nn.functional.logsigmoid
    beta, eps = params["beta"], params["label_smoothing"]
    chosen, rejected = pc - rc, pr - rr
    delta = chosen - rejected
    if name == "sigmoid":
        return _smoothed_logistic(beta * delta, eps)
    if name == "hinge":
        return torch.relu(1 - beta * delta)
    if name in ("ipo", "sigmoid_norm", "simpo"):
        # Length-normalized terms divide by the lengths, unless the log-probs are per-token means already.
        nc, nr = (1.0, 1.0) if average else (lc.clamp(min=1.0), lr.clamp(min=1.0))
    if name == "ipo":
        d = chosen / nc - rejected / nr
        return (d - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        z = beta * delta
        eps_t = torch.tensor(eps, dtype=z.dtype)
        return torch.sigmoid(z) * (logsigmoid(z) - torch.log1p(-eps_t)) + torch.sigmoid(-z) * (
            logsigmoid(-z) - torch.log(eps_t)
        )
    if name == "nca_pair":
        cr, rr_ = beta * chosen, beta * rejected
        return -logsigmoid(cr) - 0.5 * logsigmoid(-cr) - 0.5 * logsigmoid(-rr_)
    if name == "robust":
        z = beta * delta
        return (-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -logsigmoid(beta * chosen) - logsigmoid(-beta * rejected)
    if name == "sppo_hard":
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if name == "aot":
        d = torch.sort(pc - pr, stable=True).values - torch.sort(rc - rr, stable=True).values
        return _smoothed_logistic(beta * d, eps)
    if name == "aot_unpaired":
        d = torch.sort(chosen, stable=True).values - torch.sort(rejected, stable=True).values
        return _smoothed_logistic(beta * d, eps)
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if name == "apo_down":
        return torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * delta))
    if name == "discopop":
        z = beta * delta
        tau = params["tau"]
        mix = torch.sigmoid(z / tau)
        # TRL writes exp(-z) * mix, which is inf * 0 = NaN once exp(-z) overflows; this is the same value, finite.
        return -logsigmoid(z) * (1 - mix) + torch.exp(logsigmoid(z / tau) - z)
    if name == "sigmoid_norm":
        d = chosen / nc - rejected / nr
        return -logsigmoid(beta * d)
    if name == "sft":
        token_sum = (pc * lc).sum() if average else pc.sum()
        return (-token_sum / lc.sum().clamp(min=1.0)).expand(pc.shape[0])
    if name == "simpo":
        return _smoothed_logistic(beta * (pc / nc - pr / nr) - params["gamma"], eps)
    if name == "dpop":
        return -logsigmoid(beta * (delta - params["dpop_lambda"] * torch.relu(rc - pc)))
    raise AssertionError(name)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    average=False,
    **loss_params,
) -> DPOLossOutput:
    """Plain-PyTorch DPO loss with autograd; same signature and validation as `dpo_kernels.dpo_loss`.

    Computes in float64 when any log-prob input is float64, else in float32. Reference log-probs are constants
    (detached), as in TRL where they come from a no-grad forward.
    """
    average = check_average(average)
    validate_tensors(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
        rejected_lengths,
    )
    spec = validate_spec(loss_type, beta, label_smoothing, chosen_lengths, rejected_lengths, loss_params)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if ref_chosen_logps is None:
        rc = rr = torch.zeros_like(pc).detach()
    else:
        rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    lc = None if chosen_lengths is None else chosen_lengths.to(dtype)
    lr = None if rejected_lengths is None else rejected_lengths.to(dtype)

    loss = 0.0
    losses = torch.zeros_like(pc)
    for name, params in zip(spec.loss_types, spec.terms, strict=True):
        per_pair = _pair_loss(name, params, pc, pr, rc, rr, lc, lr, average)
        loss = loss + per_pair.mean() * params["loss_weights"]
        losses = losses + per_pair.detach() * params["loss_weights"]

    chosen_rewards = spec.beta * (pc - rc).detach()
    rejected_rewards = spec.beta * (pr - rr).detach()
    return DPOLossOutput(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        losses=losses,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Group (ranked-list) DPO loss. The formulas and their papers are in the header comment of csrc/group_loss_math.h.
# ---------------------------------------------------------------------------------------------------------------------
from dpo_kernels.loss_op.group_spec import (  # noqa: E402  (kept beside the loss it serves)
    GroupDPOLossOutput,
    check_group_settings,
    validate_group_inputs,
)


def group_dpo_loss(
    policy_logps,
    ref_logps,
    group_sizes,
    scores=None,
    *,
    loss_type="plackett_luce",
    beta=0.1,
    top_k=None,
    pair_loss="sigmoid",
    pair_weighting=None,
    lengths=None,
    sft_weight=0.0,
    label_smoothing=0.0,
    average=False,
    **loss_params,
) -> GroupDPOLossOutput:
    """Plain-PyTorch group DPO loss with autograd; same signature and validation as `dpo_kernels.group_dpo_loss`.

    Computes in float64 when a log-prob input is float64, else in float32; scores are compared in float64.
    """
    average = check_average(average)
    spec = check_group_settings(loss_type, beta=beta, pair_loss=pair_loss, top_k=top_k,
                                pair_weighting=pair_weighting, sft_weight=sft_weight,
                                label_smoothing=label_smoothing, loss_params=loss_params)
    sizes, dtype = validate_group_inputs(policy_logps, ref_logps, group_sizes, scores, lengths, spec)
    p = policy_logps.to(dtype)
    f = torch.zeros_like(p) if ref_logps is None else ref_logps.detach().to(dtype)
    lengths = None if lengths is None else lengths.to(dtype)
    rewards = spec.beta * (p - f)
    ranking_row, sft_row = spec.terms.terms
    group_losses, kept_best = [], []
    pairs = correct_pairs = ranked_groups = top1_correct = 0
    start = 0
    for size in sizes:
        span = torch.arange(start, start + size)
        given = torch.arange(size, 0, -1, dtype=torch.float64)  # no scores: the given order, best first
        s = given if scores is None else scores[start:start + size].to(torch.float64)
        order = span[torch.sort(s, descending=True, stable=True).indices]
        s_sorted = torch.sort(s, descending=True, stable=True).values
        r = rewards.detach()
        # Ordered pairs (i before j with a strictly higher score): the metrics, and all_pairs' terms.
        ordered = [(order[i], order[j], s_sorted[i] - s_sorted[j]) for i in range(size) for j in range(i + 1, size)
                   if s_sorted[i] > s_sorted[j]]
        pairs += len(ordered)
        correct_pairs += sum(int(r[hi] > r[lo]) for hi, lo, _ in ordered)
        top = s_sorted == s_sorted[0]
        if not top.all():
            ranked_groups += 1
            top1_correct += int(r[order[top]].max() > r[order[~top]].max())
        if spec.loss_type == "plackett_luce":
            m = size - 1 if spec.top_k == 0 else min(spec.top_k, size - 1)
            u = spec.beta * (p - f)[order]
            value = sum(torch.logsumexp(u[k:], 0) - u[k] for k in range(m))
        else:
            if spec.loss_type == "best_vs_worst":
                ordered = [(hi, lo, gap) for hi, lo, gap in ordered if hi == order[0] and lo == order[-1]]
            if not ordered:
                group_losses.append(None)
                start += size
                continue
            hi = torch.stack([h for h, _, _ in ordered])
            lo = torch.stack([low for _, low, _ in ordered])
            weight = (torch.stack([gap for _, _, gap in ordered]).to(dtype) if spec.score_gap
                      else torch.ones(len(ordered), dtype=dtype))
            lc = None if lengths is None else lengths[hi]
            lr = None if lengths is None else lengths[lo]
            per_pair = _pair_loss(spec.pair_loss, ranking_row, p[hi], p[lo], f[hi], f[lo], lc, lr, average)
            value = (weight * per_pair).sum() / weight.sum()
        group_losses.append(ranking_row["loss_weights"] * value)
        kept_best.append(order[0])
        start += size

    kept = [v for v in group_losses if v is not None]
    loss = torch.stack(kept).sum() / len(kept) if kept else p.sum() * 0
    sft = torch.zeros((), dtype=dtype)
    if spec.sft_weight != 0.0 and kept_best:
        best = torch.stack(kept_best)
        token_sum = (p[best] * lengths[best]).sum() if average else p[best].sum()
        sft = -token_sum / lengths[best].sum().clamp(min=1.0)
    if spec.sft_weight != 0.0:
        loss = loss + sft_row["loss_weights"] * sft
    zero = torch.zeros((), dtype=dtype)
    losses = torch.stack([zero if v is None else (v + sft_row["loss_weights"] * sft if spec.sft_weight != 0.0 else v)
                          for v in group_losses]).detach()
    return GroupDPOLossOutput(
        loss=loss,
        losses=losses,
        rewards=rewards.detach(),
        ranking_accuracy=torch.tensor(correct_pairs / pairs if pairs else 0.0, dtype=dtype),
        top1_accuracy=torch.tensor(top1_correct / ranked_groups if ranked_groups else 0.0, dtype=dtype),
        groups_left_out=torch.tensor(len(group_losses) - len(kept), dtype=torch.int64),
    )


def fused_linear_dpo(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    average=False,
    ignore_index=IGNORE_INDEX,
    shift=True,
    **loss_params,
) -> DPOOutput:
    """Plain-PyTorch `dpo_kernels.fused_linear_dpo` (padded layout): the lm_head's `linear`, then `sequence_logprobs`
    and `dpo_loss` above, with the `[2B, T, V]` logits materialized.

    Args:
        hidden: `[2B, T, H]` float (rows 0..B-1 chosen, B..2B-1 rejected); weight: `[V, H]`; bias: `[V]` or None.
            The logits are computed in their dtype (as an eager lm_head does), the log-softmax in float32 (float64
            for float64 logits).
        labels: `[2B, T]` int64, `ignore_index` on unscored positions.
        ref_chosen_logps, ref_rejected_logps: `[B]` or both None (reference-free).
        beta, loss_type, label_smoothing, loss_params: as `dpo_loss`; average, ignore_index, shift: as
            `sequence_logprobs` (the sft term stays the mean NLL of the chosen tokens with `average`).
    Returns:
        `DPOOutput` in float32 (float64 for float64 inputs); `loss` is differentiable w.r.t. hidden, weight and bias
        by autograd; the token statistics are None.
    """
    check_ndim(hidden, 3, "hidden", "[2B, T, H]")
    check_ndim(labels, 2, "labels", "[2B, T]")
    if hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(f"the batch needs an even, non-zero number of rows (B chosen then B rejected), got "
                         f"{hidden.shape[0]}")
    B = hidden.shape[0] // 2
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logps = sequence_logprobs(logits, labels, ignore_index=ignore_index, shift=shift, average=average)
    _, scored = _shifted(logits, labels, shift)
    counts = (scored != ignore_index).sum(-1)
    out = dpo_loss(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                   label_smoothing=label_smoothing, chosen_lengths=counts[:B], rejected_lengths=counts[B:],
                   average=average, **loss_params)
    ref_c = None if ref_chosen_logps is None else ref_chosen_logps.detach()
    ref_r = None if ref_rejected_logps is None else ref_rejected_logps.detach()
    return DPOOutput(out.loss, logps[:B].detach(), logps[B:].detach(), out.chosen_rewards, out.rejected_rewards,
                     out.reward_accuracy, out.reward_margin, out.losses, ref_c, ref_r, counts[:B], counts[B:])
