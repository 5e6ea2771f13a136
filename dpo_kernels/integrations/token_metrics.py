"""The per-token statistics TRL logs besides the loss: mean logit, entropy and top-1 accuracy, without `[N, V]`.

`logits/chosen` and `logits/rejected` are means over valid tokens and the vocabulary of `h @ W^T + b`, which is
`(h @ W.sum(0) + b.sum()) / V`: one GEMV, no logits (a LoRA head adds `s (h @ A^T) @ B.sum(0) / V`). Entropy and
whether the label is the argmax need every logit: the fused engine returns them from the pass that already reads
every logit (`token_stats=True`, `with_engine_stats`). Only where the fused loss is not used does
`token_sums(full=True)` take one extra no-grad pass over the valid tokens in chunks (2·N·H·V FLOPs, a third of a
training step's head work).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from dpo_kernels.constants import IGNORE_INDEX

# Elements of one fp32 [chunk, V] block of logits (256 MiB); a few such temporaries live at once.
_CHUNK_ELEMENTS = 1 << 26


class TokenSums(NamedTuple):
    """Sums over the valid tokens of the batch (0-d float32 tensors), split by chosen / rejected rows."""

    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_logit_sum: torch.Tensor
    rejected_logit_sum: torch.Tensor
    entropy_sum: torch.Tensor | None  # over chosen and rejected tokens
    chosen_top1: torch.Tensor | None  # chosen tokens whose label is the (first) argmax


@torch.no_grad()
def token_sums(hidden, weight, bias, next_labels, row, num_chosen_rows: int, *, full: bool, ignore_index=IGNORE_INDEX,
               lora=None):
    """Args:
        hidden: `[N, H]` the head's inputs (any position layout), detached inside.
        weight: `[V, H]`, bias: `[V]` or None; lora: the head's `LoraHead`, or None.
        next_labels: `[N]` the label each position predicts (`ignore_index` where none).
        row: `[N]` the row of each position; rows `< num_chosen_rows` are chosen responses.
        full: also compute entropy and top-1 (the extra chunked pass).
    """
    valid = next_labels != ignore_index
    h = hidden.detach()[valid]
    labels = next_labels[valid]
    chosen = row[valid] < num_chosen_rows
    vocab = weight.shape[0]
    # Accumulate in fp32 without an fp32 copy of the head: at Llama-3 8B's [128256, 4096] that copy is 2 GiB.
    w_mean = weight.detach().sum(0, dtype=torch.float32) / vocab
    b_mean = bias.detach().sum(dtype=torch.float32) / vocab if bias is not None else 0.0
    mean_logit = h.float() @ w_mean + b_mean
    if lora is not None:
        b_rows_mean = lora.b.detach().sum(0, dtype=torch.float32) / vocab
        mean_logit += (h.float() @ lora.a.detach().float().t()) @ b_rows_mean * float(lora.scaling)
    zero = mean_logit.new_zeros(())
    entropy_sum = chosen_top1 = None
    if full:
        entropy_sum, chosen_top1 = zero.clone(), zero.clone()
        step = max(1, _CHUNK_ELEMENTS // vocab)
        for start in range(0, h.shape[0], step):
            z = torch.nn.functional.linear(h[start:start + step], weight.detach(), bias)
            if lora is not None:
                z = z + lora.delta_logits(h[start:start + step])
            z = z.float()
            lse = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse.unsqueeze(-1))
            entropy_sum += (lse - (p * z).sum(-1)).sum()
            # argmax returns the first maximum, so a tie with an earlier token is not a top-1 hit (as in TRL).
            hit = z.argmax(-1) == labels[start:start + step]
            chosen_top1 += (hit & chosen[start:start + step]).sum()
    return TokenSums(
        chosen_tokens=chosen.sum().float(),
        rejected_tokens=(~chosen).sum().float(),
        chosen_logit_sum=torch.where(chosen, mean_logit, zero).sum(),
        rejected_logit_sum=torch.where(chosen, zero, mean_logit).sum(),
        entropy_sum=entropy_sum,
        chosen_top1=chosen_top1,
    )


def with_engine_stats(sums: TokenSums, out) -> TokenSums:
    """`sums` with the entropy and top-1 sums taken from a `DPOOutput` computed with `token_stats=True`.

    Built by the constructor, not `sums._replace`, which torch 2.11's dynamo returns empty inside the compiled
    model's forward this runs in (docs/design.md, "Where code runs", Compilation).
    """
    return TokenSums(
        chosen_tokens=sums.chosen_tokens,
        rejected_tokens=sums.rejected_tokens,
        chosen_logit_sum=sums.chosen_logit_sum,
        rejected_logit_sum=sums.rejected_logit_sum,
        entropy_sum=(out.chosen_entropy_sum.sum() + out.rejected_entropy_sum.sum()).float(),
        chosen_top1=out.chosen_top1_count.sum().float(),
    )
