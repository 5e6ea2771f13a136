"""Shared-prompt DPO: each prompt runs through the model once for all of its responses, with every number unchanged.

`batch.py`     `build_shared_batch`: one row per pair `[prompt | chosen | rejected]` (or several pairs per row), the
               position ids, the attention rule and the attribution of every scored position to its sequence; the
               layout itself (`SharedBatch`), whatever the number of responses
`groups.py`    `build_group_batch`: one row per group `[prompt | response 1 | ... | response K]`, 2 <= K <= 16, and
               the same groups as unshared rows for models that cannot share (`unshared_group_rows`)
`logprobs.py`  per-sequence log-probs through the attribution, from logits or (fused linear engine) hidden states

These are tensors only. The model side (the mask each attention implementation takes, the allow-list of
architectures, the backbone / logits forward on a shared batch) is `dpo_kernels.hf.shared_prompt`, whose names this
package hands on too:

    batch = build_shared_batch([(prompt_ids, chosen_ids, rejected_ids), ...], pad_id=tok.pad_token_id)
    hidden = shared_backbone_hidden_states(model, batch)
    weight, bias = dpo_kernels.hf.output_head(model)
    logps = sequence_logprobs_from_hidden(hidden, weight, batch, bias=bias)  # [2B]: chosen, then rejected
    loss = fused_linear_dpo(hidden, weight, batch.attribution, bias=bias, ...).loss  # or the DPO loss at once

    groups = build_group_batch([(prompt_ids, [response_ids, ...]), ...], pad_id=tok.pad_token_id)
    logps = sequence_logprobs_from_hidden(shared_backbone_hidden_states(model, groups), weight, groups, bias=bias)
    # [R], group by group: groups.sizes splits it
"""
from dpo_kernels.hf import shared_prompt as model_side
from dpo_kernels.hf.shared_prompt import *  # noqa: F403  (its `__all__`, the one list of the model side's names)
from dpo_kernels.shared_prompt.batch import (
    SharedBatch,
    SharedPromptBatch,
    build_shared_batch,
    pairs_from_examples,
    truncate_pair,
)
from dpo_kernels.shared_prompt.groups import GroupBatch, build_group_batch, truncate_group, unshared_group_rows
from dpo_kernels.shared_prompt.logprobs import (
    gather_scored_logits,
    sequence_logprobs_from_hidden,
    sequence_logprobs_from_logits,
)

__all__ = [
    "GroupBatch",
    "SharedBatch",
    "SharedPromptBatch",
    "build_group_batch",
    "build_shared_batch",
    "gather_scored_logits",
    "pairs_from_examples",
    "sequence_logprobs_from_hidden",
    "sequence_logprobs_from_logits",
    "truncate_group",
    "truncate_pair",
    "unshared_group_rows",
    *model_side.__all__,
]
