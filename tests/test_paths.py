"""`dpo_kernels.paths`: each public call records its backend and its plan (chunk, the mode of each group, passes,
recompute), shared prompt or not, and every fallback; strict mode turns each fallback into an error naming its
cause."""
import threading

import pytest
import torch

import dpo_kernels
from dpo_kernels import paths
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_ONCE, STREAM_TWICE, TokenAttribution

pytestmark = pytest.mark.usefixtures("single_thread")

V, H = 37, 12
CHUNK = 8  # tokens per chunk at the budget below (fp32)
BUDGET = V * 4 * CHUNK


def pair_batch(lengths, seed=0):
    """`hidden [2B, T, H]`, `weight [V, H]` (requires grad) and labels scoring `lengths[r]` tokens in row r."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 2
    hidden = torch.randn(len(lengths), T, H, generator=g)
    weight = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.full((len(lengths), T), IGNORE_INDEX)
    for r, n in enumerate(lengths):
        labels[r, 1 : n + 1] = torch.randint(0, V, (n,), generator=g)
    return hidden, weight, labels


def test_a_fused_call_records_its_plan_and_a_second_projection_counts_as_a_pass(force_backend):
    force_backend("torch")
    # Pair 0 (4 + 3 tokens) fits a chunk; pairs 1 and 2 (10 + 9 and 7 + 6 tokens) stream, the longer first (once,
    # into the empty accumulator), the other twice: its 13 tokens are projected again but for its last chunk (8).
    hidden, weight, labels = pair_batch([4, 10, 7, 3, 9, 6])
    out = dpo_kernels.fused_linear_dpo(hidden, weight, labels, memory_budget=BUDGET)
    record = dpo_kernels.last_run()
    assert record == paths.PathRecord("fused_linear_dpo", backend="torch", chunk=CHUNK,
                                      modes=(STREAM_ONCE, RESIDENT, STREAM_TWICE), recompute=False, tokens=39,
                                      projected_tokens=39 + 13 - 8, shared_prompt=False, fallbacks=())
    assert record.passes == pytest.approx(44 / 39)
    assert "modes=stream once,resident,stream twice" in record.summary()
    out.loss.backward()
    assert dpo_kernels.last_run() is record, "the backward records nothing"


def test_a_recompute_plan_projects_twice_only_when_a_backward_follows(force_backend):
    force_backend("torch")
    hidden, weight, labels = pair_batch([5, 4, 6, 2])
    dpo_kernels.fused_linear_dpo(hidden, weight, labels, memory_budget="low")
    record = dpo_kernels.last_run()
    assert (record.recompute, record.modes, record.tokens, record.passes) == (True, (), 17, 2.0)
    with torch.no_grad():
        dpo_kernels.linear_sequence_logprobs(hidden, weight, labels)
    record = dpo_kernels.last_run()
    assert (record.entry, record.recompute, record.passes) == ("linear_sequence_logprobs", True, 1.0)


def test_a_token_attribution_is_recorded_as_the_shared_prompt_layout(force_backend):
    force_backend("torch")
    hidden = torch.randn(1, 6, H)
    weight = torch.randn(V, H)
    rows = torch.tensor([0, 1, 2, 2, 3, 4])  # row 2 scores the first token of both responses
    attribution = TokenAttribution(rows, torch.tensor([3, 5, 7, 9, 11, 13]), torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    dpo_kernels.fused_linear_dpo(hidden, weight, attribution)
    assert dpo_kernels.last_run().shared_prompt is True


@pytest.mark.parametrize("entry", ["token_logprobs", "sequence_logprobs"])
def test_a_logits_call_records_its_backend(force_backend, entry):
    logits, labels = torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
    for backend in ("torch", "triton"):
        force_backend(backend)
        getattr(dpo_kernels, entry)(logits, labels)
        assert dpo_kernels.last_run() == paths.PathRecord(entry, backend=backend)


def test_auto_on_cpu_tensors_is_a_triton_to_pytorch_fallback(force_backend):
    force_backend("auto")
    logits, labels = torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
    dpo_kernels.sequence_logprobs(logits, labels)
    (found,) = dpo_kernels.last_run().fallbacks
    assert (found.kind, found.cause) == (paths.TRITON_TO_TORCH, "cpu tensors")
    assert "DPO_KERNELS_BACKEND=torch" in found.reason


def test_strict_mode_refuses_the_fallback_before_any_work(force_backend, monkeypatch):
    force_backend("auto")
    hidden, weight, labels = pair_batch([3, 4])
    before = dpo_kernels.last_run()
    with paths.strict_mode(), pytest.raises(paths.StrictModeError, match="caused by cpu tensors") as caught:
        dpo_kernels.fused_linear_dpo(hidden, weight, labels)
    assert caught.value.fallback.kind == paths.TRITON_TO_TORCH
    assert weight.grad is None and dpo_kernels.last_run() is before
    monkeypatch.setenv("DPO_KERNELS_STRICT", "1")
    with pytest.raises(paths.StrictModeError, match="cpu tensors"):
        dpo_kernels.sequence_logprobs(torch.randn(2, 3, V), torch.randint(0, V, (2, 3)))
    force_backend("torch")  # asked for: not a fallback, so strict mode runs it
    dpo_kernels.fused_linear_dpo(hidden, weight, labels)
    assert dpo_kernels.last_run().fallbacks == ()


def test_strict_mode_is_scoped_and_the_fallback_api_warns_only_outside_it(monkeypatch):
    monkeypatch.delenv("DPO_KERNELS_STRICT", raising=False)
    assert not paths.strict_enabled()
    with paths.strict_mode(True):
        assert paths.strict_enabled()
        with paths.strict_mode(False):
            assert paths.strict_enabled(), "an inner block does not switch off an outer strict block"
        with pytest.raises(paths.StrictModeError, match="refuses the fallback X caused by Y: why"):
            paths.fallback("X", "Y", "why", warn="w")
    assert not paths.strict_enabled()
    with pytest.warns(UserWarning, match="^w$"):
        found = paths.fallback("X", "Y", "why", warn="w")
    assert found == paths.Fallback("X", "Y", "why")


def test_collect_gathers_in_order_nests_and_stays_in_its_thread(force_backend):
    force_backend("torch")
    logits, labels = torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
    seen = []
    with paths.collect() as outer:
        dpo_kernels.token_logprobs(logits, labels)
        with paths.collect() as inner:
            dpo_kernels.sequence_logprobs(logits, labels)
        thread = threading.Thread(target=lambda: seen.append(dpo_kernels.last_run()))
        thread.start()
        thread.join()
        other = threading.Thread(target=lambda: dpo_kernels.token_logprobs(logits, labels))
        other.start()
        other.join()
    assert [r.entry for r in outer] == ["token_logprobs", "sequence_logprobs"]
    assert [r.entry for r in inner] == ["sequence_logprobs"]
    assert seen == [None], "a new thread starts without the caller's records"
    assert dpo_kernels.last_run().entry == "sequence_logprobs"


def test_summary_lines_count_repeated_calls():
    a = paths.PathRecord("token_logprobs", backend="torch")
    b = paths.PathRecord("trainer", shared_prompt=False,
                         fallbacks=(paths.Fallback(paths.SHARED_TO_UNSHARED, "GPT2LMHeadModel", "why"),))
    assert paths.summary_lines([b, a, a]) == [
        "trainer shared_prompt=False fallback shared prompt -> unshared rows (GPT2LMHeadModel)",
        "token_logprobs backend=torch (x2 calls)",
    ]
