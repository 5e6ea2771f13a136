"""Realistic, peaked inputs that every provider of a benchmark receives unchanged.

Near-uniform logits (plain `randn` hidden states and weights) flatter methods that skip small gradients, so the
inputs mimic a trained model instead: each vocabulary entry has a Zipf-like log-frequency `c_v = -s * log(1 + rank_v)`
(a heavy tail whose mass is spread over many tokens), and the label token sits `a ~ U(0, 6)` nats above the most
frequent token, so its log-prob is about -3 to -0.05, as it is for text a model was trained on.

For the fused-linear path the same logits are produced by `hidden @ weight.T`: the weight rows are `g_v + c_v * u`
(random directions `g_v` of norm ~1 plus the frequency along one shared direction `u`) and a hidden state is
`alpha * g_label / |g_label|^2 + u`, so its logit of `v` is `c_v` plus `alpha` at the label (plus small cross terms).

Row convention: rows `0..B-1` chosen, `B..2B-1` rejected. `labels` follow the HuggingFace convention (position t scores
`labels[:, t+1]`; the first quarter of each row is prompt, -100); `targets` are the same labels aligned with the
positions (`targets[:, t] = labels[:, t+1]`, -100 at the last position) for APIs that do not shift.
"""
import math
from dataclasses import dataclass

import torch

from dpo_kernels.constants import IGNORE_INDEX

PROMPT_FRACTION = 0.25
ZIPF_EXPONENT = 1.1
LABEL_MARGIN = (0.0, 6.0)
LOGIT_NOISE = 1.0


@dataclass(frozen=True)
class LinearInputs:
    """hidden `[2B, T, H]` and weight `[V, H]` in the benchmark dtype (leaves that require grad), labels/targets
    `[2B, T]` int64."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor

    @property
    def valid_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class LogitsInputs:
    """logits `[2B, T, V]` in the benchmark dtype (a leaf that requires grad), labels/targets `[2B, T]` int64."""

    logits: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class LossInputs:
    """Per-sequence log-probs `[B]` float32: policy (leaves that require grad) and reference."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def check_sizes(pairs: int, seq_len: int, **dims: int) -> None:
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (a prompt quarter and a response), got {seq_len}")
    for name, value in dims.items():
        if value < 2:
            raise ValueError(f"{name} must be >= 2, got {value}")


def make_labels(pairs: int, seq_len: int, vocab: int, device, seed: int = 0):
    """Labels `[2B, T]` (HF convention, prompt quarter -100) and the aligned targets `[2B, T]`."""
    g = _generator(device, seed)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device=device, generator=g)
    labels[:, : max(1, int(seq_len * PROMPT_FRACTION))] = IGNORE_INDEX
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return labels, targets


def zipf_log_frequency(vocab: int, device, seed: int = 0) -> torch.Tensor:
    """`c_v = -s log(1 + rank_v)` over a random ranking of the vocabulary, float32 `[V]`."""
    rank = torch.randperm(vocab, device=device, generator=_generator(device, seed + 1)).float()
    return -ZIPF_EXPONENT * torch.log1p(rank)


def _label_margin(shape, device, g) -> torch.Tensor:
    lo, hi = LABEL_MARGIN
    return lo + (hi - lo) * torch.rand(shape, device=device, generator=g)


def _likely_tokens(targets, vocab, g) -> torch.Tensor:
    """The token each position makes likely: its target, or a random one where nothing is scored."""
    noise = torch.randint(0, vocab, targets.shape, device=targets.device, generator=g)
    return torch.where(targets == IGNORE_INDEX, noise, targets)


def make_linear_inputs(pairs, seq_len, hidden, vocab, *, dtype=torch.bfloat16, device="cpu", seed=0):
    """Inputs of one fused-linear DPO step: `B=pairs` pairs of `T=seq_len` tokens, hidden size H, vocabulary V."""
    check_sizes(pairs, seq_len, hidden=hidden, vocab=vocab)
    labels, targets = make_labels(pairs, seq_len, vocab, device, seed)
    g = _generator(device, seed + 2)
    freq = zipf_log_frequency(vocab, device, seed)
    u = torch.randn(hidden, device=device, generator=g)
    u /= u.norm()
    directions = torch.randn(vocab, hidden, device=device, generator=g) / math.sqrt(hidden)
    weight = directions + freq[:, None] * u[None, :]
    likely = _likely_tokens(targets, vocab, g)
    alpha = _label_margin(likely.shape, device, g) - freq[likely]
    picked = directions[likely]
    hidden_states = alpha[..., None] * picked / picked.pow(2).sum(-1, keepdim=True) + u
    del directions, picked
    return LinearInputs(
        hidden=hidden_states.to(dtype).requires_grad_(),
        weight=weight.to(dtype).requires_grad_(),
        labels=labels,
        targets=targets,
    )


def make_logits_inputs(pairs, seq_len, vocab, *, dtype=torch.bfloat16, device="cpu", seed=0, rows_per_chunk=1024):
    """Inputs of one logits-path DPO step: logits `[2B, T, V]` built in row chunks (no fp32 `[2B*T, V]` copy)."""
    check_sizes(pairs, seq_len, vocab=vocab)
    labels, targets = make_labels(pairs, seq_len, vocab, device, seed)
    g = _generator(device, seed + 3)
    freq = zipf_log_frequency(vocab, device, seed)
    rows = 2 * pairs * seq_len
    logits = torch.empty(rows, vocab, device=device, dtype=dtype)
    likely = _likely_tokens(targets, vocab, g).reshape(-1)
    for start in range(0, rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, rows)
        chunk = freq[None, :] + LOGIT_NOISE * torch.randn(stop - start, vocab, device=device, generator=g)
        idx = likely[start:stop, None]
        chunk.scatter_(1, idx, _label_margin((stop - start, 1), device, g))
        logits[start:stop] = chunk.to(dtype)
    return LogitsInputs(logits=logits.view(2 * pairs, seq_len, vocab).requires_grad_(), labels=labels, targets=targets)


def make_loss_inputs(pairs, *, device="cpu", seed=0):
    """Per-sequence log-probs of `pairs` pairs, spread as summed log-probs of a few hundred tokens are."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    g = _generator(device, seed + 4)

    def logps():
        return torch.randn(pairs, device=device, generator=g) * 50 - 300

    return LossInputs(
        policy_chosen=logps().requires_grad_(),
        policy_rejected=logps().requires_grad_(),
        ref_chosen=logps(),
        ref_rejected=logps(),
    )
