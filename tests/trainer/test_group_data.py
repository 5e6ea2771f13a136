"""Group rows in the trainer: tokenization as a pair's, rankings, bad rows by file and line, skipped groups, the
fingerprint, and the settings that pair rows, group rows and the loss types must agree on."""
import json
import math

import pytest

from dpo_kernels.trainer.config import TrainConfig, check_config
from dpo_kernels.trainer.data import BadRowError, load_preference_data, tokenize_pair
from dpo_kernels.trainer.errors import InputFileError, UserInputError
from dpo_kernels.trainer.group_data import GroupExample, as_groups, pair_as_group, tokenize_group
from tests.tiny_models import build_tokenizer, conversational_rows, preference_rows, write_jsonl
from tests.trainer.group_rows import as_ranking_rows, group_rows


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer(kind="bpe")


def load(path, tok, **kw):
    return load_preference_data(path, tok, **{"max_length": 32, "max_prompt_length": 24, **kw})


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok"])
@pytest.mark.parametrize("conversational", [False, True])
def test_a_ranking_of_two_tokenizes_as_the_pair(request, tok_name, conversational):
    tok = request.getfixturevalue(tok_name)
    pairs = conversational_rows(6, seed=1) if conversational else preference_rows(6, seed=1)
    if tok_name == "bpe_tok":  # a BPE merge across the prompt's end
        pairs = [{"prompt": "the sky a", "chosen": "b the grass", "rejected": "bc is blue"}]
    for pair, ranking in zip(pairs, as_ranking_rows(pairs), strict=True):
        for max_length, max_prompt_length in ((64, 64), (12, 5)):
            kw = {"max_length": max_length, "max_prompt_length": max_prompt_length}
            assert tokenize_group(tok, ranking, **kw) == pair_as_group(tokenize_pair(tok, pair, **kw))


def test_scores_and_rankings(word_tok):
    row = {"prompt": "what is the color of the sky ?", "responses": [" blue .", " red .", " green ."],
           "scores": [2, 5.5, 2]}
    ex = tokenize_group(word_tok, row, max_length=64, max_prompt_length=32)
    assert ex.scores == (2.0, 5.5, 2.0) and ex.size == 3
    assert list(ex.prompt_ids) == word_tok(row["prompt"])["input_ids"]
    for response, ids in zip(row["responses"], ex.response_ids, strict=True):
        assert list(ex.prompt_ids + ids) == word_tok(row["prompt"] + response)["input_ids"] + [word_tok.eos_token_id]
    ranked = tokenize_group(word_tok, {"prompt": row["prompt"], "ranking": row["responses"]}, max_length=64,
                            max_prompt_length=32)
    assert ranked.scores == (2.0, 1.0, 0.0) and ranked.response_ids == ex.response_ids


BAD = [
    ({"prompt": "hi", "responses": [" a ."], "scores": [1]}, "holds 1 responses"),
    ({"prompt": "hi", "ranking": [" a ."] * 17}, "holds 17 responses"),
    ({"prompt": "hi", "responses": [" a .", " b ."], "scores": [1, 2, 3]}, "'scores' holds 3 values for 2"),
    ({"prompt": "hi", "responses": [" a .", " b ."]}, "needs 'scores'"),
    ({"prompt": "hi", "responses": [" a .", " b ."], "scores": [1, float("nan")]}, "scores[1] is nan"),
    ({"prompt": "hi", "responses": [" a .", " b ."], "scores": [1, "2"]}, "scores[1] must be a number"),
    ({"prompt": "hi", "ranking": [" a .", "  "]}, "empty text in ranking[1]"),
    ({"prompt": "hi", "ranking": [" a .", [{"role": "assistant", "content": "b"}]]}, "all strings or all message"),
    ({"responses": [" a .", " b ."], "scores": [1, 2]}, "missing field(s) ['prompt']"),
    ({"prompt": "hi", "ranking": [" a ."], "responses": [" b ."]}, "not both"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_a_bad_group_row_names_file_and_line(tmp_path, word_tok, bad, message):
    rows = group_rows(3) + [bad] + group_rows(2, seed=1)
    path = write_jsonl(tmp_path / "groups.jsonl", rows)
    with pytest.raises(BadRowError) as e:
        load(path, word_tok)
    assert str(path) in str(e.value) and "line 4" in str(e.value) and message in str(e.value), str(e.value)
    assert "--skip-bad-rows" in str(e.value)


def test_skip_bad_rows_counts_bad_rows_and_skipped_groups(tmp_path, word_tok):
    long_prompt = {"prompt": " ".join(["the sky"] * 20), "ranking": [" blue .", " red ."]}
    rows = group_rows(4) + [bad for bad, _ in BAD[:3]] + [long_prompt] + group_rows(2, seed=1)
    path = write_jsonl(tmp_path / "groups.jsonl", rows)
    with pytest.warns(UserWarning) as caught:
        data = load(path, word_tok, max_length=16, max_prompt_length=16, skip_bad_rows=True)
    messages = [str(w.message) for w in caught]
    assert data.kind == "group" and len(data) == 6 and data.dropped == 3 and data.skipped == 1
    assert any("dropped 3 bad row(s) of 10" in m for m in messages)
    assert any("skipped 1 group(s)" in m and "line 8" in m for m in messages), messages
    assert all(isinstance(e, GroupExample) and 2 <= e.size <= 5 for e in data.examples)


def test_a_file_of_pair_and_group_rows_is_refused(tmp_path, word_tok):
    path = write_jsonl(tmp_path / "mixed.jsonl", preference_rows(2) + group_rows(1))
    with pytest.raises(InputFileError, match=r"pair rows \(line 1\) and group rows \(line 3\)"):
        load(path, word_tok)


def test_the_fingerprint_covers_ids_and_scores(tmp_path, word_tok):
    rows = group_rows(4)
    base = load(write_jsonl(tmp_path / "a.jsonl", rows), word_tok).fingerprint
    rescored = json.loads(json.dumps(rows))
    rescored[2]["scores"][0] += 0.5
    assert load(write_jsonl(tmp_path / "b.jsonl", rescored), word_tok).fingerprint != base
    assert load(write_jsonl(tmp_path / "c.jsonl", rows), word_tok).fingerprint == base
    # Pairs as groups of two key another cache than the same pairs as pairs.
    pairs = load(write_jsonl(tmp_path / "p.jsonl", preference_rows(4)), word_tok)
    groups = as_groups(pairs)
    assert groups.kind == "group" and groups.fingerprint != pairs.fingerprint
    assert [e.scores for e in groups.examples] == [(1.0, 0.0)] * 4


def config(**kw):
    return TrainConfig(model="m", data="d.jsonl", **kw)


@pytest.mark.parametrize("kw, message", [
    ({"loss_type": "plackett_luce,sigmoid"}, "runs alone, not in a comma list"),
    ({"loss_type": "plackett_luce", "loss_weights": [1.0]}, "--sft-weight"),
    ({"loss_type": "all_pairs", "top_k": 2}, "top_k applies to loss_type 'plackett_luce'"),
    ({"loss_type": "plackett_luce", "pair_weighting": "score_gap"}, "pair_weighting applies to loss_type 'all_pairs'"),
    ({"loss_type": "sigmoid", "top_k": 1}, "top_k apply to the group loss types"),
    ({"loss_type": "sigmoid", "sft_weight": 0.5}, "sft_weight apply to the group loss types"),
    ({"loss_type": "all_pairs", "pair_loss": "aot"}, "pair_loss must be one of"),
    ({"loss_type": "all_pairs", "pair_weighting": "gap"}, "pair_weighting must be score_gap"),
    ({"loss_type": "plackett_luce", "top_k": 16}, "top_k must be in [1, 15]"),
    ({"loss_type": "plackett_luce", "pair_loss": "ipo"}, "reads no pair loss, so pair_loss 'ipo' would change"),
    ({"loss_type": "plackett_luce", "label_smoothing": 0.1}, "so label_smoothing 0.1 would change nothing"),
])
def test_group_settings_are_checked_before_loading(kw, message):
    with pytest.raises(UserInputError) as e:
        check_config(config(**kw))
    assert message in str(e.value), str(e.value)


def test_valid_group_settings_pass():
    check_config(config(loss_type="plackett_luce", top_k=1, sft_weight=0.5))
    check_config(config(loss_type="all_pairs", pair_loss="ipo", pair_weighting="score_gap", label_smoothing=0.0))
    check_config(config(loss_type="best_vs_worst", pair_loss="simpo", gamma=0.5))


def test_group_rows_with_a_pairwise_loss_suggest_all_pairs(tmp_path):
    from dpo_kernels.trainer import train
    from tests.tiny_models import tiny_setup, train_config

    tiny = tiny_setup(tmp_path / "tiny", rows=4)
    long_prompt = {"prompt": " ".join(["the sky"] * 20), "ranking": [" blue .", " red ."]}
    data = write_jsonl(tmp_path / "groups.jsonl", group_rows(4) + [long_prompt])
    with pytest.raises(UserInputError, match="--loss-type all_pairs --pair-loss ipo"):
        train(train_config(tiny, tmp_path / "out", data=str(data), loss_type="ipo"))
    with pytest.warns(UserWarning, match="skipped 1 group"):
        result = train(train_config(tiny, tmp_path / "ok", data=str(data), loss_type="all_pairs", pair_loss="ipo",
                                    max_steps=1, max_length=24, max_prompt_length=32))
    assert math.isfinite(result.history[0]["loss"]) and result.skipped_groups == 1
