"""The byte model of `memory_model.py` against the tensors a real step allocates, and the engine's trace of a real
step against the dry run the models sum.

The model is the engine's own run on meta tensors (`dry_run.dry_run`). Here the CPU path runs the fused DPO forward and
backward in each engine mode, fp32 and bf16, inside `trace.record()`: its `LiveTensors` dispatch mode counts every
tensor storage the step creates until it is freed, so the measured peak depends on neither the BLAS nor the
allocator, and is the same on every CPU. The logsoftmax pass runs as `dry_run.launcher_pass`, which allocates what the
Triton launcher does (the CPU twin's `[C, V]` temporaries stand for the kernel's registers); the fp32-result GEMMs
run the CPU's own branch (`fp32_gemm.py`), and the model is asked for that branch. The two peaks are equal: the
step's work before the engine (label checks and compaction), which the model leaves out, is freed before the
engine's buffers exist.

Sizes make `[V, H]` and `[C, V]` dominate: one fp32 `[V, H]` buffer is 2 MB, every `[n, H]` tensor of the step
together well under half of it, so that a second `[V, H]` accumulator cannot hide in the fp32 bound below.
"""
import pytest
import torch

import dpo_kernels
from dpo_kernels.fused_linear import dry_run, engine, fp32_gemm, trace
from dpo_kernels.fused_linear.memory_model import estimate_peak_bytes
from dpo_kernels.fused_linear.plan import plan_dpo_step
from tests.helpers import make_batch

pytestmark = pytest.mark.usefixtures("single_thread")

H, V = 32, 16000
CASES = {  # name: (B, T, memory_budget in rows of V, loss type)
    "one_chunk": (2, 100, None, "sigmoid"),
    "resident_pairs": (3, 120, 256, "sigmoid"),
    "streaming": (1, 400, 256, "sigmoid"),
    "two_streaming": (2, 240, 256, "sigmoid"),
    "untied_streaming": (1, 240, 256, "apo_zero"),
    "low": (3, 120, "low", "sigmoid"),
}


def _batch(B, T, dtype):
    g = torch.Generator().manual_seed(T)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, : T // 4] = -100
    return hidden, weight, labels


def _budget(rows, dtype):
    return rows if rows in (None, "low") else rows * V * dtype.itemsize


def _recorded_step(monkeypatch, name, dtype):
    """`(trace of one real step, pair lengths, budget)` for a case."""
    B, T, rows, loss_type = CASES[name]
    hidden, weight, labels = _batch(B, T, dtype)
    budget = _budget(rows, dtype)
    monkeypatch.setattr(engine, "logsoftmax_pass", dry_run.launcher_pass)
    with trace.record() as rec:
        out = dpo_kernels.fused_linear_dpo(hidden, weight, labels, memory_budget=budget, loss_type=loss_type)
        out.loss.backward()
    valid = (labels[:, 1:] != -100).sum(1)
    return rec, (valid[:B] + valid[B:]).tolist(), budget


def _one_accumulator_bound(name, dtype, pairs):
    """The most a step may allocate with one `[V, H]` fp32 buffer: the logits buffer, that buffer, and half of it
    for everything `[n, H]`."""
    B, T, rows, loss_type = CASES[name]
    plan = plan_dpo_step(pairs, V, dtype.itemsize, _budget(rows, dtype), loss_type)
    zbuf = plan.buffer_rows * (-(-V // 16) * 16) * dtype.itemsize
    return zbuf + 1.5 * V * H * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_byte_model_matches_allocated_peak(monkeypatch, name, dtype):
    B, T, _, loss_type = CASES[name]
    rec, pairs, budget = _recorded_step(monkeypatch, name, dtype)
    support = fp32_gemm._probe(torch.device("cpu"), dtype)
    model = estimate_peak_bytes(2 * B * T, pairs, H, V, dtype, budget, loss_type, fp32_gemm_support=support)
    measured = rec.peak_bytes()
    assert measured == model, (name, measured, model)
    if dtype == torch.float32:  # bf16 on a CPU upcasts W for its fp32-result GEMMs: a transient fp32 [V, H] copy
        assert measured < _one_accumulator_bound(name, dtype, pairs), (name, measured)


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_follows_the_real_step(monkeypatch, name):
    """The kernels a real step reports are the dry run's, in the same order with the same sizes."""
    B, T, rows, loss_type = CASES[name]
    rec, pairs, budget = _recorded_step(monkeypatch, name, torch.float32)
    plan = plan_dpo_step(pairs, V, 4, budget, loss_type)
    dry = dry_run.dry_run(plan, 2 * B * T, H, V, torch.float32, loss_type, pairs)
    kinds = (trace.Gemm, trace.Pass, trace.Elementwise, trace.Call)
    assert rec.of(*kinds) == dry.of(*kinds)
    names = {e.name for e in dry.of(trace.Gemm)}
    assert names == {"logits GEMM", "hidden-gradient GEMM", "weight-gradient GEMM"}, names


def test_bound_sees_a_second_accumulator(monkeypatch):
    """A streaming step that keeps a second fp32 `[V, H]` buffer breaks the one-accumulator bound."""
    original = engine.Grads.add_weight_gemm
    extra = []

    def with_second_accumulator(self, d, operand, *, only=False):
        if not extra:
            extra.append(torch.zeros(self.V, self.width, dtype=torch.float32, device=self.device))
        original(self, d, operand, only=only)

    monkeypatch.setattr(engine.Grads, "add_weight_gemm", with_second_accumulator)
    rec, pairs, _ = _recorded_step(monkeypatch, "streaming", torch.float32)
    assert rec.peak_bytes() >= _one_accumulator_bound("streaming", torch.float32, pairs)


def test_live_tensors_counts_storages_not_views():
    with trace.record() as rec:
        a = torch.empty(1000)
        view = a[10:].view(10, 99)
        del a
        b = view * 2  # a second storage of 990 floats
        b.add_(1)
        del view, b
        c = torch.empty(10)
    assert [type(e) for e in rec.events] == [trace.Alloc, trace.Alloc, trace.Free, trace.Free, trace.Alloc]
    assert rec.peak_bytes() == 4000 + 3960
    del c


def test_table_in_docstring():
    """The Llama-3-head sizes meet their targets in the model, and the docstring's table says so."""
    from dpo_kernels.fused_linear import memory_model as _memory_model

    targets = {(2, 2048): (4.4, 3.37), (2, 8192): (5.1, 3.94), (1, 32768): (6.1, 4.69)}
    for (B, T), (default_target, low_target) in targets.items():
        pairs = [2 * (T - T // 4)] * B
        for budget, target in ((None, default_target), ("low", low_target)):
            gib = estimate_peak_bytes(2 * B * T, pairs, 4096, 128256, torch.bfloat16, budget) / 2**30
            assert gib <= target, (B, T, budget, gib)
            assert f"{gib:.2f}   (<= {target})" in _memory_model.__doc__, (B, T, budget, gib)


@pytest.mark.parametrize("mode", ["one_chunk", "streaming", "low"])
def test_returned_gradients_become_grad_without_copy(monkeypatch, mode):
    """The model counts the returned gradients once: autograd must take them as `.grad` without cloning."""
    B, T = 2, 9
    hidden, weight, _, labels, _, _, _ = make_batch(B, T, 24, 1000, seed=41)
    hidden.requires_grad_()
    weight.requires_grad_()
    formed = []
    original = engine.Grads.weight_bias

    def record(self, dtype, **kwargs):
        out = original(self, dtype, **kwargs)
        formed.append((self.hidden.data_ptr(), out[0].data_ptr()))
        return out

    monkeypatch.setattr(engine.Grads, "weight_bias", record)
    budget = {"one_chunk": None, "streaming": 4 * 1000 * 4, "low": "low"}[mode]
    dpo_kernels.fused_linear_dpo(hidden, weight, labels, memory_budget=budget).loss.backward()
    assert formed == [(hidden.grad.data_ptr(), weight.grad.data_ptr())]
