"""Sequence log-probs and the DPO loss from hidden states and the lm_head, never materializing `[N, V]` logits.

`functional` (autograd Functions and the public API; `group` its group DPO entry, with `units` saying how the
engine's units of completion, pairs or groups, map to sequences) -> `plan` (which tokens, which chunks, which mode) ->
`engine` (the chunk loops that execute a plan) -> `logsoftmax_pass` (the Triton pass over one `[C, V]` chunk) and
`fp32_gemm` (fp32-result GEMMs); `trace` records what the engine allocates and computes, `dry_run` runs it on
meta tensors for a plan, and `memory_model` and `cost_model` sum that trace; `lora` (`LoraHead`) runs a LoRA
adapter on the head inside the engine. Across processes, `parallel` (`ParallelOptions`) and `rank_check` (the
ranks' consistency check).
"""
from dpo_kernels.fused_linear import ops  # noqa: F401  (registers the path torch.compile traces)
from dpo_kernels.fused_linear.by_prompt import fused_linear_dpo_by_prompt
from dpo_kernels.fused_linear.functional import fused_linear_dpo, linear_sequence_logprobs
from dpo_kernels.fused_linear.group import fused_linear_group_dpo
from dpo_kernels.fused_linear.lora import LoraHead
from dpo_kernels.fused_linear.parallel import ParallelOptions

__all__ = [
    "LoraHead",
    "ParallelOptions",
    "fused_linear_dpo",
    "fused_linear_dpo_by_prompt",
    "fused_linear_group_dpo",
    "linear_sequence_logprobs",
]
