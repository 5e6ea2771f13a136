"""The learning comparison of `benchmarks/group_learning.py` at its demo size: plackett_luce on ranked lists of 4
reaches a held-out ranking accuracy of 0.75 in fewer optimizer steps than sigmoid DPO on the best-vs-worst pair of
the same lists (same model, seed, optimizer, learning rate, beta and batches; float64, so any CPU gives the same
steps)."""
import importlib.util
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.usefixtures("single_thread")

TARGET = 0.75


def load_script():
    path = REPO_ROOT / "benchmarks" / "group_learning.py"
    spec = importlib.util.spec_from_file_location("group_learning", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_ranked_lists_reach_the_target_in_fewer_steps_than_best_vs_worst():
    script = load_script()
    curves = script.compare()
    steps = script.Training().steps
    assert {name: len(curve) for name, curve in curves.items()} == {"lists": steps + 1, "best_vs_worst": steps + 1}
    assert curves["lists"][0] == curves["best_vs_worst"][0]  # the same model before training
    lists, best_vs_worst = (script.steps_to(curves[name], TARGET) for name in ("lists", "best_vs_worst"))
    table = "\n".join(script.table(curves, TARGET))
    assert lists is not None, table
    assert best_vs_worst is None or lists < best_vs_worst, table
