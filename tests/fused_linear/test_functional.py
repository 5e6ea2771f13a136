"""Fused linear DPO and linear_sequence_logprobs against the float64 eager reference (torch path, CPU tensors).

Truth: `hidden.double() @ weight.double().T + bias` -> reference.sequence_logprobs -> reference.dpo_loss, with
autograd for the gradients. Baseline: the same eager code in the inputs' dtype. The accuracy rule is
tests/helpers.py.
"""

import pytest
import torch

import dpo_kernels
from dpo_kernels import LOSS_TYPES, reference
from dpo_kernels.fused_linear import engine
from tests.helpers import (
    DEVICES,
    IGNORE_INDEX,
    LOSS_PARAMS,
    MODES,
    REFERENCE_FREE,
    assert_within_rule,
    budget,
    check_against_truth,
    eager_truth_and_baseline,
    make_batch,
    run_fused,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def on_device(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# On a CUDA machine every case also runs on the GPU (cuBLAS GEMMs, the Triton pass, fp32-result GEMMs): the ids
# carry "cuda", which the GPU check's test selection picks up.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_fp32(loss_type, mode, average, device):
    B, T, H, V = 3, 11, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=1)
    hidden, weight, bias, labels, ref_c, ref_r = on_device(device, hidden, weight, bias, labels, ref_c, ref_r)
    if loss_type in REFERENCE_FREE:
        ref_c = ref_r = None
    params = LOSS_PARAMS.get(loss_type, {})
    truth, base = eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, loss_type=loss_type,
                                           average=average, **params)
    out, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type=loss_type, average=average,
                           memory_budget=MODES[mode](T, V, torch.float32), **params)
    check_against_truth(out, grads, truth, base, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down"])
def test_half_precision(dtype, mode, loss_type, device):
    B, T, H, V = 2, 13, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, dtype, seed=2)
    hidden, weight, bias, labels, ref_c, ref_r = on_device(device, hidden, weight, bias, labels, ref_c, ref_r)
    truth, base = eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, loss_type=loss_type,
                                           average=False)
    out, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type=loss_type, average=False,
                           memory_budget=MODES[mode](T, V, dtype))
    check_against_truth(out, grads, truth, base, dtype)


def test_large_odd_vocab_few_tokens():
    B, T, H, V = 1, 9, 24, 32003
    hidden, weight, bias, _, _, ref_c, ref_r = make_batch(B, T, H, V, empty_rows=(), seed=3)
    # Full rows: 8 scored tokens each, so the streaming chunks below are 8 rows (CPU BLAS sums K=32003 less
    # accurately for matrices of fewer than 4 rows, which would blur the comparison).
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, 0] = IGNORE_INDEX
    truth, base = eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid",
                                           average=False)
    for memory_budget in (None, budget(8, V, torch.float32)):
        out, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid", average=False,
                               memory_budget=memory_budget)
        check_against_truth(out, grads, truth, base, torch.float32)


def _sigmoid_case(seed, with_bias):
    """A `[2B, T, H]` batch (B, T, H, V = 2, 9, 24, 1000) and its float64 truth and in-dtype baseline, sigmoid sums:
    `(T, V, hidden, weight, bias or None, labels, ref_c, ref_r, truth, base)`."""
    T, V = 9, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, T, 24, V, seed=seed)
    bias = bias if with_bias else None
    truth, base = eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid",
                                           average=False)
    return T, V, hidden, weight, bias, labels, ref_c, ref_r, truth, base


def test_without_bias_and_partial_requires_grad():
    T, V, hidden, weight, _, labels, ref_c, ref_r, truth, base = _sigmoid_case(seed=4, with_bias=False)
    for mode in ("resident", "streaming", "low"):
        for which in ("hidden", "weight"):
            h, w = hidden.clone(), weight.clone()
            target = h if which == "hidden" else w
            target.requires_grad_()
            out = dpo_kernels.fused_linear_dpo(h, w, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                               memory_budget=MODES[mode](T, V, torch.float32))
            out.loss.backward()
            idx = 0 if which == "hidden" else 1
            assert_within_rule(target.grad, truth[2][idx], base[2][idx], atol=1e-6, name=f"{mode} grad_{which}")
            assert (h if which == "weight" else w).grad is None


def test_no_grad_forward_matches(monkeypatch):
    B, T, H, V = 2, 9, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=5)
    out_grad, _ = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid", average=False)
    formed = []
    original = engine.fused_dpo
    monkeypatch.setattr(engine, "fused_dpo", lambda loop, *a: (formed.append(loop.grads is not None),
                                                                original(loop, *a))[1])
    with torch.no_grad():
        # Evaluation: parameters still require grad, but no gradient may be formed (forward only, 2NHV).
        out = dpo_kernels.fused_linear_dpo(hidden, weight.clone().requires_grad_(), labels, bias=bias,
                                           ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    assert formed == [False]
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, out_grad.loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out.chosen_logps, out_grad.chosen_logps, rtol=0, atol=0)


def test_upstream_gradient_scales():
    T, V, hidden, weight, bias, labels, ref_c, ref_r, truth, base = _sigmoid_case(seed=6, with_bias=True)
    for mode in ("resident", "streaming", "low"):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = dpo_kernels.fused_linear_dpo(h, w, labels, bias=b, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                           memory_budget=MODES[mode](T, V, torch.float32))
        (out.loss * -2.5).backward()
        grads = (h.grad, w.grad, b.grad)
        for name, g, tg, bg in zip(("hidden", "weight", "bias"), grads, truth[2], base[2], strict=True):
            assert_within_rule(g, -2.5 * tg, -2.5 * bg, atol=1e-6, name=f"{mode} grad_{name}")


def to_packed(hidden, labels, lengths):
    """The padded batch as packed sequences: ([N, H], [N], cu_seqlens [R + 1] int32)."""
    rows = range(hidden.shape[0])
    packed_h = torch.cat([hidden[r, : lengths[r]] for r in rows])
    packed_l = torch.cat([labels[r, : lengths[r]] for r in rows])
    cu = torch.zeros(hidden.shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return packed_h, packed_l, cu


@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
def test_packed_equals_padded(mode):
    B, T, H, V = 3, 10, 24, 1000
    hidden, weight, bias, labels, lengths, ref_c, ref_r = make_batch(B, T, H, V, seed=7)
    memory_budget = MODES[mode](T, V, torch.float32)
    padded, (gh, gw, gb) = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="ipo", average=True,
                                     memory_budget=memory_budget)
    ph, pl, cu = to_packed(hidden, labels, lengths)
    packed, (pgh, pgw, pgb) = run_fused(ph, weight, bias, pl, ref_c, ref_r, loss_type="ipo", average=True,
                                        memory_budget=memory_budget, cu_seqlens=cu)
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(pgw, gw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pgb, gb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pgh, to_packed(gh, labels, lengths)[0], rtol=1e-5, atol=1e-7)
    # Padding positions get no gradient.
    for r in range(2 * B):
        assert not gh[r, lengths[r]:].any()


def test_output_fields_and_lengths():
    B, T, H, V = 2, 9, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=8)
    out = dpo_kernels.FusedLinearDPOLoss(beta=0.2)(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c,
                                                   ref_rejected_logps=ref_r)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    assert out.chosen_lengths.tolist() == counts[:B].tolist()
    assert out.rejected_lengths.tolist() == counts[B:].tolist()
    assert torch.equal(out.ref_chosen_logps, ref_c) and torch.equal(out.ref_rejected_logps, ref_r)
    torch.testing.assert_close(out.chosen_rewards, 0.2 * (out.chosen_logps - ref_c))
    accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
    torch.testing.assert_close(out.reward_accuracy, accuracy)
    torch.testing.assert_close(out.reward_margin, (out.chosen_rewards - out.rejected_rewards).mean())
    assert set(out._fields) >= {"loss", "reward_accuracy", "reward_margin", "ref_chosen_logps", "chosen_lengths"}
    free = dpo_kernels.fused_linear_dpo(hidden, weight, labels, bias=bias)
    assert free.ref_chosen_logps is None
    torch.testing.assert_close(free.chosen_rewards, 0.1 * free.chosen_logps)


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_reference_from_hidden_states(mode):
    B, T, H, V = 2, 9, 24, 1000
    hidden, weight, bias, labels, _, _, _ = make_batch(B, T, H, V, seed=9)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    with torch.no_grad():
        ref = reference.sequence_logprobs(ref_hidden.double() @ ref_weight.double().T, labels).float()
    memory_budget = MODES[mode](T, V, torch.float32)
    expected, grads = run_fused(hidden, weight, bias, labels, ref[:B], ref[B:], loss_type="sigmoid", average=False,
                                memory_budget=memory_budget)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = dpo_kernels.fused_linear_dpo(h, w, labels, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                       memory_budget=memory_budget)
    out.loss.backward()
    torch.testing.assert_close(out.ref_chosen_logps, ref[:B], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-4, atol=1e-7)
    # ref_weight defaults to the policy's head (a shared, frozen lm_head).
    shared = dpo_kernels.fused_linear_dpo(hidden, weight, labels, ref_hidden=ref_hidden)
    with torch.no_grad():
        want = reference.sequence_logprobs(ref_hidden.double() @ weight.double().T, labels).float()
    torch.testing.assert_close(shared.ref_rejected_logps, want[B:], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
def test_deterministic(mode):
    B, T, H, V = 2, 12, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, torch.bfloat16, seed=10)
    runs = [run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="bco_pair", average=False,
                      memory_budget=MODES[mode](T, V, torch.bfloat16)) for _ in range(2)]
    (a, ga), (b, gb) = runs
    assert torch.equal(a.loss, b.loss) and torch.equal(a.chosen_logps, b.chosen_logps)
    for x, y in zip(ga, gb, strict=True):
        assert torch.equal(x, y)


def test_modes_really_run(monkeypatch):
    """The budgets used above do select the mode they are named after."""
    B, T, H, V = 2, 9, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=11)
    calls = []
    for name in ("_stream_once", "recompute_grads", "fused_dpo"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    expect = {"resident": {"fused_dpo"}, "pairs": {"fused_dpo"}, "streaming": {"fused_dpo", "_stream_once"},
              "low": {"recompute_grads"}}
    for mode, wanted in expect.items():
        calls.clear()
        run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid", average=False,
                  memory_budget=MODES[mode](T, V, torch.float32))
        assert set(calls) == wanted, (mode, calls)
    # aot couples the pairs through their log-probs: without the whole batch resident it recomputes.
    calls.clear()
    run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="aot", average=False,
              memory_budget=MODES["streaming"](T, V, torch.float32))
    assert set(calls) == {"recompute_grads"}


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_linear_sequence_logprobs(average, packed):
    R, T, H, V = 5, 10, 24, 1000
    hidden, weight, bias, labels, lengths, _, _ = make_batch(3, T, H, V, seed=12)
    hidden, labels, lengths = hidden[:R], labels[:R], lengths[:R]
    upstream = torch.randn(R)
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    truth = reference.sequence_logprobs(h64 @ w64.T + b64, labels, average=average)
    t_grads = torch.autograd.grad((truth * upstream).sum(), (h64, w64, b64))
    h32, w32, b32 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    base = reference.sequence_logprobs(h32 @ w32.T + b32, labels, average=average)
    b_grads = torch.autograd.grad((base * upstream).sum(), (h32, w32, b32))
    for memory_budget in (None, budget(3, V, torch.float32)):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if packed:
            ph, pl, cu = to_packed(h, labels, lengths)
            out = dpo_kernels.linear_sequence_logprobs(ph, w, pl, bias=b, average=average, cu_seqlens=cu,
                                                       memory_budget=memory_budget)
        else:
            out = dpo_kernels.linear_sequence_logprobs(h, w, labels, bias=b, average=average,
                                                       memory_budget=memory_budget)
        assert out.dtype == torch.float32 and out.shape == (R,)
        assert_within_rule(out, truth, base, atol=1e-6, name="logps")
        (out * upstream).sum().backward()
        grads = (h.grad, w.grad, b.grad)
        for name, g, tg, bg in zip(("hidden", "weight", "bias"), grads, t_grads, b_grads, strict=True):
            assert_within_rule(g, tg, bg, atol=1e-6, name=f"grad_{name}")


def test_linear_sequence_logprobs_no_shift_and_empty_packed_sequence():
    H, V = 24, 1000
    hidden = torch.randn(9, H)
    weight = torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (9,))
    labels[4] = IGNORE_INDEX
    cu = torch.tensor([0, 4, 4, 9])  # the middle sequence is empty
    out = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, shift=False, average=True)
    logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
    want = torch.stack([logp[:4].mean(), torch.zeros((), dtype=torch.float64), logp[5:].mean()])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    shifted = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, cu_seqlens=cu)
    # With shift each sequence's last position scores nothing: sequence 0 scores labels 1..3 from positions 0..2.
    want0 = sum(torch.log_softmax(hidden[p].double() @ weight.double().T, -1)[labels[p + 1]] for p in range(3))
    torch.testing.assert_close(shifted[0].double(), want0, rtol=1e-5, atol=1e-5)
    assert shifted[1].item() == 0.0


def test_all_responses_empty():
    B, T, H, V = 2, 7, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, empty_rows=range(4), seed=13)
    out, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid", average=True)
    assert torch.equal(out.chosen_logps, torch.zeros(B)) and torch.equal(out.rejected_logps, torch.zeros(B))
    assert torch.isfinite(out.loss)
    assert all(not g.any() for g in grads)


def test_backward_twice_is_refused():
    B, T, H, V = 1, 6, 24, 1000
    hidden, weight, _, labels, _, _, _ = make_batch(B, T, H, V, empty_rows=(), seed=14)
    hidden.requires_grad_()
    out = dpo_kernels.fused_linear_dpo(hidden, weight, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.loss.backward()


@pytest.mark.parametrize("mode", ["pairs", "streaming"])
def test_loss_list_with_batch_level_sft_term(mode):
    """sft averages over all chosen tokens of the batch; chunks that see only some pairs must still be exact."""
    B, T, H, V = 3, 10, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=15)
    params = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], average=False)
    truth, base = eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, **params)
    out, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, memory_budget=MODES[mode](T, V, torch.float32),
                           **params)
    check_against_truth(out, grads, truth, base, torch.float32)


def test_packed_batch_with_leading_empty_sequence():
    B, H, V = 2, 24, 1000
    hidden, weight, bias, labels, lengths, ref_c, ref_r = make_batch(B, 8, H, V, seed=16)
    lengths = lengths.clone()
    lengths[0] = 0  # a zero-length chosen sequence first in the pack
    labels = labels.clone()
    labels[0] = IGNORE_INDEX
    padded, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type="sigmoid", average=False)
    ph, pl, cu = to_packed(hidden, labels, lengths)
    assert cu[0] == cu[1] == 0
    packed, pgrads = run_fused(ph, weight, bias, pl, ref_c, ref_r, loss_type="sigmoid", average=False,
                               cu_seqlens=cu)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.chosen_logps, padded.chosen_logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pgrads[1], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero"])
def test_long_pair_after_short_pairs(monkeypatch, loss_type):
    """The longest streaming pair runs first and in one pass (tied losses); untied ones run it twice. Both exact."""
    B, T, H, V = 3, 12, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, empty_rows=(), seed=17)
    labels = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(17))
    labels[[0, 1, 3, 4], 4:] = IGNORE_INDEX  # pairs 0 and 1: 3 + 3 scored tokens; pair 2: 11 + 11
    calls, projected = [], []
    for name in ("_resident_group", "_stream_once", "_stream_twice"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    project = engine._project
    monkeypatch.setattr(engine, "_project", lambda loop, h: (projected.append(h.shape[0]), project(loop, h))[1])
    truth, base = eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, loss_type=loss_type,
                                           average=False)
    out, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, loss_type=loss_type, average=False,
                           memory_budget=budget(8, V, torch.float32))
    check_against_truth(out, grads, truth, base, torch.float32)
    stream = "_stream_once" if loss_type == "sigmoid" else "_stream_twice"
    assert calls == [stream, "_resident_group", "_resident_group"], calls
    # Chunks of 8: the long pair is 8 + 8 + 6 tokens; run twice, it projects the remainder first, keeps its last
    # full chunk's logits for the gradient pass and projects the other 6 + 8 tokens again.
    assert projected == ([8, 8, 6, 6, 6] if loss_type == "sigmoid" else [6, 8, 8, 8, 6, 6, 6]), projected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_uninitialized_buffers_are_never_read(monkeypatch, dtype, mode):
    """Every buffer the engine takes from `torch.empty` is written before it is read, padding included.

    The logits buffer's rows are padded to 16 elements (V = 1000 -> 1008); CPU bf16 GEMMs (oneDNN) read a row
    past K up to that stride, so garbage there (a NaN left by an earlier tensor) reached the hidden-state gradient
    of the chunks whose `D @ W` takes the buffer as its left operand (recompute, a pair run twice)."""
    B, T, H, V = 2, 33, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, dtype, seed=18)
    kwargs = dict(loss_type="sigmoid", average=False, memory_budget=MODES[mode](T, V, dtype))
    want, want_grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, **kwargs)
    empty = torch.empty

    def poisoned(*args, **kw):
        t = empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    got, grads = run_fused(hidden, weight, bias, labels, ref_c, ref_r, **kwargs)
    for name in ("loss", "chosen_logps", "rejected_logps"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name, g, w in zip(("hidden", "weight", "bias"), grads, want_grads, strict=True):
        assert torch.equal(g, w), f"grad_{name}: {g.isnan().sum().item()} NaN"


@pytest.mark.parametrize("pairs, passes", [(1, 0), (2, 1)], ids=["one_long_pair", "two_long_pairs"])
def test_scales_fold_into_the_conversion_of_the_accumulator(monkeypatch, pairs, passes):
    """A streaming pair's coefficient and the upstream gradient cost no pass of their own over `[V, H]`: both fold
    into the one pass that converts the fp32 accumulator into the weight's dtype. Only a pair streamed after the
    first makes its coefficient due earlier (one pass)."""
    B, T, H, V = pairs, 12, 24, 1000
    hidden, weight, _, labels, _, ref_c, ref_r = make_batch(B, T, H, V, torch.bfloat16, empty_rows=(), seed=19)
    truth, base = eager_truth_and_baseline(hidden, weight, None, labels, ref_c, ref_r, loss_type="sigmoid",
                                           average=False)
    scaled = []
    mul_ = torch.Tensor.mul_

    def spy(self, other):
        scaled.extend([tuple(self.shape)] if self.shape == (V, H) else [])
        return mul_(self, other)

    monkeypatch.setattr(torch.Tensor, "mul_", spy)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = dpo_kernels.fused_linear_dpo(h, w, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                       memory_budget=budget(8, V, torch.bfloat16))
    (out.loss * 0.5).backward()
    assert len(scaled) == passes, scaled
    for name, g, tg, bg in zip(("hidden", "weight"), (h.grad, w.grad), truth[2], base[2], strict=True):
        assert_within_rule(g.float(), 0.5 * tg, 0.5 * bg.float(), atol=1e-6, name=f"grad_{name}")


HOST_READS = (("Tensor", "tolist"), ("Tensor", "item"), ("Tensor", "__bool__"), ("Tensor", "nonzero"),
              ("torch", "nonzero"), ("torch", "bincount"), ("Tensor", "bincount"))


@pytest.mark.parametrize("packed", [False, True])
def test_one_host_read_before_the_first_gemm(monkeypatch, packed):
    """Validation and the token layout read the device once before the first projection (twice when packed: the
    offsets are checked first). On CUDA each read drains the queue: the first GEMM waits for every one."""
    B, T, H, V = 2, 9, 24, 1000
    hidden, weight, bias, labels, lengths, ref_c, ref_r = make_batch(B, T, H, V, seed=20)
    cu = None
    if packed:
        hidden, labels, cu = to_packed(hidden, labels, lengths)
    reads, at_first_gemm = [], []
    for owner, name in HOST_READS:
        target = torch.Tensor if owner == "Tensor" else torch
        original = getattr(target, name)
        monkeypatch.setattr(target, name, lambda *a, _o=original, _n=name, **k: (reads.append(_n), _o(*a, **k))[1])
    project = engine._project
    monkeypatch.setattr(engine, "_project", lambda loop, h: (at_first_gemm.append(len(reads)), project(loop, h))[1])
    dpo_kernels.fused_linear_dpo(hidden, weight.clone().requires_grad_(), labels, bias=bias, cu_seqlens=cu,
                                 ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    assert at_first_gemm[0] == (2 if packed else 1), reads
