"""The fused linear engine ignores an enclosing autocast region: the caller's dtypes decide its GEMMs.

Under bf16 autocast (a training loop's mixed-precision region) `torch.mm(D, W)` on fp32 operands returns bf16: the
hidden-state gradient of a chunk whose coefficients are known (recompute backward, a long pair run twice) then
failed in `index_copy_` into the fp32 buffer, and the fp32 products that keep U and the weight gradient unrounded
became bf16 ones. CPU autocast casts `mm` like CUDA autocast does, so the CPU shows both.
"""
import pytest
import torch

from dpo_kernels.fused_linear.functional import fused_linear_dpo, linear_sequence_logprobs
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
    hidden, weight, labels = batch(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = fn(hidden, weight, labels)
        out.sum().backward()
    return out.detach(), hidden.grad, weight.grad


# One resident chunk; 20-token chunks (the longest pair streams, the others run twice); "low" (recompute backward).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_budget", [None, 20 * V * 4, "low"], ids=["resident", "streaming", "low"])
def test_fused_dpo_under_autocast_matches_fp32(memory_budget, device):
    def fn(hidden, weight, labels):
        return fused_linear_dpo(hidden, weight, labels, memory_budget=memory_budget).loss

    want = grads_of(fn, device, autocast=False)
    got = grads_of(fn, device, autocast=True)
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert g.dtype == torch.float32, f"{name} came back in {g.dtype}"
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} changed under autocast")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_sequence_logprobs_backward_under_autocast_matches_fp32(device):
    def fn(hidden, weight, labels):
        return linear_sequence_logprobs(hidden, weight, labels) * torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)

    want = grads_of(fn, device, autocast=False)
    got = grads_of(fn, device, autocast=True)
    for name, g, w in zip(("logps", "grad_hidden", "grad_weight"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} changed under autocast")
