"""`dpo_kernels.hf` (model access: backbone hidden states, the lm_head, fused sequence log-probs) at the import path
user code already uses."""
from dpo_kernels import hf
from dpo_kernels.hf import *  # noqa: F403  (its `__all__`, the one list of its names)

__all__ = hf.__all__
