"""Held-out measurements of a policy against the reference: preference, DPO rewards and greedy behaviour.

    preference accuracy   P[log pi(chosen) > log pi(rejected)]          what the model itself prefers
    reward accuracy       P[r(chosen) > r(rejected)],  r = beta * (log pi(y|x) - log pi_ref(y|x))   (ties count 1/2,
                          so the reference itself, whose rewards are all 0, scores the chance level 0.5)
    reward margin         mean of r(chosen) - r(rejected)
    follows instruction   fraction of prompts whose greedy answer is exactly the chosen response, overall and per task
"""
import tasks
import torch
from batches import collate, left_padded_prompts

import dpo_kernels


@torch.no_grad()
def pair_logprobs(model, tokenizer, pairs: list[dict], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs `(chosen [N], rejected [N])`, fp32, with the package's sequence log-prob op."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [p["prompt"] for p in chunk] * 2
        batch = collate(tokenizer, prompts, [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = dpo_kernels.sequence_logprobs(logits, batch["labels"])
        chosen.append(logps[: len(chunk)])
        rejected.append(logps[len(chunk) :])
    return torch.cat(chosen).float(), torch.cat(rejected).float()


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 128) -> list[str]:
    """The model's own answer to each prompt: greedy decoding until `<eos>`."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = left_padded_prompts(tokenizer, prompts[start : start + batch_size])
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def _accuracy(margins: torch.Tensor) -> float:
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


def evaluate(model, ref_logps, tokenizer, pairs: list[dict], beta: float) -> dict:
    """Metrics of `model` on `pairs`; `ref_logps` = the reference's `pair_logprobs` on the same pairs."""
    chosen, rejected = pair_logprobs(model, tokenizer, pairs)
    ref_chosen, ref_rejected = ref_logps
    reward_margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    answers = greedy_answers(model, tokenizer, [p["prompt"] for p in pairs])
    follows = [tasks.follows_instruction(p, a) for p, a in zip(pairs, answers, strict=True)]
    metrics = {
        "preference_accuracy": _accuracy(chosen - rejected),
        "logp_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": _accuracy(reward_margins),
        "reward_margin": reward_margins.mean().item(),
        "follows_instruction": sum(follows) / len(follows),
    }
    for task in tasks.TASKS:
        mine = [f for p, f in zip(pairs, follows, strict=True) if p["task"] == task]
        metrics[f"follows_instruction/{task}"] = sum(mine) / max(len(mine), 1)
    metrics["answers"] = answers
    return metrics
