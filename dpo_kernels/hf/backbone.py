"""A HuggingFace causal LM without its `[*, V]` logits: the backbone's last hidden states, for the fused head.

A causal LM computes `logits = head(backbone(input_ids))`. The fused engine wants the two halves apart: the last
hidden states `[R, T, H]` and the head's weight `[V, H]` (and bias). Any transformers 5.x causal LM splits that way,
PEFT-wrapped ones included, under one contract:

    F.linear(backbone_hidden_states(model, ...), *output_head(model)) == model(...).logits

(with a LoRA lm_head, `fused_head(model)` adds its adapter's term, `LoraHead.delta_logits`).

`check_output_head` tests the contract on a model this package does not know.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpo_kernels.hf.head import fused_head, logit_multiplier
from dpo_kernels.hf.unwrap import unwrap_model

__all__ = ["backbone_hidden_states", "check_output_head"]


def _backbone(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    base = getattr(inner, "base_model", inner)
    # `base_model` is the module under `base_model_prefix` (LlamaModel inside LlamaForCausalLM; the multimodal model
    # inside a VLM, which takes pixel_values); without one, transformers' own decoder lookup.
    if base is not inner and isinstance(base, nn.Module):
        return base
    if hasattr(inner, "get_decoder"):
        decoder = inner.get_decoder()
        if decoder is not inner:
            return decoder
    raise ValueError(
        f"cannot find the backbone of {type(inner).__name__}: expected a causal LM with a base model "
        "(`model.model`) or `get_decoder()`"
    )


def backbone_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The last hidden states that the lm_head would read, without computing logits.

    Args:
        model: an HF causal LM (or a PEFT / compiled / DDP wrapper of one).
        input_ids: `[R, T]` int64 (or None with `inputs_embeds` in `model_kwargs`).
        attention_mask: `[R, T]`, a prepared mask as `shared_prompt.shared_attention_mask` builds it (4D, a
            FlexAttention `BlockMask`, or a dict of them by layer type), or None (padding-free batches pass
            `position_ids` instead).
        model_kwargs: forwarded to the backbone (`position_ids`, `pixel_values`, ...); `use_cache` is off.
    Returns:
        `[R, T, H]` in the model's dtype, with any constant logit multiplier folded in, so that
        `F.linear(hidden, *output_head(model))` equals the model's logits.
    """
    scale = logit_multiplier(model)
    backbone = _backbone(model)
    model_kwargs.setdefault("use_cache", False)
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    outputs = backbone(input_ids=input_ids, return_dict=True, **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden * scale if scale != 1.0 else hidden


@torch.no_grad()
def check_output_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      *, tolerance: float | None = None) -> None:
    """Runs the model both ways on a small batch and raises ValueError if hidden @ W^T + b differs from its logits.

    A one-off guard for architectures this package does not know (an unusual logit transform would otherwise change
    the loss silently). Costs one full forward of the batch; call it once, on a few short rows. Dropout is off
    during the check. `tolerance` is relative to the largest logit: 1e-4 for float32 heads, 3e-2 for 16-bit ones or
    under autocast (folding a logit multiplier into the hidden states rounds differently there).
    """
    weight, bias, lora = fused_head(model)
    if tolerance is None:
        full = weight.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(weight.device.type)
        tolerance = 1e-4 if full else 3e-2
    training = model.training
    model.eval()
    try:
        hidden = backbone_hidden_states(model, input_ids, attention_mask)
        hidden = hidden.to(weight.dtype)
        ours = torch.nn.functional.linear(hidden, weight, bias)
        if lora is not None:
            ours = ours + lora.delta_logits(hidden)
        ours = ours.float()
        theirs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    finally:
        model.train(training)
    diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("nan")
    if not diff <= tolerance * max(theirs.abs().max().item(), 1e-6):
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}'s logits are not hidden @ lm_head.weight^T + bias (+ its LoRA term) "
            f"(max abs difference {diff:.3e}); this model needs the logits path"
        )
