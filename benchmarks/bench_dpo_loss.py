"""The DPO loss alone over per-sequence log-probs `[B]`, fwd+bwd, per provider (launch-bound)."""
import pytest
from conftest import cases


@pytest.mark.parametrize("provider, size", cases("loss"))
def test_dpo_loss(dpo_step, provider, size):
    dpo_step("loss", provider, size)
