"""Providers of the logits-path step: logits `[2B, T, V]` -> sequence log-probs -> DPO loss -> dlogits.

Labels follow the HuggingFace convention (position t scores `labels[:, t+1]`); every provider shifts by indexing.
"""
import torch

from dpo_kernels.bench.peers import BY_PROVIDER
from dpo_kernels.bench.providers.common import BETA, Provider, at_least_fp32, compiled, dpo_head, masked_token_sum


def _eager_loss(logits, labels):
    logits, labels = logits[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(at_least_fp32(logits), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return dpo_head(masked_token_sum(picked, labels))


def build_dpo_kernels(inputs, **_):
    import dpo_kernels

    def forward():
        seq = dpo_kernels.sequence_logprobs(inputs.logits, inputs.labels)
        return dpo_kernels.dpo_loss(seq[: seq.shape[0] // 2], seq[seq.shape[0] // 2 :], beta=BETA).loss

    return forward


def build_eager(inputs, **_):
    return lambda: _eager_loss(inputs.logits, inputs.labels)


def build_compile(inputs, compile_backend="inductor", **_):
    fn = compiled(_eager_loss, compile_backend)
    return lambda: fn(inputs.logits, inputs.labels)


def build_trl(inputs, **_):
    from trl.trainer.utils import selective_log_softmax

    def forward():
        labels = inputs.labels[:, 1:]
        picked = selective_log_softmax(inputs.logits[:, :-1], labels.clamp_min(0))
        return dpo_head(masked_token_sum(picked.float(), labels))

    return forward


def build_liger(inputs, **_):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss_fn = LigerCrossEntropyLoss(reduction="none")

    def forward():
        logits, labels = inputs.logits[:, :-1], inputs.labels[:, 1:]
        nll = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).view(labels.shape)
        return dpo_head(masked_token_sum(-nll.float(), labels))

    return forward


def build_quack(inputs, **_):
    from quack.cross_entropy import cross_entropy

    rows, positions, vocab = inputs.logits.shape

    def forward():
        # The position-aligned targets score the logits as they lie: no shifted, non-contiguous [*, V] slice.
        nll = cross_entropy(inputs.logits.view(rows * positions, vocab), inputs.targets.view(-1), reduction="none")
        return dpo_head(masked_token_sum(-nll.float().view(rows, positions), inputs.targets))

    return forward


TRL, LIGER, CCE = BY_PROVIDER["trl"], BY_PROVIDER["liger"], BY_PROVIDER["cce"]
NATIVE, QUACK = BY_PROVIDER["torch_native"], BY_PROVIDER["quack"]
PROVIDERS = (
    Provider("dpo_kernels", "dpo_kernels.sequence_logprobs + dpo_kernels.dpo_loss", build_dpo_kernels,
             requires=("dpo_kernels:sequence_logprobs", "dpo_kernels:dpo_loss")),
    Provider("eager", "log_softmax(logits.float()).gather, eager PyTorch", build_eager),
    Provider("torch_compile", "the eager step under torch.compile", build_compile),
    Provider(TRL.provider, f"{TRL.title} selective_log_softmax (its logits path)", build_trl, requires=("trl",),
             install_hint=TRL.install_hint),
    Provider(LIGER.provider, f"{LIGER.title} LigerCrossEntropyLoss(reduction='none')", build_liger,
             requires=("liger_kernel",), devices=("cuda",), install_hint=LIGER.install_hint),
    Provider(CCE.provider, CCE.title, None,
             not_applicable="CCE takes hidden states and the classifier, not logits"),
    Provider(NATIVE.provider, NATIVE.title, None,
             not_applicable="F.linear_cross_entropy takes hidden states and the classifier; from logits, torch's "
                            "own path is the eager row"),
    Provider(QUACK.provider, f"{QUACK.title} cross_entropy(reduction='none')", build_quack,
             requires=("quack.cross_entropy",), devices=("cuda",), install_hint=QUACK.install_hint),
)
