"""dpo_kernels: exact, fast and memory-lean Direct Preference Optimization.

Public API:
    sequence_logprobs, token_logprobs   per-sequence / per-token label log-probs from logits (Triton)
    dpo_loss                            the fused DPO loss, metrics and gradient in one op (C++/CUDA)
    group_dpo_loss                      the same for groups of K ranked responses per prompt (Plackett-Luce,
                                        all pairs, best vs worst)
    linear_sequence_logprobs            sequence log-probs from hidden states without materializing logits
    fused_linear_dpo                    the DPO loss from hidden states, gradients formed in the forward
    fused_linear_group_dpo              the same for groups of K ranked responses (`GroupDPOOutput`)
    fused_linear_dpo_by_prompt          pairwise DPO on pairs grouped by prompt, each distinct response once
    DPOLoss, FusedLinearDPOLoss         nn.Modules to drop into a training loop
    GroupDPOLoss, FusedLinearGroupLoss  the same for groups
    ParallelOptions                     the process groups of a sharded head (vocabulary / sequence parallel)
    LoraHead                            a LoRA adapter on the lm_head, run inside the fused linear engine
    reference                           plain-PyTorch references of all of the above
    last_run, paths                     which path the newest call took (backend, plan, fallbacks); strict mode
"""
from dpo_kernels import paths, reference
from dpo_kernels.fused_linear.by_prompt import fused_linear_dpo_by_prompt
from dpo_kernels.fused_linear.functional import fused_linear_dpo, linear_sequence_logprobs
from dpo_kernels.fused_linear.group import fused_linear_group_dpo
from dpo_kernels.fused_linear.lora import LoraHead
from dpo_kernels.fused_linear.parallel import ParallelOptions
from dpo_kernels.logprobs.from_logits import sequence_logprobs, token_logprobs
from dpo_kernels.loss_op.group import GroupDPOLossOutput, group_dpo_loss
from dpo_kernels.loss_op.group_spec import GROUP_LOSS_TYPES
from dpo_kernels.loss_op.op import LOSS_TYPES, DPOLossOutput, dpo_loss
from dpo_kernels.losses import DPOLoss, DPOOutput, FusedLinearDPOLoss, FusedLinearGroupLoss, GroupDPOLoss
from dpo_kernels.outputs import GroupDPOOutput
from dpo_kernels.paths import last_run

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "DPOOutput",
    "FusedLinearDPOLoss",
    "FusedLinearGroupLoss",
    "GroupDPOLoss",
    "GroupDPOOutput",
    "LoraHead",
    "ParallelOptions",
    "fused_linear_dpo",
    "fused_linear_dpo_by_prompt",
    "fused_linear_group_dpo",
    "last_run",
    "linear_sequence_logprobs",
    "LOSS_TYPES",
    "DPOLossOutput",
    "dpo_loss",
    "paths",
    "GROUP_LOSS_TYPES",
    "GroupDPOLossOutput",
    "group_dpo_loss",
    "reference",
    "sequence_logprobs",
    "token_logprobs",
]
