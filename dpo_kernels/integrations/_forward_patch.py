"""A forward mode that hands the backbone's hidden states and the lm_head to a function, inside `model.forward`.

Trainers call the model through wrappers (DDP, FSDP, DeepSpeed, PEFT) whose hooks only run when `forward` runs, so
the fused head must be computed inside the forward rather than on an unwrapped module. TRL does the same with
`fused_lm_head=True`; this adds `dpo_kernels_head_fn=fn`, which returns `fn(hidden [R,T,H], weight [V,H], bias)`.
Without the keyword the previous forward runs unchanged (generation, TRL's own fused head).
"""
from __future__ import annotations

import functools
import types

from torch import nn

from dpo_kernels.integrations.hf import backbone_hidden_states, output_head

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
        if args:
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                kwargs["attention_mask"] = args[1]
        kwargs.pop("labels", None)
        hidden = backbone_hidden_states(self, kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None),
                                        **kwargs)
        weight, bias = output_head(self)
        return dpo_kernels_head_fn(hidden, weight, bias)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)
