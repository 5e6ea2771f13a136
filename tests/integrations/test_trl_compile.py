"""The TRL drop-in with `torch_compile=True`: accelerate compiles the policy, the fused head runs as its custom op
inside the compiled graph, and the step gives stock TRL's (uncompiled) loss, metrics and weights."""
import warnings

import pytest
import torch

from dpo_kernels.fused_linear import functional, ops
from tests.helpers import assert_same_trl_logs, trl_train_logs
from tests.integrations.requires_trl import FusedDPOTrainer, trl
from tests.integrations.test_trl import assert_same_weights, make_trainer, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def test_compiled_policy_matches_stock_trainer(tiny, monkeypatch):  # noqa: F811
    traced = []
    original = ops.traced_fused_linear_dpo

    def record(*args, **kwargs):
        traced.append(torch.compiler.is_compiling())
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "_traced_entry", record)  # the path `fused_linear_dpo` takes while traced
    torch._dynamo.reset()
    stock = make_trainer(trl.DPOTrainer, tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = make_trainer(FusedDPOTrainer, tiny, torch_compile=True, torch_compile_backend="aot_eager")
        fused_logs = trl_train_logs(fused)
    assert traced and all(traced), "the fused head did not run inside the compiled graph"
    assert_same_trl_logs(fused_logs[0], trl_train_logs(stock)[0])
    assert_same_weights(fused.model, stock.model, tiny["policy"])
