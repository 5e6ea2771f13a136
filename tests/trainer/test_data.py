"""dpo_kernels.trainer.data: loading, the prompt/response boundary, truncation, chat rendering, bad rows, batching."""
import json

import pytest
import torch

from dpo_kernels.trainer.data import IGNORE_INDEX, BadRowError, collate, load_preference_data, tokenize_pair
from dpo_kernels.trainer.errors import InputFileError
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
def test_bad_row_error_names_file_and_line(tmp_path, word_tok, bad, message):
    rows = preference_rows(3)
    rows.insert(2, bad)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError) as info:
        load_preference_data(path, word_tok, max_length=16, max_prompt_length=32)
    text = str(info.value)
    assert text.startswith(f"{path}: line 3: ") and message in text


def _lines(*parts: bytes) -> bytes:
    return b"\n".join(parts) + b"\n"


def _row(i: int) -> bytes:
    return json.dumps(preference_rows(i + 1)[i]).encode()


BAD_LINES = [  # a bad line of the file, what the error says
    (b"{not json", "not valid JSON"),
    (b'{"prompt": "the sky \xff", "chosen": " blue", "rejected": " red"}', "not valid UTF-8 (byte 0xff"),
    (b'{"prompt": "the sky \\ud800", "chosen": " blue", "rejected": " red"}', "'prompt' holds a lone surrogate"),
    (b'{"prompt": "the sky", "chosen": " blue"}', "missing field"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_bad_line_after_blank_lines_is_reported_by_its_line(tmp_path, word_tok, bad, message):
    # Blank lines count: the bad row is line 5 of the file although it is the third non-blank one.
    path = tmp_path / "blank.jsonl"
    path.write_bytes(_lines(_row(0), b"", _row(1), b"   ", bad, _row(2)))
    with pytest.raises(BadRowError) as info:
        load_preference_data(path, word_tok, max_length=64)
    assert str(info.value).startswith(f"{path}: line 5: ") and message in str(info.value)


def test_skip_bad_rows_drops_bad_lines_counts_and_reports_them(tmp_path, word_tok):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_lines(_row(0), *(bad for bad, _ in BAD_LINES), _row(1), _row(2)))
    with pytest.warns(UserWarning, match=r"mixed.jsonl: dropped 4 bad row\(s\) of 7 \(line 2: not valid JSON"):
        data = load_preference_data(path, word_tok, max_length=64, skip_bad_rows=True)
    assert data.dropped == 4 and len(data) == 3


def test_skip_bad_rows_counts_dropped(tmp_path, word_tok):
    rows = preference_rows(4)
    rows[1:1] = [bad for bad, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.warns(UserWarning, match="dropped 5 bad row"):
        data = load_preference_data(path, word_tok, max_length=16, max_prompt_length=32, skip_bad_rows=True)
    assert data.dropped == len(BAD_ROWS) and len(data) == 4


def test_a_bad_row_of_a_json_list_is_reported_by_its_index(tmp_path, word_tok):
    rows = preference_rows(3)
    rows[1] = {"prompt": "the sky", "chosen": " blue"}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(BadRowError, match=r"rows.json: row 1: missing field"):
        load_preference_data(path, word_tok, max_length=64)


@pytest.mark.parametrize("setup,message", [
    (lambda d: d / "nope.jsonl", "no such file or directory"),
    (lambda d: (d / "plain").mkdir() or d / "plain", "is a directory but not one written by datasets.save_to_disk"),
    (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", "unsupported dataset format '.csv'"),
    (lambda d: (d / "x.parquet").write_bytes(b"PAR1 not really") and d / "x.parquet", "not a readable parquet"),
    (lambda d: (d / "x.json").write_text('[{"prompt": 1},\n oops]') and d / "x.json", "line 2: not valid JSON"),
    (lambda d: (d / "x.json").write_text('{"rows": []}') and d / "x.json", "expected a JSON list of rows"),
])
def test_a_missing_or_unreadable_data_file_is_one_error_naming_it(tmp_path, word_tok, setup, message):
    path = setup(tmp_path)
    with pytest.raises(InputFileError) as info:
        load_preference_data(path, word_tok, max_length=64)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


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
