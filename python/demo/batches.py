"""Token batches for the demo's warm-up and evaluation (the DPO step itself uses the package's data pipeline).

A row is prompt tokens, response tokens and `<eos>`; labels are -100 on the prompt and on padding, so a loss or a
log-prob counts the response and its end only. The demo's tokenizer is word-level, so tokenizing prompt and response
apart gives the same ids as tokenizing them joined by a space.
"""
import torch

IGNORE_INDEX = -100


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + response + <eos>` and the number of prompt tokens."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


def collate(tokenizer, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels`, each `[R, T]` int64."""
    rows = [encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_padded_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` `[R, T]` for generation, so every row ends where answers start."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
