"""Running a HuggingFace causal LM on a shared-prompt batch (pairs, or groups of K responses): the mask each attention
implementation takes.

transformers 5.x hands a 4D attention mask (a tensor or a FlexAttention `BlockMask`) to the attention layers as it
is, so the shared layout needs no patch of the model, only a mask and the position ids:

    eager            `[rows, 1, T, T]` additive float mask (0 where allowed, the dtype's minimum elsewhere),
                     because eager attention adds the mask to the scores
    sdpa             `[rows, 1, T, T]` additive float mask in the dtype the query reaches SDPA with (the autocast
                     dtype inside an autocast region, else the embeddings' dtype): SDPA turns a bool mask into such
                     a float mask on every call, and autocast casts a float mask of another dtype on every call, so
                     either would cost one `[rows, 1, T, T]` tensor per layer instead of one per forward
    flex_attention   a `BlockMask` from a mask_mod over the per-position document / segment / position ids (no
                     `[T, T]` tensor on CUDA, where `create_block_mask` runs compiled); fully masked blocks are
                     skipped, which is where packing gains
    flash_attention_2 and others: refused. One varlen call cannot express "a response sees the prompt but not the
                     other responses"; callers fall back to unshared rows (for groups,
                     `shared_prompt.unshared_group_rows`).

Sliding windows: a prepared 4D mask bypasses transformers' own window, so the window goes into the mask, measured
in the unshared rows' positions. Models whose layers mix full and sliding attention (Qwen2/3 with
`use_sliding_window`, Gemma 2/3) take a mapping `{"full_attention": mask, "sliding_attention": mask}`; models with
one window for every layer (Mistral, Phi-3) take one windowed mask.

Only architectures verified to honour a custom 4D mask and the given position ids are accepted
(`SUPPORTED_MODELS`, each tested against its unshared rows); others raise `SharedPromptUnsupported` naming the
model class.

The batch (`dpo_kernels.shared_prompt.SharedPromptBatch` or `GroupBatch`) carries the attention rule in both forms
this module hands on (`attention_mask` dense, `mask_mod` for FlexAttention); `SharedLayout` names what is read from
it, so model access imports nothing of the shared-prompt package above it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from dpo_kernels.hf.backbone import backbone_hidden_states
from dpo_kernels.hf.unwrap import unwrap_model

__all__ = [
    "SUPPORTED_ATTENTION",
    "SUPPORTED_MODELS",
    "SharedLayout",
    "SharedPromptUnsupported",
    "check_shared_prompt_support",
    "shared_attention_mask",
    "shared_backbone_hidden_states",
    "shared_logits",
]

# How the backbone takes a prepared mask: one mask for every layer (with the config's sliding window, if any,
# applying to every layer), or a mapping keyed by `config.layer_types`.
_ONE_MASK, _BY_LAYER_TYPE = "one mask", "by layer type"

SUPPORTED_MODELS = {
    "LlamaForCausalLM": _ONE_MASK,
    "MistralForCausalLM": _ONE_MASK,
    "Phi3ForCausalLM": _ONE_MASK,
    "GemmaForCausalLM": _ONE_MASK,
    "Qwen2ForCausalLM": _BY_LAYER_TYPE,
    "Qwen3ForCausalLM": _BY_LAYER_TYPE,
    "Gemma2ForCausalLM": _BY_LAYER_TYPE,
    "Gemma3ForCausalLM": _BY_LAYER_TYPE,
}
SUPPORTED_ATTENTION = ("eager", "sdpa", "flex_attention")
_LAYER_TYPES = ("full_attention", "sliding_attention")


class SharedLayout(Protocol):
    """What running a model on a shared-prompt batch reads from it; `SharedPromptBatch` and `GroupBatch` are."""

    input_ids: torch.Tensor  # [rows, T] int64
    position_ids: torch.Tensor  # [rows, T] int64, each token's position in its unshared row
    document_ids: torch.Tensor  # [rows, T] int64, on the device the masks are built on

    def attention_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """`[rows, 1, T, T]` bool, True where a query position may attend to a key position."""

    def mask_mod(self, sliding_window: int | None = None):
        """The same rule as FlexAttention's `mask_mod(b, h, q, kv) -> bool`."""


class SharedPromptUnsupported(ValueError):
    """The model (or its attention implementation) cannot run the shared-prompt layout; use unshared rows. `model`:
    the class name of the model that cannot (None when not given)."""

    def __init__(self, message: str, model: str | None = None):
        super().__init__(message)
        self.model = model


def _attention_implementation(model: nn.Module) -> str:
    config = unwrap_model(model).config
    return getattr(config, "_attn_implementation", None) or "eager"


def check_shared_prompt_support(model: nn.Module) -> None:
    """Raises `SharedPromptUnsupported` (a ValueError) unless `model` (or the model inside a PEFT / compiled / DDP
    wrapper) is a causal LM in `SUPPORTED_MODELS` running eager, SDPA or FlexAttention."""
    inner = unwrap_model(model)
    name = type(inner).__name__
    if name not in SUPPORTED_MODELS:
        raise SharedPromptUnsupported(
            f"{name} is not verified to honour a custom 4D attention mask and position ids, so the shared-prompt "
            f"layout cannot run on it; supported: {', '.join(sorted(SUPPORTED_MODELS))}. Use unshared rows.", name
        )
    attention = _attention_implementation(inner)
    if attention not in SUPPORTED_ATTENTION:
        raise SharedPromptUnsupported(
            f"{name} runs attn_implementation={attention!r}, which cannot express the shared-prompt mask (a "
            "rejected token must see the prompt but not the chosen response: not one varlen flash-attention call); "
            f"load the model with attn_implementation in {SUPPORTED_ATTENTION}, or use unshared rows.", name
        )
    if SUPPORTED_MODELS[name] == _BY_LAYER_TYPE:
        kinds = set(getattr(inner.config, "layer_types", None) or ())
        if not kinds <= set(_LAYER_TYPES):
            raise SharedPromptUnsupported(f"{name} has layer types {sorted(kinds)}; the shared-prompt mask knows "
                                          f"{_LAYER_TYPES}. Use unshared rows.", name)


def _windows(config, kind: str) -> dict[str, int | None]:
    """The sliding window of each mask the backbone takes (None: full causal attention)."""
    window = getattr(config, "sliding_window", None)
    if kind == _ONE_MASK:
        return {"": window}
    windows = {"full_attention": None}
    if "sliding_attention" in (config.layer_types or ()):
        windows["sliding_attention"] = window
    return windows


def _dense_mask(batch: SharedLayout, window, attention, dtype):
    allowed = batch.attention_mask(window)
    # SDPA's own conversion of a bool mask fills with -inf; eager adds the mask to the scores itself, where the
    # dtype's minimum keeps a masked score finite.
    fill = float("-inf") if attention == "sdpa" else torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, fill)


def _mask_dtype(inner: nn.Module, attention: str, device: torch.device) -> torch.dtype:
    """The dtype of the dense mask: what the query has when it reaches the attention."""
    if attention == "sdpa" and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return inner.get_input_embeddings().weight.dtype


# Compiled once per process on CUDA (and re-specialized for dynamic shapes by torch.compile): the compiled
# create_block_mask evaluates the mask_mod block by block instead of materializing [rows, 1, T, T].
_compiled_create_block_mask = None


def _block_mask(batch: SharedLayout, window):
    global _compiled_create_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    rows, T = batch.input_ids.shape
    device = batch.document_ids.device
    create = create_block_mask
    if device.type == "cuda":
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask)
        create = _compiled_create_block_mask
    return create(batch.mask_mod(window), rows, None, T, T, device=device)


def shared_attention_mask(model: nn.Module, batch: SharedLayout, dtype: torch.dtype | None = None):
    """The `attention_mask` argument that makes `model`'s backbone run `batch` with the shared-prompt rule.

    Returns a 4D tensor, a FlexAttention `BlockMask`, or (for models mixing full and sliding layers) a dict of them
    keyed by layer type. Build it once per forward, next to the forward (`shared_backbone_hidden_states` and
    `shared_logits` do): under SDPA its default dtype follows the autocast region it is built in.
    `dtype`: the additive mask's dtype (default: under SDPA inside an autocast region, the autocast dtype; else the
    input embeddings' dtype, as transformers builds its own). Raises `SharedPromptUnsupported` for unsupported
    models.
    """
    check_shared_prompt_support(model)
    inner = unwrap_model(model)
    attention = _attention_implementation(inner)
    if dtype is None:
        dtype = _mask_dtype(inner, attention, batch.document_ids.device)
    masks = {}
    for key, window in _windows(inner.config, SUPPORTED_MODELS[type(inner).__name__]).items():
        if attention == "flex_attention":
            masks[key] = _block_mask(batch, window)
        else:
            masks[key] = _dense_mask(batch, window, attention, dtype)
    return masks[""] if "" in masks else masks


def _model_inputs(model, batch, model_kwargs):
    if "attention_mask" in model_kwargs or "position_ids" in model_kwargs:
        raise ValueError("the shared-prompt batch sets attention_mask and position_ids itself")
    model_kwargs["position_ids"] = batch.position_ids
    return shared_attention_mask(model, batch)


def shared_backbone_hidden_states(model: nn.Module, batch: SharedLayout, **model_kwargs: Any) -> torch.Tensor:
    """`[rows, T, H]` last hidden states of `batch` (what the lm_head reads; constant logit multipliers folded in,
    as `backbone.backbone_hidden_states`). Rows of the flattened result are what `batch.token_rows` index.
    `model_kwargs` go to the backbone."""
    mask = _model_inputs(model, batch, model_kwargs)
    return backbone_hidden_states(model, batch.input_ids, mask, **model_kwargs)


def shared_logits(model: nn.Module, batch: SharedLayout, *, reference: bool = False,
                  **model_kwargs: Any) -> torch.Tensor:
    """`[rows, T, V]` logits of `batch` from the model's own forward (the logits path); under no_grad with
    `reference`."""
    mask = _model_inputs(model, batch, model_kwargs)
    model_kwargs.setdefault("use_cache", False)
    with torch.no_grad() if reference else contextlib.nullcontext():
        return model(input_ids=batch.input_ids, attention_mask=mask, **model_kwargs).logits
