"""The byte model and the dry run of a group step (`fused_linear_group_dpo`) against a real CPU step, as
test_memory_model.py checks them for pairs: the real step runs inside `trace.record()` with the pass as
`dry_run.launcher_pass`, its peak of live tensor bytes must equal `memory_model.estimate_group_peak_bytes` to the
byte, and its kernels must be `dry_run.dry_run_group`'s, in every mode the plan gives groups.

Responses of one batch differ in length (each row's tail is padding of its own length), so the model must follow the
tokens per response, not an even split. Sizes make `[V, H]` and `[C, V]` dominate, as in the pairwise test.
"""
import pytest
import torch

import dpo_kernels
from dpo_kernels.fused_linear import dry_run, engine, fp32_gemm, trace
from dpo_kernels.fused_linear.cost_model import estimate_group_step_cost, trace_cost
from dpo_kernels.fused_linear.memory_model import estimate_group_peak_bytes
from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_ONCE, STREAM_TWICE, plan_group_step
from dpo_kernels.fused_linear.units import GroupUnits

pytestmark = pytest.mark.usefixtures("single_thread")

H, V = 32, 16000
# name: (group sizes, T, memory_budget in rows of V, weight requires grad, loss type, the modes the plan gives)
CASES = {
    "one_chunk": ((2, 3), 60, None, True, "plackett_luce", [RESIDENT]),
    "resident_groups": ((3, 2, 4), 50, 128, True, "all_pairs", [RESIDENT, RESIDENT]),
    "stream_twice": ((2, 3), 100, 128, True, "plackett_luce", [STREAM_TWICE, STREAM_TWICE]),
    "stream_once": ((3,), 130, 128, False, "plackett_luce", [STREAM_ONCE]),
    "mixed": ((4, 2, 2), 60, 128, True, "best_vs_worst", [STREAM_TWICE, RESIDENT]),
    "low": ((3, 2, 4), 50, "low", True, "plackett_luce", []),
}


def _batch(sizes, T, dtype, weight_grad):
    R = sum(sizes)
    g = torch.Generator().manual_seed(T)
    hidden = torch.randn(R, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.1).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[:, : T // 4] = -100
    for r in range(R):
        labels[r, T - 7 * r :] = -100
    return hidden, weight, labels


def _budget(rows, dtype):
    return rows if rows in (None, "low") else rows * V * dtype.itemsize


def _recorded_step(monkeypatch, name, dtype):
    """`(trace of one real group step, scored tokens per response, budget)` for a case."""
    sizes, T, rows, weight_grad, loss_type, _ = CASES[name]
    hidden, weight, labels = _batch(sizes, T, dtype, weight_grad)
    budget = _budget(rows, dtype)
    monkeypatch.setattr(engine, "logsoftmax_pass", dry_run.launcher_pass)
    with trace.record() as rec:
        out = dpo_kernels.fused_linear_group_dpo(hidden, weight, labels, list(sizes), memory_budget=budget,
                                                 loss_type=loss_type)
        out.loss.backward()
    return rec, (labels[:, 1:] != -100).sum(1).tolist(), budget


def _plan(name, lengths, dtype):
    sizes, _, rows, weight_grad, _, _ = CASES[name]
    counts = GroupUnits.of_sizes(sizes).token_counts(lengths)
    return plan_group_step(counts, V, dtype.itemsize, _budget(rows, dtype), weight_grad=weight_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_group_byte_model_matches_allocated_peak(monkeypatch, name, dtype):
    sizes, T, _, weight_grad, loss_type, modes = CASES[name]
    rec, lengths, budget = _recorded_step(monkeypatch, name, dtype)
    plan = _plan(name, lengths, dtype)
    assert [g.mode for g in plan.groups] == modes and plan.recompute == (not modes), (name, plan)
    support = fp32_gemm._probe(torch.device("cpu"), dtype)
    model = estimate_group_peak_bytes(len(lengths) * T, lengths, sizes, H, V, dtype, budget, loss_type,
                                      fp32_gemm_support=support, weight_grad=weight_grad)
    assert rec.peak_bytes() == model, (name, rec.peak_bytes(), model)


@pytest.mark.parametrize("name", list(CASES))
def test_group_dry_run_follows_the_real_step(monkeypatch, name):
    """The kernels and loss-op calls of a real group step are the dry run's, in order, with the same sizes."""
    sizes, T, _, weight_grad, loss_type, _ = CASES[name]
    rec, lengths, _ = _recorded_step(monkeypatch, name, torch.float32)
    plan = _plan(name, lengths, torch.float32)
    dry = dry_run.dry_run_group(plan, len(lengths) * T, H, V, torch.float32, lengths, sizes, loss_type,
                                weight_grad=weight_grad)
    kinds = (trace.Gemm, trace.Pass, trace.Elementwise, trace.Call)
    assert rec.of(*kinds) == dry.of(*kinds)
    names = {e.name for e in dry.of(trace.Gemm)}
    expected = {"logits GEMM", "hidden-gradient GEMM"} | ({"weight-gradient GEMM"} if weight_grad else set())
    assert names == expected, names
    calls = [e.op for e in dry.of(trace.Call)]
    assert calls and set(calls) <= {"dpo_kernels::group_loss_forward", "dpo_kernels::group_loss_backward"}, calls


def test_group_cost_counts_the_plan():
    """The group cost model sums the dry run's kernels: 6NHV of GEMMs for a resident step, 2HV more per token a
    `stream twice` group projects again, more loss-op calls when groups complete in more chunks, and the same cost
    as `trace_cost` of the same trace."""
    sizes, lengths = (3, 3), [40, 38, 35, 30, 29, 25]
    N = sum(lengths)
    resident = estimate_group_step_cost(6 * 64, lengths, sizes, H, V, torch.float32)
    assert resident.gemm_flops == 6 * N * H * V
    budget = 64 * V * 4
    plan = plan_group_step(GroupUnits.of_sizes(sizes).token_counts(lengths), V, 4, budget)
    assert [g.mode for g in plan.groups] == [STREAM_TWICE, STREAM_TWICE]
    twice = estimate_group_step_cost(6 * 64, lengths, sizes, H, V, torch.float32, budget)
    again = sum(g.projected_tokens - (g.end - g.start) for g in plan.groups)
    assert twice.gemm_flops == 6 * N * H * V + 2 * again * H * V
    assert twice.small_kernels > resident.small_kernels
    trace_ = dry_run.dry_run_group(plan, 6 * 64, H, V, torch.float32, lengths, sizes)
    assert trace_cost(trace_.events, plan.total, H, V).seconds() == twice.seconds()
