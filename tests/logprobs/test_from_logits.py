"""sequence_logprobs / token_logprobs against the float64 reference, on both backends.

Every case runs under the Triton kernels (the CPU interpreter here, the GPU where there is one) and the chunked
PyTorch fallback. Truth = the reference on the same logits in float64; baseline = the reference in the logits' own
dtype; the accuracy rule is tests/accuracy.py.
"""

import pytest
import torch

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.logprobs import from_logits as op
from tests.helpers import (
    IGNORE_INDEX,
    LOGPROBS_ATOL,
    assert_within_rule,
    check_against_reference,
    device_for,
    forward_backward,
    make_inputs,
)


@pytest.mark.parametrize("dtype,atol", LOGPROBS_ATOL)
@pytest.mark.parametrize("R,T,V", [(3, 9, 1000), (2, 6, 3001)])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_matches_reference(backend, dtype, atol, R, T, V, shift, average):
    logits, labels = make_inputs(R, T, V, dtype)
    weights = torch.randn(R)  # a different upstream weight per row, negative ones included
    out, grad = check_against_reference(
        "sequence_logprobs", logits, labels, weights, atol, shift=shift, average=average
    )
    assert out[0].item() == 0.0, "a row with no valid label must give exactly 0"
    assert torch.all(grad[0] == 0), "a row with no valid label must get a zero gradient"
    if shift:
        assert torch.all(grad[:, -1] == 0), "the last position scores nothing with shift"


@pytest.mark.parametrize("dtype,atol", LOGPROBS_ATOL)
@pytest.mark.parametrize("shift", [True, False])
def test_token_matches_reference(backend, dtype, atol, shift):
    R, T, V = 3, 7, 1000
    logits, labels = make_inputs(R, T, V, dtype)
    upstream = torch.randn(R, T - 1 if shift else T)
    out, _ = check_against_reference("token_logprobs", logits, labels, upstream, atol, shift=shift)
    scored = labels[:, 1:] if shift else labels
    assert torch.all(out[scored == IGNORE_INDEX] == 0)


def test_token_non_contiguous_upstream(backend):
    logits, labels = make_inputs(2, 6, 1000, torch.float32)
    upstream = torch.randn(5, 2).t()  # [2, 5] with strides (1, 2)
    check_against_reference("token_logprobs", logits, labels, upstream, 1e-5)


def test_large_vocab_torch(force_backend):
    force_backend("torch")
    logits, labels = make_inputs(2, 4, 50257, torch.bfloat16, prompt=1)
    check_against_reference("sequence_logprobs", logits, labels, torch.randn(2), 1e-5)


def test_large_vocab_triton(force_backend):
    # Several forward tiles (BLOCK_V 8192) and backward tiles (4096) with a ragged last one.
    force_backend("triton")
    with device_for("triton"):
        logits, labels = make_inputs(1, 3, 32003, torch.float32, prompt=1, empty_row=None)
        labels[0, 2] = 32002  # the very last vocabulary entry
        check_against_reference("sequence_logprobs", logits, labels, torch.tensor([0.7]), 1e-5)


def test_fallback_chunking(force_backend, monkeypatch):
    """Chunks smaller than a row's positions and chunks spanning several rows both match the reference."""
    force_backend("torch")
    logits, labels = make_inputs(3, 9, 1000, torch.float32)
    for chunk in (2500, 20_000):  # 2 positions per chunk; 2 rows (of 8 positions) per chunk
        monkeypatch.setattr(op, "_CHUNK_ELEMENTS", chunk)
        check_against_reference("sequence_logprobs", logits, labels, torch.randn(3), 1e-5)


def test_strided_views(backend):
    """`[:, :-1]` views and a transposed batch are read through their strides; the gradient lands in place."""
    R, T, V = 3, 8, 1000
    base, labels = make_inputs(R, T, V, torch.bfloat16)
    weights = torch.randn(R)

    full = base.clone().requires_grad_()
    out_view = dpo_kernels.sequence_logprobs(full[:, :-1], labels[:, 1:], shift=False)
    (out_view * weights).sum().backward()
    out_shift, grad_shift = forward_backward(dpo_kernels.sequence_logprobs, base, labels, weights)
    assert torch.equal(out_view, out_shift)
    assert torch.equal(full.grad, grad_shift)

    batch_major = base.transpose(0, 1).contiguous().requires_grad_()  # [T, R, V]
    out_t = dpo_kernels.sequence_logprobs(batch_major.transpose(0, 1), labels.t().contiguous().t())
    (out_t * weights).sum().backward()
    assert torch.equal(out_t, out_shift)
    assert torch.equal(batch_major.grad.transpose(0, 1), grad_shift)

    vocab_strided = base.transpose(1, 2).contiguous().requires_grad_()  # [R, V, T]: unit stride is not V
    out_v = dpo_kernels.sequence_logprobs(vocab_strided.transpose(1, 2), labels)
    (out_v * weights).sum().backward()
    assert torch.equal(out_v, out_shift)
    assert torch.equal(vocab_strided.grad.transpose(1, 2), grad_shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    logits, labels = make_inputs(3, 7, 1000, dtype)
    weights = torch.randn(3)
    expected_out, expected_grad = forward_backward(dpo_kernels.sequence_logprobs, logits, labels, weights)

    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1  # a non-leaf whose storage the backward may overwrite
    out = dpo_kernels.sequence_logprobs(buffer, labels, inplace_backward=True)
    (out * weights).sum().backward()
    assert torch.equal(out, expected_out)
    assert torch.equal(leaf.grad, expected_grad)
    assert torch.equal(buffer.detach(), expected_grad), "inplace_backward must write dlogits into the logits buffer"


def test_inplace_backward_fails_the_version_check_of_an_op_that_saved_the_logits(backend):
    # exp saves its output: overwriting it with the gradient would make exp's backward multiply by the gradient.
    logits, labels = make_inputs(2, 5, 100, torch.float32)
    leaf = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(leaf.exp(), labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_inplace_backward_refuses_a_second_backward(backend):
    logits, labels = make_inputs(2, 5, 100, torch.float32)
    leaf = logits.clone().requires_grad_()
    out = dpo_kernels.token_logprobs(leaf * 1, labels, inplace_backward=True).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        out.backward()


@pytest.mark.parametrize("name", ["sequence_logprobs", "token_logprobs"])
def test_inplace_backward_refuses_positions_that_share_memory(backend, name):
    R, T, V = 2, 3, 100
    _, labels = make_inputs(R, T, V, torch.float32)
    one_row = torch.randn(1, T, V, requires_grad=True)
    flat = torch.randn(8 * V, requires_grad=True)
    for logits in (
        (one_row * 1).expand(R, T, V),  # stride 0 along R
        (flat * 1).as_strided((R, T, V), (V, V, 1)),  # rows (0, 1) and (1, 0) are the same row
        (flat * 1).as_strided((R, T, V), (V // 2, 2 * V, 1)),  # rows overlapping by half
    ):
        with pytest.raises(ValueError, match="do not share memory"):
            getattr(dpo_kernels, name)(logits, labels, inplace_backward=True)
    # Interleaved but disjoint rows (starts 0, 2V, 4V and 3V, 5V, 7V) are written in place.
    strides = (3 * V, 2 * V, 1)
    buffer = (flat * 1).as_strided((R, T, V), strides)
    weights = torch.randn(R) if name == "sequence_logprobs" else torch.randn(R, T - 1)
    expected_out, expected_grad = forward_backward(getattr(dpo_kernels, name), buffer.detach().clone(), labels, weights)
    out = getattr(dpo_kernels, name)(buffer, labels, inplace_backward=True)
    (out * weights).sum().backward()
    assert torch.equal(out, expected_out)
    assert torch.equal(flat.grad.as_strided((R, T, V), strides), expected_grad)
    assert torch.equal(buffer.detach(), expected_grad)


def test_deterministic(backend):
    logits, labels = make_inputs(3, 9, 3001, torch.bfloat16)
    weights = torch.randn(3)
    first = forward_backward(dpo_kernels.sequence_logprobs, logits, labels, weights)
    second = forward_backward(dpo_kernels.sequence_logprobs, logits, labels, weights)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
def test_non_finite_logits(backend):
    R, T, V = 4, 6, 1000
    logits, labels = make_inputs(R, T, V, torch.float32, prompt=1, empty_row=None)
    labels[:, 3] = 5
    logits[0, 2, 17] = float("nan")  # NaN in a scored row -> NaN
    logits[1, 2, 9] = float("inf")  # +inf in a scored row -> non-finite
    logits[2, 2, :700] = float("-inf")  # masked vocabulary, label 5 inside it -> -inf
    logits[3, 2, 100:] = float("-inf")  # masked vocabulary including whole tiles, label 5 outside -> finite
    out = dpo_kernels.sequence_logprobs(logits, labels)
    truth = reference.sequence_logprobs(logits.double(), labels)
    assert torch.isnan(out[0]) and not torch.isfinite(out[1]) and out[2].item() == float("-inf")
    assert_within_rule(out, truth, reference.sequence_logprobs(logits, labels), atol=1e-5)
    masked = logits[3:].clone().requires_grad_()
    dpo_kernels.sequence_logprobs(masked, labels[3:]).sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_masked_leading_tile(backend):
    """A first vocabulary tile (BLOCK_V = 8192) of only -inf must not poison the online sum-exp with NaN."""
    logits = torch.randn(1, 2, 9000)
    logits[0, 0, :8192] = float("-inf")
    labels = torch.tensor([[8500, 3]])
    check_against_reference("token_logprobs", logits, labels, torch.randn(1, 2), 1e-5, shift=False)


def test_empty_and_degenerate_shapes(backend):
    for R, T in [(0, 5), (2, 1), (2, 0)]:
        logits = torch.randn(R, T, 50, requires_grad=True)
        labels = torch.randint(0, 50, (R, T))
        seq = dpo_kernels.sequence_logprobs(logits, labels, average=True)
        tok = dpo_kernels.token_logprobs(logits, labels)
        assert seq.shape == (R,) and torch.all(seq == 0)
        assert tok.shape == (R, max(T - 1, 0))
        (seq.sum() + tok.sum()).backward()
        assert logits.grad.shape == logits.shape and torch.all(logits.grad == 0)


def test_int32_labels_and_ignore_index(backend):
    logits, labels = make_inputs(2, 6, 1000, torch.float32, empty_row=None)
    labels = labels.masked_fill(labels == IGNORE_INDEX, 0)  # ignore_index 0: label 0 marks the unscored positions
    out = dpo_kernels.sequence_logprobs(logits, labels.int(), ignore_index=0, average=True)
    truth = reference.sequence_logprobs(logits.double(), labels, ignore_index=0, average=True)
    assert_within_rule(out, truth, reference.sequence_logprobs(logits, labels, ignore_index=0, average=True), atol=1e-5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 5, 10), torch.zeros(2, 4, dtype=torch.long)), "does not match"),
        (lambda: (torch.randn(2, 5, 10), torch.full((2, 5), 10)), r"outside \[0, 10\)"),
        (lambda: (torch.randn(2, 5, 10), torch.full((2, 5), -1)), r"outside \[0, 10\)"),
        (lambda: (torch.randn(2, 5, 10), torch.zeros(2, 5)), "integer"),
        (lambda: (torch.randn(2, 5, 10), torch.zeros(2, 5, dtype=torch.bool)), "integer"),
        (lambda: (torch.randn(2, 5, 10, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.long)), "float64"),
        (lambda: (torch.zeros(2, 5, 10, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)), "int64"),
        (lambda: (torch.randn(10, 10), torch.zeros(10, dtype=torch.long)), "3 dimensions"),
        (lambda: (torch.randn(2, 5, 10), torch.zeros(10, dtype=torch.long)), "2 dimensions"),
        (lambda: (torch.randn(2, 5, 0), torch.full((2, 5), IGNORE_INDEX)), "V = 0"),
        (lambda: (torch.randn(2, 5, 10), torch.zeros(2, 5, dtype=torch.long, device="meta")), "same device"),
    ],
)
@pytest.mark.parametrize("name", ["sequence_logprobs", "token_logprobs"])
def test_bad_input(backend, make, match, name):
    logits, labels = make()
    with pytest.raises(ValueError, match=match):
        getattr(dpo_kernels, name)(logits, labels)


def test_bad_ignore_index(backend):
    with pytest.raises(ValueError, match="ignore_index"):
        dpo_kernels.sequence_logprobs(torch.randn(1, 3, 10), torch.zeros(1, 3, dtype=torch.long), ignore_index=1.5)


def test_int64_row_offsets(backend):
    """Row offsets beyond 2**31 elements: an int32 offset would wrap and read the wrong memory.

    A strided view over a 4 GiB (bfloat16) allocation of which only three rows are ever touched.
    """
    V, stride = 1000, (1 << 30) + 16
    storage = torch.empty(2 * stride + V, dtype=torch.bfloat16)
    logits = storage.as_strided((3, 1, V), (stride, V, 1))
    logits.copy_(torch.randn(3, 1, V) * 3)
    labels = torch.tensor([[7], [IGNORE_INDEX], [V - 1]])
    compact = logits.clone()
    expected = dpo_kernels.token_logprobs(compact, labels, shift=False)
    assert torch.equal(dpo_kernels.token_logprobs(logits, labels, shift=False), expected)
    truth = reference.token_logprobs(compact.double(), labels, shift=False)
    assert_within_rule(expected, truth, reference.token_logprobs(compact, labels, shift=False), atol=1e-5)

    weights = torch.tensor([[0.5], [1.0], [-2.0]])
    compact.requires_grad_()
    want = torch.autograd.grad((dpo_kernels.token_logprobs(compact, labels, shift=False) * weights).sum(), compact)[0]
    forward, backward = (
        (op.token_logprobs_forward, op.token_logprobs_backward)
        if backend == "triton"
        else (op._forward_torch, op._backward_torch)
    )
    lse = forward(compact.detach(), labels, IGNORE_INDEX, False)[1]
    backward(logits, labels, lse, weights, IGNORE_INDEX, False, logits)  # in place, through the huge strides
    assert torch.equal(logits, want.to(logits.dtype))
