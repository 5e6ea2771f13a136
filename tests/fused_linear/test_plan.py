"""The fused linear engine's plan (`dpo_kernels.fused_linear.plan`), tested without running the engine."""
import pytest

from dpo_kernels.fused_linear.plan import parse_memory_budget


@pytest.mark.parametrize("value, parsed", [(None, None), ("low", "low"), (4e6, 4_000_000), (1, 1), (2 << 30, 2 << 30)])
def test_memory_budget_parses(value, parsed):
    assert parse_memory_budget(value) == parsed


@pytest.mark.parametrize("value", [0, -1, 0.5, True, "high", "LOW", float("nan"), float("inf"), [1]])
def test_memory_budget_rejects(value):
    with pytest.raises(ValueError, match="memory_budget must be None, 'low' or a positive number of bytes"):
        parse_memory_budget(value)
