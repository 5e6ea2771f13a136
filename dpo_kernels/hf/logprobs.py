"""Per-sequence label log-probs of a HuggingFace causal LM through the fused linear engine (no `[*, V]` logits), for
the policy or, under no_grad, the reference."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import linear_sequence_logprobs
from dpo_kernels.hf.backbone import backbone_hidden_states
from dpo_kernels.hf.head import fused_head
from dpo_kernels.validation import check_cu_seqlens

__all__ = ["packed_position_ids", "sequence_logprobs"]


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
        model: HF causal LM (PEFT / compiled / DDP wrappers accepted; a LoRA lm_head runs inside the engine).
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
        weight, bias, lora = fused_head(model)
        if cu_seqlens is not None:
            hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        # Inside an autocast region the engine computes in the autocast dtype, as the model's own lm_head would.
        return linear_sequence_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift,
                                        average=average, cu_seqlens=cu_seqlens, memory_budget=memory_budget,
                                        lora=lora)
