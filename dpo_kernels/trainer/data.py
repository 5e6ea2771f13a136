"""Preference data for the trainer: load rows, tokenize them, batch them (chosen rows first, then rejected).

Rows are `{prompt, chosen, rejected}` (or groups of K ranked responses: `trainer.group_data`), either all strings
(standard form) or all lists of `{role, content}` messages (conversational form, rendered with the tokenizer's chat
template). Files: `.json` (a list of rows), `.jsonl`, `.parquet`, or a directory written by
`datasets.Dataset.save_to_disk`. A bad row is reported by the file's 1-based line (JSON lines) or the 0-based row
index (other formats), or skipped and counted with `skip_bad_rows`.

Where the prompt ends: the prompt and prompt+response are tokenized separately and the response starts at the
longest common prefix of the two id lists (for chosen and rejected alike: the shorter of the two), so that a BPE
merge across the boundary can neither shift the mask nor drop a response token. Responses get EOS appended.
Truncation: the prompt keeps its last `max_prompt_length` tokens (and its BOS), then the response is cut to fit
`max_length`. A prompt that leaves no room for a response is a bad row.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.trainer.errors import InputFileError, UserInputError
from dpo_kernels.trainer.group_data import group_digest, group_row_problem, is_group_row, tokenize_group
from dpo_kernels.trainer.row_text import common_prefix, messages_problem, not_unicode

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Example:
    """One tokenized pair; `*_ids` are prompt + response (+ EOS), the first `prompt_len` ids are the prompt."""

    prompt_len: int
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


@dataclass
class PreferenceData:
    examples: list          # `Example`s (kind "pair") or `group_data.GroupExample`s (kind "group")
    source: str
    dropped: int            # rows dropped because they were malformed (only with skip_bad_rows)
    fingerprint: str        # sha256 of every token id (and score): keys the reference log-prob cache
    kind: str = "pair"      # "pair" or "group"
    skipped: int = 0        # groups that truncation left with fewer than two responses

    def __len__(self) -> int:
        return len(self.examples)


class BadRowError(InputFileError):
    """A dataset row that cannot be used. Raised with the problem alone by `tokenize_pair`; `load_preference_data`
    adds the file and where in it (`line N` of a JSON-lines file, `row I` of other formats)."""

    def __init__(self, problem: str, path=None, where: str | None = None):
        if path is None:
            UserInputError.__init__(self, problem)
            self.path, self.problem = "", problem
        else:
            super().__init__(path, f"{where}: {problem}")
        self.reason, self.where = problem, where


@dataclass(frozen=True)
class _Unreadable:
    """A line of a JSON-lines file that is no row: not UTF-8 or not JSON (dropped by skip_bad_rows like a bad row)."""

    problem: str


# ---------------------------------------------------------------------------------------------------------- loading
_DATASETS_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def read_rows(path: str | os.PathLike) -> list[tuple[str, object]]:
    """`(where, raw row)` of a JSON / JSONL / parquet file or a saved `datasets` directory, in file order.

    `where` is `line N` (1-based line of the file) for JSON lines and `row I` (0-based, as `dataset[I]`) for the other
    formats. A JSON-lines line that is not UTF-8 or not JSON comes back as an unreadable row, for the caller to
    report or skip. Raises InputFileError for a missing, unreadable or unsupported file.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or directory")
    if path.is_dir():
        rows = _read_datasets_dir(path)
    elif path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(str(path)).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise InputFileError(path, f"not a readable parquet file ({str(e).splitlines()[0]})") from None
    elif path.suffix.lower() in (".json", ".jsonl"):
        data = path.read_bytes()
        rows = _json_document(path, data) if path.suffix.lower() == ".json" else None
        if rows is None:
            return _json_lines(data)
    else:
        raise InputFileError(path, f"unsupported dataset format {path.suffix!r}; use .json, .jsonl, .parquet or a "
                                   "datasets.save_to_disk directory")
    return [(f"row {i}", row) for i, row in enumerate(rows)]


def _read_datasets_dir(path: Path) -> list:
    if not any((path / name).is_file() for name in _DATASETS_MARKERS):
        raise InputFileError(path, "is a directory but not one written by datasets.save_to_disk (no "
                                   f"{' / '.join(_DATASETS_MARKERS)}); point at a .json/.jsonl/.parquet file or such "
                                   "a directory")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise InputFileError(path, f"cannot load the saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise InputFileError(path, f"holds splits {list(ds)}; point at one split's directory or name it 'train'")
    return ds.to_list()


def _json_document(path: Path, data: bytes) -> list | None:
    """The rows of a .json file holding one list, or None when it holds JSON lines instead."""
    is_list = data.lstrip()[:1] == b"["
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        if not is_list:
            return None
        line = data.count(b"\n", 0, e.start) + 1
        raise InputFileError(path, f"line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    except json.JSONDecodeError as e:
        if not is_list:
            return None
        raise InputFileError(path, f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise InputFileError(path, f"expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _json_lines(data: bytes) -> list[tuple[str, object]]:
    rows = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((f"line {line_no}", _Unreadable(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                                        f"{e.start + 1})")))
            continue
        try:
            rows.append((f"line {line_no}", json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((f"line {line_no}", _Unreadable(f"not valid JSON ({e.msg})")))
    return rows


def row_problem(row) -> str | None:
    """What is wrong with a raw row (None when it is usable)."""
    if isinstance(row, _Unreadable):
        return row.problem
    if not isinstance(row, dict):
        return f"a row must be an object with {FIELDS}, got {type(row).__name__}"
    missing = [f for f in FIELDS if f not in row or row[f] is None]
    if missing:
        return f"missing field(s) {missing}"
    if all(isinstance(row[f], str) for f in FIELDS):
        empty = [f for f in FIELDS if not row[f].strip()]
        if empty:
            return f"empty text in {empty}"
        return next(filter(None, (not_unicode(row[f], f) for f in FIELDS)), None)
    if all(isinstance(row[f], list) for f in FIELDS):
        for f in FIELDS:
            problem = messages_problem(row[f], f)
            if problem:
                return problem
        return None
    kinds = {f: type(row[f]).__name__ for f in FIELDS}
    return f"fields must be all strings or all message lists, got {kinds}"


# ------------------------------------------------------------------------------------------------------ tokenizing
def _render(tokenizer, row) -> tuple[str, str, str]:
    """(prompt, prompt+chosen, prompt+rejected) as text."""
    if isinstance(row["prompt"], str):
        return row["prompt"], row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError("conversational rows need a tokenizer with a chat template (tokenizer.chat_template is "
                             "unset)")
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    chosen = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    rejected = tokenizer.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False)
    return prompt, chosen, rejected


def tokenize_pair(tokenizer, row, *, max_length: int, max_prompt_length: int | None) -> Example:
    """Tokenizes one valid row (see `row_problem`); raises BadRowError when the prompt leaves no room."""
    prompt, full_chosen, full_rejected = _render(tokenizer, row)
    # Chat templates put their own BOS in the text; plain text gets the tokenizer's special tokens.
    special = isinstance(row["prompt"], str)
    enc = tokenizer([prompt, full_chosen, full_rejected], add_special_tokens=special)["input_ids"]
    prompt_ids, chosen_ids, rejected_ids = enc
    cut = min(common_prefix(prompt_ids, chosen_ids), common_prefix(prompt_ids, rejected_ids))
    prompt_ids = list(chosen_ids[:cut])
    responses = []
    eos = tokenizer.eos_token_id
    for ids in (chosen_ids, rejected_ids):
        response = list(ids[cut:])
        if eos is not None and (not response or response[-1] != eos):
            response.append(eos)
        responses.append(response)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        bos = tokenizer.bos_token_id
        keep_bos = bos is not None and prompt_ids and prompt_ids[0] == bos and max_prompt_length > 1
        prompt_ids = ([bos] if keep_bos else []) + prompt_ids[len(prompt_ids) - (max_prompt_length - keep_bos):]
    if len(prompt_ids) >= max_length:
        raise BadRowError(
            f"the prompt alone is {len(prompt_ids)} tokens, which leaves no room for a response within "
            f"max_length={max_length} (lower max_prompt_length or raise max_length)"
        )
    room = max_length - len(prompt_ids)
    return Example(
        prompt_len=len(prompt_ids),
        chosen_ids=tuple(prompt_ids + responses[0][:room]),
        rejected_ids=tuple(prompt_ids + responses[1][:room]),
    )


def file_kind(path, rows) -> str:
    """"group" when the rows have the group form (`group_data.is_group_row`), else "pair"; raises InputFileError
    naming a line of each kind when the file mixes them."""

    group = next((where for where, row in rows if is_group_row(row)), None)
    if group is None:
        return "pair"
    pair = next((where for where, row in rows if isinstance(row, dict) and not is_group_row(row)
                 and any(f in row for f in ("chosen", "rejected"))), None)
    if pair is not None:
        raise InputFileError(path, f"holds pair rows ({pair}) and group rows ({group}); a file holds one kind")
    return "group"


def load_preference_data(path, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                         skip_bad_rows: bool = False) -> PreferenceData:
    """Loads and tokenizes a preference dataset of pair rows or of group rows (`trainer.group_data`).

    Raises InputFileError for a missing or unreadable file, and BadRowError naming the file and where in it (the
    1-based line of a JSON-lines file, else the 0-based row) for a malformed row, a line that is not JSON or not
    UTF-8, unless `skip_bad_rows`: then such rows are dropped, counted in `PreferenceData.dropped` and reported in
    one warning. Groups that truncation leaves with fewer than two responses are skipped, counted in
    `PreferenceData.skipped` and reported in one warning.
    """

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    rows = read_rows(path)
    kind = file_kind(path, rows)
    problem_of, tokenize = (row_problem, tokenize_pair) if kind == "pair" else (group_row_problem, tokenize_group)
    examples, bad, skipped = [], [], []
    for where, row in rows:
        try:
            problem = row.problem if isinstance(row, _Unreadable) else problem_of(row)
            if problem:
                raise BadRowError(problem)
            example = tokenize(tokenizer, row, max_length=max_length, max_prompt_length=max_prompt_length)
        except BadRowError as e:
            if not skip_bad_rows:
                raise BadRowError(f"{e.reason} (pass --skip-bad-rows to drop such rows)", path, where) from None
            bad.append(f"{where}: {e.reason}")
            continue
        if example is None:
            skipped.append(where)
            continue
        examples.append(example)
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        warnings.warn(f"{path}: dropped {len(bad)} bad row(s) of {len(rows)} ({shown})", stacklevel=2)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} group(s) whose prompt leaves no room for a response within "
                      f"max_length={max_length} ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})",
                      stacklevel=2)
    if not examples:
        raise InputFileError(path, f"no usable rows ({len(rows)} read, {len(bad)} dropped, {len(skipped)} skipped)")
    fingerprint = pair_digest(examples) if kind == "pair" else group_digest(examples)
    return PreferenceData(examples=examples, source=str(path), dropped=len(bad), fingerprint=fingerprint, kind=kind,
                          skipped=len(skipped))


def pair_digest(examples: list[Example]) -> str:
    """sha256 of every token id of `examples`."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(repr((e.prompt_len, e.chosen_ids, e.rejected_ids)).encode())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------- batching
def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Stacks B pairs into one right-padded batch of 2B rows: rows 0..B-1 chosen, B..2B-1 rejected.

    Returns `input_ids` `[2B, T]` int64, `attention_mask` `[2B, T]` int64, `labels` `[2B, T]` int64 (-100 on prompt
    and padding), `num_tokens` (non-padding tokens, a 0-d int64).
    """
    seqs = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    prompt_lens = [e.prompt_len for e in examples] * 2
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for r, (seq, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[r, : len(seq)] = ids
        attention_mask[r, : len(seq)] = 1
        labels[r, p : len(seq)] = ids[p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "num_tokens": attention_mask.sum()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
