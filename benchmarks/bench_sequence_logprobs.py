"""Sequence log-probs from logits `[2B, T, V]` + DPO loss, fwd+bwd, per provider (`make bench`)."""
import pytest
from conftest import cases


@pytest.mark.parametrize("provider, size", cases("logits"))
def test_sequence_logprobs(dpo_step, provider, size):
    dpo_step("logits", provider, size)
