"""The fp32-result GEMMs of the fused linear engine (`fp32_gemm.py`) against float64, on every device.

On CUDA a one-time probe decides whether torch's `out_dtype` GEMMs can be used; the probe must give the same answer
inside a bf16 autocast region (where an fp32 check computed with `@` would come back in bf16) and must not draw
from the caller's CUDA RNG. Elsewhere the upcast fallback runs. Each outcome of the CUDA probe is stood in for on the
CPU: it is logged once, a slow branch warns, and the memory model of a step on that device takes its branch.
"""
import logging
import warnings

import pytest
import torch

from dpo_kernels.fused_linear import fp32_gemm as gemm
from dpo_kernels.fused_linear.memory_model import estimate_peak_bytes
from tests.helpers import DEVICES

# A CUDA device as a key only: nothing runs on it in the stand-in tests.
STAND_IN_CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_gemms_match_float64(device, dtype):
    a = torch.randn(37, 50, device=device).to(dtype)
    b = torch.randn(50, 29, device=device).to(dtype)
    truth = a.double() @ b.double()
    # Inputs already rounded to `dtype`, products summed in fp32: a few fp32 ulps of the largest partial sums.
    atol = 1e-4
    prod = gemm.mm_fp32(a, b)
    assert prod.dtype == torch.float32
    torch.testing.assert_close(prod.double(), truth, rtol=0, atol=atol)
    acc = torch.full((37, 29), 0.5, device=device)
    gemm.addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc.double(), truth + 0.5, rtol=0, atol=atol)
    gemm.addmm_fp32_(acc, a, b, accumulate=False)
    torch.testing.assert_close(acc.double(), truth, rtol=0, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the out_dtype GEMMs are probed on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_probe_ignores_autocast_and_rng(monkeypatch, dtype):
    device = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setattr(gemm, "_PROBED", {})
    plain = gemm._probe(device, dtype)
    monkeypatch.setattr(gemm, "_PROBED", {})
    rng = torch.cuda.get_rng_state(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        in_autocast = gemm._probe(device, dtype)
    assert torch.equal(torch.cuda.get_rng_state(device), rng), "the probe drew from the CUDA RNG"
    assert in_autocast == plain
    # torch >= 2.8 has aten::mm.dtype for CUDA: without it every engine GEMM upcasts its [V, H] operand.
    assert plain[0], f"torch {torch.__version__}: no fp32-result mm for {dtype} on CUDA"


@pytest.mark.parametrize("support", list(gemm.BRANCHES), ids=[name for name, _ in gemm.BRANCHES.values()])
def test_probe_outcome_is_logged_once_and_slow_branches_warn(monkeypatch, caplog, support):
    probes = []
    monkeypatch.setattr(gemm, "_PROBED", {})
    monkeypatch.setattr(gemm, "_try_out_dtype_gemms", lambda device, dtype: probes.append(device) or support)
    name = gemm.BRANCHES[support][0]
    with caplog.at_level(logging.INFO, logger=gemm.logger.name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert gemm.fp32_gemm_branch(STAND_IN_CUDA, torch.bfloat16) == name
        assert gemm.fp32_gemm_branch(STAND_IN_CUDA, torch.bfloat16) == name
        assert gemm.fp32_gemm_support(STAND_IN_CUDA, torch.bfloat16) == support
    assert probes == [STAND_IN_CUDA]
    logged = [r.getMessage() for r in caplog.records if r.name == gemm.logger.name]
    assert len(logged) == 1 and repr(name) in logged[0], logged
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(slow) == (0 if support == (True, True) else 1), [str(w.message) for w in slow]


def test_branch_names_off_cuda_and_for_fp32_operands():
    assert gemm.fp32_gemm_branch("cpu", torch.bfloat16) == "upcast"
    assert gemm.fp32_gemm_branch("cpu", torch.float32) == gemm.FP32_BRANCH
    with gemm.assume_support(STAND_IN_CUDA, torch.float16, (True, False)):
        assert gemm.fp32_gemm_branch(STAND_IN_CUDA, torch.float16) == "out_dtype_mm_then_add"
        assert gemm.fp32_gemm_branch(STAND_IN_CUDA, torch.float32) == gemm.FP32_BRANCH


def test_memory_model_takes_the_branch_of_the_device():
    """A pair streamed over chunks accumulates into the fp32 weight gradient: each branch costs different bytes,
    and the model of a step on a device takes that device's branch."""
    H, V, budget = 64, 3000, 256 * 3000 * 2
    args = (1000, [700], H, V, torch.bfloat16, budget)
    peaks = {support: estimate_peak_bytes(*args, fp32_gemm_support=support) for support in gemm.BRANCHES}
    for support, peak in peaks.items():
        with gemm.assume_support(STAND_IN_CUDA, torch.bfloat16, support):
            assert estimate_peak_bytes(*args, device=STAND_IN_CUDA) == peak, support
    assert estimate_peak_bytes(*args) == peaks[(True, True)]
    assert estimate_peak_bytes(*args, device="cpu") == peaks[(False, False)]
    # The fallbacks' extra buffers: a transient fp32 product, or fp32 copies of the operands.
    assert peaks[(True, False)] > peaks[(True, True)]
    assert peaks[(False, False)] > peaks[(True, True)]
