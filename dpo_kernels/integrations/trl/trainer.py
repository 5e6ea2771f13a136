"""The two ways in: `FusedDPOTrainer`, a `trl.DPOTrainer` built fused, and `patch_dpo_trainer`, which turns a built
one fused in place."""
from __future__ import annotations

import contextlib

import trl.trainer.dpo_trainer
from trl import DPOTrainer

from dpo_kernels.fused_linear.plan import parse_memory_budget
from dpo_kernels.integrations.trl.mixin import FusedDPOMixin

__all__ = ["FusedDPOTrainer", "patch_dpo_trainer"]


class FusedDPOTrainer(FusedDPOMixin, DPOTrainer):
    """`trl.DPOTrainer` with the fused linear log-prob engine and the fused DPO loss; same arguments, plus:

    Args:
        token_metrics: log `entropy` and `mean_token_accuracy` as TRL does, from the fused engine's pass over
            the logits (no extra GEMM; the rare steps that cannot use the fused loss, an ipo/sigmoid_norm batch
            whose completion starts at position 0, take one extra no-grad pass); False does not log them.
        memory_budget: the fused engine's `[C, V]` logits buffer in bytes, or "low" for the recompute path
            (`dpo_kernels.FusedLinearDPOLoss`); None is its default (2 GiB, C <= 8192 tokens).
        share_prompt: run each pair's prompt through the policy and the reference once, in one
            `[prompt | chosen | rejected]` row (`dpo_kernels.shared_prompt`; with `padding_free`, several pairs per
            row), for the same numbers. A model outside `shared_prompt.SUPPORTED_MODELS` or not on eager, SDPA or
            FlexAttention runs unshared rows, with one warning; so does a batch whose pairs kept different prompt
            tokens in their two rows (`truncation_mode="keep_end"`).
        strict: every fallback (TRL's own computation for an option the engine lacks, unshared rows for a model or
            batch, PyTorch for tensors Triton does not run) raises `dpo_kernels.paths.StrictModeError` naming the
            option, model or device instead of warning; `DPO_KERNELS_STRICT=1` does the same.

    The first step prints which paths it took (`dpo_kernels.paths`), and keeps their records as `dpo_kernels_paths`.
    """

    def __init__(self, *args, token_metrics: bool = True, memory_budget: int | str | None = None,
                 share_prompt: bool = False, strict: bool = False, **kwargs):
        parse_memory_budget(memory_budget)  # a bad value fails here, before TRL's setup
        _check_flag("share_prompt", share_prompt)
        _check_flag("strict", strict)
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        # TRL 1.16 switches padding_free off with a warning during its __init__; this trainer implements it, so keep
        # the flag out of TRL's sight and restore it once TRL is set up.
        padding_free = bool(getattr(config, "padding_free", False))
        self._dk_options = {"token_metrics": token_metrics, "memory_budget": memory_budget,
                            "padding_free": padding_free, "share_prompt": share_prompt, "strict": strict}
        if padding_free:
            config.padding_free = False
        try:
            with _lora_head_allowed():
                super().__init__(*args, **kwargs)
        finally:
            if padding_free:
                config.padding_free = True
        self._dpo_kernels_setup()
        self.padding_free = padding_free and not self._dk_unsupported


class _NoTunerLayer:
    """A class no module is an instance of."""


@contextlib.contextmanager
def _lora_head_allowed():
    """TRL 1.16 refuses a PEFT adapter on the lm_head in its `__init__` (`isinstance(head, BaseTunerLayer)`), since
    its own fused head reads `lm_head.weight` alone. This trainer runs the adapter inside the fused engine, and
    refuses it where a step would fall back to TRL's head (`FusedDPOMixin._dpo_kernels_setup`)."""
    module = trl.trainer.dpo_trainer
    saved = getattr(module, "BaseTunerLayer", None)
    if saved is None:
        yield
        return
    module.BaseTunerLayer = _NoTunerLayer
    try:
        yield
    finally:
        module.BaseTunerLayer = saved


def _check_flag(name, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def patch_dpo_trainer(trainer: DPOTrainer, *, token_metrics: bool = True, memory_budget: int | str | None = None,
                      share_prompt: bool = False, strict: bool = False) -> DPOTrainer:
    """Turns an already-built `trl.DPOTrainer` (or subclass) into a fused one, in place; returns it. The options
    are `FusedDPOTrainer`'s.

    Reference log-probs that TRL already precomputed are kept (they are the same numbers).
    """
    if not isinstance(trainer, DPOTrainer):
        raise ValueError(f"patch_dpo_trainer expects a trl.DPOTrainer, got {type(trainer).__name__}")
    parse_memory_budget(memory_budget)
    _check_flag("share_prompt", share_prompt)
    _check_flag("strict", strict)
    if not isinstance(trainer, FusedDPOMixin):
        cls = type(trainer)
        trainer.__class__ = type(f"Fused{cls.__name__}", (FusedDPOMixin, cls), {})
    trainer._dk_options = {"token_metrics": token_metrics, "memory_budget": memory_budget,
                           "share_prompt": share_prompt, "strict": strict}
    trainer._dk_ready = False
    trainer._dpo_kernels_setup()
    return trainer
