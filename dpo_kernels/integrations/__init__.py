"""Glue to the frameworks people already train with.

`dpo_kernels.integrations.hf`   split an HF causal LM into backbone hidden states + lm_head; fused sequence log-probs
`dpo_kernels.integrations.trl`  `FusedDPOTrainer` / `patch_dpo_trainer` for TRL's DPOTrainer (needs `.[trl]`)

The TRL module is not imported here, so `import dpo_kernels.integrations` works without TRL installed.
"""
from dpo_kernels.integrations.hf import (
    backbone_hidden_states,
    check_output_head,
    logit_multiplier,
    output_head,
    sequence_logprobs,
    unwrap_model,
)

__all__ = [
    "backbone_hidden_states",
    "check_output_head",
    "logit_multiplier",
    "output_head",
    "sequence_logprobs",
    "unwrap_model",
]
