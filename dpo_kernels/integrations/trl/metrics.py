"""The metrics TRL 1.16's DPOTrainer logs, with its names and values, written into the trainer's own metric store
from the fused step's outputs and token sums (`integrations.token_metrics`)."""
from __future__ import annotations

import contextlib

import torch

from dpo_kernels.integrations.token_metrics import TokenSums

__all__ = ["fp32_sums", "log_metrics"]


@contextlib.contextmanager
def fp32_sums(hidden: torch.Tensor):
    """The region `token_sums` runs in: its GEMV and entropy sums accumulate in fp32 on the head's operands, which
    autocast would round to bf16."""
    with torch.autocast(hidden.device.type, enabled=False):
        yield


def log_metrics(trainer, mode: str, inputs: dict, policy_logps: torch.Tensor, out, sums: TokenSums) -> None:
    """Appends one step's metrics to `trainer._metrics[mode]`, gathered over processes as TRL gathers them.

    Args:
        mode: "train" or "eval".
        inputs: TRL's collated batch (its `attention_mask` counts the step's tokens).
        policy_logps: `[2B]` chosen rows first.
        out: the step's `DPOOutput` (or `DPOLossOutput`): its rewards.
        sums: the step's `TokenSums`.
    """
    accelerator = trainer.accelerator
    gather_sum = lambda x: accelerator.gather_for_metrics(x).sum()  # noqa: E731
    metrics = trainer._metrics[mode]
    if sums.entropy_sum is not None:
        total = gather_sum(sums.chosen_tokens + sums.rejected_tokens)
        entropy = gather_sum(sums.entropy_sum)
        metrics["entropy"].append((entropy / total).item() if total > 0 else 0.0)
    if mode == "train":
        tokens = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += tokens // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]
    chosen_tokens, rejected_tokens = gather_sum(sums.chosen_tokens).item(), gather_sum(sums.rejected_tokens).item()
    chosen_logits, rejected_logits = gather_sum(sums.chosen_logit_sum).item(), gather_sum(
        sums.rejected_logit_sum).item()
    metrics["logits/chosen"].append(chosen_logits / chosen_tokens if chosen_tokens > 0 else 0.0)
    metrics["logits/rejected"].append(rejected_logits / rejected_tokens if rejected_tokens > 0 else 0.0)
    if sums.chosen_top1 is not None:
        correct = gather_sum(sums.chosen_top1)
        metrics["mean_token_accuracy"].append((correct / chosen_tokens).item() if chosen_tokens > 0 else 0.0)
    chosen_rewards = accelerator.gather(out.chosen_rewards)
    rejected_rewards = accelerator.gather(out.rejected_rewards)
    metrics["rewards/chosen"].append(chosen_rewards.mean().item())
    metrics["rewards/rejected"].append(rejected_rewards.mean().item())
    metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
    metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
    chosen_logps, rejected_logps = policy_logps.detach().chunk(2, dim=0)
    metrics["logps/chosen"].append(accelerator.gather(chosen_logps).mean().item())
    metrics["logps/rejected"].append(accelerator.gather(rejected_logps).mean().item())
