"""The one place the integrations reach the fused linear engine (helper C's `linear_sequence_logprobs`)."""
from __future__ import annotations

import torch


def linear_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, shift=True, average=False,
                    cu_seqlens=None) -> torch.Tensor:
    """`dpo_kernels.linear_sequence_logprobs` with the same arguments; see it for shapes."""
    import dpo_kernels

    engine = getattr(dpo_kernels, "linear_sequence_logprobs", None)
    if engine is not None:
        return engine(hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift, average=average,
                      cu_seqlens=cu_seqlens)
    return _materialized_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift,
                                  average=average, cu_seqlens=cu_seqlens)


def _materialized_logprobs(hidden, weight, labels, *, bias, ignore_index, shift, average, cu_seqlens):
    # Stand-in until the fused engine is exported: same result, with [*, V] logits.
    from dpo_kernels import reference

    if cu_seqlens is None:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return reference.sequence_logprobs(logits, labels, ignore_index=ignore_index, shift=shift,
                                           average=average).float()
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        logits = torch.nn.functional.linear(hidden[start:end], weight, bias).unsqueeze(0)
        out.append(reference.sequence_logprobs(logits, labels[start:end].unsqueeze(0), ignore_index=ignore_index,
                                               shift=shift, average=average))
    return torch.cat(out).float()
