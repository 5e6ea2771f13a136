"""Bad input to the fused linear API: a ValueError naming the problem before any projection runs."""
import pytest
import torch

import dpo_kernels
from dpo_kernels.fused_linear import engine
from tests.helpers import make_batch

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, H, V = 2, 7, 24, 1000


@pytest.fixture
def batch():
    hidden, weight, bias, labels, lengths, ref_c, ref_r = make_batch(B, T, H, V, seed=31)
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, lengths=lengths, ref_c=ref_c, ref_r=ref_r)


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    """Any engine loop reached by a bad input fails the test: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the engine ran before the input was rejected")

    for name in ("forward_logps", "fused_dpo", "recompute_grads"):
        monkeypatch.setattr(engine, name, refuse)


def _packed(b):
    h = b["hidden"].reshape(-1, H)
    labels = b["labels"].reshape(-1)
    cu = torch.arange(0, 2 * B * T + 1, T, dtype=torch.int32)
    return h, labels, cu


def _call(b, **overrides):
    args = dict(hidden=b["hidden"], weight=b["weight"], labels=b["labels"], bias=b["bias"])
    args.update(overrides)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    return dpo_kernels.fused_linear_dpo(hidden, weight, labels, **args)


CASES = {
    "hidden size differs from weight": (lambda b: dict(weight=b["weight"][:, :20]), "hidden size"),
    "weight not 2-D": (lambda b: dict(weight=b["weight"][None]), "weight must have 2 dimensions"),
    "odd row count": (lambda b: dict(hidden=b["hidden"][:3], labels=b["labels"][:3]), "even"),
    "labels shape": (lambda b: dict(labels=b["labels"][:, :-1]), "labels shape"),
    "label above vocab": (lambda b: dict(labels=b["labels"].index_fill(1, torch.tensor([5]), V)), "outside"),
    "negative label": (lambda b: dict(labels=b["labels"].index_fill(1, torch.tensor([5]), -3)), "outside"),
    "float labels": (lambda b: dict(labels=b["labels"].float()), "integer"),
    "dtype mismatch": (lambda b: dict(weight=b["weight"].half()), "dtype"),
    "float64 hidden": (lambda b: dict(hidden=b["hidden"].double(), weight=b["weight"].double(),
                                      bias=b["bias"].double()), "hidden must be one of"),
    "bias shape": (lambda b: dict(bias=b["bias"][:-1]), r"bias must be \[V\]"),
    "bias dtype": (lambda b: dict(bias=b["bias"].half()), r"bias must be \[V\]"),
    "device mismatch": (lambda b: dict(bias=b["bias"].to("meta")), "same device"),
    "chosen ref without rejected": (lambda b: dict(ref_chosen_logps=b["ref_c"]), "both"),
    "rejected ref without chosen": (lambda b: dict(ref_rejected_logps=b["ref_r"]), "both"),
    "ref logps wrong shape": (lambda b: dict(ref_chosen_logps=b["ref_c"][:1], ref_rejected_logps=b["ref_r"][:1]),
                              "shape"),
    "integer ref logps": (lambda b: dict(ref_chosen_logps=b["ref_c"].long(), ref_rejected_logps=b["ref_r"].long()),
                          "ref_chosen_logps must be float16, bfloat16, float32 or float64"),
    "ref logps and ref hidden": (lambda b: dict(ref_chosen_logps=b["ref_c"], ref_rejected_logps=b["ref_r"],
                                                ref_hidden=b["hidden"]), "not both"),
    "ref weight without ref hidden": (lambda b: dict(ref_weight=b["weight"]), "without ref_hidden"),
    "ref hidden shape": (lambda b: dict(ref_hidden=b["hidden"][:, :-1]), "ref_hidden"),
    "ref weight size": (lambda b: dict(ref_hidden=b["hidden"], ref_weight=b["weight"][:, :20]), "hidden size"),
    "unknown loss type": (lambda b: dict(loss_type="nope"), "loss_type"),
    "bad hyper-parameter": (lambda b: dict(loss_type="robust", label_smoothing=0.7), "robust"),
    "bad memory budget": (lambda b: dict(memory_budget=-5), "memory_budget"),
    "memory budget string": (lambda b: dict(memory_budget="lots"), "memory_budget"),
    "packed hidden without cu_seqlens": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1]),
                                         "hidden must have 3 dimensions"),
    "cu_seqlens not increasing": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1],
                                                 cu_seqlens=torch.tensor([0, 7, 5, 21, 28])), "non-decreasing"),
    "cu_seqlens not ending at N": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1],
                                                  cu_seqlens=torch.tensor([0, 7, 14, 21, 27])), "end at"),
    "cu_seqlens not starting at 0": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1],
                                                    cu_seqlens=torch.tensor([1, 7, 14, 21, 28])), "start at 0"),
    "cu_seqlens float": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1],
                                        cu_seqlens=torch.tensor([0.0, 7, 14, 21, 28])), "integer"),
    "cu_seqlens odd sequence count": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1],
                                                     cu_seqlens=torch.tensor([0, 7, 14, 28])), "even"),
    "packed labels length": (lambda b: dict(hidden=_packed(b)[0], labels=_packed(b)[1][:-1],
                                            cu_seqlens=_packed(b)[2]), "tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_value_error(batch, case):
    make, match = CASES[case]
    with pytest.raises(ValueError, match=match):
        _call(batch, **make(batch))


def test_module_and_primitive_validate_too(batch):
    with pytest.raises(ValueError, match="hidden size"):
        dpo_kernels.FusedLinearDPOLoss()(batch["hidden"], batch["weight"][:, :3], batch["labels"])
    with pytest.raises(ValueError, match="outside"):
        dpo_kernels.linear_sequence_logprobs(batch["hidden"], batch["weight"], batch["labels"] + V)
    with pytest.raises(ValueError, match="non-decreasing"):
        h, labels, _ = _packed(batch)
        dpo_kernels.linear_sequence_logprobs(h, batch["weight"], labels, cu_seqlens=torch.tensor([0, 9, 3, 28]))

