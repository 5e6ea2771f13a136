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

from dpo_kernels.data import IGNORE_INDEX
from dpo_kernels.integrations import hf

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


def _logits(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class DPOForward(nn.Module):
    """Wraps a causal LM; `forward(batch tensors, ref log-probs)` returns the loss and the DPO metrics."""

    def __init__(self, model: nn.Module, backend: str, loss_kwargs: dict, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"loss backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.backend = backend
        self.loss_kwargs = dict(loss_kwargs)
        self.autocast_dtype = autocast_dtype
        self._fused = None
        if backend == "fused-linear":
            import dpo_kernels

            fused_cls = getattr(dpo_kernels, "FusedLinearDPOLoss", None)
            if fused_cls is not None:
                self._fused = fused_cls(**self.loss_kwargs)

    def _autocast(self, device: torch.device):
        enabled = self.autocast_dtype is not None
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def forward(self, input_ids, attention_mask, labels, ref_chosen_logps=None, ref_rejected_logps=None) -> StepOutput:
        import dpo_kernels

        half = input_ids.shape[0] // 2
        lengths = response_lengths(labels)
        with self._autocast(input_ids.device):
            if self._fused is not None:
                hidden = hf.backbone_hidden_states(self.model, input_ids, attention_mask)
                weight, bias = hf.output_head(self.model)
                out = self._fused(hidden.to(weight.dtype), weight, labels, bias=bias,
                                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
                logps = torch.cat([out.chosen_logps, out.rejected_logps])
            else:
                if self.backend == "fused-linear":
                    # The fused loss module is not available: the fused log-prob engine + the loss op.
                    logps = hf.sequence_logprobs(self.model, input_ids, attention_mask, labels)
                    loss_fn = dpo_kernels.dpo_loss
                elif self.backend == "logits":
                    logps = dpo_kernels.sequence_logprobs(_logits(self.model, input_ids, attention_mask), labels)
                    loss_fn = dpo_kernels.dpo_loss
                else:
                    logps = dpo_kernels.reference.sequence_logprobs(
                        _logits(self.model, input_ids, attention_mask), labels)
                    loss_fn = dpo_kernels.reference.dpo_loss
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

    enabled = autocast_dtype is not None
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        if backend == "fused-linear":
            logps = hf.sequence_logprobs(model, input_ids, attention_mask, labels, reference=True)
        elif backend == "logits":
            logps = dpo_kernels.sequence_logprobs(_logits(model, input_ids, attention_mask), labels)
        else:
            logps = dpo_kernels.reference.sequence_logprobs(_logits(model, input_ids, attention_mask), labels)
    return logps.float()
