"""The benchmark's inputs are realistic and every provider computes the same DPO step as eager PyTorch.

Each available provider's loss and gradients are judged against the float64 truth (eager on float64 copies of the
same inputs) with the accuracy rule (docs/design.md, "Numerics and the accuracy rule"), eager in the same dtype being
the baseline.
"""
import math

import pytest
import torch

from dpo_kernels.bench import compare, inputs
from dpo_kernels.bench.providers import OPS, Provider, providers_for, unavailable_reason
from tests.helpers import assert_within_rule

TINY = {"linear": compare.Size(2, 24, 24, 301), "logits": compare.Size(2, 20, 0, 301), "loss": compare.Size(5)}
CPU = torch.device("cpu")


def _float64_copy(op, x):
    def leaf(t):
        return t.detach().double().requires_grad_()

    if op == "linear":
        return inputs.LinearInputs(leaf(x.hidden), leaf(x.weight), x.labels, x.targets)
    if op == "logits":
        return inputs.LogitsInputs(leaf(x.logits), x.labels, x.targets)
    return inputs.LossInputs(leaf(x.policy_chosen), leaf(x.policy_rejected), x.ref_chosen.double(),
                             x.ref_rejected.double())


def _loss_and_grads(op, provider, x):
    tensors = compare.leaves(op, x)
    loss, grads = compare.loss_and_grads(provider.build(x, compile_backend="aot_eager"), tensors)
    return loss, [g.clone() for g in grads]


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_available_provider_matches_the_float64_truth(op):
    x = compare.make_inputs(op, TINY[op], torch.float32, CPU)
    eager = providers_for(op, ["eager"])[0]
    truth_loss, truth_grads = _loss_and_grads(op, eager, _float64_copy(op, x))
    base_loss, base_grads = _loss_and_grads(op, eager, x)
    ran = []
    for provider in providers_for(op):
        if unavailable_reason(provider, CPU):
            continue
        loss, grads = _loss_and_grads(op, provider, x)
        assert_within_rule(loss, truth_loss, base_loss, atol=1e-6, name=f"{op}/{provider.name} loss")
        for name, g, t, b in zip(compare.GRAD_NAMES[op], grads, truth_grads, base_grads, strict=True):
            assert_within_rule(g, t, b, atol=1e-6, name=f"{op}/{provider.name} {name}")
        ran.append(provider.name)
    assert {"eager", "torch_compile"} <= set(ran), ran


def test_logits_are_peaked_not_uniform():
    x = inputs.make_logits_inputs(1, 64, 5000, dtype=torch.float32)
    logp = torch.log_softmax(x.logits.detach()[:, :-1], -1)
    labels = x.labels[:, 1:]
    valid = labels != inputs.IGNORE_INDEX
    label_logp = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0][valid]
    entropy = -(logp.exp() * logp).sum(-1)
    # A trained model's label log-prob: a few nats at most, far above uniform's log(1/V) = -8.5.
    assert -4.0 < label_logp.mean().item() < -0.05, label_logp.mean()
    assert label_logp.min().item() > -8.0
    # A heavy Zipf tail: well below the uniform entropy, but not a one-hot either.
    assert 1.0 < entropy.mean().item() < 0.8 * math.log(5000), entropy.mean()


def test_hidden_states_make_the_label_likely():
    x = inputs.make_linear_inputs(1, 48, 64, 3001, dtype=torch.float32)
    logits = x.hidden.detach() @ x.weight.detach().t()
    valid = x.targets != inputs.IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, x.targets.clamp_min(0)[..., None])[..., 0][valid]
    assert -4.5 < logp.mean().item() < -0.05, logp.mean()
    # the same tokens as the HF-convention labels, and a prompt quarter that is not scored
    assert torch.equal(x.targets[:, :-1], x.labels[:, 1:])
    assert (x.labels[:, :12] == inputs.IGNORE_INDEX).all() and (x.labels[:, 12:] >= 0).all()
    assert x.valid_tokens == 2 * (48 - 12)


@pytest.mark.parametrize("bad", [dict(pairs=0), dict(seq_len=2), dict(vocab=1), dict(hidden=1)])
def test_bad_sizes_are_refused(bad):
    args = dict(pairs=1, seq_len=16, hidden=8, vocab=50) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        inputs.make_linear_inputs(args["pairs"], args["seq_len"], args["hidden"], args["vocab"])


def test_unavailable_providers_get_a_note_not_an_error():
    missing = Provider("ghost", "needs a module that does not exist", None, requires=("no_such_module_xyz",))
    assert "not available: no_such_module_xyz" in unavailable_reason(missing, CPU)
    gpu_only = Provider("gpu", "CUDA only", None, devices=("cuda",))
    assert "needs CUDA" in unavailable_reason(gpu_only, CPU)
    assert "not applicable" in unavailable_reason(providers_for("logits", ["cce"])[0], CPU)
    with pytest.raises(ValueError, match="unknown provider"):
        providers_for("linear", ["eager", "nope"])
    with pytest.raises(ValueError, match="unknown op"):
        providers_for("attention")
