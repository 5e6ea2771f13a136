"""The output head of a HuggingFace causal LM as the fused engine consumes it: `(weight [V, H], bias [V] or None)`,
with any constant logit multiplier folded in.

A constant logit multiplier (the config fields TRL 1.16's fused LM head reads: Cohere's `logit_scale`,
`output_multiplier`, Falcon-H1's `lm_head_multiplier`, Granite's `logits_scaling`) is linear, so it is folded into
the hidden states (`backbone.backbone_hidden_states`) and the bias. Final-logit soft-capping (Gemma 2/3/4:
`tanh(z / c) * c`) is not a linear map of `h @ W^T`, so those models are refused with a ValueError; use the logits
path (`dpo_kernels.sequence_logprobs` on `model(...).logits`) for them.
"""
from __future__ import annotations

import torch
from torch import nn

from dpo_kernels.hf.unwrap import unwrap_model

__all__ = ["logit_multiplier", "output_head"]

# Config fields that mean "logits pass through a non-linear cap": the fused engine cannot reproduce them.
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logit_softcapping", "output_softcapping")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def logit_multiplier(model: nn.Module) -> float:
    """The constant `s` in `logits = s * (h @ W^T + b)` (1.0 for most models).

    Raises ValueError for models whose final logits are soft-capped (not a linear function of the hidden states).
    """
    model = unwrap_model(model)
    configs = [c for c in (getattr(model, "config", None), _text_config(model)) if c is not None]
    for config in configs:
        for field in _SOFTCAP_FIELDS:
            if getattr(config, field, None):
                raise ValueError(
                    f"{type(model).__name__} soft-caps its logits (config.{field}={getattr(config, field)}): "
                    "tanh capping is not linear in the hidden states, so the fused linear engine cannot reproduce it. "
                    "Use the logits path instead (dpo_kernels.sequence_logprobs on model(...).logits)."
                )
    # The same fields TRL 1.16's fused LM head reads, with the same meaning (logits = scale * lm_head(h)).
    config = configs[-1] if configs else None
    scale = None
    for field in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if scale is None and config is not None:
            scale = getattr(config, field, None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by it; HyperCLOVA X multiplies.
        scaling = float(config.logits_scaling)
        scale = scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    return 1.0 if scale is None else float(scale)


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's `(weight [V, H], bias [V] or None)`, as the fused engine consumes them.

    The weight is the module's own parameter (tied to the input embeddings when the model ties them), so gradients
    reach it. A constant logit multiplier is folded into the returned bias (and into `backbone_hidden_states`).
    Raises ValueError when the head is missing, is not a plain linear map (e.g. a LoRA-adapted lm_head), or the
    model soft-caps its logits.
    """
    scale = logit_multiplier(model)
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        head = getattr(inner, "lm_head", None)
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no output embeddings (lm_head); the fused engine needs a causal LM head"
        )
    # PEFT's modules_to_save wrapper keeps the trained copy of the head under the active adapter's name.
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapter"):
        active = head.active_adapter
        active = active[0] if isinstance(active, (list, tuple)) else active
        if not getattr(head, "disable_adapters", False) and active in head.modules_to_save:
            head = head.modules_to_save[active]
        else:
            head = head.original_module
    if any(hasattr(head, attr) for attr in ("lora_A", "base_layer", "lora_embedding_A")):
        raise ValueError(
            "the lm_head carries a LoRA adapter, so its weight alone is not the head; merge the adapter into the "
            "lm_head or leave lm_head out of target_modules to use the fused engine"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the lm_head ({type(head).__name__}) has no 2-D weight; it is not a linear head")
    bias = getattr(head, "bias", None)
    if bias is not None and scale != 1.0:
        bias = bias * scale
    return weight, bias
