"""Plain-PyTorch references of every op and loss: the oracle for tests and benchmarks.

They favour clarity over memory: `[*, V]` tensors are materialized. Inputs in float64 give float64 results (the
truth the kernels are judged against); float32 inputs compute in float32; fp16/bf16 inputs are upcast to float32 the
way eager training code does (`log_softmax(logits.float())`).
"""
import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    if shift:
        return logits[:, :-1, :], labels[:, 1:]
    return logits, labels


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True):
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
    ignore_index: int = -100,
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
