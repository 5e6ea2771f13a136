"""The fused DPO loss (temporary: backed by the PyTorch reference until the C++ op lands)."""
import torch

from dpo_kernels import reference
from dpo_kernels.ops._dpo_loss_api import LOSS_TYPES, DPOLossOutput, LossTraits, loss_traits

__all__ = ["LOSS_TYPES", "DPOLossOutput", "LossTraits", "dpo_loss", "dpo_loss_and_grads", "loss_traits"]


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
             **loss_params) -> DPOLossOutput:
    return reference.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **loss_params)


def dpo_loss_and_grads(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                       **kwargs):
    with torch.enable_grad():
        pc = policy_chosen_logps.detach().float().requires_grad_()
        pr = policy_rejected_logps.detach().float().requires_grad_()
        out = dpo_loss(pc, pr, ref_chosen_logps, ref_rejected_logps, **kwargs)
        gc, gr = torch.autograd.grad(out.loss, (pc, pr))
    return out._replace(loss=out.loss.detach()), gc, gr
