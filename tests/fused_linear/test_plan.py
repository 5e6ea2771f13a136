"""The fused linear engine's plan (`dpo_kernels.fused_linear.plan`), tested without running the engine."""
import pytest
import torch

from dpo_kernels.fused_linear.plan import (
    RESIDENT,
    STREAM_ONCE,
    STREAM_TWICE,
    chunk_tokens,
    compact_tokens,
    group_units,
    longest_streaming_first,
    parse_memory_budget,
    plan_dpo_step,
    plan_logps,
    scored_counts,
)


@pytest.mark.parametrize("value, parsed", [(None, None), ("low", "low"), (4e6, 4_000_000), (1, 1), (2 << 30, 2 << 30)])
def test_memory_budget_parses(value, parsed):
    assert parse_memory_budget(value) == parsed


@pytest.mark.parametrize("value", [0, -1, 0.5, True, "high", "LOW", float("nan"), float("inf"), [1]])
def test_memory_budget_rejects(value):
    with pytest.raises(ValueError, match="memory_budget must be None, 'low' or a positive number of bytes"):
        parse_memory_budget(value)


# --- compaction


def test_compaction_keeps_scored_positions_in_pair_order():
    # 2 pairs, T = 5, shift: position t scores label t + 1; row 1 (pair 1 chosen) has no scored token.
    labels = torch.tensor([[-100, 7, 8, -100, 9],
                           [-100, -100, -100, -100, -100],
                           [-100, -100, 3, 4, -100],
                           [-100, 5, -100, -100, -100]])
    natural = compact_tokens(labels, None, 4, -100, shift=True, paired=False)
    assert natural.rows.tolist() == [0, 1, 3, 11, 12, 15]
    assert natural.targets.tolist() == [7, 8, 9, 3, 4, 5]
    assert natural.seq.tolist() == [0, 0, 0, 2, 2, 3]
    assert natural.slot.tolist() == [0, 1, 2, 0, 1, 0]
    assert natural.counts_host == [3, 0, 2, 1] and natural.max_count == 3
    assert torch.equal(natural.counts, scored_counts(labels, -100, shift=True))
    paired = compact_tokens(labels, None, 4, -100, shift=True, paired=True)
    # chosen 0, rejected 2 (pair 0); chosen 1 (empty), rejected 3 (pair 1).
    assert paired.seq.tolist() == [0, 0, 0, 2, 2, 3]
    assert paired.rows.tolist() == [0, 1, 3, 11, 12, 15]
    unshifted = compact_tokens(labels, None, 4, -100, shift=False, paired=True)
    assert unshifted.rows.tolist() == [1, 2, 4, 12, 13, 16] and unshifted.counts_host == [3, 0, 2, 1]


def test_compaction_of_packed_sequences_stops_at_each_boundary():
    labels = torch.tensor([5, 6, 7, 8, 9, 10, -100, 11])
    cu = torch.tensor([0, 3, 3, 6, 8], dtype=torch.int32)  # lengths 3, 0, 3, 2
    layout = compact_tokens(labels, cu, 4, -100, shift=True, paired=True)
    # Sequence 0 scores labels 1..2 from positions 0..1; sequence 2 scores 4, 5 from 3, 4; sequence 3 scores
    # label 7 from position 6. Pair order: seq 0, seq 2 (rejected of pair 0), seq 1 (empty), seq 3.
    assert layout.rows.tolist() == [0, 1, 3, 4, 6]
    assert layout.targets.tolist() == [6, 7, 9, 10, 11]
    assert layout.seq.tolist() == [0, 0, 2, 2, 3]
    assert layout.counts_host == [2, 0, 2, 1]


def test_compaction_checks_every_label_against_each_vocabulary():
    labels = torch.tensor([[-100, 3, 7], [-100, 2, 9]])
    assert compact_tokens(labels, None, 2, -100, True, True, vocabs=(10,)).counts_host == [2, 2]
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 9 is outside \[0, 8\)"):
        compact_tokens(labels, None, 2, -100, True, True, vocabs=(10, 8))
    labels[0, 0] = -5  # a position that scores nothing is checked too
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = -5 is outside \[0, 10\)"):
        compact_tokens(labels, None, 2, -100, True, True, vocabs=(10,))


HOST_READS = (("Tensor", "tolist"), ("Tensor", "item"), ("Tensor", "__bool__"), ("Tensor", "nonzero"),
              ("torch", "nonzero"), ("torch", "bincount"), ("Tensor", "bincount"))


def count_host_reads(monkeypatch):
    """Counts the calls that bring device data to the host (each a synchronization on CUDA)."""
    reads = []
    for owner, name in HOST_READS:
        target = torch.Tensor if owner == "Tensor" else torch
        original = getattr(target, name)
        monkeypatch.setattr(target, name, lambda *a, _o=original, _n=name, **k: (reads.append(_n), _o(*a, **k))[1])
    return reads


@pytest.mark.parametrize("packed", [False, True])
def test_compaction_reads_the_device_once(monkeypatch, packed):
    labels = torch.tensor([[-100, 3, 7, 1], [-100, -100, 2, 9]])
    cu = None
    if packed:
        labels, cu = labels.reshape(-1), torch.tensor([0, 4, 8])
    reads = count_host_reads(monkeypatch)
    layout = compact_tokens(labels, cu, 2, -100, True, True, vocabs=(10,))
    assert reads == ["tolist"], reads
    assert layout.counts_host == [3, 2]


# --- chunk size


def test_chunk_size_rule():
    assert chunk_tokens(128256, 2, None) == 8192  # Llama-3 head in bf16: 1.96 GiB buffer
    assert chunk_tokens(128256, 2, "low") == 2048  # 512 MiB
    assert chunk_tokens(151936, 2, None) == 7040  # 2 GiB // (V * 2) = 7067, rounded down to whole 128-token tiles
    assert chunk_tokens(1000, 4, 20 * 1000 * 4) == 20  # under 128 tokens: not rounded
    assert chunk_tokens(1000, 4, 4e6) == 896
    assert chunk_tokens(1000, 4, 10) == 1  # never zero


# --- grouping and run order


def test_greedy_groups_of_whole_pairs_and_long_pairs_alone():
    groups = group_units([3, 4, 2, 9, 5, 0, 1], chunk=8)
    assert [(s, e, list(p), streaming) for s, e, p, streaming in groups] == [
        (0, 7, [0, 1], False),  # 3 + 4; adding 2 would exceed 8
        (7, 9, [2], False),  # closed by the long pair
        (9, 18, [3], True),
        (18, 24, [4, 5, 6], False),  # 5 + 0 + 1
    ]
    assert group_units([0, 0], chunk=8) == [(0, 0, range(0, 2), False)]
    # Every pair is in exactly one group, an empty one before a long pair included.
    assert group_units([0, 10], chunk=8) == [(0, 0, range(0, 1), False), (0, 10, range(1, 2), True)]


def test_longest_streaming_pair_runs_first():
    groups = group_units([2, 10, 3, 12, 12], chunk=8)
    order = longest_streaming_first(groups)
    assert [list(g[2]) for g in order] == [[3], [0], [1], [2], [4]]  # the first of the two longest
    resident_only = group_units([2, 3], chunk=8)
    assert longest_streaming_first(resident_only) == resident_only


# --- modes


def modes(plan):
    return [(list(g.units), g.mode) for g in plan.groups]


def test_step_plan_modes():
    V, s = 1000, 4
    eight = 8 * V * s
    one = plan_dpo_step([3, 4], V, s, None, "sigmoid")
    assert not one.recompute and modes(one) == [([0, 1], RESIDENT)] and one.one_weight_gemm
    assert one.chunk == chunk_tokens(V, s, None) and one.total == 7 and one.buffer_rows == 7
    # Tied loss: the longest streaming pair streams once into the empty accumulator; the other runs twice.
    tied = plan_dpo_step([3, 10, 12], V, s, eight, "sigmoid")
    assert modes(tied) == [([2], STREAM_ONCE), ([0], RESIDENT), ([1], STREAM_TWICE)]
    assert not tied.one_weight_gemm and tied.buffer_rows == 8
    assert tied.groups[0].chunks == ((13, 21), (21, 25))
    # Run twice: the short remainder first, so the gradient pass starts from the full chunk still in the buffer.
    assert tied.groups[2].chunks == ((3, 5), (5, 13))
    # Untied: every streaming pair runs twice; without a weight gradient none does.
    assert [m for _, m in modes(plan_dpo_step([3, 10, 12], V, s, eight, "apo_zero"))] == \
        [STREAM_TWICE, RESIDENT, STREAM_TWICE]
    no_weight = plan_dpo_step([3, 10, 12], V, s, eight, "apo_zero", weight_grad=False)
    assert [m for _, m in modes(no_weight)] == [STREAM_ONCE, RESIDENT, STREAM_ONCE]
    # A resident group without tokens leaves the accumulator empty for the streaming pair after it.
    assert modes(plan_dpo_step([0, 10], V, s, eight, "sigmoid")) == [([1], STREAM_ONCE), ([0], RESIDENT)]


def test_default_budget_grows_the_buffer_when_a_pair_would_run_twice():
    V, s = 128256, 2
    # 2 x 8192 at the Llama-3 head: pairs of 12288 tokens. At C = 8192 the second runs twice and projects 4096
    # tokens again; with the 2.5 GiB buffer only 12288 - 10368 = 1920.
    plan = plan_dpo_step([12288, 12288], V, s, None, "sigmoid")
    assert plan.chunk == 10368 and [g.mode for g in plan.groups] == [STREAM_ONCE, STREAM_TWICE]
    assert plan.groups[1].chunks == ((12288, 14208), (14208, 24576))
    # An explicit budget is kept; no pair run twice, no growth.
    assert plan_dpo_step([12288, 12288], V, s, 8192 * V * s, "sigmoid").chunk == 8192
    assert plan_dpo_step([49152], V, s, None, "sigmoid").chunk == 8192
    # A small vocabulary: the grown buffer holds the whole pair, which becomes resident.
    small = plan_dpo_step([9000, 9000], 1000, 4, None, "sigmoid")
    assert small.chunk == 9000 and [g.mode for g in small.groups] == [RESIDENT, RESIDENT]


def test_recompute_decision():
    V, s = 1000, 4
    low = plan_dpo_step([3, 4], V, s, "low", "sigmoid")
    assert low.recompute and low.groups == () and low.chunks == ((0, 7),) and low.one_weight_gemm
    # Losses coupling pairs through their log-probs recompute unless the batch fits one chunk.
    assert not plan_dpo_step([3, 4], V, s, 8 * V * s, "aot").recompute
    coupled = plan_dpo_step([3, 4, 5], V, s, 8 * V * s, ["sigmoid", "aot"])
    assert coupled.recompute and coupled.chunks == ((0, 8), (8, 12)) and not coupled.one_weight_gemm
    logps = plan_logps(20, V, s, 8 * V * s)
    assert logps.recompute and logps.chunks == ((0, 8), (8, 16), (16, 20)) and logps.buffer_rows == 8
    assert plan_logps(0, V, s, None).chunks == () and plan_logps(0, V, s, None).buffer_rows == 1
