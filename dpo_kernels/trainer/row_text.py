"""The text checks and the prompt boundary that pair rows (`trainer.data`) and group rows (`trainer.group_data`)
share."""
from __future__ import annotations


def not_unicode(text: str, name: str) -> str | None:
    """What is wrong with `text`, the field `name`, as Unicode (None when nothing is)."""
    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"'{name}' holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), not Unicode text"
    return None


def messages_problem(value, name: str) -> str | None:
    """What is wrong with `value`, the field `name`, as a list of chat messages (None when nothing is)."""
    if not isinstance(value, list) or not value:
        return f"'{name}' must be a non-empty list of messages"
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"'{name}' has a message that is not {{'role': str, 'content': str}}"
        if not m["content"].strip():
            return f"'{name}' has a message with empty content"
        problem = not_unicode(m["role"], name) or not_unicode(m["content"], name)
        if problem:
            return problem
    return None


def common_prefix(a, b) -> int:
    """The length of the longest common prefix of two id lists: where a response starts after its prompt, however
    the tokenizer merges across the boundary."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
