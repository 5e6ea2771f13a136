"""The shared-prompt batch: layout, attribution, attention rule, truncation (as the trainer's unshared rows)."""
import random

import pytest
import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.shared_prompt.batch import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    build_shared_batch,
    pairs_from_examples,
    truncate_pair,
)
from dpo_kernels.trainer.data import collate, tokenize_pair
from tests.helpers import brute_force_mask
from tests.tiny_models import build_tokenizer, preference_rows

# Empty chosen, a one-token prompt, identical responses, an empty prompt, a long pair.
PAIRS = [
    ([5, 6, 7], [8, 9], [10, 11, 12]),
    ([4], [], [13]),
    ([14, 15], [16, 17, 18], [16, 17, 18]),
    ([], [19, 20], [21]),
    ([22, 23, 24, 25, 26, 27], [28], [29, 30, 31, 32]),
]


def unshared_scores(pairs):
    """(sequence, position in its unshared row, target) of every scored label, by the HF shift rule on
    `[prompt | response]`: position t scores token t + 1 when t + 1 is a response token."""
    B = len(pairs)
    out = []
    for i, (p, c, r) in enumerate(pairs):
        for seq, response in ((i, c), (B + i, r)):
            row = list(p) + list(response)
            out += [(seq, t, row[t + 1]) for t in range(len(row) - 1) if t + 1 >= len(p)]
    return sorted(out)


@pytest.mark.parametrize("pack", [False, True])
def test_attribution_scores_what_the_unshared_rows_score(pack):
    batch = build_shared_batch(PAIRS, pack=pack, pad_id=1)
    B = len(PAIRS)
    expected = unshared_scores(PAIRS)
    # Map each shared hidden row back to (pair, segment, position): the position is the unshared row's position.
    flat_pos = batch.position_ids.reshape(-1)
    got = sorted((s, flat_pos[r].item(), t) for r, t, s in zip(batch.token_rows.tolist(), batch.token_targets.tolist(),
                                                              batch.token_seqs.tolist(), strict=True))
    assert got == expected
    assert batch.counts.tolist() == [sum(1 for e in expected if e[0] == s) for s in range(2 * B)]
    # Sequence by sequence, in token order.
    assert batch.token_seqs.tolist() == sorted(batch.token_seqs.tolist())
    # The hidden row that scores a label holds the token just before it in the unshared row.
    flat_ids = batch.input_ids.reshape(-1)
    for r, seq, t in zip(batch.token_rows.tolist(), batch.token_seqs.tolist(), batch.token_targets.tolist(),
                         strict=True):
        p, c, rej = PAIRS[seq % B]
        row = p + (c if seq < B else rej)
        pos = flat_pos[r].item()
        assert flat_ids[r].item() == row[pos] and row[pos + 1] == t


def test_layout_one_row_per_pair():
    batch = build_shared_batch(PAIRS, pad_id=1)
    assert batch.input_ids.shape == (5, 11)
    p, c, r = PAIRS[0]
    assert batch.input_ids[0, :8].tolist() == p + c + r and batch.input_ids[0, 8:].tolist() == [1] * 3
    assert batch.position_ids[0, :8].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert batch.segment_ids[0].tolist() == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3 + [PAD] * 3
    assert batch.document_ids[0].tolist() == [0] * 8 + [-1] * 3
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * 3 + c + r + [IGNORE_INDEX] * 3
    # The last prompt row scores the first token of both responses.
    assert batch.token_rows.tolist().count(2) == 2
    assert batch.num_positions == 55


def test_packing_puts_pairs_in_rows_up_to_the_cap():
    lengths = [len(p) + len(c) + len(r) for p, c, r in PAIRS]  # 8, 2, 8, 3, 11
    one_row = build_shared_batch(PAIRS, pack=True)
    assert one_row.input_ids.shape == (1, sum(lengths))
    capped = build_shared_batch(PAIRS, pack=True, max_row_tokens=13)
    assert capped.input_ids.shape == (3, 11)  # the longest row: [8 + 3]
    assert capped.document_ids[0].unique().tolist() == [-1, 0, 1]
    assert capped.document_ids[1].unique().tolist() == [2, 3]
    with pytest.raises(ValueError, match="pair 4 holds 11 tokens"):
        build_shared_batch(PAIRS, pack=True, max_row_tokens=10)
    with pytest.raises(ValueError, match="pack=True"):
        build_shared_batch(PAIRS, max_row_tokens=20)
    assert build_shared_batch(PAIRS, pad_to_multiple_of=8).input_ids.shape == (5, 16)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_mask_is_the_rule(pack, window):
    batch = build_shared_batch(PAIRS, pack=pack, max_row_tokens=16 if pack else None)
    mask = batch.attention_mask(window)
    assert mask.dtype == torch.bool and torch.equal(mask, brute_force_mask(batch, window))
    # Every query attends to something (no empty softmax row), padding included.
    assert mask.any(-1).all()


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.mark.parametrize("max_length, max_prompt_length", [(64, None), (9, None), (12, 4), (7, 1), (6, 5)])
def test_truncation_keeps_exactly_the_unshared_tokens(word_tok, max_length, max_prompt_length):
    rows = preference_rows(12, seed=3)
    full = [tokenize_pair(word_tok, row, max_length=10_000, max_prompt_length=None) for row in rows]
    cut = []
    for row in rows:
        try:
            cut.append(tokenize_pair(word_tok, row, max_length=max_length, max_prompt_length=max_prompt_length))
        except ValueError:
            cut.append(None)
    for untruncated, expected in zip(pairs_from_examples(full), cut, strict=True):
        if expected is None:
            with pytest.raises(ValueError, match="no room for a response"):
                truncate_pair(*untruncated, max_length=max_length, max_prompt_length=max_prompt_length,
                              bos_token_id=word_tok.bos_token_id)
            continue
        p, c, r = truncate_pair(*untruncated, max_length=max_length, max_prompt_length=max_prompt_length,
                                bos_token_id=word_tok.bos_token_id)
        assert (len(p), tuple(p + c), tuple(p + r)) == (expected.prompt_len, expected.chosen_ids,
                                                        expected.rejected_ids)


def test_truncated_batch_scores_the_trainers_unshared_labels(word_tok):
    """The shared batch of untruncated pairs, cut by build_shared_batch, scores exactly the labels of the trainer's
    own truncated, collated unshared rows."""
    rows = preference_rows(6, seed=1)
    kw = {"max_length": 9, "max_prompt_length": 5}
    examples = [tokenize_pair(word_tok, row, **kw) for row in rows]
    full = pairs_from_examples([tokenize_pair(word_tok, row, max_length=10_000, max_prompt_length=None)
                                for row in rows])
    batch = build_shared_batch(full, bos_token_id=word_tok.bos_token_id, **kw)
    unshared = collate(examples, pad_id=word_tok.pad_token_id)
    labels = unshared["labels"]
    expected = sorted((s, t, labels[s, t + 1].item()) for s, t in (labels[:, 1:] != IGNORE_INDEX).nonzero().tolist())
    flat_pos = batch.position_ids.reshape(-1)
    got = sorted((s, flat_pos[r].item(), t) for r, t, s in zip(batch.token_rows.tolist(),
                                                              batch.token_targets.tolist(),
                                                              batch.token_seqs.tolist(), strict=True))
    assert got == expected


def test_random_pairs_token_count_and_attribution():
    rng = random.Random(0)

    def ids(most):
        return [rng.randrange(50) for _ in range(rng.randint(0, most))]

    pairs = [(ids(6), ids(5), ids(5)) for _ in range(20)]
    for pack in (False, True):
        batch = build_shared_batch(pairs, pack=pack)
        flat_pos = batch.position_ids.reshape(-1)
        got = sorted((s, flat_pos[r].item(), t) for r, t, s in zip(batch.token_rows.tolist(),
                                                                  batch.token_targets.tolist(),
                                                                  batch.token_seqs.tolist(), strict=True))
        assert got == unshared_scores(pairs)
        real = (batch.segment_ids != PAD).sum().item()
        assert real == sum(len(p) + len(c) + len(r) for p, c, r in pairs)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one pair"):
        build_shared_batch([])
    with pytest.raises(ValueError, match="pair 0's chosen"):
        build_shared_batch([([1], [-3], [2])])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        build_shared_batch(PAIRS, pad_to_multiple_of=0)
