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
