"""Model access: what the fused kernels need from a HuggingFace causal LM, for every feature above.

`unwrap.py`        the HF model inside DDP / `torch.compile` / PEFT wrappers
`head.py`          the lm_head as `(weight [V, H], bias)`, with constant logit multipliers folded in, and its PEFT
                   LoRA adapter (`fused_head`)
`backbone.py`      the backbone's last hidden states (no `[*, V]` logits), and a check that the split is exact
`logprobs.py`      per-sequence log-probs of a model (policy, or reference under no_grad) through the fused engine
`head_forward.py`  a forward mode that runs the fused head inside `model.forward`, under the trainer's wrappers
`shared_prompt.py` the shared-prompt layout on a model: the architecture allow-list, the 4D / FlexAttention masks,
                   the backbone and logits of a shared batch

This package is a floor below the features that run models (`shared_prompt`, `integrations`, `trainer`, `bench`):
it imports the kernels (`fused_linear`) and nothing of those features (docs/design.md, "Layout").
"""
from dpo_kernels.hf import shared_prompt
from dpo_kernels.hf.backbone import backbone_hidden_states, check_output_head
from dpo_kernels.hf.head import FusedHead, fused_head, logit_multiplier, output_head
from dpo_kernels.hf.logprobs import packed_position_ids, sequence_logprobs
from dpo_kernels.hf.shared_prompt import *  # noqa: F403  (its `__all__`, the one list of the model side's names)
from dpo_kernels.hf.unwrap import unwrap_model

__all__ = [
    "FusedHead",
    "backbone_hidden_states",
    "check_output_head",
    "fused_head",
    "logit_multiplier",
    "output_head",
    "packed_position_ids",
    "sequence_logprobs",
    "unwrap_model",
    *shared_prompt.__all__,
]
