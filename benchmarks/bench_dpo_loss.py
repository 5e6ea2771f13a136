"""The DPO loss alone over per-sequence log-probs `[B]`, fwd+bwd, per provider (launch-bound)."""
OP = "loss"


def test_dpo_loss(dpo_step, provider, size):
    dpo_step(OP, provider, size)
