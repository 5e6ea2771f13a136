"""The HuggingFace model inside the wrappers training puts around it (DDP, `torch.compile`, PEFT)."""
from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


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
