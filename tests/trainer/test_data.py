"""dpo_kernels.trainer.data: loading, the prompt/response boundary, truncation, chat rendering, bad rows, batching."""
import json

import pytest
import torch

from dpo_kernels.trainer.data import IGNORE_INDEX, BadRowError, collate, load_preference_data, tokenize_pair
from tests.tiny_models import build_tokenizer, conversational_rows, preference_rows, write_jsonl


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer(kind="bpe")


def test_word_level_boundary_masks_exactly_the_prompt(word_tok):
    row = {"prompt": "what is the color of the sky ?", "chosen": " the sky is blue .", "rejected": " red ."}
    ex = tokenize_pair(word_tok, row, max_length=64, max_prompt_length=32)
    prompt_ids = word_tok(row["prompt"])["input_ids"]
    assert ex.prompt_len == len(prompt_ids)
    assert list(ex.chosen_ids) == word_tok(row["prompt"] + row["chosen"])["input_ids"] + [word_tok.eos_token_id]
    assert list(ex.rejected_ids[: ex.prompt_len]) == prompt_ids
    assert ex.rejected_ids[-1] == word_tok.eos_token_id


def test_bpe_merge_across_boundary_neither_shifts_nor_drops_tokens(bpe_tok):
    # "a" ends the prompt and "b" starts the response: BPE merges them into one "ab" token in prompt+response.
    row = {"prompt": "the sky a", "chosen": "b the grass", "rejected": "bc is blue"}
    prompt_ids = bpe_tok(row["prompt"])["input_ids"]
    full = bpe_tok(row["prompt"] + row["chosen"])["input_ids"]
    assert full[: len(prompt_ids)] != prompt_ids, "test set-up: the tokenizer must merge across the boundary"
    ex = tokenize_pair(bpe_tok, row, max_length=64, max_prompt_length=64)
    assert ex.prompt_len < len(prompt_ids)
    # The sequence is exactly the tokenization of the joined text (+ EOS): nothing dropped, nothing shifted, and the
    # scored part covers the whole response (and the prompt characters merged into it).
    assert list(ex.chosen_ids) == full + [bpe_tok.eos_token_id]
    scored = bpe_tok.decode(list(ex.chosen_ids[ex.prompt_len:-1])).replace(" ", "")
    assert scored.endswith(row["chosen"].replace(" ", ""))
    assert list(ex.chosen_ids[: ex.prompt_len]) == list(ex.rejected_ids[: ex.prompt_len])


def test_truncation_keeps_prompt_end_and_bos_and_cuts_response(word_tok):
    words = "one two three four five six seven eight nine ten".split()
    row = {"prompt": "<bos> " + " ".join(words), "chosen": " yes yes yes yes yes", "rejected": " no"}
    ex = tokenize_pair(word_tok, row, max_length=8, max_prompt_length=4)
    ids = word_tok.convert_ids_to_tokens(list(ex.chosen_ids))
    assert ids[: ex.prompt_len] == ["<bos>", "eight", "nine", "ten"]
    assert ids[ex.prompt_len:] == ["yes"] * 4 and len(ex.chosen_ids) == 8
    assert word_tok.convert_ids_to_tokens(list(ex.rejected_ids))[ex.prompt_len:] == ["no", "<eos>"]


def test_conversational_rows_use_the_chat_template(word_tok):
    row = conversational_rows(1, seed=3)[0]
    ex = tokenize_pair(word_tok, row, max_length=64, max_prompt_length=64)
    rendered_prompt = word_tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    rendered_full = word_tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    prompt_ids = word_tok(rendered_prompt, add_special_tokens=False)["input_ids"]
    assert list(ex.chosen_ids[: ex.prompt_len]) == prompt_ids
    assert word_tok.convert_ids_to_tokens(prompt_ids[-1]) == "<assistant>"
    assert list(ex.chosen_ids) == word_tok(rendered_full, add_special_tokens=False)["input_ids"] + [
        word_tok.eos_token_id]


def test_file_formats_agree(tmp_path, word_tok):
    import datasets

    rows = preference_rows(6, seed=1)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "d_dir"))
    loaded = [load_preference_data(tmp_path / name, word_tok, max_length=64)
              for name in ("d.jsonl", "d.json", "d.parquet", "d_dir")]
    assert len(loaded[0]) == 6
    for other in loaded[1:]:
        assert other.examples == loaded[0].examples and other.fingerprint == loaded[0].fingerprint


BAD_ROWS = [
    ({"prompt": "what is the sky ?", "chosen": " blue ."}, "missing field"),
    ({"prompt": "what is the sky ?", "chosen": "  ", "rejected": " red ."}, "empty text"),
    ({"prompt": "what is the sky ?", "chosen": 3, "rejected": " red ."}, "all strings or all message lists"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": [{"role": "assistant", "content": "blue"}],
      "rejected": [{"role": "assistant", "content": "red"}]}, "empty content"),
    ({"prompt": " ".join(["sky"] * 40), "chosen": " blue", "rejected": " red"}, "leaves no room"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_row_error_names_file_and_row(tmp_path, word_tok, bad, message):
    rows = preference_rows(3)
    rows.insert(2, bad)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError) as info:
        load_preference_data(path, word_tok, max_length=16, max_prompt_length=32)
    text = str(info.value)
    assert str(path) in text and "row 2" in text and message in text


def test_skip_bad_rows_counts_dropped(tmp_path, word_tok):
    rows = preference_rows(4)
    rows[1:1] = [bad for bad, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = load_preference_data(path, word_tok, max_length=16, max_prompt_length=32, skip_bad_rows=True)
    assert data.dropped == len(BAD_ROWS) and len(data) == 4


def test_invalid_json_line_names_the_line(tmp_path, word_tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(preference_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(BadRowError, match="broken.jsonl, line 2"):
        load_preference_data(path, word_tok, max_length=64)


def test_collate_puts_chosen_first_right_padded(word_tok):
    rows = preference_rows(3, seed=2)
    examples = [tokenize_pair(word_tok, r, max_length=64, max_prompt_length=64) for r in rows]
    pad = word_tok.pad_token_id
    batch = collate(examples, pad)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 6
    for i, ex in enumerate(examples):
        for row, seq in ((i, ex.chosen_ids), (3 + i, ex.rejected_ids)):
            n = len(seq)
            assert ids[row, :n].tolist() == list(seq)
            assert (ids[row, n:] == pad).all() and mask[row, :n].all() and not mask[row, n:].any()
            assert (labels[row, : ex.prompt_len] == IGNORE_INDEX).all()
            assert labels[row, ex.prompt_len:n].tolist() == list(seq[ex.prompt_len:])
            assert (labels[row, n:] == IGNORE_INDEX).all()
    assert batch["num_tokens"].item() == mask.sum().item()
    assert labels.dtype == ids.dtype == torch.long
