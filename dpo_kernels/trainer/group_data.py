"""Preference groups for the trainer: one prompt with K ranked responses (2 <= K <= 16).

Rows are `{prompt, responses: [...], scores: [...]}` (higher is better, ties allowed) or `{prompt, ranking: [...]}`
(best first, read as the scores K-1, ..., 0). The prompt and the responses are all strings, or all lists of
`{role, content}` messages, as pair rows (`trainer.data`). A file holds pair rows or group rows, not both.

Each response is tokenized as a pair's response is: the prompt is cut at the longest common prefix of its own ids
and every prompt+response's ids, EOS is appended, the prompt keeps its last `max_prompt_length` tokens (and its
BOS), and each response keeps its first `max_length - len(prompt)` tokens. A response that truncation cuts to zero
tokens (the prompt fills `max_length`) is dropped, and a group left with fewer than two responses is skipped and
counted (`shared_prompt.truncate_group`), since one long prompt should not stop a run.

Pair rows train under a group loss as groups of two, chosen first (`as_groups`).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, replace

from dpo_kernels.shared_prompt.groups import MAX_GROUP_SIZE, MIN_GROUP_SIZE, truncate_group
from dpo_kernels.trainer.errors import UserInputError
from dpo_kernels.trainer.row_text import common_prefix, messages_problem, not_unicode

GROUP_FIELDS = ("responses", "ranking")


@dataclass(frozen=True)
class GroupExample:
    """One tokenized group: `prompt_ids`, each response's ids (EOS included, without the prompt) and its score
    (higher is better; a ranking's scores are K-1 .. 0)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.response_ids)


def is_group_row(row) -> bool:
    """Whether a raw row has the group form (a `responses` or `ranking` field)."""
    return isinstance(row, dict) and any(f in row for f in GROUP_FIELDS)


def _text_problem(value, name: str) -> str | None:
    if isinstance(value, str):
        return f"empty text in {name}" if not value.strip() else not_unicode(value, name)
    return messages_problem(value, name)


def _scores_problem(scores, count: int) -> str | None:
    if not isinstance(scores, list):
        return f"'scores' must be a list of numbers, got {type(scores).__name__}"
    if len(scores) != count:
        return f"'scores' holds {len(scores)} values for {count} responses"
    for k, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            return f"scores[{k}] must be a number, got {s!r}"
        if not math.isfinite(s):
            return f"scores[{k}] is {s!r}, not a finite number"
    return None


def group_row_problem(row) -> str | None:
    """What is wrong with a raw group row (None when it is usable)."""
    if not isinstance(row, dict):
        return f"a row must be an object with prompt and responses + scores (or ranking), got {type(row).__name__}"
    if row.get("prompt") is None:
        return "missing field(s) ['prompt']"
    if "responses" in row and "ranking" in row:
        return "a row holds 'responses' with 'scores', or 'ranking', not both"
    field = "responses" if "responses" in row else "ranking"
    responses = row[field]
    if not isinstance(responses, list):
        return f"'{field}' must be a list, got {type(responses).__name__}"
    if not MIN_GROUP_SIZE <= len(responses) <= MAX_GROUP_SIZE:
        return f"'{field}' holds {len(responses)} responses; a group holds {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE}"
    if field == "responses":
        if row.get("scores") is None:
            return "'responses' needs 'scores' (one number per response, higher is better); or give 'ranking', " \
                   "best first"
        problem = _scores_problem(row["scores"], len(responses))
        if problem:
            return problem
    values = [row["prompt"], *responses]
    if not (all(isinstance(v, str) for v in values) or all(isinstance(v, list) for v in values)):
        return f"the prompt and the {field} must be all strings or all message lists"
    problem = _text_problem(row["prompt"], "prompt")
    for k, response in enumerate(responses):
        problem = problem or _text_problem(response, f"{field}[{k}]")
    return problem


def _render(tokenizer, prompt, responses) -> tuple[str, list[str]]:
    """The prompt and each prompt+response as text."""
    if isinstance(prompt, str):
        return prompt, [prompt + r for r in responses]
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError("conversational rows need a tokenizer with a chat template (tokenizer.chat_template is "
                             "unset)")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return text, [tokenizer.apply_chat_template(prompt + r, tokenize=False) for r in responses]


def tokenize_group(tokenizer, row, *, max_length: int, max_prompt_length: int | None) -> GroupExample | None:
    """Tokenizes one valid group row (see `group_row_problem`); None when truncation leaves fewer than two
    responses (the group is skipped)."""
    responses = row["responses"] if "responses" in row else row["ranking"]
    scores = [float(s) for s in row["scores"]] if "responses" in row else \
        [float(len(responses) - 1 - k) for k in range(len(responses))]
    prompt, fulls = _render(tokenizer, row["prompt"], responses)
    # Chat templates put their own BOS in the text; plain text gets the tokenizer's special tokens.
    enc = tokenizer([prompt, *fulls], add_special_tokens=isinstance(row["prompt"], str))["input_ids"]
    prompt_ids, full_ids = enc[0], enc[1:]
    cut = min(common_prefix(prompt_ids, ids) for ids in full_ids)
    eos = tokenizer.eos_token_id
    response_ids = []
    for ids in full_ids:
        response = list(ids[cut:])
        if eos is not None and (not response or response[-1] != eos):
            response.append(eos)
        response_ids.append(response)
    kept = truncate_group(full_ids[0][:cut], response_ids, max_length=max_length,
                          max_prompt_length=max_prompt_length, bos_token_id=tokenizer.bos_token_id)
    # The responses share the prompt's room: truncation drops all of them (an empty one aside) or none, and a group
    # that lost any is skipped, so the scores stay aligned with the responses kept.
    if kept is None or len(kept[1]) != len(response_ids):
        return None
    prompt_ids, response_ids = kept
    return GroupExample(tuple(prompt_ids), tuple(tuple(r) for r in response_ids), tuple(scores))


def group_digest(examples) -> str:
    """sha256 of every token id and score of `examples` (what the group loss reads)."""
    digest = hashlib.sha256(b"groups")
    for e in examples:
        digest.update(repr((e.prompt_ids, e.response_ids, e.scores)).encode())
    return digest.hexdigest()


def pair_as_group(example) -> GroupExample:
    """A tokenized pair (`trainer.data.Example`) as a group of two, chosen first with the higher score."""
    p = example.prompt_len
    return GroupExample(tuple(example.chosen_ids[:p]), (tuple(example.chosen_ids[p:]), tuple(example.rejected_ids[p:])),
                        (1.0, 0.0))


def as_groups(data):
    """`data` (a `PreferenceData`) with its pairs as groups of two; group data is returned as is."""
    if data.kind == "group":
        return data
    examples = [pair_as_group(e) for e in data.examples]
    return replace(data, examples=examples, kind="group", fingerprint=group_digest(examples))


# ---------------------------------------------------------------------------------------------- --group-by-prompt
@dataclass(frozen=True)
class PromptGroup:
    """Pairs that share a prompt, run as one group: `prompt_ids`, each distinct response once (`response_ids`, EOS
    included), and each pair as `(chosen, rejected)` indices into them, in file order."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return len(self.response_ids)


def _prompt_group(prompt, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> PromptGroup:
    responses, index = [], {}
    for ids in (ids for pair in pairs for ids in pair):
        if ids not in index:
            index[ids] = len(responses)
            responses.append(ids)
    if len(responses) < MIN_GROUP_SIZE:
        # Every pair holds one response twice: keep the copy, as the pairs' rows would.
        responses.append(responses[0])
        return PromptGroup(prompt, tuple(responses), tuple((0, 1) for _ in pairs))
    return PromptGroup(prompt, tuple(responses), tuple((index[c], index[r]) for c, r in pairs))


def group_by_prompt(data):
    """`data` (a `PreferenceData` of pairs) with the pairs that share a prompt (the same prompt token ids) as one
    `PromptGroup`, in the order of each prompt's first pair. A prompt whose pairs hold more than `MAX_GROUP_SIZE`
    distinct responses makes several groups, one after another, each filled in file order."""
    by_prompt: dict[tuple[int, ...], list[list]] = {}
    for e in data.examples:
        p = e.prompt_len
        prompt, pair = tuple(e.chosen_ids[:p]), (tuple(e.chosen_ids[p:]), tuple(e.rejected_ids[p:]))
        chunks = by_prompt.setdefault(prompt, [[]])
        distinct = {ids for c, r in chunks[-1] for ids in (c, r)} | set(pair)
        if len(distinct) > MAX_GROUP_SIZE:
            chunks.append([])
        chunks[-1].append(pair)
    examples = [_prompt_group(prompt, pairs) for prompt, chunks in by_prompt.items() for pairs in chunks]
    digest = hashlib.sha256(b"prompt groups")
    for e in examples:
        digest.update(repr((e.prompt_ids, e.response_ids, e.pairs)).encode())
    return replace(data, examples=examples, kind="prompt_group", fingerprint=digest.hexdigest())
