"""The fused linear engine on the group layout (`linear_sequence_logprobs(hidden, weight, batch.attribution)`): the
`[R]` log-probs and the gradients of hidden, weight and bias equal a float64 log-softmax of the scored rows, in every
mode, the last prompt row of a group adding the gradients of all K first tokens."""
import pytest
import torch

from dpo_kernels import linear_sequence_logprobs
from dpo_kernels.shared_prompt import build_group_batch, sequence_logprobs_from_hidden
from tests.helpers import MODES, assert_close_to_truth
from tests.shared_prompt.test_group_batch import GROUPS

pytestmark = pytest.mark.usefixtures("single_thread")

V, H = 300, 24


def plain_logps(hidden, weight, bias, batch, average, dtype):
    """Per-sequence log-probs in `dtype` by a full log-softmax over every scored row."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, H).to(dtype), weight.to(dtype), bias.to(dtype))
    tok = torch.log_softmax(logits, -1)[batch.token_rows, batch.token_targets]
    total = torch.zeros(batch.num_seqs, dtype=dtype).index_add(0, batch.token_seqs, tok)
    return total / batch.counts.clamp_min(1) if average else total


def weighted_grads(fn, hidden, weight, bias, dtype):
    """The log-probs of `fn` and the gradients of a weighted sum of them w.r.t. hidden, weight and bias."""
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias))
    logps = fn(h, w, b)
    (logps * torch.linspace(-1.0, 2.0, logps.numel(), dtype=logps.dtype)).sum().backward()
    return logps.detach(), (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_equals_the_float64_log_softmax(mode, average):
    batch = build_group_batch(GROUPS, pack=True)
    g = torch.Generator().manual_seed(0)
    rows, T = batch.input_ids.shape
    hidden = torch.randn(rows, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)
    bias = torch.randn(V, generator=g) * 0.5
    budget = MODES[mode](T, V, torch.float32)
    got, got_grads = weighted_grads(
        lambda h, w, b: linear_sequence_logprobs(h, w, batch.attribution, bias=b, average=average,
                                                 memory_budget=budget), hidden, weight, bias, torch.float32)
    truth, truth_grads = weighted_grads(lambda h, w, b: plain_logps(h, w, b, batch, average, torch.float64),
                                        hidden, weight, bias, torch.float64)
    base, base_grads = weighted_grads(lambda h, w, b: plain_logps(h, w, b, batch, average, torch.float32),
                                      hidden, weight, bias, torch.float32)
    assert got.shape == (batch.num_seqs,) and got[2].item() == 0.0  # the empty response
    assert_close_to_truth(got, truth, base, torch.float32, f"{mode} logps")
    for name, x, t, b in zip(("hidden", "weight", "bias"), got_grads, truth_grads, base_grads, strict=True):
        assert_close_to_truth(x, t, b, torch.float32, f"{mode} grad {name}")
    # The batch-level call is the same computation.
    same = sequence_logprobs_from_hidden(hidden, weight, batch, bias=bias, average=average, memory_budget=budget)
    assert torch.equal(same, got)
