"""Providers of the fused-linear step: hidden `[2B, T, H]` and lm_head weight `[V, H]` -> sequence log-probs ->
DPO loss -> grad_hidden and grad_weight.

`inputs.labels` follow the HuggingFace convention (shift inside the op); `inputs.targets` are aligned with the
positions, for APIs that do not shift (TRL's chunked function, Liger, CCE, torch, QuACK). Both describe the same
scored tokens.
"""
import inspect

import torch

from dpo_kernels.bench.peers import BY_PROVIDER
from dpo_kernels.bench.providers.common import BETA, Provider, at_least_fp32, compiled, dpo_head, masked_token_sum
from dpo_kernels.constants import IGNORE_INDEX

# TRL 1.16's fused LM head uses this vocabulary chunk (trl/trainer/utils.py, _CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_VOCAB_CHUNK = 32768
# QuACK 0.6.5's default token chunk (quack/linear_cross_entropy.py, chunked_linear_cross_entropy).
QUACK_TOKEN_CHUNK = 4096


def _eager_loss(hidden, weight, targets):
    logits = at_least_fp32(hidden @ weight.t())
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return dpo_head(masked_token_sum(picked, targets))


def _build_fused(memory_budget):
    def build(inputs, **_):
        from dpo_kernels import FusedLinearDPOLoss

        loss_fn = FusedLinearDPOLoss(beta=BETA, memory_budget=memory_budget)
        return lambda: loss_fn(inputs.hidden, inputs.weight, inputs.labels).loss

    return build


def build_eager(inputs, **_):
    return lambda: _eager_loss(inputs.hidden, inputs.weight, inputs.targets)


def build_compile(inputs, compile_backend="inductor", **_):
    fn = compiled(_eager_loss, compile_backend)
    return lambda: fn(inputs.hidden, inputs.weight, inputs.targets)


def build_trl(inputs, **_):
    # What TRL 1.16's DPOTrainer runs on a Triton device: compact the scored positions, chunked online-LSE
    # log-probs, recompute in backward (trl/trainer/utils.py add_fused_lm_head).
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    mask = inputs.targets != IGNORE_INDEX

    def forward():
        token = ChunkedLogProbFunction.apply(
            inputs.hidden[mask], inputs.weight, None, inputs.targets[mask], 1.0, TRL_VOCAB_CHUNK, None, 1.0, ()
        )[0]
        return dpo_head(token.new_zeros(mask.shape).masked_scatter(mask, token).sum(-1))

    return forward


def build_liger(inputs, **_):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    wanted = dict(beta=BETA, use_ref_model=False, compute_nll_loss=False, average_log_prob=False)
    accepted = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    loss_fn = LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})

    def forward():
        out = loss_fn(inputs.weight, inputs.hidden, inputs.targets)
        return out[0] if isinstance(out, tuple) else out

    return forward


def build_cce(inputs, **_):
    from cut_cross_entropy import linear_cross_entropy

    def forward():
        nll = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.targets, reduction="none")
        return dpo_head(masked_token_sum(-nll.float(), inputs.targets))

    return forward


def build_torch_native(inputs, **_):
    # torch >= 2.13's own chunked head, as a user gets it: the default LinearCrossEntropyOptions() picks the chunk
    # size and precision policy per device and dtype, and reduction='none' recomputes its chunks in the backward.
    import torch.nn.functional as F
    from torch.nn import LinearCrossEntropyOptions

    options = LinearCrossEntropyOptions()
    rows, positions, hidden = inputs.hidden.shape

    def forward():
        nll = F.linear_cross_entropy(inputs.hidden.view(rows * positions, hidden), inputs.weight,
                                     inputs.targets.view(-1), reduction="none", ignore_index=IGNORE_INDEX,
                                     options=options)
        return dpo_head(masked_token_sum(-nll.float().view(rows, positions), inputs.targets))

    return forward


def build_quack(inputs, **_):
    # QuACK's chunked path reduces to one 'mean' or 'sum' over its tokens and has no per-token output, so each
    # sequence is one call with reduction='sum': its sum of token losses is minus the sequence log-prob.
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    def forward():
        nll = [chunked_linear_cross_entropy(inputs.hidden[row], inputs.weight, inputs.targets[row],
                                            chunk_size=QUACK_TOKEN_CHUNK, ignore_index=IGNORE_INDEX,
                                            reduction="sum")
               for row in range(inputs.hidden.shape[0])]
        return dpo_head(-torch.stack(nll).float())

    return forward


TRL, LIGER, CCE = BY_PROVIDER["trl"], BY_PROVIDER["liger"], BY_PROVIDER["cce"]
NATIVE, QUACK = BY_PROVIDER["torch_native"], BY_PROVIDER["quack"]
PROVIDERS = (
    Provider("dpo_kernels", "dpo_kernels.FusedLinearDPOLoss (default memory budget)", _build_fused(None),
             requires=("dpo_kernels:FusedLinearDPOLoss",)),
    Provider("dpo_kernels_low", "dpo_kernels.FusedLinearDPOLoss(memory_budget='low'), recompute mode",
             _build_fused("low"), requires=("dpo_kernels:FusedLinearDPOLoss",)),
    Provider("eager", "(hidden @ W.T).float() -> log_softmax -> gather, eager PyTorch", build_eager),
    Provider("torch_compile", "the eager step under torch.compile", build_compile),
    Provider(TRL.provider, f"{TRL.title} ChunkedLogProbFunction (DPOTrainer's fused LM head)", build_trl,
             requires=("trl.kernels.chunked_logprob",), install_hint=TRL.install_hint),
    Provider(LIGER.provider, f"{LIGER.title} LigerFusedLinearDPOLoss", build_liger, requires=("liger_kernel",),
             devices=("cuda",), install_hint=LIGER.install_hint),
    Provider(CCE.provider, f"{CCE.title} linear_cross_entropy(reduction='none')", build_cce,
             requires=("cut_cross_entropy",), devices=("cuda",), install_hint=CCE.install_hint),
    Provider(NATIVE.provider, f"{NATIVE.title} F.linear_cross_entropy(reduction='none', "
             "options=LinearCrossEntropyOptions())", build_torch_native,
             requires=("torch.nn.functional:linear_cross_entropy", "torch.nn:LinearCrossEntropyOptions"),
             install_hint=NATIVE.install_hint),
    Provider(QUACK.provider, f"{QUACK.title} chunked_linear_cross_entropy(reduction='sum'), one call per sequence",
             build_quack, requires=("quack.linear_cross_entropy",), devices=("cuda",),
             install_hint=QUACK.install_hint),
)
