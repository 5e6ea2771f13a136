"""Fused linear DPO from hidden states `[2B, T, H]` and the lm_head `[V, H]`, fwd+bwd, per provider."""
OP = "linear"


def test_fused_linear_dpo(dpo_step, provider, size):
    dpo_step(OP, provider, size)
