"""One DPO forward of a policy on a batch, through one of three loss backends (`trainer.backends`).

    fused-linear  backbone hidden states + lm_head weight -> dpo_kernels.FusedLinearDPOLoss (no [2B, T, V] logits);
                  a PEFT LoRA adapter on the lm_head runs inside it (`hf.fused_head`)
    logits        model(...).logits -> dpo_kernels.DPOLoss (Triton log-probs on CUDA, then the fused loss op)
    reference     model(...).logits -> dpo_kernels.reference.sequence_logprobs -> dpo_kernels.reference.dpo_loss

The model runs inside the autocast region when an autocast dtype is given; so does the fused head, which then
computes in that dtype as the model's own lm_head would (`dpo_kernels.fused_linear.functional.head_operands`). The
logits backends read the logits outside it.

`DPOForward` is an nn.Module so that DDP and FSDP wrap it whole: the lm_head weight that the fused path reads is
then gathered (FSDP) and its gradient synchronized (DDP/FSDP) like any parameter used inside `forward`.
"""
from __future__ import annotations

import torch
from torch import nn

import dpo_kernels
from dpo_kernels import hf
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.plan import scored_counts
from dpo_kernels.losses import DPOLoss, FusedLinearDPOLoss
from dpo_kernels.outputs import DPOOutput
from dpo_kernels.shared_prompt.batch import SharedBatch
from dpo_kernels.shared_prompt.logprobs import gather_scored_logits
from dpo_kernels.trainer.backends import BACKENDS


def _autocast(input_ids, autocast_dtype):
    return torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                          enabled=autocast_dtype is not None)


def _logits(model, input_ids, attention_mask, labels, autocast_dtype):
    """`(logits [2B, T, V], labels [2B, T])` (`[R, ...]` for groups); a shared-prompt or group batch's scored logits
    are gathered into that layout."""
    with _autocast(input_ids, autocast_dtype):
        if isinstance(labels, SharedBatch):
            return gather_scored_logits(hf.shared_logits(model, labels), labels)
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, labels


def _hidden_states(model, input_ids, attention_mask, labels):
    """The backbone's hidden states and what the fused head scores: the labels, or a shared-prompt (or group) batch's
    attribution (its hidden states stay in the shared `[rows, T, H]` layout)."""
    if isinstance(labels, SharedBatch):
        return hf.shared_backbone_hidden_states(model, labels), labels.attribution
    return hf.backbone_hidden_states(model, input_ids, attention_mask), labels


class PolicyForward(nn.Module):
    """What every loss forward of the trainer holds: the causal LM, the loss backend, the loss's settings, the
    autocast dtype and the fused head's memory budget (`DPOForward` for pairs, `trainer.group_forward` for groups)."""

    def __init__(self, model: nn.Module, backend: str, loss_kwargs: dict, autocast_dtype: torch.dtype | None = None,
                 memory_budget: int | str | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"loss backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.backend = backend
        self.loss_kwargs = dict(loss_kwargs)
        self.autocast_dtype = autocast_dtype
        self.memory_budget = memory_budget

    def on_fused_head(self, fn, input_ids, attention_mask, labels, *args, **kwargs):
        """`fn(hidden, weight, scored, *args, bias=, lora=, memory_budget=, **kwargs)`, a fused-linear entry, on the
        backbone's hidden states and the model's head (`hf.fused_head`), under the run's autocast."""
        with _autocast(input_ids, self.autocast_dtype):
            hidden, scored = _hidden_states(self.model, input_ids, attention_mask, labels)
            weight, bias, lora = hf.fused_head(self.model)
            return fn(hidden, weight, scored, *args, bias=bias, lora=lora, memory_budget=self.memory_budget, **kwargs)


class DPOForward(PolicyForward):
    """Wraps a causal LM; `forward(batch tensors, ref log-probs)` returns the loss and the DPO metrics."""

    def __init__(self, model: nn.Module, backend: str, loss_kwargs: dict, autocast_dtype: torch.dtype | None = None,
                 memory_budget: int | str | None = None):
        super().__init__(model, backend, loss_kwargs, autocast_dtype, memory_budget)
        self.fused = FusedLinearDPOLoss(memory_budget=memory_budget, **self.loss_kwargs) \
            if backend == "fused-linear" else None
        self.logits_loss = DPOLoss(**self.loss_kwargs) if backend == "logits" else None

    def forward(self, input_ids, attention_mask, labels, ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput:
        """`DPOOutput` of the batch (`[2B, T]` tensors, chosen rows first; or a `SharedPromptBatch` as `labels`, with
        its `input_ids` and no attention_mask); only `loss` carries gradient."""
        if self.fused is not None:
            with _autocast(input_ids, self.autocast_dtype):
                hidden, labels = _hidden_states(self.model, input_ids, attention_mask, labels)
                weight, bias, lora = hf.fused_head(self.model)
                return self.fused(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
                                  ref_rejected_logps=ref_rejected_logps, lora=lora)
        logits, labels = _logits(self.model, input_ids, attention_mask, labels, self.autocast_dtype)
        if self.logits_loss is not None:
            return self.logits_loss(logits, labels, ref_chosen_logps, ref_rejected_logps)
        return _reference_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, self.loss_kwargs)


def _reference_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, loss_kwargs) -> DPOOutput:
    """The float64-capable plain-PyTorch oracle of `DPOLoss`."""
    half = logits.shape[0] // 2
    logps = dpo_kernels.reference.sequence_logprobs(logits, labels)
    lengths = scored_counts(labels, IGNORE_INDEX, shift=True)
    out = dpo_kernels.reference.dpo_loss(logps[:half], logps[half:], ref_chosen_logps, ref_rejected_logps,
                                         chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
                                         **loss_kwargs)
    metrics = logps.detach().float()
    return DPOOutput(
        loss=out.loss,
        chosen_logps=metrics[:half],
        rejected_logps=metrics[half:],
        chosen_rewards=out.chosen_rewards.detach(),
        rejected_rewards=out.rejected_rewards.detach(),
        reward_accuracy=out.reward_accuracy.detach(),
        reward_margin=out.reward_margin.detach(),
        losses=out.losses.detach(),
        ref_chosen_logps=None if ref_chosen_logps is None else ref_chosen_logps.detach(),
        ref_rejected_logps=None if ref_rejected_logps is None else ref_rejected_logps.detach(),
        chosen_lengths=lengths[:half],
        rejected_lengths=lengths[half:],
    )


@torch.no_grad()
def reference_logps(model: nn.Module, backend: str, input_ids, attention_mask, labels,
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """No-grad per-row log-probs `[2B]` (`[R]` for groups) fp32 of `model` (the reference model), with the backend's
    log-prob op; a `SharedPromptBatch` or `GroupBatch` as `labels` shares the prompt here too."""
    if backend == "fused-linear":
        with _autocast(input_ids, autocast_dtype):
            hidden, labels = _hidden_states(model, input_ids, attention_mask, labels)
            weight, bias, lora = hf.fused_head(model)
            logps = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, bias=bias, lora=lora)
    else:
        logps_fn = dpo_kernels.sequence_logprobs if backend == "logits" else dpo_kernels.reference.sequence_logprobs
        logps = logps_fn(*_logits(model, input_ids, attention_mask, labels, autocast_dtype))
    return logps.float()
