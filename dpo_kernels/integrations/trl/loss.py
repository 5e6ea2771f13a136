"""TRL's loss settings as dpo_kernels reads them, and the loss of a step computed the way TRL 1.16 computes it.

A TRL release that renames a loss setting, or changes which lengths a loss divides by, changes this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import dpo_kernels
from dpo_kernels.loss_op.loss_types import LOSSES
from dpo_kernels.loss_op.spec import check_loss_settings

__all__ = ["TrlLossSettings"]


@dataclass(frozen=True)
class TrlLossSettings:
    """The loss settings a `trl.DPOTrainer` holds, for `dpo_kernels.dpo_loss` (every name in `LOSSES`)."""

    loss_types: list[str]
    loss_weights: list[float]
    beta: float
    label_smoothing: list[float]  # per loss type: TRL's label_smoothing where TRL reads it, else 0
    tau: float  # discopop_tau

    @classmethod
    def of(cls, trainer) -> TrlLossSettings:
        """The trainer's settings as they are now (read at every step, as TRL reads them)."""
        types = list(trainer.loss_types)
        smoothing = [trainer.label_smoothing if LOSSES[name].trl_smoothed else 0.0 for name in types]
        return cls(types, list(trainer.loss_weights), trainer.beta, smoothing, trainer.args.discopop_tau)

    @property
    def params(self) -> dict:
        return {"loss_weights": self.loss_weights, "tau": self.tau}

    def check(self) -> None:
        """Raises ValueError for settings the loss op refuses."""
        check_loss_settings(self.loss_types, beta=self.beta, label_smoothing=self.label_smoothing,
                            loss_params=self.params)

    def fused_loss(self, completion_mask: torch.Tensor, *, memory_budget, token_stats: bool):
        """The fast path (gradients formed in the forward, 6NHV) when its lengths are TRL's, else None.

        `FusedLinearDPOLoss` hands length-normalized losses the number of scored tokens, which is TRL's
        `completion_mask.sum()` unless a completion starts at position 0 (its first token is never scored).
        """
        if any(LOSSES[n].trl_unshifted_lengths for n in self.loss_types) and completion_mask[:, 0].any():
            return None
        return dpo_kernels.FusedLinearDPOLoss(
            beta=self.beta, loss_type=self.loss_types, label_smoothing=self.label_smoothing,
            memory_budget=memory_budget, token_stats=token_stats, **self.params,
        )

    def loss(self, policy_logps, ref_chosen, ref_rejected, completion_mask):
        """`dpo_kernels.dpo_loss` of `policy_logps [2B]` (chosen rows first) with TRL's lengths; `[B]` references."""
        chosen, rejected = policy_logps.chunk(2, dim=0)
        lengths = _lengths(self.loss_types, completion_mask)
        if lengths is not None:
            lc, lr = lengths.chunk(2, dim=0)
            return dpo_kernels.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                        loss_type=self.loss_types, label_smoothing=self.label_smoothing,
                                        chosen_lengths=lc, rejected_lengths=lr, **self.params)
        total = None
        unshifted, shifted = completion_mask.sum(dim=1).float(), completion_mask[:, 1:].sum(dim=1).float()
        for name, weight, eps in zip(self.loss_types, self.loss_weights, self.label_smoothing, strict=True):
            lc, lr = (shifted if name == "sft" else unshifted).chunk(2, dim=0)
            out = dpo_kernels.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=name,
                                       label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr, tau=self.tau)
            total = out._replace(loss=out.loss * weight) if total is None else total._replace(
                loss=total.loss + out.loss * weight)
        return total


def _lengths(loss_types: list[str], completion_mask: torch.Tensor):
    # TRL divides ipo / sigmoid_norm by completion_mask.sum() (unshifted) but averages sft over the shifted
    # mask; the two differ only when a completion starts at position 0. One dpo_loss call takes one length, so
    # such batches compute each loss type with its own length (None here).
    unshifted = completion_mask.sum(dim=1).float()
    shifted = completion_mask[:, 1:].sum(dim=1).float()
    names = set(loss_types)
    unshifted_loss = any(LOSSES[n].trl_unshifted_lengths for n in names)
    if "sft" in names and unshifted_loss and not torch.equal(unshifted, shifted):
        return None
    return shifted if "sft" in names else unshifted
