"""The fused DPO loss: one C++/CUDA op (`torch.ops.dpo_kernels.dpo_loss_forward`) computes the batch-mean loss, the
per-pair losses, the rewards, the reward accuracy and margin, and the per-sequence coefficients dloss/dlogp in one
pass; the backward (`torch.ops.dpo_kernels.dpo_loss_backward`, one launch) only scales those coefficients by the
upstream gradient. The autograd formula is registered in C++ (csrc/dpo_loss_autograd.cpp), so a step runs no Python
between the forward and the backward: at training batch sizes the op is bound by host overhead, not by the device.

The per-loss math lives in csrc/dpo_loss_math.h, shared by the CPU and CUDA kernels; its header comment states every
loss's formula and paper. `dpo_kernels.reference.dpo_loss` is the plain-PyTorch oracle with the same signature.
"""
import torch

from dpo_kernels.loss_op.spec import (
    LOSS_TYPES,
    DPOLossOutput,
    LossTraits,
    check_average,
    loss_traits,
    op_constants,
    validate_tensors,
)

__all__ = ["LOSS_TYPES", "DPOLossOutput", "LossTraits", "dpo_loss", "dpo_loss_and_grads", "loss_traits"]

try:
    from dpo_kernels import _C  # noqa: F401  (importing it registers torch.ops.dpo_kernels.*)
except ImportError as error:
    # Fail at import, not at the first training step: every path of the package ends in this op.
    raise ImportError(
        "dpo_kernels._C (the compiled DPO loss op) is not built or failed to load "
        f"({error}). Build it with `make install` or `pip install --no-build-isolation -e .` "
        "(in a checkout: `python setup.py build_ext --inplace`)."
    ) from error


_FORWARD_NAME = "dpo_kernels::dpo_loss_forward"
_BACKWARD_NAME = "dpo_kernels::dpo_loss_backward"
_has_cuda_kernel = None
_forward_op = torch.ops.dpo_kernels.dpo_loss_forward.default


# The autograd formula is registered in C++ (csrc/dpo_loss_autograd.cpp), so that a training step runs no
# Python between the op's forward and backward; torch.compile needs only the fake (shape) functions here.
@torch.library.register_fake(_FORWARD_NAME)
def _dpo_loss_forward_fake(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                           rejected_lengths, loss_types, params, average=False):
    scalar = policy_chosen.new_empty(())
    vector = torch.empty_like(policy_chosen, memory_format=torch.contiguous_format)
    return (scalar, vector, vector.clone(), vector.clone(), scalar.clone(), scalar.clone(), vector.clone(),
            vector.clone())


@torch.library.register_fake(_BACKWARD_NAME)
def _dpo_loss_backward_fake(grad_loss, grad_chosen, grad_rejected):
    return (torch.empty_like(grad_chosen, memory_format=torch.contiguous_format),
            torch.empty_like(grad_rejected, memory_format=torch.contiguous_format))


def _require_cuda_kernel():
    global _has_cuda_kernel
    if _has_cuda_kernel is None:
        _has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_NAME, "CUDA")
    if not _has_cuda_kernel:
        raise RuntimeError(
            "dpo_kernels._C was built without CUDA (torch had no CUDA or nvcc was not found at build time); "
            "rebuild on the GPU machine with `pip install --no-build-isolation --no-deps -e .`"
        )


def _call_op(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing,
             chosen_lengths, rejected_lengths, average, **loss_params):
    # Every check runs before the launch; the hyper-parameters' part is cached (a training loop repeats them).
    average = check_average(average)
    dtype = validate_tensors(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                             rejected_lengths)
    const = op_constants(loss_type, beta, label_smoothing, chosen_lengths is not None, rejected_lengths is not None,
                         loss_params)
    if policy_chosen.is_cuda:
        _require_cuda_kernel()
    # Casts only where needed (each is a launch); lengths reach the op only when a term reads them (trainers pass
    # them always).
    if policy_chosen.dtype != dtype:
        policy_chosen = policy_chosen.to(dtype)
    if policy_rejected.dtype != dtype:
        policy_rejected = policy_rejected.to(dtype)
    if ref_chosen is not None and ref_chosen.dtype != dtype:
        ref_chosen = ref_chosen.to(dtype)
    if ref_rejected is not None and ref_rejected.dtype != dtype:
        ref_rejected = ref_rejected.to(dtype)
    chosen_lengths = chosen_lengths.to(dtype) if const.reads_chosen_lengths else None
    rejected_lengths = rejected_lengths.to(dtype) if const.reads_rejected_lengths else None
    return _forward_op(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
                       *const.op_args, average)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    average: bool = False,
    **loss_params,
) -> DPOLossOutput:
    r"""Direct Preference Optimization loss and metrics in one fused op (C++ on CPU, one CUDA launch on GPU).

    Args:
        policy_chosen_logps, policy_rejected_logps: `[B]` float16/bfloat16/float32/float64, differentiable:
            the policy's summed log-probs of each pair's chosen and rejected response.
        ref_chosen_logps, ref_rejected_logps: `[B]` float, or both None (reference-free: taken as 0). Constants:
            no gradient flows into them.
        beta: > 0, the KL coefficient (IPO's tau, SimPO's beta).
        loss_type: one name from `LOSS_TYPES`, or a list of names combined as `sum_k loss_weights[k] * mean(loss_k)`
            (TRL's `DPOConfig.loss_type` list).
        label_smoothing: a float, or one per loss type; read by sigmoid, robust, exo_pair, aot, aot_unpaired and
            simpo, ignored by the others (as TRL ignores it).
        chosen_lengths, rejected_lengths: `[B]` integer or float counts of response tokens, needed by ipo,
            sigmoid_norm and simpo (both) and sft (chosen); clamped to >= 1 where they divide, as in TRL (sft
            divides by the batch's total, clamped likewise).
        average: the log-probs are per-token means (`sequence_logprobs(..., average=True)`), not sums: the sft term
            weighs each by its chosen length, so that it stays the mean NLL of the batch's chosen tokens; ipo,
            sigmoid_norm and simpo do not divide by the lengths again (the means are length-normalized already).
            The other terms read the log-probs as given.
        loss_params: `loss_weights` (one float per loss type, default 1), `gamma` (simpo margin, >= 0, default 0.5),
            `tau` (discopop temperature, > 0, default 0.05), `dpop_lambda` (dpop, >= 0, default 50).
    Returns:
        `DPOLossOutput(loss [], chosen_rewards [B], rejected_rewards [B], reward_accuracy [], reward_margin [],
        losses [B])` in float32 (float64 if any log-prob input is float64). Only `loss` has a gradient.

    The formula and paper of each loss type, and where this package departs from TRL 1.16, are stated once, in the
    header comment of csrc/dpo_loss_math.h, beside the code that computes them; `loss_type_help()` of
    `dpo_kernels.loss_op.loss_types` lists the loss types with their hyper-parameters and ranges.
    Rewards are `beta * (policy - ref)` for every loss type, and accuracy counts `chosen_rewards > rejected_rewards`,
    as TRL logs them.
    """
    out = _call_op(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                   loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                   rejected_lengths=rejected_lengths, average=average, **loss_params)
    # The op marks every output but `loss` non-differentiable (csrc/dpo_loss_autograd.cpp): no detach needed.
    loss, losses, chosen_rewards, rejected_rewards, accuracy, margin = out[:6]
    return DPOLossOutput(loss, chosen_rewards, rejected_rewards, accuracy, margin, losses)


def dpo_loss_and_grads(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                       **settings):
    """`dpo_loss` without autograd, plus dloss/dlogp for an upstream gradient of 1.

    Same arguments as `dpo_loss`: `settings` are its keyword arguments, with its defaults. Returns
    `(DPOLossOutput, grad_chosen [B], grad_rejected [B])`, all detached; the grads are float32 (float64 for float64
    inputs). For the fused linear engine, which forms its own backward.
    """
    detach = (lambda t: t.detach() if isinstance(t, torch.Tensor) else t)
    out = _call_op(detach(policy_chosen_logps), detach(policy_rejected_logps), detach(ref_chosen_logps),
                   detach(ref_rejected_logps), **{**dpo_loss.__kwdefaults__, **settings})
    loss, losses, chosen_rewards, rejected_rewards, accuracy, margin, grad_chosen, grad_rejected = out
    return DPOLossOutput(loss, chosen_rewards, rejected_rewards, accuracy, margin, losses), grad_chosen, grad_rejected
