"""DPO from logits you already have: `dpo_kernels.DPOLoss` reads the [2B, T, V] logits once (Triton on GPU).

    python python/logits_dpo_loss.py --tiny                 # tiny Llama built from a config, CPU, seconds

For trainers that already run the full model forward. When you can, prefer the fused linear path
(`python/plain_pytorch_loop.py`), which never builds the logits at all.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dpo_kernels


def batch(vocab, pairs, prompt_len, response_len, generator):
    """Random token rows, [2B, T]: B chosen then B rejected, prompt and padding labels -100."""
    rows = 2 * pairs
    length = prompt_len + response_len
    input_ids = torch.randint(3, vocab, (rows, length), generator=generator)
    lengths = torch.randint(prompt_len + 1, length + 1, (rows,), generator=generator)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_len] = -100
    return input_ids, attention_mask, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, seconds)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-type", default="sigmoid", choices=dpo_kernels.LOSS_TYPES)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    vocab, hidden, layers = (101, 32, 2) if args.tiny else (32000, 1024, 4)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).to(device).train()
    ref_model = LlamaForCausalLM(config).to(device).eval().requires_grad_(False)
    ref_model.load_state_dict(policy.state_dict())

    loss_fn = dpo_kernels.DPOLoss(beta=0.1, loss_type=args.loss_type)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    # One fixed batch, so that the loss visibly goes down.
    input_ids, attention_mask, labels = (t.to(device) for t in batch(vocab, 4, 6, 10, generator))
    losses = []
    for step in range(args.steps):
        with torch.no_grad():
            ref_logits = ref_model(input_ids=input_ids, attention_mask=attention_mask).logits
            ref_logps = dpo_kernels.sequence_logprobs(ref_logits, labels)
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        out = loss_fn(logits, labels, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        print(f"step {step}  {args.loss_type} loss {out.loss.item():.4f}  "
              f"chosen reward {out.chosen_rewards.mean().item():+.4f}  "
              f"rejected reward {out.rejected_rewards.mean().item():+.4f}")
    return losses


if __name__ == "__main__":
    main()
