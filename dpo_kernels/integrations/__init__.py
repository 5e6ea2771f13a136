"""Glue to the frameworks people already train with.

`dpo_kernels.integrations.trl`  `FusedDPOTrainer` / `patch_dpo_trainer` for TRL's DPOTrainer (needs `.[trl]`)
`packing.py`, `token_metrics.py` padding-free rows and the per-token metrics TRL logs
`dpo_kernels.integrations.hf`   the names of `dpo_kernels.hf` (model access) at the path user code imports

The TRL package is not imported here, so `import dpo_kernels.integrations` works without TRL installed.
"""
from dpo_kernels.hf import (
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
