"""A forward mode that hands the backbone's hidden states and the lm_head to a function, inside `model.forward`.

Trainers call the model through wrappers (DDP, FSDP, DeepSpeed, PEFT) whose hooks only run when `forward` runs, so
the fused head must be computed inside the forward rather than on an unwrapped module. TRL does the same with
`fused_lm_head=True`; this adds `dpo_kernels_head_fn=fn`, which returns `fn(hidden [R,T,H], weight [V,H], bias, lora)`
(`lora`: the head's PEFT LoRA adapter as a `LoraHead`, or None; see `head.fused_head`).
Without the keyword the previous forward runs unchanged (generation, TRL's own fused head).
"""
from __future__ import annotations

import contextlib
import functools
import types

from torch import nn

from dpo_kernels.hf.backbone import backbone_hidden_states
from dpo_kernels.hf.head import fused_head

_MARK = "_dpo_kernels_head_forward"


def install_head_forward(model: nn.Module) -> None:
    """Patches `model.forward` (an HF `PreTrainedModel`) in place; idempotent."""
    if getattr(model, _MARK, False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, dpo_kernels_head_fn=None, **kwargs):
        if dpo_kernels_head_fn is None:
            return previous(*args, **kwargs)
        if len(args) > 2:
            raise ValueError("the fused head forward takes input_ids and attention_mask positionally, the rest by name")
        kwargs.update(zip(("input_ids", "attention_mask"), args, strict=False))
        kwargs.pop("labels", None)
        hidden = backbone_hidden_states(self, kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None),
                                        **kwargs)
        weight, bias, lora = fused_head(self)
        with _gathered(weight, bias):
            if lora is not None:
                lora = lora.with_factors(_full(lora.a), _full(lora.b))
            return dpo_kernels_head_fn(hidden, _full(weight), _full(bias), lora)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)


def _gathered(*params):
    """DeepSpeed ZeRO-3 shards the head and gathers it only in the lm_head's own forward, which is not called here."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError as exc:
        raise ValueError("under DeepSpeed ZeRO-3 the fused head gathers the lm_head with TRL's helper: "
                         "pip install 'dpo_kernels[trl]'") from exc
    return maybe_gather_lm_head_ctx(*params)


def _full(param):
    # FSDP2 keeps parameters as DTensor shards; the engine needs the whole head (differentiably gathered).
    if param is not None and type(param).__name__ == "DTensor" and hasattr(param, "full_tensor"):
        return param.full_tensor()
    return param
