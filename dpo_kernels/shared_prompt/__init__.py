"""Shared-prompt DPO: each pair's prompt runs through the model once, with every number unchanged.

`batch.py`     `build_shared_batch`: one row per pair `[prompt | chosen | rejected]` (or several pairs per row), the
               position ids, the attention rule and the attribution of every scored position to its sequence
`logprobs.py`  per-sequence log-probs through the attribution, from logits or (fused linear engine) hidden states

These are tensors only. The model side (the mask each attention implementation takes, the allow-list of
architectures, the backbone / logits forward on a shared batch) is `dpo_kernels.hf.shared_prompt`, whose names this
package hands on too:

    batch = build_shared_batch([(prompt_ids, chosen_ids, rejected_ids), ...], pad_id=tok.pad_token_id)
    hidden = shared_backbone_hidden_states(model, batch)
    weight, bias = dpo_kernels.hf.output_head(model)
    logps = sequence_logprobs_from_hidden(hidden, weight, batch, bias=bias)  # [2B]: chosen, then rejected
    loss = fused_linear_dpo(hidden, weight, batch.attribution, bias=bias, ...).loss  # or the DPO loss at once
"""
from dpo_kernels.hf.shared_prompt import (
    SUPPORTED_MODELS,
    SharedPromptUnsupported,
    check_shared_prompt_support,
    shared_attention_mask,
    shared_backbone_hidden_states,
    shared_logits,
)
from dpo_kernels.shared_prompt.batch import (
    SharedPromptBatch,
    build_shared_batch,
    pairs_from_examples,
    truncate_pair,
)
from dpo_kernels.shared_prompt.logprobs import (
    gather_scored_logits,
    sequence_logprobs_from_hidden,
    sequence_logprobs_from_logits,
)

__all__ = [
    "SUPPORTED_MODELS",
    "SharedPromptBatch",
    "SharedPromptUnsupported",
    "build_shared_batch",
    "check_shared_prompt_support",
    "gather_scored_logits",
    "pairs_from_examples",
    "sequence_logprobs_from_hidden",
    "sequence_logprobs_from_logits",
    "shared_attention_mask",
    "shared_backbone_hidden_states",
    "shared_logits",
    "truncate_pair",
]
