"""One DPO forward of a policy on a batch, through one of three loss backends.

    fused-linear  backbone hidden states + lm_head weight -> dpo_kernels.FusedLinearDPOLoss (no [2B, T, V] logits)
    logits        model(...).logits -> dpo_kernels.sequence_logprobs (Triton on CUDA) -> dpo_kernels.dpo_loss
    reference     model(...).logits -> dpo_kernels.reference.sequence_logprobs -> dpo_kernels.reference.dpo_loss

`DPOForward` is an nn.Module so that DDP and FSDP wrap it whole: the lm_head weight that the fused path reads is
then gathered (FSDP) and its gradient synchronized (DDP/FSDP) like any parameter used inside `forward`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dpo_kernels.integrations import hf
from dpo_kernels.trainer.data import IGNORE_INDEX

BACKENDS = ("fused-linear", "logits", "reference")


class StepOutput(NamedTuple):
    loss: torch.Tensor               # [] differentiable
    chosen_logps: torch.Tensor       # [B] fp32, detached
    rejected_logps: torch.Tensor     # [B]
    chosen_rewards: torch.Tensor     # [B]
    rejected_rewards: torch.Tensor   # [B]
    reward_accuracy: torch.Tensor    # []
    reward_margin: torch.Tensor      # []


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Scored tokens per row `[2B]` (labels are shifted: position 0 never scores)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def _hidden_and_head(model, input_ids, attention_mask, autocast_dtype):
    """Backbone hidden states (under autocast when asked) and the lm_head, all in one dtype: autocast's, else the
    head's. The fused engine then runs outside autocast, on explicit dtypes, as the lm_head GEMM it replaces would."""
    enabled = autocast_dtype is not None
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        hidden = hf.backbone_hidden_states(model, input_ids, attention_mask)
    weight, bias = hf.output_head(model)
    dtype = autocast_dtype or weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _logits(model, input_ids, attention_mask, autocast_dtype):
    enabled = autocast_dtype is not None
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class DPOForward(nn.Module):
    """Wraps a causal LM; `forward(batch tensors, ref log-probs)` returns the loss and the DPO metrics."""

    def __init__(self, model: nn.Module, backend: str, loss_kwargs: dict, autocast_dtype: torch.dtype | None = None,
                 memory_budget: int | str | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"loss backend must be one of {BACKENDS}, got {backend!r}")
        from dpo_kernels.losses import FusedLinearDPOLoss

        self.model = model
        self.backend = backend
        self.loss_kwargs = dict(loss_kwargs)
        self.autocast_dtype = autocast_dtype
        self.fused = None
        if backend == "fused-linear":
            self.fused = FusedLinearDPOLoss(memory_budget=memory_budget, **self.loss_kwargs)

    def forward(self, input_ids, attention_mask, labels, ref_chosen_logps=None, ref_rejected_logps=None) -> StepOutput:
        import dpo_kernels

        half = input_ids.shape[0] // 2
        if self.fused is not None:
            hidden, weight, bias = _hidden_and_head(self.model, input_ids, attention_mask, self.autocast_dtype)
            out = self.fused(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
                             ref_rejected_logps=ref_rejected_logps)
            logps = torch.cat([out.chosen_logps, out.rejected_logps])
        else:
            if self.backend == "logits":
                logps_fn, loss_fn = dpo_kernels.sequence_logprobs, dpo_kernels.dpo_loss
            else:
                logps_fn, loss_fn = dpo_kernels.reference.sequence_logprobs, dpo_kernels.reference.dpo_loss
            logps = logps_fn(_logits(self.model, input_ids, attention_mask, self.autocast_dtype), labels)
            lengths = response_lengths(labels)
            out = loss_fn(logps[:half], logps[half:], ref_chosen_logps, ref_rejected_logps,
                          chosen_lengths=lengths[:half], rejected_lengths=lengths[half:], **self.loss_kwargs)
        logps = logps.detach().float()
        return StepOutput(out.loss, logps[:half], logps[half:], out.chosen_rewards, out.rejected_rewards,
                          out.reward_accuracy, out.reward_margin)


@torch.no_grad()
def sequence_logps(model: nn.Module, backend: str, input_ids, attention_mask, labels,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """No-grad per-row log-probs `[2B]` fp32 of `model` (the reference model), with the backend's log-prob op."""
    import dpo_kernels

    if backend == "fused-linear":
        hidden, weight, bias = _hidden_and_head(model, input_ids, attention_mask, autocast_dtype)
        logps = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, bias=bias)
    else:
        logps_fn = dpo_kernels.sequence_logprobs if backend == "logits" else dpo_kernels.reference.sequence_logprobs
        logps = logps_fn(_logits(model, input_ids, attention_mask, autocast_dtype), labels)
    return logps.float()
