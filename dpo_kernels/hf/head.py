"""The output head of a HuggingFace causal LM as the fused engine consumes it: `(weight [V, H], bias [V] or None)`,
with any constant logit multiplier folded in.

A constant logit multiplier (the config fields TRL 1.16's fused LM head reads: Cohere's `logit_scale`,
`output_multiplier`, Falcon-H1's `lm_head_multiplier`, Granite's `logits_scaling`) is linear, so it is folded into
the hidden states (`backbone.backbone_hidden_states`) and the bias. Final-logit soft-capping (Gemma 2/3/4:
`tanh(z / c) * c`) is not a linear map of `h @ W^T`, so those models are refused with a ValueError; use the logits
path (`dpo_kernels.sequence_logprobs` on `model(...).logits`) for them.

A PEFT LoRA adapter on the head (`target_modules=["lm_head"]`, a tied head included) is read as a `LoraHead`
(`fused_head`), which the engine runs without materializing `W + s B A`; `output_head` keeps refusing it, since
its weight alone is not the head.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dpo_kernels.fused_linear.lora import LoraHead
from dpo_kernels.hf.unwrap import unwrap_model

__all__ = ["FusedHead", "fused_head", "logit_multiplier", "output_head"]

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


class FusedHead(NamedTuple):
    """The output head as the fused engine runs it: `weight [V, H]`, `bias [V]` or None, and `lora`, the PEFT LoRA
    adapter on it (a `LoraHead` in the weight's dtype) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: LoraHead | None


def fused_head(model: nn.Module) -> FusedHead:
    """The lm_head's `(weight [V, H], bias [V] or None, lora)`, as the fused engine consumes them.

    The weight is the module's own parameter (tied to the input embeddings when the model ties them), so gradients
    reach it; with PEFT's `modules_to_save` the active adapter's trained copy. A PEFT LoRA adapter on the head
    comes back as a `LoraHead` over its own `lora_A` / `lora_B` weights (cast to the weight's dtype where PEFT keeps
    them in fp32), so gradients reach them. A constant logit multiplier is folded into the returned bias (and into
    `backbone_hidden_states`). Raises ValueError when the head is missing, is not a linear map, carries an adapter
    the engine cannot run (`_lora_of`), or the model soft-caps its logits.
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
    lora = None
    for _ in range(8):  # PEFT's wrappers, outermost first
        if hasattr(head, "modules_to_save") and hasattr(head, "active_adapter"):
            head = _saved_module(head)
        elif any(hasattr(head, attr) for attr in ("lora_A", "base_layer", "lora_embedding_A")):
            adapter = _lora_of(head)
            if adapter is not None and lora is not None:
                raise ValueError("the lm_head carries two LoRA adapters at once; the fused engine runs one")
            lora = adapter or lora
            head = head.base_layer
        else:
            break
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the lm_head ({type(head).__name__}) has no 2-D weight; it is not a linear head")
    bias = getattr(head, "bias", None)
    if bias is not None and scale != 1.0:
        bias = bias * scale
    if lora is not None and lora.a.dtype != weight.dtype:
        lora = lora.with_factors(lora.a.to(weight.dtype), lora.b.to(weight.dtype))
    return FusedHead(weight, bias, lora)


def _saved_module(head):
    """PEFT's `modules_to_save` wrapper keeps the trained copy of the head under the active adapter's name."""
    active = head.active_adapter
    active = active[0] if isinstance(active, (list, tuple)) else active
    if not getattr(head, "disable_adapters", False) and active in head.modules_to_save:
        return head.modules_to_save[active]
    return head.original_module


def _lora_of(layer) -> LoraHead | None:
    """The active adapter of a PEFT LoRA layer on the head as a `LoraHead`, or None when none acts (adapters
    disabled, none active on this layer, or merged into the base weight, which then is the head).

    Raises ValueError for what the engine does not run: a layer that is not PEFT's `lora.Linear`, several active
    adapters, DoRA, a bias on `lora_B`, dropout (a random mask on `h` inside the head; PEFT's default
    `lora_dropout=0` has none), or a merged adapter while adapters are disabled (PEFT unmerges it in the forward).
    """
    needed = ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters", "merged")
    if not all(hasattr(layer, attr) for attr in needed) or getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"the lm_head carries a LoRA adapter ({type(layer).__name__}) that the fused engine cannot "
                         "read; merge the adapter into the lm_head or leave lm_head out of target_modules")
    disabled = getattr(layer, "disable_adapters", False)
    if layer.merged:
        if disabled:
            raise ValueError("the lm_head's LoRA adapter is merged while adapters are disabled; call "
                             "unmerge_adapter() first")
        return None
    active = [] if disabled else [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise ValueError(f"the lm_head has {len(active)} active LoRA adapters ({active}); the fused engine runs one")
    name = active[0]
    if getattr(layer, "use_dora", {}).get(name, False):
        raise ValueError("the lm_head's LoRA adapter uses DoRA, which the fused engine does not run")
    down, up = layer.lora_A[name], layer.lora_B[name]
    if getattr(up, "bias", None) is not None:
        raise ValueError("the lm_head's LoRA adapter has a bias (lora_bias=True), which the fused engine does not run")
    dropout = layer.lora_dropout[name] if hasattr(layer, "lora_dropout") else None
    if dropout is not None and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        raise ValueError(f"the lm_head's LoRA adapter applies dropout ({dropout}); the fused engine runs lm_head "
                         "adapters with lora_dropout=0")
    return LoraHead(down.weight, up.weight, float(layer.scaling[name]))


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's `(weight [V, H], bias [V] or None)`, as the fused engine consumes them (`fused_head`).

    Raises ValueError when the head is missing, is not a plain linear map (a LoRA-adapted lm_head: `fused_head`
    returns its adapter too), or the model soft-caps its logits.
    """
    weight, bias, lora = fused_head(model)
    if lora is not None:
        raise ValueError(
            "the lm_head carries a LoRA adapter, so its weight alone is not the head; use dpo_kernels.hf.fused_head "
            "(the adapter as a LoraHead, for lora= of the fused engine), or merge the adapter into the lm_head"
        )
    return weight, bias
