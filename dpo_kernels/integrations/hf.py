"""HuggingFace causal LMs without their `[*, V]` logits: backbone hidden states + the lm_head, and sequence log-probs.

A causal LM computes `logits = head(backbone(input_ids))`. The fused engine wants the two halves apart: the last
hidden states `[R, T, H]` and the head's weight `[V, H]` (and bias). The helpers here split any transformers 5.x
causal LM that way, including PEFT-wrapped ones, and keep one contract:

    F.linear(backbone_hidden_states(model, ...), *output_head(model)) == model(...).logits

A constant logit multiplier (the config fields TRL 1.16's fused LM head reads: Cohere's `logit_scale`,
`output_multiplier`, Falcon-H1's `lm_head_multiplier`, Granite's `logits_scaling`) is linear, so it is folded into
the hidden states and the bias. Final-logit soft-capping (Gemma 2/3/4: `tanh(z / c) * c`) is not a linear map of
`h @ W^T`, so those models are refused with a ValueError; use the logits path (`dpo_kernels.sequence_logprobs` on
`model(...).logits`) for them.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import linear_sequence_logprobs
from dpo_kernels.validation import check_cu_seqlens

__all__ = [
    "backbone_hidden_states",
    "check_output_head",
    "logit_multiplier",
    "output_head",
    "packed_position_ids",
    "sequence_logprobs",
    "unwrap_model",
]

# Config fields that mean "logits pass through a non-linear cap": the fused engine cannot reproduce them.
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logit_softcapping", "output_softcapping")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF `PreTrainedModel` inside `model`: strips DDP/FSDP-style `.module`, `torch.compile`'s `_orig_mod` and
    PEFT's `PeftModel` (`get_base_model()`). LoRA layers stay in place, so adapters (and `disable_adapter()`) still act.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


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
        attention_mask: `[R, T]`, a prepared mask as `shared_prompt.hf.shared_attention_mask` builds it (4D, a
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

    A one-off guard for architectures this module does not know (an unusual logit transform would otherwise change
    the loss silently). Costs one full forward of the batch; call it once, on a few short rows. Dropout is off
    during the check. `tolerance` is relative to the largest logit: 1e-4 for float32 heads, 3e-2 for 16-bit ones or
    under autocast (folding a logit multiplier into the hidden states rounds differently there).
    """
    weight, bias = output_head(model)
    if tolerance is None:
        full = weight.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(weight.device.type)
        tolerance = 1e-4 if full else 3e-2
    training = model.training
    model.eval()
    try:
        hidden = backbone_hidden_states(model, input_ids, attention_mask)
        ours = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        theirs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    finally:
        model.train(training)
    diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("nan")
    if not diff <= tolerance * max(theirs.abs().max().item(), 1e-6):
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}'s logits are not hidden @ lm_head.weight^T + bias "
            f"(max abs difference {diff:.3e}); this model needs the logits path"
        )


def _adapters_disabled(model: nn.Module):
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def packed_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """`[1, N]` int64 positions restarting at 0 at each offset of `cu_seqlens` (how transformers tells packed
    sequences apart when there is no attention mask)."""
    check_cu_seqlens(cu_seqlens, total)
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return (torch.arange(total, device=cu.device) - starts).unsqueeze(0)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    reference: bool = False,
    disable_adapters: bool = False,
    memory_budget: int | str | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Per-sequence label log-probs of an HF causal LM through the fused linear engine (no `[*, V]` logits).

    Args:
        model: HF causal LM (PEFT / compiled / DDP wrappers accepted).
        input_ids: `[R, T]` int64; or, with `cu_seqlens`, packed `[1, N]` (padding-free: `position_ids` in
            `model_kwargs` restart at 0 per sequence, and are derived from `cu_seqlens` when not given, so that
            attention stays within each sequence).
        attention_mask: `[R, T]` or None.
        labels: `[R, T]` int64 (`[1, N]` or `[N]` when packed); `ignore_index` marks unscored positions.
        average: mean over valid tokens instead of the sum.
        shift: position t scores `labels[t+1]` (HF convention); within each sequence when packed.
        cu_seqlens: `[R+1]` int32 sequence boundaries of a packed batch, or None.
        reference: run under `torch.no_grad()` (reference model, evaluation).
        disable_adapters: run with the PEFT adapters disabled (a PEFT policy is its own reference).
        memory_budget: the fused engine's `[C, V]` buffer size (see `dpo_kernels.linear_sequence_logprobs`).
        model_kwargs: forwarded to the backbone.
    Returns:
        `[R]` float32 log-probs (differentiable w.r.t. the model unless `reference`).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [R, T] (or [1, N] packed), got shape {tuple(input_ids.shape)}")
    if cu_seqlens is None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    if cu_seqlens is not None and model_kwargs.get("position_ids") is None:
        model_kwargs["position_ids"] = packed_position_ids(cu_seqlens, input_ids.numel())
    grad_ctx = torch.no_grad() if reference else contextlib.nullcontext()
    adapter_ctx = _adapters_disabled(model) if disable_adapters else contextlib.nullcontext()
    with grad_ctx, adapter_ctx:
        hidden = backbone_hidden_states(model, input_ids, attention_mask, **model_kwargs)
        weight, bias = output_head(model)
        if cu_seqlens is not None:
            hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        # Inside an autocast region the engine computes in the autocast dtype, as the model's own lm_head would.
        return linear_sequence_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift,
                                        average=average, cu_seqlens=cu_seqlens, memory_budget=memory_budget)
