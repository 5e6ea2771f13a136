"""The step profiler (`dpo-kernels bench --ops profile`) at tiny sizes on the CPU, and its classing of a GPU
profile's kernels from stand-in profiler events, so that a GPU slot never meets it for the first time."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from dpo_kernels.bench import cli, profile
from dpo_kernels.fused_linear import engine, logsoftmax_pass
from dpo_kernels.fused_linear.memory_model import estimate_peak_bytes

GEMMS = ("logits GEMM", "hidden-gradient GEMM", "weight-gradient GEMM")


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    assert cli.main(["bench", "--ops", "profile", "--tiny", "--device", "cpu", "--output-dir", str(out)]) == 0
    return json.loads((out / "profile.json").read_text()), (out / "profile.md").read_text()


def test_tiny_profile_reports_the_device_and_the_pass_per_grid(tiny_profile):
    result, markdown = tiny_profile
    assert result["complete"] and result["tiny"]
    assert result["device"] == {"fp32_gemm_branch": "upcast", "num_sms": None, "l2_bytes": None}
    assert result["stamp"]["fp32_gemm_branch"]["bfloat16"] == "upcast"
    rows, vocab = profile.TINY_PASS_SHAPE
    by_key = {(r["variant"], r["grid"]): r for r in result["pass"]["rows_by_grid"]}
    z, labels = torch.zeros(rows, vocab, dtype=torch.bfloat16), torch.zeros(rows, dtype=torch.long)
    engine_grid = logsoftmax_pass.pass_launch(z, labels)
    sms = engine_grid.limits.num_sms
    for variant, _, _ in profile.PASS_VARIANTS:
        assert by_key[(variant, "engine")]["programs"] == engine_grid.programs
        for k in profile.PROGRAMS_PER_SM:
            row = by_key[(variant, f"{k}/SM")]
            assert row["programs"] == min(rows, k * sms), row
            assert row["median_ms"] > 0
            assert row["gbs"] is None and row["fraction_of_copy"] is None  # no bandwidth claims on the CPU
    assert "| logp+grad | 4/SM |" in markdown and "fp32 GEMM branch (bfloat16): upcast" in markdown


def test_tiny_profile_classes_each_step_beside_the_models(tiny_profile):
    result, markdown = tiny_profile
    assert [s["size"] for s in result["steps"]] == [s.label for s in profile.TINY_STEP_SIZES]
    for s, size in zip(result["steps"], profile.TINY_STEP_SIZES, strict=True):
        measured, modeled = s["measured_ms"], s["model_ms"]
        assert set(measured) == set(modeled) == set(profile.CLASSES)
        for cls in (*GEMMS, "logsoftmax pass", "loss op"):
            assert measured[cls] > 0 and modeled[cls] > 0, (s["size"], cls, measured, modeled)
        # bf16 on a CPU upcasts the GEMMs' operands: conversions the profile must see.
        assert measured["conversions"] > 0
        assert s["measured_total_ms"] == pytest.approx(sum(measured.values()))
        assert s["model_total_ms"] > s["model_floor_ms"] > 0
        rows = 2 * size.pairs * size.seq_len
        pairs_model = estimate_peak_bytes(rows, _pairs(size), size.hidden, size.vocab, torch.bfloat16,
                                          fp32_gemm_support=(False, False))
        assert s["model_peak_bytes"] == pairs_model
        assert f"| {cls} |" in markdown
    assert engine.logsoftmax_pass is logsoftmax_pass.logsoftmax_pass  # the profiled step's range is gone


def _pairs(size):
    from dpo_kernels.bench.inputs import make_linear_inputs

    labels = make_linear_inputs(size.pairs, size.seq_len, size.hidden, size.vocab, seed=0).labels
    return profile._pair_lengths(labels, size.pairs)


def test_the_pass_range_hook_restores_the_engines_pass():
    own_pass = engine.logsoftmax_pass
    with profile.labelled_pass():
        assert engine.logsoftmax_pass is not own_pass
    assert engine.logsoftmax_pass is own_pass


H, V, C = 48, 1000, 70


def _op(name, shapes=(), kernels=(), parent=None):
    return SimpleNamespace(name=name, input_shapes=[list(s) for s in shapes], cpu_parent=parent, is_async=False,
                           is_legacy=False, device_type=DeviceType.CPU,
                           kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels])


def _kernel(name, us):
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, is_async=False,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_device_kernels_are_classed_by_their_op_and_name():
    """A stand-in for a GPU profile: each cuBLAS kernel under the GEMM op that launched it, the Triton pass launched
    inside the pass's range and once outside any op, the loss op's inner ATen kernel, the conversions."""
    to = _op("aten::to")
    to_copy = _op("aten::_to_copy", parent=to)
    loss = _op("dpo_kernels::dpo_loss_forward")
    pass_range = _op(profile.PASS_RANGE, kernels=[("logsoftmax_pass_kernel", 300)])
    events = [
        _op("aten::mm", [(C, H), (H, V), (C, V)], [("nvjet_tst_a", 1000)]),
        _op("aten::mm", [(C, V), (V, H), ()], [("nvjet_tst_b", 900)]),
        _op("aten::addmm", [(V, H), (V, C), (C, H), (), (), (V, H)], [("nvjet_tst_c", 800)]),
        _op("aten::addmm_", [(V, H + 2), (V, C), (C, H + 2), (), ()], [("sm90_xmma_gemm", 50)]),
        to, to_copy, _op("aten::copy_", [(C, H), (C, H)], [("direct_copy_kernel", 20)], parent=to_copy),
        _op("aten::mul", [(V, H), (), (V, H)], [("mul_kernel", 30)]),
        _op("aten::mul_", [(V, H), ()], [("mul_kernel", 7)]),
        loss, _op("aten::sum", [(8,)], [("reduce_kernel", 5)], parent=loss),
        pass_range,
    ]
    device = [_kernel(n, us) for n, us in (("nvjet_tst_a", 1000), ("nvjet_tst_b", 900), ("nvjet_tst_c", 800),
                                           ("sm90_xmma_gemm", 50), ("direct_copy_kernel", 20), ("mul_kernel", 30),
                                           ("mul_kernel", 7), ("reduce_kernel", 5), ("logsoftmax_pass_kernel", 300),
                                           ("logsoftmax_pass_kernel", 200), ("fill_kernel", 11))]
    got = profile.ms_by_class(events + device, H, V, device_kernels=True)
    want = {"logits GEMM": 1.0, "hidden-gradient GEMM": 0.9, "weight-gradient GEMM": 0.85,
            "logsoftmax pass": 0.5, "conversions": 0.05, "loss op": 0.005, "others": 0.018}
    assert got == pytest.approx(want), got


def test_cost_model_classes_sum_to_its_step_time():
    from dpo_kernels.fused_linear.cost_model import H200, estimate_step_cost

    cost = estimate_step_cost(2 * 2 * 2048, [2 * 1536] * 2, 4096, 128256)
    by_class = profile.modeled_ms_by_class(cost)
    assert sum(by_class.values()) == pytest.approx(cost.seconds(H200) * 1e3)
    assert all(by_class[g] > 0 for g in GEMMS) and by_class["logsoftmax pass"] > 0
