"""Every benchmark output's stamp names the branch of the engine's fp32-result GEMMs on the device measured
(`fused_linear/fp32_gemm.py`): a slow branch changes memory and time without changing results."""
import torch

from dpo_kernels.bench import report
from dpo_kernels.fused_linear import fp32_gemm


def test_stamp_names_the_fp32_gemm_branch(monkeypatch):
    monkeypatch.setattr(report, "fp32_gemm_branch", lambda device, dtype: f"stand-in-{dtype}-{device.type}")
    s = report.stamp(torch.device("cpu"))
    assert s["fp32_gemm_branch"] == {"bfloat16": "stand-in-torch.bfloat16-cpu",
                                     "float16": "stand-in-torch.float16-cpu"}
    assert "fp32 GEMMs bfloat16 stand-in-torch.bfloat16-cpu, float16 stand-in-torch.float16-cpu" in report.stamp_line(s)


def test_stamp_on_the_cpu_reports_the_upcast_branch():
    s = report.stamp(torch.device("cpu"))
    assert s["fp32_gemm_branch"] == {d: fp32_gemm.fp32_gemm_branch("cpu", getattr(torch, d)) for d in
                                     ("bfloat16", "float16")} == {"bfloat16": "upcast", "float16": "upcast"}
