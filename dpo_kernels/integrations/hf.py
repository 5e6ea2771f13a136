"""`dpo_kernels.hf` (model access: backbone hidden states, the lm_head, fused sequence log-probs) at the import path
user code already uses."""
from dpo_kernels.hf.backbone import backbone_hidden_states, check_output_head
from dpo_kernels.hf.head import fused_head, logit_multiplier, output_head
from dpo_kernels.hf.logprobs import packed_position_ids, sequence_logprobs
from dpo_kernels.hf.unwrap import unwrap_model

__all__ = [
    "backbone_hidden_states",
    "check_output_head",
    "fused_head",
    "logit_multiplier",
    "output_head",
    "packed_position_ids",
    "sequence_logprobs",
    "unwrap_model",
]
