"""Label log-probs from materialized logits: fused Triton kernels and their PyTorch twin (`from_logits`)."""
from dpo_kernels.logprobs.from_logits import sequence_logprobs, token_logprobs

__all__ = ["sequence_logprobs", "token_logprobs"]
