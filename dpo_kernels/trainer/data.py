"""Preference data for the trainer: load rows, tokenize them, batch them (chosen rows first, then rejected).

Rows are `{prompt, chosen, rejected}`, either all strings (standard form) or all lists of `{role, content}`
messages (conversational form, rendered with the tokenizer's chat template). Files: `.json` (a list of rows),
`.jsonl`, `.parquet`, or a directory written by `datasets.Dataset.save_to_disk`.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_kernels.constants import IGNORE_INDEX

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Example:
    """One tokenized pair; `*_ids` are prompt + response (+ EOS), the first `prompt_len` ids are the prompt."""

    prompt_len: int
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


@dataclass
class PreferenceData:
    examples: list[Example]
    source: str
    dropped: int            # rows dropped because they were malformed (only with skip_bad_rows)
    fingerprint: str        # sha256 of every token id: keys the reference log-prob cache

    def __len__(self) -> int:
        return len(self.examples)


class BadRowError(ValueError):
    """A dataset row that cannot be used; the message names the file and the row."""


# ---------------------------------------------------------------------------------------------------------- loading
def load_rows(path: str | os.PathLike) -> list:
    """The raw rows of a JSON / JSONL / parquet file or a saved `datasets` directory, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise ValueError(f"{path} holds splits {list(ds)}; point at one split's directory or name it 'train'")
        return ds.to_list()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError:
                rows = None  # a .json file holding JSON lines
            if isinstance(rows, list):
                return rows
            if rows is not None:
                raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadRowError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
        return rows
    raise ValueError(f"{path}: unsupported dataset format {suffix!r}; use .json, .jsonl, .parquet or a datasets dir")


def _check_messages(value, name: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"'{name}' must be a non-empty list of messages"
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"'{name}' has a message that is not {{'role': str, 'content': str}}"
        if not m["content"].strip():
            return f"'{name}' has a message with empty content"
    return None


def row_problem(row) -> str | None:
    """What is wrong with a raw row (None when it is usable)."""
    if not isinstance(row, dict):
        return f"a row must be an object with {FIELDS}, got {type(row).__name__}"
    missing = [f for f in FIELDS if f not in row or row[f] is None]
    if missing:
        return f"missing field(s) {missing}"
    if all(isinstance(row[f], str) for f in FIELDS):
        empty = [f for f in FIELDS if not row[f].strip()]
        return f"empty text in {empty}" if empty else None
    if all(isinstance(row[f], list) for f in FIELDS):
        for f in FIELDS:
            problem = _check_messages(row[f], f)
            if problem:
                return problem
        return None
    kinds = {f: type(row[f]).__name__ for f in FIELDS}
    return f"fields must be all strings or all message lists, got {kinds}"


# ------------------------------------------------------------------------------------------------------ tokenizing
def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render(tokenizer, row) -> tuple[str, str, str]:
    """(prompt, prompt+chosen, prompt+rejected) as text."""
    if isinstance(row["prompt"], str):
        return row["prompt"], row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational rows need a tokenizer with a chat template (tokenizer.chat_template is unset)")
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
    cut = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
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


def load_preference_data(path, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                         skip_bad_rows: bool = False) -> PreferenceData:
    """Loads and tokenizes a preference dataset.

    Raises BadRowError naming the file and the (0-based) row for a malformed row, unless `skip_bad_rows`, which
    drops such rows and counts them in `PreferenceData.dropped`.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    rows = load_rows(path)
    examples, dropped = [], 0
    digest = hashlib.sha256()
    for i, row in enumerate(rows):
        try:
            problem = row_problem(row)
            if problem:
                raise BadRowError(problem)
            example = tokenize_pair(tokenizer, row, max_length=max_length, max_prompt_length=max_prompt_length)
        except BadRowError as e:
            if not skip_bad_rows:
                raise BadRowError(f"{path}, row {i}: {e} (pass --skip-bad-rows to drop such rows)") from None
            dropped += 1
            continue
        examples.append(example)
        digest.update(repr((example.prompt_len, example.chosen_ids, example.rejected_ids)).encode())
    if not examples:
        raise ValueError(f"{path}: no usable rows ({len(rows)} read, {dropped} dropped)")
    return PreferenceData(examples=examples, source=str(path), dropped=dropped, fingerprint=digest.hexdigest())


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
