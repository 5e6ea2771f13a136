"""Inside an autocast region the fused linear engine computes as the model's own lm_head would.

The entry points cast hidden states, weight and bias to the autocast dtype (`head_operands`), as `F.linear` under
autocast does, and then run the engine with autocast off: the result must be bit for bit the one of the same call
on inputs cast by hand outside autocast, gradients included (they reach the fp32 leaves in fp32). Were autocast left
on inside the engine, `torch.mm(D, W)` would round the fp32 products that keep U and the weight gradient unrounded
(and return bf16 for fp32 operands, which `index_copy_` into an fp32 gradient refuses): the comparison would see it.
CPU autocast casts `mm` like CUDA autocast does, so the CPU shows both. The backward runs inside the region too.
"""
import pytest
import torch

from dpo_kernels.fused_linear.functional import fused_linear_dpo, head_operands, linear_sequence_logprobs
from tests.helpers import DEVICES

B, T, H, V = 2, 24, 32, 300


def batch(device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.1
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :5] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def grads_of(fn, device, autocast):
    """fp32 leaves; `autocast`: the call and its backward inside a bf16 region, else on operands cast by hand."""
    hidden, weight, labels = batch(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    if autocast:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fn(hidden, weight, labels)
            out.sum().backward()
    else:
        out = fn(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), labels)
        out.sum().backward()
    return out.detach(), hidden.grad, weight.grad


def assert_same(got, want, names):
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, f"{name} came back in {g.dtype}, not {w.dtype}"
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} differs from the explicit bf16 call")


# One resident chunk; 20-token chunks (the longest pair streams, the others run twice); "low" (recompute backward).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_budget", [None, 20 * V * 2, "low"], ids=["resident", "streaming", "low"])
def test_fused_dpo_under_autocast_computes_in_the_autocast_dtype(memory_budget, device):
    def fn(hidden, weight, labels):
        return fused_linear_dpo(hidden, weight, labels, memory_budget=memory_budget).loss

    want = grads_of(fn, device, autocast=False)
    got = grads_of(fn, device, autocast=True)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert_same(got, want, ("loss", "grad_hidden", "grad_weight"))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_sequence_logprobs_under_autocast_computes_in_the_autocast_dtype(device):
    def fn(hidden, weight, labels):
        return linear_sequence_logprobs(hidden, weight, labels) * torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)

    want = grads_of(fn, device, autocast=False)
    got = grads_of(fn, device, autocast=True)
    assert_same(got, want, ("logps", "grad_hidden", "grad_weight"))


@pytest.mark.parametrize("device", DEVICES)
def test_head_operands_follow_autocast_of_their_device(device):
    hidden, weight, _ = batch(device)
    bias = torch.zeros(V, device=device)
    assert all(t.dtype == torch.float32 for t in head_operands(hidden, weight, bias))
    with torch.autocast(device, dtype=torch.bfloat16):
        h, w, b = head_operands(hidden, weight, bias)
        assert h.dtype == w.dtype == b.dtype == torch.bfloat16
        assert head_operands(hidden, weight)[2] is None
        # float64 is never cast by autocast, and is left for the engine's dtype check to refuse.
        assert head_operands(hidden.double(), weight)[0].dtype == torch.float64
    if device != "cpu":  # autocast on another device type leaves these tensors alone
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert head_operands(hidden, weight)[0].dtype == torch.float32
