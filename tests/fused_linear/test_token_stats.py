"""Token statistics from the fused pass: each token's entropy and first-argmax hit, read with its log-prob.

The logsoftmax pass (Triton, interpreted on the CPU here, and its PyTorch twin) against a float64 truth, on rows
built to catch the hard cases: ties (torch.argmax takes the first maximum), -inf logits (0 log 0 = 0), a whole
first tile of -inf, a maximum that moves to a later tile, a tie across tiles. Then the engine's per-sequence sums in
every chunking mode against the float64 truth and against the separate chunked pass (`token_sums(full=True)`, which
the TRL drop-in runs where the fused loss is not used).
"""
import pytest
import torch

import dpo_kernels
from dpo_kernels.fused_linear import logsoftmax_pass as lp
from dpo_kernels.integrations.token_metrics import token_sums
from tests.helpers import (
    DTYPE_ATOL,
    IGNORE_INDEX,
    MODES,
    TRITON_DEVICE,
    assert_token_logprobs_within_rule,
    assert_within_rule,
    device_for,
    make_batch,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_BLOCK = 256  # several tiles per row at V = 1000, so the running max and first argmax cross tiles


def entropy_truth(z):
    """float64 `-sum p log p` with 0 log 0 = 0 (a -inf logit adds nothing)."""
    log_p = torch.log_softmax(z.double(), -1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros((), dtype=p.dtype)).sum(-1)


def entropy_baseline(z):
    """Plain PyTorch in fp32 from the upcast logits (what TRL's torch path computes), 0 log 0 = 0 via entr."""
    return torch.special.entr(torch.softmax(z.float(), -1)).sum(-1)


def hard_rows(V, dtype):
    """`z [8, V]` and labels with ties, -inf logits and maxima in later tiles; returns (z, labels)."""
    z = (torch.randn(8, V) * 3).to(dtype)
    labels = torch.randint(0, V, (8,))
    top = z.float().abs().max() + 4
    z[0, 10], z[0, 700] = top, top  # tie: label at the second maximum is not a hit
    labels[0] = 700
    z[1, 10], z[1, 700] = top, top  # tie: label at the first maximum is a hit
    labels[1] = 10
    z[2, ::3] = float("-inf")  # -inf logits: no NaN, 0 log 0 = 0
    labels[2] = int(z[2].float().argmax())
    z[3, :SMALL_BLOCK] = float("-inf")  # a whole first tile of -inf, then the max in a later tile
    labels[3] = int(z[3].float().argmax())
    z[4] = torch.linspace(-5, 5, V).to(dtype)  # the max moves in every tile (bf16 rounds the last few to ties)
    labels[4] = int(z[4].float().argmax())
    z[5, 300], z[5, V - 2] = top, top  # tie across tiles: the earlier tile wins
    labels[5] = V - 2
    z[6, 5] = top + 1  # ordinary hit in the first tile, far below later logits' index
    labels[6] = 5
    return z, labels  # row 7: random logits and label


@pytest.mark.parametrize("block", [None, SMALL_BLOCK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pass_entropy_and_top1_match_float64(force_backend, monkeypatch, backend, dtype, block):
    if backend == "torch" and (block is not None or TRITON_DEVICE != "cpu"):
        pytest.skip("the PyTorch twin has no tiles and runs for CPU tensors")
    force_backend(backend)
    if block is not None:
        monkeypatch.setattr(lp, "_block_v", lambda vocab: block)
    V = 1000
    z, labels = hard_rows(V, dtype)
    z, labels = z.to(TRITON_DEVICE), labels.to(TRITON_DEVICE)
    want_hit = z.double().argmax(-1) == labels
    assert want_hit[[1, 2, 3, 4, 6]].all() and not want_hit[[0, 5]].any(), "the rows do not test what they say"
    plain = z.clone()
    logp = lp.logsoftmax_pass(plain, labels)
    with_stats = z.clone()
    logp_s, entropy, top1 = lp.logsoftmax_pass(with_stats, labels, stats=True)
    assert entropy.dtype == torch.float32 and top1.dtype == torch.bool
    assert torch.equal(logp_s, logp) and torch.equal(with_stats, z), "stats changed the plain outputs"
    # Row 3's first tile is all -inf: the running sum must not become NaN before the first finite logit.
    assert_token_logprobs_within_rule(logp, z, labels, atol=DTYPE_ATOL[dtype] * 10)
    assert torch.equal(top1, want_hit), f"top-1 {top1.tolist()} != first-argmax truth {want_hit.tolist()}"
    assert_within_rule(entropy, entropy_truth(z), entropy_baseline(z), atol=DTYPE_ATOL[dtype] * 10, name="entropy")

    # With the gradient written in place: the same statistics (taken before the overwrite), the same D.
    d_plain, d_stats = z.clone(), z.clone()
    scale = torch.randn(z.shape[0], device=TRITON_DEVICE)
    lp.logsoftmax_pass(d_plain, labels, scale=scale, write_grad=True)
    logp_g, entropy_g, top1_g = lp.logsoftmax_pass(d_stats, labels, scale=scale, write_grad=True, stats=True)
    assert torch.equal(d_stats, d_plain) and torch.equal(logp_g, logp)
    assert torch.equal(entropy_g, entropy) and torch.equal(top1_g, top1)


def test_pass_stats_kernel_agrees_with_twin(force_backend):
    force_backend("triton")
    z = (torch.randn(6, 3001) * 5).to(TRITON_DEVICE)
    labels = z.argmax(-1)
    labels[::2] = torch.randint(0, 3001, (3,), device=TRITON_DEVICE)
    _, entropy, top1 = lp.logsoftmax_pass(z.clone(), labels, stats=True)
    _, twin_entropy, twin_top1 = lp.logsoftmax_pass_torch(z.cpu(), labels.cpu(), None, False, True)
    torch.testing.assert_close(entropy.cpu(), twin_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(top1.cpu(), twin_top1) and top1[1::2].all()


def _truth_sums(hidden, weight, bias, labels, dtype):
    """Per-sequence entropy sums, top-1 counts, and the number of near-tied tokens, from logits in `dtype`."""
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), bias.to(dtype))[:, :-1]
    nxt = labels[:, 1:]
    valid = nxt != IGNORE_INDEX
    entropy = (entropy_truth(logits) if dtype == torch.float64 else entropy_baseline(logits)) * valid
    hit = (logits.argmax(-1) == nxt) & valid
    top2 = logits.double().topk(2, dim=-1).values
    near_tie = ((top2[..., 0] - top2[..., 1]) < 1e-2 * top2[..., 0].abs().clamp_min(1)) & valid
    return entropy.sum(-1), hit.sum(-1), near_tie.sum(-1)


@pytest.mark.parametrize("mode", ["resident", "pairs", "streaming", "low"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_sums_match_float64_and_the_separate_pass(force_backend, backend, loss_type, dtype, mode):
    # bco_pair's chosen and rejected coefficients are not tied: a streaming pair runs twice (stats from the forward).
    force_backend(backend)
    device = device_for(backend)
    B, T, H, V = 2, 9, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = (t.to(device) for t in make_batch(B, T, H, V, dtype, seed=5))
    # Every other scored label is the argmax of its position's logits, so that there are hits to count.
    best = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double()).argmax(-1)
    labels[:, 1::2] = torch.where(labels[:, 1::2] == IGNORE_INDEX, labels[:, 1::2], best[:, :-1:2])
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    kwargs = dict(bias=b, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, loss_type=loss_type,
                  memory_budget=MODES[mode](T, V, dtype))
    out = dpo_kernels.fused_linear_dpo(h, w, labels, token_stats=True, **kwargs)
    out.loss.backward()
    plain = dpo_kernels.fused_linear_dpo(*(t.clone().requires_grad_() for t in (hidden, weight)), labels,
                                         **dict(kwargs, bias=bias.clone().requires_grad_()))
    assert plain.chosen_entropy_sum is None and plain.chosen_top1_count is None
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.chosen_logps, plain.chosen_logps)
    for name in ("chosen_entropy_sum", "rejected_entropy_sum", "chosen_top1_count", "rejected_top1_count"):
        assert not getattr(out, name).requires_grad
    assert out.chosen_top1_count.dtype == torch.int64 and out.chosen_entropy_sum.dtype == torch.float32

    want_entropy, want_hits, near_tie = _truth_sums(hidden, weight, bias, labels, torch.float64)
    base_entropy, _, _ = _truth_sums(hidden, weight, bias, labels, dtype)
    got_entropy = torch.cat([out.chosen_entropy_sum, out.rejected_entropy_sum])
    got_hits = torch.cat([out.chosen_top1_count, out.rejected_top1_count])
    assert_within_rule(got_entropy, want_entropy, base_entropy, atol=DTYPE_ATOL[dtype] * 100, name="entropy sums")
    # Rounding the logits to bf16 may break or make a near tie; every other token must count as in float64.
    assert ((got_hits - want_hits).abs() <= near_tie).all(), f"top-1 {got_hits.tolist()} vs {want_hits.tolist()}"
    if dtype == torch.float32:
        assert torch.equal(got_hits, want_hits) and want_hits.sum() > 0

    # The separate chunked pass gives the same batch sums.
    nxt = torch.cat([labels[:, 1:], torch.full((2 * B, 1), IGNORE_INDEX, device=device)], 1).reshape(-1)
    rows = torch.arange(2 * B, device=device).repeat_interleave(T)
    sums = token_sums(hidden.reshape(-1, H), weight, bias, nxt, rows, B, full=True)
    torch.testing.assert_close(got_entropy.sum(), sums.entropy_sum, rtol=1e-5, atol=1e-4)
    assert out.chosen_top1_count.sum().item() == sums.chosen_top1.item()
