"""`dpo-kernels train --compile`: the policy's forward and its fused DPO loss run under torch.compile, and the first
step's numbers match the float64 reference by the accuracy rule, as the eager run's do. The test compiles with the
"aot_eager" backend (inductor takes minutes for a model on a small CPU runner; tests/test_compile.py runs it on the
fused loss)."""
import torch

from dpo_kernels.trainer import forward as dpo_forward
from dpo_kernels.trainer import train
from tests.helpers import assert_within_rule
from tests.tiny_models import train_config


def test_compiled_policy_matches_the_float64_reference(tiny, tmp_path, monkeypatch):
    compiled = []
    original = dpo_forward.DPOForward.compile

    def record(self):
        compiled.append(self)
        return original(self, backend="aot_eager")

    monkeypatch.setattr(dpo_forward.DPOForward, "compile", record, raising=False)
    kw = dict(max_steps=1, loss_type="sigmoid")
    settings = {"compiled": {"compile": True, "precision": "fp32"},
                "truth": {"loss_backend": "reference", "precision": "fp64"},
                "baseline": {"loss_backend": "reference", "precision": "fp32"}}
    runs = {name: train(train_config(tiny, tmp_path / name, **kw, **extra)).history[0]
            for name, extra in settings.items()}
    assert len(compiled) == 1 and compiled[0].fused is not None
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
        got, truth, base = (torch.tensor(runs[n][key], dtype=torch.float64) for n in ("compiled", "truth", "baseline"))
        assert_within_rule(got, truth, base, atol=1e-5, name=f"compiled {key}")
