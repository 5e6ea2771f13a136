"""The tiny Llama and its supervised warm-up, which makes the DPO reference model.

The warm-up trains on the chosen AND the rejected response of every pair, in equal parts: the model learns the answer
format of each task (copy the words, say one of the two numbers, repeat a word) but not which of the two answers
follows the instruction, so the reference starts near chance on the preference.
"""
import random

import torch
from batches import collate
from transformers import LlamaConfig, LlamaForCausalLM


def build_model(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised fp32 `LlamaForCausalLM` sized for the tokenizer (0.14 M parameters at the defaults)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def warm_up(model, tokenizer, pairs: list[dict], *, steps: int, batch_size: int = 64, lr: float = 3e-3,
            seed: int = 0, log_every: int = 50) -> list[float]:
    """Trains `model` in place with next-token cross-entropy on the responses; returns the loss of each step."""
    rng = random.Random(seed)
    examples = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    losses = []
    for step in range(steps):
        prompts, responses = zip(*rng.sample(examples, batch_size), strict=True)
        loss = model(**collate(tokenizer, list(prompts), list(responses))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  warm-up step {step + 1:4d}/{steps}  loss {loss.item():.3f}")
    model.eval()
    return losses
