"""The fp32-result GEMMs of the fused linear engine (`_fp32_gemm.py`) against float64, on every device.

On CUDA a one-time probe decides whether torch's `out_dtype` GEMMs can be used; the probe must give the same answer
inside a bf16 autocast region (where an fp32 check computed with `@` would come back in bf16) and must not draw
from the caller's CUDA RNG. Elsewhere the upcast fallback runs.
"""
import pytest
import torch

from dpo_kernels.fused_linear import fp32_gemm as gemm
from tests.helpers import DEVICES


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
