"""The baselines users already have: torch's own `F.linear_cross_entropy` (torch >= 2.13) and QuACK.

`torch_native` runs here when this torch has it: it takes torch's chunked path (no fallback warning) and equals the
float64 truth within the accuracy rule (docs/design.md, "Numerics and the accuracy rule"); without it, the provider is
skipped with a note naming the torch it needs. QuACK runs on CUDA only and is not installed here, so its providers'
glue (a sequence's sum from one `reduction='sum'` call, the position-aligned targets) runs against a stand-in module
that keeps QuACK's documented contract with plain PyTorch.
"""
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from dpo_kernels.bench import compare, inputs
from dpo_kernels.bench.providers import linear as linear_providers
from dpo_kernels.bench.providers import logits, providers_for, unavailable_reason
from dpo_kernels.constants import IGNORE_INDEX
from tests.helpers import assert_within_rule

CPU = torch.device("cpu")
HAS_NATIVE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def _float64(x):
    def leaf(t):
        return t.detach().double().requires_grad_()

    if isinstance(x, inputs.LinearInputs):
        return inputs.LinearInputs(leaf(x.hidden), leaf(x.weight), x.labels, x.targets)
    return inputs.LogitsInputs(leaf(x.logits), x.labels, x.targets)


def _run(op, build, x):
    tensors = compare.leaves(op, x)
    loss, grads = compare.loss_and_grads(build(x), tensors)
    return loss, [g.clone() for g in grads]


def _check_against_truth(op, build, x):
    eager = providers_for(op, ["eager"])[0].build
    truth_loss, truth_grads = _run(op, eager, _float64(x))
    base_loss, base_grads = _run(op, eager, x)
    loss, grads = _run(op, build, x)
    assert_within_rule(loss, truth_loss, base_loss, atol=1e-6, name=f"{op} loss")
    for name, g, t, b in zip(compare.GRAD_NAMES[op], grads, truth_grads, base_grads, strict=True):
        assert_within_rule(g, t, b, atol=1e-6, name=f"{op} {name}")


@pytest.mark.skipif(not HAS_NATIVE, reason="this torch has no F.linear_cross_entropy (torch >= 2.13)")
@pytest.mark.parametrize("size", [compare.Size(2, 40, 24, 301), compare.Size(1, 96, 16, 1000)],
                         ids=lambda s: s.label)
def test_torch_native_takes_the_chunked_path_and_matches_the_float64_truth(size):
    x = inputs.make_linear_inputs(size.pairs, size.seq_len, size.hidden, size.vocab, dtype=torch.float32)
    native = providers_for("linear", ["torch_native"])[0]
    assert unavailable_reason(native, CPU) is None
    with warnings.catch_warnings():
        # torch falls back to its reference path (the full logits) with a warning; that would be another provider
        warnings.simplefilter("error")
        _check_against_truth("linear", native.build, x)


def test_torch_native_is_skipped_with_a_note_on_an_older_torch(monkeypatch):
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    note = unavailable_reason(providers_for("linear", ["torch_native"])[0], CPU)
    assert note.startswith("not available: torch.nn.functional:linear_cross_entropy (needs torch >= 2.13.0; this is "
                           "torch "), note


def _stand_in_quack(monkeypatch, calls):
    """`quack.linear_cross_entropy.chunked_linear_cross_entropy` and `quack.cross_entropy.cross_entropy` in plain
    PyTorch, with QuACK 0.6.5's signatures and checks: x `(B*L, d)`, target `(B*L,)`, B*L a multiple of 8, the
    chunked reduction 'mean' or 'sum' only."""

    def chunked_linear_cross_entropy(x, weight, target, chunk_size=4096, ignore_index=-100, reduction="mean",
                                     tuned=True, use_scaled_exp=None):
        assert x.dim() == 2 and target.shape == x.shape[:1] and x.shape[0] % 8 == 0 and chunk_size % 8 == 0
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid reduction: {reduction}")
        calls.append(x.shape[0])
        return F.cross_entropy(x @ weight.t(), target, ignore_index=ignore_index, reduction=reduction)

    def cross_entropy(x, target, lse_partial=None, weight=None, ignore_index=-100, reduction="mean",
                      inplace_backward=False):
        assert x.dim() == 2 and x.is_contiguous() and target.shape == x.shape[:1]
        calls.append(x.shape[0])
        return F.cross_entropy(x.float(), target, ignore_index=ignore_index, reduction=reduction)

    package = types.ModuleType("quack")
    lce = types.ModuleType("quack.linear_cross_entropy")
    lce.chunked_linear_cross_entropy = chunked_linear_cross_entropy
    ce = types.ModuleType("quack.cross_entropy")
    ce.cross_entropy = cross_entropy
    package.linear_cross_entropy, package.cross_entropy = lce, ce
    for module in (package, lce, ce):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_quack_linear_sums_each_sequence_in_its_own_call(monkeypatch):
    calls = []
    _stand_in_quack(monkeypatch, calls)
    x = inputs.make_linear_inputs(2, 24, 16, 301, dtype=torch.float32)
    _check_against_truth("linear", linear_providers.build_quack, x)
    assert calls == [24] * 4, calls  # one call per row, on the row's positions


def test_quack_logits_scores_the_aligned_targets(monkeypatch):
    calls = []
    _stand_in_quack(monkeypatch, calls)
    x = inputs.make_logits_inputs(2, 20, 301, dtype=torch.float32)
    assert (x.targets[:, -1] == IGNORE_INDEX).all()
    _check_against_truth("logits", logits.build_quack, x)
    assert calls == [4 * 20], calls


@pytest.mark.parametrize("op", ["linear", "logits"])
def test_quack_needs_cuda_and_names_its_pin_when_missing(op):
    quack = providers_for(op, ["quack"])[0]
    note = unavailable_reason(quack, CPU)
    assert note == "needs CUDA; this run is on cpu" or note.endswith("(pip install quack-kernels==0.6.5)"), note
