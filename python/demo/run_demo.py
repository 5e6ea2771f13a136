"""`make demo`: a tiny Llama learns with DPO, on the CPU and in about a minute, to follow instructions.

    python python/demo/run_demo.py [--quick] [--output-dir DIR] [--threads N] [--seed S]

1. Synthetic preference pairs (make_dataset.py) for three tasks: write words in the asked case, repeat a word the
   asked number of times, answer with the larger of two numbers (tasks.py). Held-out prompts are never trained on.
2. A randomly initialised `LlamaForCausalLM` (tiny config, the word-level tokenizer shipped in tokenizer/) is warmed
   up on the chosen AND the rejected responses: it learns the answer formats, not which answer is right. This is the
   reference model; its held-out preference is near chance.
3. DPO with the package's trainer (`dpo_kernels.trainer.train`, fused-linear backend, reference log-probs
   precomputed once), sigmoid loss plus a small SFT term on the chosen responses (RPO): without it the tiny policy
   learns the preference by pushing the rejected answers down so far that its own greedy answers degrade.
4. Before/after table on the held-out pairs: DPO reward accuracy and margin, the model's own log-prob preference,
   and how often its greedy answer follows the instruction. The trainer writes the curves to DIR/dpo/curves.png;
   DIR/summary.json holds every number.

Needs no download. `--quick` is the shortened run the tests use.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_dataset  # noqa: E402  (sibling modules of this script)
import tasks  # noqa: E402
from measure import evaluate, pair_logprobs  # noqa: E402
from warmup import build_model, warm_up  # noqa: E402

from dpo_kernels.trainer import TrainConfig, train  # noqa: E402

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")


@dataclass(frozen=True)
class DemoSettings:
    train_pairs: int
    eval_pairs: int
    warmup_steps: int        # supervised warm-up steps (batch of 64 responses)
    dpo_steps: int
    dpo_batch_size: int      # pairs per DPO step
    dpo_lr: float
    beta: float = 0.1
    sft_weight: float = 1.0  # weight of the SFT term next to the sigmoid DPO loss
    eval_every: int = 25     # trainer's held-out evaluation, for the curves


FULL = DemoSettings(train_pairs=1200, eval_pairs=96, warmup_steps=400, dpo_steps=150, dpo_batch_size=32, dpo_lr=1e-3)
QUICK = DemoSettings(train_pairs=600, eval_pairs=48, warmup_steps=200, dpo_steps=80, dpo_batch_size=32, dpo_lr=1e-3,
                     eval_every=40)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shortened run (fewer pairs and steps), as in the tests")
    parser.add_argument("--output-dir", default="build/demo", help="data, models, curves (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the run")
    # One thread is the fastest for matrices this small, and it does not collapse when the CPU is shared.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="one line per DPO step instead of a bar")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _table(before: dict, after: dict, settings: DemoSettings) -> str:
    def per_task(m):
        return "/".join(f"{m[f'follows_instruction/{t}']:.2f}" for t in tasks.TASKS)

    rows = [
        ("reward accuracy  P[r(chosen) > r(rejected)] *", "reward_accuracy", "{:.2f}"),
        ("reward margin  mean r(chosen) - r(rejected)", "reward_margin", "{:.2f}"),
        ("model prefers chosen  P[log p(ch) > log p(rej)]", "preference_accuracy", "{:.2f}"),
        ("log-prob margin  mean log p(ch) - log p(rej)", "logp_margin", "{:.2f}"),
        ("follows the instruction (greedy answer)", "follows_instruction", "{:.2f}"),
    ]
    width = 50
    lines = [f"{'held-out pairs: ' + str(settings.eval_pairs):<{width}} {'reference':>16} {'after DPO':>16}"]
    for label, key, fmt in rows:
        lines.append(f"{label:<{width}} {fmt.format(before[key]):>16} {fmt.format(after[key]):>16}")
    lines.append(f"{'  per task: ' + '/'.join(tasks.TASKS):<{width}} {per_task(before):>16} {per_task(after):>16}")
    lines.append(f"* r = beta * (log pi - log pi_ref), beta {settings.beta}; the reference's rewards are all 0, "
                 "and ties count 1/2")
    return "\n".join(lines)


def _examples(pairs: list[dict], before: dict, after: dict, count: int = 6) -> str:
    """The first `count` held-out prompts (the tasks take turns), not a selection of the best ones."""
    lines = [f"  {'prompt':<34} {'reference':<26} after DPO"]
    for pair, b, a in list(zip(pairs, before["answers"], after["answers"], strict=True))[:count]:
        lines.append(f"  {pair['prompt']:<34} {b!r:<26} {a!r}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    # Loading and saving a 0.1 M-parameter model takes milliseconds; its progress bars would only clutter the output.
    hf_logging.disable_progress_bar()
    out = os.path.abspath(args.output_dir)
    start = time.perf_counter()

    print(f"[1/4] data: {settings.train_pairs} training pairs, {settings.eval_pairs} held-out pairs -> {out}/data")
    train_pairs, eval_pairs = make_dataset.make_splits(settings.train_pairs, settings.eval_pairs, args.seed)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    train_file, eval_file = os.path.join(out, "data", "train.jsonl"), os.path.join(out, "data", "eval.jsonl")
    make_dataset.write_jsonl(train_file, train_pairs)
    make_dataset.write_jsonl(eval_file, eval_pairs)

    print(f"[2/4] warm-up: {settings.warmup_steps} supervised steps on chosen and rejected responses alike")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    model = build_model(tokenizer, seed=args.seed)
    t = time.perf_counter()
    warm_up(model, tokenizer, train_pairs, steps=settings.warmup_steps, seed=args.seed)
    warmup_s = time.perf_counter() - t
    ref_dir = os.path.join(out, "reference")
    model.save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    ref_logps = pair_logprobs(model, tokenizer, eval_pairs)
    before = evaluate(model, ref_logps, tokenizer, eval_pairs, settings.beta)
    del model

    print(f"[3/4] DPO: {settings.dpo_steps} steps of {settings.dpo_batch_size} pairs with dpo_kernels.trainer "
          "(fused-linear backend)")
    config = TrainConfig(
        model=ref_dir, data=train_file, eval_data=eval_file, output_dir=os.path.join(out, "dpo"),
        precompute_ref=True, max_steps=settings.dpo_steps, batch_size=settings.dpo_batch_size,
        eval_batch_size=128, lr=settings.dpo_lr, lr_scheduler="constant_with_warmup", warmup_steps=5,
        beta=settings.beta, loss_type="sigmoid,sft", loss_weights=[1.0, settings.sft_weight],
        max_length=32, max_prompt_length=24, loss_backend="fused-linear", device="cpu", seed=args.seed,
        eval_every=settings.eval_every, progress=not args.no_progress, plot=True,
    )
    t = time.perf_counter()
    result = train(config)
    dpo_s = time.perf_counter() - t
    policy = LlamaForCausalLM.from_pretrained(result.final_checkpoint, local_files_only=True).eval()
    after = evaluate(policy, ref_logps, tokenizer, eval_pairs, settings.beta)

    total_s = time.perf_counter() - start
    print("[4/4] held-out results\n")
    print(_table(before, after, settings))
    print("\ngreedy answers:\n" + _examples(eval_pairs, before, after))
    learnt = after["reward_accuracy"] >= 0.9 and after["follows_instruction"] > before["follows_instruction"]
    print(f"\n{'OK' if learnt else 'NOT LEARNT'}: reward accuracy {after['reward_accuracy']:.2f} (target >= 0.9), "
          f"instruction following {before['follows_instruction']:.2f} -> {after['follows_instruction']:.2f}")
    print(f"time: warm-up {warmup_s:.0f} s, DPO {dpo_s:.0f} s, total {total_s:.0f} s; curves: {result.plot_path}")

    summary = {
        "settings": asdict(settings), "seed": args.seed, "before": before, "after": after,
        "trainer_eval": result.eval_metrics, "plot": result.plot_path, "final_checkpoint": result.final_checkpoint,
        "seconds": {"warmup": warmup_s, "dpo": dpo_s, "total": total_s},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
