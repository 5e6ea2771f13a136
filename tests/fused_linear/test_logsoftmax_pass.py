"""The Triton logsoftmax pass (CPU interpreter here, the GPU where there is one) and the engine driven through it."""
import pytest
import torch

import dpo_kernels
from dpo_kernels.fused_linear.logsoftmax_pass import logsoftmax_pass, logsoftmax_pass_torch, pass_grid
from dpo_kernels.fused_linear.pass_grid import (
    L2_SHARE,
    PROGRAMS_PER_SM_ENV,
    DeviceLimits,
    ProgramResources,
    device_limits,
    programs_per_sm_override,
    resident_programs,
)
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
# Stand-ins for torch.cuda.get_device_properties: an H200 / H100 SXM (132 SMs) and an H100 PCIe (114 SMs), sm_90.
H200 = DeviceLimits(num_sms=132, l2_bytes=50 * MIB)
H100_PCIE = DeviceLimits(num_sms=114, l2_bytes=50 * MIB)
# A program of 8 warps within 128 registers a thread (the bound the compile test holds every variant to), and one
# over it (the 174 registers a statistics variant took with the next-tile prefetch).
FITS_TWICE = ProgramResources(regs=128, shared=32, num_warps=8)
FITS_ONCE = ProgramResources(regs=174, shared=32, num_warps=8)


def test_resident_programs_from_registers_shared_memory_and_warps():
    assert resident_programs(FITS_TWICE, H200) == 2
    assert resident_programs(FITS_ONCE, H200) == 1
    # Registers are allocated a warp at a time, in 256s: 129 registers a thread take as many as 136.
    assert resident_programs(ProgramResources(129, 32, 8), H200) == 1
    assert resident_programs(ProgramResources(64, 32, 8), H200) == 4
    # 24 registers, 4 warps: the threads (2048 an SM) bind before the registers do.
    assert resident_programs(ProgramResources(24, 0, 4), H200) == 16
    # Shared memory binds: 100 KiB a program (plus the 1 KiB reserved) fits twice in 228 KiB.
    assert resident_programs(ProgramResources(32, 100 << 10, 4), H200) == 2
    # A program too large for any SM still counts as one: the launch itself reports that it does not fit.
    assert resident_programs(ProgramResources(255, 300 << 10, 8), H200) == 1


@pytest.mark.parametrize("limits", [H200, H100_PCIE], ids=["H200", "H100-PCIe"])
@pytest.mark.parametrize("program", [FITS_TWICE, FITS_ONCE], ids=["fits-twice", "fits-once"])
def test_pass_grid_never_idles_an_sm(limits, program):
    # Llama 3's vocabulary in bf16: 250 KiB rows. Half of L2 holds 102 of them, fewer than the SMs; the grid still
    # gives every SM a program, and no SM more programs than it holds at once.
    row = 128256 * 2
    assert int(limits.l2_bytes * L2_SHARE) // row < limits.num_sms
    programs, in_flight = pass_grid(8192, 128256, 2, limits, program)
    assert programs == in_flight == limits.num_sms
    assert limits.num_sms <= programs <= resident_programs(program, limits) * limits.num_sms


def test_pass_grid_keeps_the_l2_rule_above_one_program_per_sm():
    # 96 KiB rows (V = 49152 in bf16): half of L2 holds 266 of them, more than the 264 two-program slots of an H200,
    # and 200 rows of 128 KiB hold 25 MiB exactly: between one and two programs per SM, the L2 rule decides.
    assert pass_grid(100_000, 49152, 2, H200, FITS_TWICE) == (264, 264)
    programs, _ = pass_grid(100_000, 65536, 2, H200, FITS_TWICE)
    assert programs == 200 and programs * 65536 * 2 <= H200.l2_bytes * L2_SHARE < (programs + 1) * 65536 * 2
    # Small rows: L2 does not bind, the grid stops at what the SMs hold.
    assert pass_grid(100_000, 1000, 4, H200, FITS_TWICE) == (264, 264)
    assert pass_grid(100_000, 1000, 4, H200, FITS_ONCE) == (132, 132)


def test_pass_grid_bounds():
    # Fewer rows than SMs: one program per row.
    assert pass_grid(7, 128256, 2, H200, FITS_TWICE) == (7, 7)
    # A row larger than half of L2 still leaves no SM idle; no rows, no programs.
    assert pass_grid(1000, 32 * MIB, 4, H200, FITS_TWICE) == (132, 132)
    assert pass_grid(0, 1000, 4, H200, FITS_TWICE) == (0, 0)


@pytest.mark.parametrize("per_sm", [1, 2, 4])
def test_pass_grid_knob_sets_the_programs_per_sm(monkeypatch, per_sm):
    """`DPO_KERNELS_PASS_PROGRAMS_PER_SM` (or the argument) replaces the occupancy and L2 bounds, for a profiler."""
    monkeypatch.setenv(PROGRAMS_PER_SM_ENV, str(per_sm))
    assert programs_per_sm_override() == per_sm
    assert pass_grid(8192, 128256, 2, H200, FITS_ONCE, programs_per_sm_override()) == (per_sm * 132,) * 2
    # The argument wins over the environment; the rows still bound the grid.
    assert programs_per_sm_override(3) == 3
    assert pass_grid(100, 128256, 2, H200, FITS_ONCE, per_sm) == (100, 100)


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_pass_grid_knob_rejects_what_is_not_a_positive_count(monkeypatch, value):
    monkeypatch.setenv(PROGRAMS_PER_SM_ENV, value)
    with pytest.raises(ValueError, match="programs per SM|PROGRAMS_PER_SM"):
        programs_per_sm_override()


def test_pass_grid_without_the_knob(monkeypatch):
    monkeypatch.delenv(PROGRAMS_PER_SM_ENV, raising=False)
    assert programs_per_sm_override() is None
    monkeypatch.setenv(PROGRAMS_PER_SM_ENV, " ")
    assert programs_per_sm_override() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_results_do_not_depend_on_the_grid(force_backend, monkeypatch, dtype):
    """Each row is swept by exactly one program, the same way whichever program it falls to: the outputs are the same
    bits for one program, a few, and one per row. The launcher sizes the grid with `pass_grid`, from the device's
    limits and the compiled variant's resources (`pass_launch` reports both)."""
    from dpo_kernels.fused_linear import logsoftmax_pass as op

    force_backend("triton")
    rows, V = 7, 1000
    z = (torch.randn(rows, V) * 4).to(dtype).to(TRITON_DEVICE)
    labels = torch.randint(0, V, (rows,), device=TRITON_DEVICE)
    scale = torch.randn(rows, device=TRITON_DEVICE)
    launch = op.pass_launch(z, labels, scale=scale, write_grad=True, stats=True)
    assert launch.limits == device_limits(torch.device(TRITON_DEVICE))
    assert launch.programs == min(rows, resident_programs(launch.program, launch.limits) * launch.limits.num_sms)
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
    assert asked == [(rows, V, z.element_size(), launch.limits, launch.program, None)] * 3
