"""Providers of the DPO loss alone: per-sequence log-probs `[B]` -> loss -> their gradients (launch-bound)."""
import torch.nn.functional as F

from dpo_kernels.bench.peers import BY_PROVIDER
from dpo_kernels.bench.providers.common import BETA, Provider, compiled


def _eager_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    margin = BETA * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -F.logsigmoid(margin)
    # The metrics every trainer logs, so that no provider skips work the others do.
    chosen = BETA * (policy_chosen - ref_chosen).detach()
    rejected = BETA * (policy_rejected - ref_rejected).detach()
    return losses.mean(), (chosen > rejected).float().mean(), (chosen - rejected).mean()


def _args(inputs):
    return inputs.policy_chosen, inputs.policy_rejected, inputs.ref_chosen, inputs.ref_rejected


def build_dpo_kernels(inputs, **_):
    import dpo_kernels

    return lambda: dpo_kernels.dpo_loss(*_args(inputs), beta=BETA).loss


def build_eager(inputs, **_):
    return lambda: _eager_loss(*_args(inputs))[0]


def build_compile(inputs, compile_backend="inductor", **_):
    fn = compiled(_eager_loss, compile_backend)
    return lambda: fn(*_args(inputs))[0]


TRL, LIGER, CCE = BY_PROVIDER["trl"], BY_PROVIDER["liger"], BY_PROVIDER["cce"]
NATIVE, QUACK = BY_PROVIDER["torch_native"], BY_PROVIDER["quack"]
PROVIDERS = (
    Provider("dpo_kernels", "dpo_kernels.dpo_loss (one C++/CUDA launch)", build_dpo_kernels,
             requires=("dpo_kernels:dpo_loss",)),
    Provider("eager", "-logsigmoid(beta * margin).mean() + metrics, eager PyTorch", build_eager),
    Provider("torch_compile", "the eager loss under torch.compile", build_compile),
    Provider(TRL.provider, TRL.title, None,
             not_applicable=f"{TRL.title} computes the loss inline in DPOTrainer._compute_loss"),
    Provider(LIGER.provider, LIGER.title, None,
             not_applicable="Liger's DPO loss exists only fused with the linear layer (see the linear op)"),
    Provider(CCE.provider, CCE.title, None, not_applicable="CCE has no DPO loss"),
    Provider(NATIVE.provider, NATIVE.title, None, not_applicable="torch has no DPO loss"),
    Provider(QUACK.provider, QUACK.title, None, not_applicable="QuACK has no DPO loss"),
)
