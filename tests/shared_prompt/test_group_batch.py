"""The group batch: K responses after one prompt, the attribution, the attention rule, truncation and skipped groups,
and the pair batch as its K = 2 case."""
import random

import pytest
import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.shared_prompt import (
    GroupBatch,
    build_group_batch,
    build_shared_batch,
    truncate_group,
    unshared_group_rows,
)
from dpo_kernels.shared_prompt.batch import PAD, PROMPT
from tests.helpers import brute_force_mask

# K = 2, 3, 5 and 8 in one batch: an empty response, identical responses, an empty prompt, a one-token prompt.
GROUPS = [
    ([5, 6, 7], [[8, 9], [10, 11, 12]]),
    ([4], [[], [13], [14, 15]]),
    ([14, 15], [[16, 17, 18], [16, 17, 18], [19], [20, 21], [16, 17]]),
    ([], [[19, 20], [21]]),
    ([22, 23, 24, 25, 26, 27], [[28], [29, 30, 31, 32], [33, 34], [35], [36, 37, 38, 39, 40], [41], [42, 43],
                                [44]]),
]


def unshared_scores(groups):
    """(sequence, position in its unshared row, target) of every scored label, by the HF shift rule on
    `[prompt | response]`, sequences numbered group by group."""
    out, seq = [], 0
    for p, responses in groups:
        for response in responses:
            row = list(p) + list(response)
            out += [(seq, t, row[t + 1]) for t in range(len(row) - 1) if t + 1 >= len(p)]
            seq += 1
    return sorted(out)


def random_groups(sizes, seed):
    rng = random.Random(seed)
    return [([rng.randrange(3, 90) for _ in range(rng.randrange(0, 6))],
             [[rng.randrange(3, 90) for _ in range(rng.randrange(0, 5))] for _ in range(k)]) for k in sizes]


@pytest.mark.parametrize("pack", [False, True])
def test_attribution_scores_what_the_unshared_rows_score(pack):
    batch = build_group_batch(GROUPS, pack=pack, pad_id=1)
    assert isinstance(batch, GroupBatch) and batch.sizes == (2, 3, 5, 2, 8)
    assert batch.group_sizes.tolist() == [2, 3, 5, 2, 8] and batch.num_seqs == 20
    assert batch.group_starts == (0, 2, 5, 10, 12)
    expected = unshared_scores(GROUPS)
    flat_pos, flat_ids = batch.position_ids.reshape(-1), batch.input_ids.reshape(-1)
    got = sorted((s, flat_pos[r].item(), t) for r, t, s in zip(batch.token_rows.tolist(), batch.token_targets.tolist(),
                                                              batch.token_seqs.tolist(), strict=True))
    assert got == expected
    assert batch.counts.tolist() == [sum(1 for e in expected if e[0] == s) for s in range(20)]
    assert batch.max_count == max(batch.counts.tolist())
    assert batch.token_seqs.tolist() == sorted(batch.token_seqs.tolist())
    rows = [list(p) + list(r) for p, responses in GROUPS for r in responses]
    for r, seq, t in zip(batch.token_rows.tolist(), batch.token_seqs.tolist(), batch.token_targets.tolist(),
                         strict=True):
        pos = flat_pos[r].item()
        assert flat_ids[r].item() == rows[seq][pos] and rows[seq][pos + 1] == t
    # The last prompt row of the K = 8 group scores the first token of all eight responses.
    last_prompt = batch.token_rows[batch.token_seqs == 12][0].item()
    assert batch.token_rows.tolist().count(last_prompt) == 8
    attribution = batch.attribution
    assert attribution.num_seqs == 20 and torch.equal(attribution.rows, batch.token_rows)


def test_layout_of_one_group():
    batch = build_group_batch(GROUPS, pad_id=1)
    assert batch.input_ids.shape == (5, 23)
    assert batch.input_ids[1, :4].tolist() == [4, 13, 14, 15] and batch.input_ids[1, 4:].tolist() == [1] * 19
    assert batch.position_ids[1, :4].tolist() == [0, 1, 1, 2]  # every response continues from the prompt's end
    assert batch.segment_ids[1, :5].tolist() == [PROMPT, 2, 3, 3, PAD]  # the empty response 0 holds no position
    assert batch.document_ids[1, :5].tolist() == [1, 1, 1, 1, -1]
    assert batch.labels[1, :4].tolist() == [IGNORE_INDEX, 13, 14, 15]
    assert batch.counts[2:5].tolist() == [0, 1, 2]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_mask_is_the_rule(pack, window):
    batch = build_group_batch(GROUPS, pack=pack, max_row_tokens=30 if pack else None)
    mask = batch.attention_mask(window)
    assert torch.equal(mask, brute_force_mask(batch, window))
    rows, T = batch.input_ids.shape
    b, q, k = torch.meshgrid(torch.arange(rows), torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(batch.mask_mod(window)(b, None, q, k).unsqueeze(1), mask)


def test_packing_puts_groups_in_rows_up_to_the_cap():
    lengths = [len(p) + sum(map(len, rs)) for p, rs in GROUPS]  # 8, 4, 13, 3, 23
    assert build_group_batch(GROUPS, pack=True).input_ids.shape == (1, sum(lengths))
    capped = build_group_batch(GROUPS, pack=True, max_row_tokens=25)
    assert capped.input_ids.shape == (3, 25)  # the longest row: [8 + 4 + 13]
    assert [row.unique().tolist() for row in capped.document_ids] == [[0, 1, 2], [-1, 3], [-1, 4]]
    with pytest.raises(ValueError, match="group 4 holds 23 tokens"):
        build_group_batch(GROUPS, pack=True, max_row_tokens=20)
    assert build_group_batch(GROUPS, pad_to_multiple_of=16).input_ids.shape == (5, 32)


@pytest.mark.parametrize("K", range(2, 9))
def test_every_group_size(K):
    groups = random_groups([K] * 3, seed=K)
    batch = build_group_batch(groups, pack=True, max_row_tokens=64)
    assert batch.sizes == (K,) * 3 and batch.num_seqs == 3 * K
    flat_pos = batch.position_ids.reshape(-1)
    got = sorted((s, flat_pos[r].item(), t) for r, t, s in zip(batch.token_rows.tolist(), batch.token_targets.tolist(),
                                                              batch.token_seqs.tolist(), strict=True))
    assert got == unshared_scores(groups)
    assert torch.equal(batch.attention_mask(), brute_force_mask(batch))


def test_a_pair_batch_is_the_group_batch_of_two_renumbered():
    pairs = [(p, rs[0], rs[1]) for p, rs in GROUPS if len(rs) >= 2]
    shared = build_shared_batch(pairs, pack=True, pad_id=3)
    groups = build_group_batch([(p, [c, r]) for p, c, r in pairs], pack=True, pad_id=3)
    for name in ("input_ids", "position_ids", "segment_ids", "document_ids", "labels"):
        assert torch.equal(getattr(shared, name), getattr(groups, name)), name
    B = len(pairs)
    # Chosen i is sequence 2i of the group batch, rejected i is 2i + 1.
    to_group = torch.tensor([2 * i for i in range(B)] + [2 * i + 1 for i in range(B)])
    assert torch.equal(groups.counts[to_group], shared.counts)

    def entries(batch, seqs):
        return sorted(zip(batch.token_rows.tolist(), batch.token_targets.tolist(), seqs.tolist(), strict=True))

    assert entries(shared, to_group[shared.token_seqs]) == entries(groups, groups.token_seqs)


def test_truncation_drops_responses_and_skips_groups():
    # max_length 7: the 6-token prompt leaves one token per response; a 7-token prompt leaves none.
    groups = [*GROUPS, ([1, 50, 51, 52, 53, 54, 55], [[56], [57, 58]]), ([1, 60, 61, 62, 63, 64, 65], [[], [], [66]])]
    batch = build_group_batch(groups, max_length=7)
    assert batch.skipped_groups == 1 and batch.kept_groups == (0, 1, 2, 3, 4, 6)
    # The second prompt that fills max_length drops its one non-empty response and keeps its two empty ones.
    assert batch.sizes == (2, 3, 5, 2, 8, 2) and batch.counts[-2:].tolist() == [0, 0]
    assert truncate_group(*groups[5], max_length=7) is None
    assert truncate_group(*groups[4], max_length=7) == ([22, 23, 24, 25, 26, 27], [[28], [29], [33], [35], [36], [41],
                                                                                   [42], [44]])
    # The prompt keeps its BOS and its last tokens, as the trainer's rows.
    assert truncate_group([1, 5, 6, 7, 8], [[9, 10, 11], [12]], max_length=5, max_prompt_length=3,
                          bos_token_id=1) == ([1, 7, 8], [[9, 10], [12]])
    kept = [truncate_group(p, rs, max_length=7) for p, rs in groups]
    flat_pos = batch.position_ids.reshape(-1)
    got = sorted((s, flat_pos[r].item(), t) for r, t, s in zip(batch.token_rows.tolist(), batch.token_targets.tolist(),
                                                              batch.token_seqs.tolist(), strict=True))
    assert got == unshared_scores([k for k in kept if k is not None])
    with pytest.raises(ValueError, match="all 1 groups were skipped"):
        build_group_batch([groups[5]], max_length=7)


def test_unshared_rows_are_the_groups_sequences():
    ids, mask, labels = unshared_group_rows(GROUPS, pad_id=1, max_length=7)
    kept = [g for g in (truncate_group(p, rs, max_length=7) for p, rs in GROUPS) if g is not None]
    rows = [(p, r) for p, rs in kept for r in rs]
    assert ids.shape == (20, max(len(p) + len(r) for p, r in rows))
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        assert ids[i, :n].tolist() == p + r and ids[i, n:].eq(1).all() and mask[i].sum() == n
        assert labels[i].tolist() == [IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * (ids.shape[1] - n)


def test_moving_keeps_the_group_fields():
    batch = build_group_batch(GROUPS, max_length=7)
    moved = batch.to("cpu")
    assert isinstance(moved, GroupBatch) and moved.sizes == batch.sizes and moved.kept_groups == batch.kept_groups
    assert moved.skipped_groups == batch.skipped_groups and torch.equal(moved.group_sizes, batch.group_sizes)


@pytest.mark.parametrize("groups, message", [
    ([], "at least one group"),
    ([([1], [[2]])], "group 0 has 1 responses; a group holds 2 to 16"),
    ([([1], [[2]] * 17)], "group 0 has 17 responses"),
    ([([1], [[2], [3]]), ([1], [[2], [-3]])], "group 1's response 1 must hold non-negative integer token ids"),
    ([([1.5], [[2], [3]])], "group 0's prompt"),
    ([([1], [2], [3])], "group 0 must be a"),
])
def test_bad_groups_are_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        build_group_batch(groups)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="max_row_tokens caps packed rows"):
        build_group_batch(GROUPS, max_row_tokens=40)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1 or None, got 0"):
        build_group_batch(GROUPS, max_length=0)
