"""Writes the demo's synthetic preference data: train.jsonl and eval.jsonl in `{prompt, chosen, rejected}` form.

    python python/demo/make_dataset.py --output-dir DIR [--train-pairs N] [--eval-pairs N] [--seed S]

Deterministic for a given seed. The three tasks of tasks.py take turns; no eval prompt appears in the training data,
so the held-out numbers measure a learnt rule, not memorized answers.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402  (sibling module of this script)


def make_splits(train_pairs: int, eval_pairs: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`(train, eval)` lists of pairs; eval prompts are distinct and absent from train."""
    if train_pairs < 1 or eval_pairs < 1:
        raise ValueError(f"train_pairs and eval_pairs must be >= 1, got {train_pairs} and {eval_pairs}")
    rng = random.Random(seed)
    held_out, eval_split = set(), []
    while len(eval_split) < eval_pairs:
        pair = _draw(tasks.TASKS[len(eval_split) % len(tasks.TASKS)], rng, held_out)
        held_out.add(pair["prompt"])
        eval_split.append(pair)
    train_split = [_draw(tasks.TASKS[i % len(tasks.TASKS)], rng, held_out) for i in range(train_pairs)]
    return train_split, eval_split


def _draw(task: str, rng: random.Random, excluded: set, tries: int = 10_000) -> dict:
    # The repeat task has only 64 distinct prompts: too many eval pairs would leave none for training.
    for _ in range(tries):
        pair = tasks.sample(task, rng)
        if pair["prompt"] not in excluded:
            return pair
    raise ValueError(f"task {task!r} ran out of prompts that are not held out; ask for fewer eval pairs")


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="where train.jsonl and eval.jsonl are written")
    parser.add_argument("--train-pairs", type=int, default=1200, help="training pairs (default: %(default)s)")
    parser.add_argument("--eval-pairs", type=int, default=96, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    train_split, eval_split = make_splits(args.train_pairs, args.eval_pairs, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train_split)
    write_jsonl(os.path.join(args.output_dir, "eval.jsonl"), eval_split)
    print(f"wrote {len(train_split)} training and {len(eval_split)} held-out pairs to {args.output_dir}")


if __name__ == "__main__":
    main()
