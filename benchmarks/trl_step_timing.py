"""One TRL DPO training step with and without the dpo_kernels drop-in, on a model with Llama-3-8B's head.

    python benchmarks/trl_step_timing.py --output-dir OUT            # GPU: H=4096, V=128256, 2 layers, 2x(512+1536)
    python benchmarks/trl_step_timing.py --output-dir OUT --tiny     # CPU smoke run, tiny sizes

Both trainers start from the same weights (a different reference model, so rewards are not zero), see the same
synthetic batches and use TRL's defaults (bf16 autocast on the GPU, gradient checkpointing, AdamW). Each step is
timed between the trainer's step callbacks with the device synchronized; the first `--warmup` steps are dropped.
Writes `trl_step.json` and `trl_step.md` (median ms per step, peak GiB allocated, first-step loss of each, the
device, versions and date) to `--output-dir`. Without TRL it writes a "skipped" record and exits 0.
"""
import argparse
import copy
import gc
import json
import os
import statistics
import time

import torch
from transformers import TrainerCallback

from dpo_kernels.bench import report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="benchmarks/results/trl_step")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2x rows)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    p.add_argument("--response", type=int, default=1536, help="response tokens per row (plus EOS)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--padding-free", action="store_true", help="pass padding_free=True to the drop-in")
    p.add_argument("--no-token-metrics", action="store_true",
                   help="drop-in without the entropy / token-accuracy pass (token_metrics=False)")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.vocab, args.layers, args.pairs = 64, 1000, 1, 2
        args.prompt, args.response, args.warmup, args.steps = 8, 24, 1, 2
    return args


def synthetic_tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def synthetic_dataset(args, rows):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"w{i}" for i in torch.randint(3, args.vocab, (n,), generator=g).tolist())

    return Dataset.from_list([{"prompt": text(args.prompt), "chosen": " " + text(args.response),
                               "rejected": " " + text(args.response)} for _ in range(rows)])


def build_models(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 128)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(3.5 * args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=args.prompt + args.response + 8, pad_token_id=0, eos_token_id=1,
                         tie_word_embeddings=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.device(device):
            models.append(LlamaForCausalLM(config).to(dtype))
    return models


class StepTimer(TrainerCallback):
    """Records each optimizer step's wall time (device synchronized)."""

    def __init__(self, device):
        self.device, self.times, self._t0 = device, [], None

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def run(provider, args, policy, ref, tokenizer, dataset, device):
    import trl

    from dpo_kernels.integrations.trl import FusedDPOTrainer

    fused = provider == "dpo_kernels"
    cls = FusedDPOTrainer if fused else trl.DPOTrainer
    extra = {"padding_free": True} if fused and args.padding_free else {}
    options = {"token_metrics": not args.no_token_metrics} if fused else {}
    config = trl.DPOConfig(
        output_dir=os.path.join(args.output_dir, "_trainer"), per_device_train_batch_size=args.pairs,
        max_steps=args.warmup + args.steps, max_length=args.prompt + args.response + 1, learning_rate=1e-6,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=device == "cpu", bf16=device == "cuda",
        disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra,
    )
    timer = StepTimer(device)
    trainer = cls(model=policy, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=[timer], **options)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    timed = timer.times[args.warmup:] or timer.times
    row = {
        "provider": provider,
        "median_ms": 1e3 * statistics.median(timed),
        "min_ms": 1e3 * min(timed),
        "steps_timed": len(timed),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "padding_free": bool(extra),
        "token_metrics": options.get("token_metrics"),
    }
    del trainer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def write(out_dir, record):
    lines = [f"# TRL DPO step, with and without the dpo_kernels drop-in ({record['stamp']['device']})", ""]
    if "skipped" in record:
        lines.append(f"skipped: {record['skipped']}")
    else:
        s = record["shape"]
        lines += [f"H={s['hidden']} V={s['vocab']} layers={s['layers']}, {s['pairs']} pairs x "
                  f"({s['prompt']} prompt + {s['response']} response) tokens", "",
                  "| provider | median ms/step | min ms | peak GiB | first loss |", "|---|---|---|---|---|"]
        for r in record["rows"]:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            lines.append(f"| {r['provider']}{' (padding-free)' if r['padding_free'] else ''} | {r['median_ms']:.1f} "
                         f"| {r['min_ms']:.1f} | {peak} | {r['first_loss']:.6f} |")
        if record.get("speedup") is not None:
            lines += ["", f"speedup (TRL / drop-in): {record['speedup']:.2f}x"]
    lines += ["", f"Device and versions: {report.stamp_line(record['stamp'])}"]
    report.write_report(out_dir, "trl_step", record, lines)
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    out_dir = args.output_dir
    record = {"stamp": report.stamp(torch.device(device)), "shape": {k: getattr(args, k) for k in (
        "hidden", "vocab", "layers", "pairs", "prompt", "response", "warmup", "steps")}}
    try:
        import trl  # noqa: F401
    except ImportError:
        record["skipped"] = "trl is not installed (pip install -e '.[trl]')"
        write(out_dir, record)
        return record
    if device == "cpu":
        torch.set_num_threads(1)
    tokenizer = synthetic_tokenizer(args.vocab)
    dataset = synthetic_dataset(args, args.pairs * (args.warmup + args.steps))
    policy, ref = build_models(args, device)
    rows = []
    for provider in ("trl", "dpo_kernels"):
        rows.append(run(provider, args, copy.deepcopy(policy), copy.deepcopy(ref), tokenizer, dataset, device))
        print(json.dumps(rows[-1]), flush=True)
    record["rows"] = rows
    record["speedup"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    write(out_dir, record)
    return record


if __name__ == "__main__":
    main()
