"""Sequence log-probs from logits `[2B, T, V]` + DPO loss, fwd+bwd, per provider (`make bench`)."""
OP = "logits"


def test_sequence_logprobs(dpo_step, provider, size):
    dpo_step(OP, provider, size)
