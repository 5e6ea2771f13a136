"""The Triton logsoftmax pass (CPU interpreter here, the GPU where there is one) and the engine driven through it."""
import pytest
import torch

import dpo_kernels
from dpo_kernels.fused_linear.logsoftmax_pass import PROGRAMS_PER_SM, logsoftmax_pass, logsoftmax_pass_torch, pass_grid
from tests.helpers import (
    DTYPE_ATOL,
    MODES,
    TRITON_DEVICE,
    assert_token_logprobs_within_rule,
    assert_within_rule,
    check_against_truth,
    eager_truth_and_baseline,
    make_batch,
    run_fused,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _pass_grad_truth(z, labels, scale):
    """float64 `scale * (onehot - softmax)`."""
    d = -torch.softmax(z.double(), -1)
    d[torch.arange(z.shape[0]), labels] += 1
    return d * scale.double()[:, None]


@pytest.mark.parametrize("V", [1000, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pass_kernel_matches_float64(force_backend, dtype, V):
    force_backend("triton")
    rows = 5
    z = (torch.randn(rows, V) * 4).to(dtype).to(TRITON_DEVICE)
    labels = torch.randint(0, V, (rows,), device=TRITON_DEVICE)
    scale = torch.randn(rows, device=TRITON_DEVICE)
    want_d = _pass_grad_truth(z, labels, scale)
    # Plain PyTorch in the same dtype: the gradient rounded to the logits' dtype.
    base_d = (-torch.softmax(z.float(), -1)).index_put_((torch.arange(rows, device=TRITON_DEVICE), labels),
                                                       torch.ones(rows, device=TRITON_DEVICE), accumulate=True)
    base_d = (base_d * scale[:, None]).to(dtype)
    d = z.clone()
    logp = logsoftmax_pass(d, labels, scale=scale, write_grad=True)
    assert logp.dtype == torch.float32 and d.dtype == dtype
    atol = DTYPE_ATOL[dtype]
    assert_token_logprobs_within_rule(logp, z, labels, atol=atol * 10)
    # Triton's CPU interpreter converts fp32 to bf16 by truncation (up to 1 ulp) where GPUs round to nearest
    # (half an ulp, like torch): allow for that there only.
    factor = 3.0 if dtype == torch.bfloat16 and TRITON_DEVICE == "cpu" else 2.0
    assert_within_rule(d, want_d, base_d, atol=atol, factor=factor, name="D")
    # Without write_grad the buffer is left alone, and the log-probs are the same.
    untouched = z.clone()
    torch.testing.assert_close(logsoftmax_pass(untouched, labels), logp, rtol=0, atol=0)
    assert torch.equal(untouched, z)


def test_pass_kernel_strided_rows_and_twin(force_backend):
    force_backend("triton")
    V = 1000
    buf = torch.randn(6, V + 24, device=TRITON_DEVICE) * 3
    z = buf[:, :V]  # row stride V + 24, as a chunk view of a wider buffer would have
    labels = torch.randint(0, V, (6,), device=TRITON_DEVICE)
    twin = z.clone()
    logp = logsoftmax_pass(z, labels, write_grad=True)
    twin_logp = logsoftmax_pass_torch(twin, labels, None, True)
    torch.testing.assert_close(logp, twin_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, twin, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("stats", [False, True])
def test_pass_kernel_non_finite(force_backend, stats):
    """An inf or a NaN logit makes its row's log-prob (and entropy) non-finite, and no other row's."""
    force_backend("triton")
    z = torch.randn(3, 1000, device=TRITON_DEVICE)
    z[0, 7] = float("inf")
    z[1, 9] = float("nan")
    labels = torch.tensor([1, 2, 3], device=TRITON_DEVICE)
    out = logsoftmax_pass(z.clone(), labels, stats=stats)
    values = {"logp": out[0], "entropy": out[1]} if stats else {"logp": out}
    for name, value in values.items():
        assert not torch.isfinite(value[:2]).any() and torch.isfinite(value[2]), f"{name}: {value.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_engine_through_triton_pass(force_backend, loss_type, mode, dtype):
    force_backend("triton")
    B, T, H, V = 2, 8, 24, 1000
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, dtype, seed=21)
    on = [t.to(TRITON_DEVICE) for t in (hidden, weight, bias, labels, ref_c, ref_r)]
    # Truth and baseline on the same device: on a GPU the baseline is cuBLAS in the same dtype.
    truth, base = eager_truth_and_baseline(*on, loss_type=loss_type, average=False)
    out, grads = run_fused(*on, loss_type=loss_type, average=False, memory_budget=MODES[mode](T, V, dtype))
    check_against_truth(out, grads, truth, base, dtype)


def test_linear_sequence_logprobs_through_triton_pass(force_backend):
    force_backend("triton")
    hidden, weight, bias, labels, _, _, _ = make_batch(2, 8, 24, 1000, torch.bfloat16, seed=22)
    upstream = torch.randn(4)
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    truth = dpo_kernels.reference.sequence_logprobs(torch.nn.functional.linear(h64, w64, b64), labels, average=True)
    t_grads = torch.autograd.grad((truth * upstream).sum(), (h64, w64, b64))
    hb, wb, bb = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    base = dpo_kernels.reference.sequence_logprobs(torch.nn.functional.linear(hb, wb, bb), labels, average=True)
    b_grads = torch.autograd.grad((base * upstream).sum(), (hb, wb, bb))
    h, w, b = (t.clone().to(TRITON_DEVICE).requires_grad_() for t in (hidden, weight, bias))
    out = dpo_kernels.linear_sequence_logprobs(h, w, labels.to(TRITON_DEVICE), bias=b, average=True,
                                               memory_budget=5 * 1000 * 2)
    (out * upstream.to(TRITON_DEVICE)).sum().backward()
    assert_within_rule(out.cpu(), truth, base, atol=1e-5, name="logps")
    for name, g, tg, bg in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), t_grads, b_grads, strict=True):
        assert_within_rule(g.cpu(), tg, bg, atol=1e-5, name=f"grad_{name}")


def test_pass_launches_on_the_chunks_device(force_backend, monkeypatch):
    """Triton launches on the current CUDA device: the launcher must enter the chunk's own device first (an lm_head
    on a second GPU). The interpreter has no devices, so this checks which tensor's device the launch is put on,
    and that a CUDA tensor on device 1 selects device 1."""
    import types

    from dpo_kernels.fused_linear import logsoftmax_pass as op

    force_backend("triton")
    seen = []
    real = op.launch_device

    def recording(t):
        seen.append(t)
        return real(t)

    monkeypatch.setattr(op, "launch_device", recording)
    z = torch.randn(3, 70, device=TRITON_DEVICE)
    logsoftmax_pass(z, torch.tensor([0, 5, 69], device=TRITON_DEVICE), write_grad=True)
    assert len(seen) == 1 and seen[0].data_ptr() == z.data_ptr()
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    guard = real(fake_cuda)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("write_grad,stats", [(False, True), (True, False)])
def test_pass_reads_padding_but_never_uses_or_writes_it(force_backend, write_grad, stats):
    """Rows padded to 16 elements (the engine's buffer, V = 1000 -> 1008) are read up to the padded width so that
    an odd V keeps vector loads; whatever the padding holds (NaN, inf, huge) must not reach any output, and it
    must stay as it was."""
    from dpo_kernels.fused_linear import logsoftmax_pass as op

    force_backend("triton")
    rows, V, padded = 4, 1000, 1008
    buffer = torch.empty(rows, padded, device=TRITON_DEVICE)
    buffer[:, V:] = torch.tensor([float("nan"), float("inf"), 3e38, -float("inf"), 1e4, 0.0, 7.0, float("nan")])
    z = buffer[:, :V]
    z.copy_(torch.randn(rows, V) * 3)
    assert op._load_width(z) == padded and op._load_width(z.contiguous()) == V
    # A view whose last row has no storage past V may not be read past V.
    assert op._load_width(torch.empty(rows * padded - 8, device=TRITON_DEVICE).as_strided((rows, V), (padded, 1))) == V
    labels = torch.tensor([0, 999, 500, 17], device=TRITON_DEVICE)
    plain = z.contiguous()
    pad_before = buffer[:, V:].clone()
    want = logsoftmax_pass(plain, labels, write_grad=write_grad, stats=stats)
    got = logsoftmax_pass(z, labels, write_grad=write_grad, stats=stats)
    # On a GPU the aligned rows get another register layout, so fp32 sums may differ in the last bits; padding
    # that leaked in would give NaN or errors of order one.
    for g, w in zip(got if stats else (got,), want if stats else (want,), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, plain, rtol=1e-6, atol=1e-6, msg="padded and contiguous rows differ")
    assert torch.equal(buffer[:, V:].nan_to_num(), pad_before.nan_to_num()), "the padding was written"


MIB = 1 << 20


@pytest.mark.parametrize("l2_bytes,num_sms", [(50 * MIB, 132), (60 * MIB, 132), (40 * MIB, 114)])
def test_pass_grid_keeps_the_rows_in_flight_within_half_of_l2(l2_bytes, num_sms):
    # Llama 3's vocabulary in bf16: 250 KiB rows, far more rows than programs.
    programs, in_flight = pass_grid(8192, 128256, 2, l2_bytes, num_sms)
    assert in_flight == programs
    assert in_flight * 128256 * 2 <= l2_bytes // 2 < (in_flight + 1) * 128256 * 2
    assert pass_grid(8192, 128256, 2, 50 * MIB, 132) == (102, 102)


def test_pass_grid_bounds():
    # Small rows: L2 does not bind, the grid stops at PROGRAMS_PER_SM per SM.
    assert pass_grid(100_000, 1000, 4, 50 * MIB, 132) == (PROGRAMS_PER_SM * 132, PROGRAMS_PER_SM * 132)
    # Fewer rows than programs: one program per row.
    assert pass_grid(7, 128256, 2, 50 * MIB, 132) == (7, 7)
    # A row larger than half of L2 still gets a program; no rows, no programs.
    assert pass_grid(64, 32 * MIB, 4, 50 * MIB, 132) == (1, 1)
    assert pass_grid(0, 1000, 4, 50 * MIB, 132) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_results_do_not_depend_on_the_grid(force_backend, monkeypatch, dtype):
    """Each row is swept by exactly one program, the same way whichever program it falls to: the outputs are the same
    bits for one program, a few, and one per row. The launcher sizes the grid from the device with `pass_grid`."""
    from dpo_kernels.fused_linear import logsoftmax_pass as op

    force_backend("triton")
    rows, V = 7, 1000
    z = (torch.randn(rows, V) * 4).to(dtype).to(TRITON_DEVICE)
    labels = torch.randint(0, V, (rows,), device=TRITON_DEVICE)
    scale = torch.randn(rows, device=TRITON_DEVICE)
    asked, results = [], []
    for programs in (1, 3, rows):
        def grid(*args, programs=programs):
            asked.append(args)
            return programs, programs

        monkeypatch.setattr(op, "pass_grid", grid)
        d = z.clone()
        results.append((*logsoftmax_pass(d, labels, scale=scale, write_grad=True, stats=True), d))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)
    assert not torch.equal(results[0][-1], z), "the gradient was not written"
    device = torch.device(TRITON_DEVICE)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        limits = (props.L2_cache_size, props.multi_processor_count)
    else:
        limits = (op.INTERPRETER_L2_BYTES, op.INTERPRETER_SMS)
    assert asked == [(rows, V, z.element_size(), *limits)] * 3
