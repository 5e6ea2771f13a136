"""What the fused engine cannot run for a given `trl.DPOTrainer`: options that send every step to TRL's own
computation, and models that cannot take the shared-prompt layout. The drop-in turns each answer into one
`dpo_kernels.paths.fallback`: a warning, or the error of strict mode."""
from __future__ import annotations

import torch
from accelerate.utils import is_peft_model

import dpo_kernels
from dpo_kernels import hf
from dpo_kernels.integrations.trl.loss import TrlLossSettings

__all__ = ["shared_prompt_problem", "unsupported_options"]


def unsupported_options(trainer) -> list[str]:
    """The trainer's settings and models that the fused engine does not implement, one phrase each."""
    args = trainer.args
    found = []
    if args.ld_alpha is not None:
        found.append(f"ld_alpha={args.ld_alpha}")
    if args.f_divergence_type != "reverse_kl":
        found.append(f"f_divergence_type={args.f_divergence_type!r}")
    if args.use_weighting:
        found.append("use_weighting=True")
    if getattr(trainer, "aux_loss_enabled", False):
        found.append("the MoE router auxiliary loss (router_aux_loss_coef)")
    if getattr(trainer, "_is_vision_dataset", False):
        found.append("a vision dataset")
    unknown = [name for name in trainer.loss_types if name not in dpo_kernels.LOSS_TYPES]
    if unknown:
        found.append(f"loss_type={unknown}")
    else:
        try:
            TrlLossSettings.of(trainer).check()
        except ValueError as exc:
            found.append(f"these loss settings ({exc})")
    model = trainer.model
    if is_peft_model(model):
        config = model.peft_config.get(model.active_adapter) if hasattr(model, "peft_config") else None
        if getattr(config, "is_prompt_learning", False):
            found.append("prompt-learning PEFT (virtual tokens)")
    for name, candidate in (("the policy", model), ("the reference model", trainer.ref_model)):
        if candidate is None:
            continue
        try:
            hf.fused_head(candidate)
            _probe_head(trainer, candidate)
        except ValueError as exc:
            found.append(f"{name}'s output head ({exc})")
    return found


def _probe_head(trainer, model) -> None:
    """One 8-token forward both ways: an architecture whose logits are not `h @ W^T + b` falls back to TRL."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() or getattr(trainer, "is_fsdp_enabled", False):
        return  # sharded parameters cannot run a forward outside the engine here
    weight = hf.fused_head(model).weight
    ids = (torch.arange(8, device=weight.device) * 7919 % weight.shape[0]).unsqueeze(0)
    with trainer.accelerator.autocast():
        hf.check_output_head(model, ids)


def shared_prompt_problem(trainer) -> tuple[str, hf.SharedPromptUnsupported] | None:
    """Why no step of the trainer can share prompts, or None: which model ("the policy", "the reference model") and
    the error naming its class and what it lacks."""
    for name, model in (("the policy", trainer.model), ("the reference model", trainer.ref_model)):
        if model is None:
            continue
        try:
            hf.check_shared_prompt_support(model)
        except hf.SharedPromptUnsupported as exc:
            return name, exc
    return None
