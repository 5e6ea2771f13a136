"""TRL's DPOTrainer with dpo_kernels' fused engine: the one-line change is the import.

    python python/trl_dropin.py --tiny                       # a tiny Llama built from a config, CPU, seconds
    python python/trl_dropin.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized

Needs the TRL extra: pip install -e ".[trl]".
"""
import argparse
import random

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig

from dpo_kernels.integrations.trl import FusedDPOTrainer as DPOTrainer  # the drop-in

WORDS = "the sky grass sun snow is blue green yellow white red what color of ? .".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_rows(n):
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        thing = rng.choice(["sky", "grass", "sun", "snow"])
        good, bad = rng.sample(["blue", "green", "yellow", "white", "red"], 2)
        rows.append({"prompt": f"what color is the {thing} ?", "chosen": f" the {thing} is {good} .",
                     "rejected": f" the {thing} is {bad} ."})
    return Dataset.from_list(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama from a config and 16 made-up pairs")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--output-dir", default="dpo-kernels-trl-dropin")
    args = parser.parse_args(argv)

    if args.tiny:
        tokenizer = tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        model, ref_model = LlamaForCausalLM(config), LlamaForCausalLM(config)
        ref_model.load_state_dict(model.state_dict())
        train_dataset, steps = tiny_rows(16), args.steps or 4
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model, ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16), None
        train_dataset, steps = load_dataset(args.dataset, split="train"), args.steps or 100

    config = DPOConfig(output_dir=args.output_dir, max_steps=steps, per_device_train_batch_size=4,
                       learning_rate=1e-2 if args.tiny else 5e-7, beta=0.1, loss_type="sigmoid", logging_steps=1,
                       report_to=[], save_strategy="no", use_cpu=args.tiny, bf16=not args.tiny,
                       padding_free=True, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train_dataset,
                         processing_class=tokenizer)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"trained {len(losses)} steps with the fused engine; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
