"""DPO in a plain PyTorch loop: an HF causal LM, the fused linear engine and the fused DPO loss. No trainer.

    python python/plain_pytorch_loop.py --tiny              # tiny Llama built from a config, CPU, seconds
    python python/plain_pytorch_loop.py --model Qwen/Qwen2.5-0.5B-Instruct

The policy's last hidden states and lm_head weight go to `FusedLinearDPOLoss`, which never builds the [2B, T, V]
logits; the frozen reference's log-probs come from the same engine under no_grad.
"""
import argparse
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dpo_kernels
from dpo_kernels import hf

WORDS = "the sky grass sun snow is blue green yellow white red what color of ? .".split()
PAIRS = [("what color is the sky ?", " the sky is blue .", " the sky is green ."),
         ("what color is the grass ?", " the grass is green .", " the grass is red ."),
         ("what color is the sun ?", " the sun is yellow .", " the sun is blue ."),
         ("what color is the snow ?", " the snow is white .", " the snow is green .")]


def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), LlamaForCausalLM(config), tokenizer


def collate(tokenizer, pairs, device):
    """[2B, T] input_ids / attention_mask / labels: the B chosen rows first, prompt and padding labels -100."""
    rows, prompt_lengths = [], []
    for column in (1, 2):
        for pair in pairs:
            prompt = tokenizer(pair[0], add_special_tokens=False)["input_ids"]
            response = tokenizer(pair[column], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt + response)
            prompt_lengths.append(len(prompt))
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, start) in enumerate(zip(rows, prompt_lengths, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, start: len(row)] = input_ids[i, start: len(row)]
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama built from a config (CPU)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        policy, ref_model, tokenizer = tiny_model_and_tokenizer()
        ref_model.load_state_dict(policy.state_dict())
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    policy.to(device).train()
    ref_model.to(device).eval().requires_grad_(False)

    loss_fn = dpo_kernels.FusedLinearDPOLoss(beta=0.1, loss_type="sigmoid")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr or (1e-2 if args.tiny else 1e-6))
    rng = random.Random(0)
    losses = []
    for step in range(args.steps):
        input_ids, attention_mask, labels = collate(tokenizer, rng.sample(PAIRS, 2), device)
        ref_logps = hf.sequence_logprobs(ref_model, input_ids, attention_mask, labels, reference=True)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        hidden = hf.backbone_hidden_states(policy, input_ids, attention_mask)
        weight, bias = hf.output_head(policy)
        out = loss_fn(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        print(f"step {step:3d}  loss {out.loss.item():.4f}  reward margin {out.reward_margin.item():+.4f}  "
              f"accuracy {out.reward_accuracy.item():.2f}")
    return losses


if __name__ == "__main__":
    main()
