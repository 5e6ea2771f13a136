"""Ranked lists against their best-vs-worst binarization: which reaches a held-out ranking accuracy in fewer steps.

    python benchmarks/group_learning.py [--steps 40] [--train-lists 64] [--target 0.75] [--png curves.png]

The task: every token of a small vocabulary carries a hidden value; a response's quality is the sum of its tokens'
values, so a list of four random responses to a random prompt is ranked by a linear token property that a tiny
Llama (built from a config, no download) can learn. The lists are split into a training and a held-out set.

Two copies of the same initial model train with the same optimizer, learning rate, beta, batches (the same lists,
in the same order) and steps, the reference being that initial model (its log-probs precomputed):

    lists            plackett_luce (`group_dpo_loss`) on the full ranked lists, one group row per list
    best vs worst    sigmoid DPO (`dpo_loss`) on the best and the worst response of each list, one shared-prompt row
                     per pair (the usual binarization of such data)

After every optimizer step, the held-out ranking accuracy of each copy: `group_dpo_loss(...).ranking_accuracy` on
the held-out lists, with rewards beta (log pi - log pi_ref), i.e. the fraction of the lists' ordered pairs whose
rewards are in the same order. Everything runs in float64 on the CPU from fixed seeds, so the curves are the same on
any CPU up to rounding in the last bits. Prints both curves as one table (and the first step at which each reaches
`--target`); with `--png` and matplotlib installed, also plots them.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_kernels import dpo_loss, group_dpo_loss  # noqa: E402
from dpo_kernels.shared_prompt import (  # noqa: E402
    build_group_batch,
    build_shared_batch,
    shared_logits,
)


@dataclass(frozen=True)
class Task:
    """The synthetic ranked lists: `train` and `heldout` lists of `list_size` responses of `response` tokens to a
    `prompt`-token prompt, over `vocab` tokens."""

    vocab: int = 48
    prompt: int = 4
    response: int = 6
    list_size: int = 4
    train: int = 64
    heldout: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Training:
    """The settings both runs share."""

    steps: int = 40
    batch: int = 16  # lists per step
    lr: float = 1e-3
    beta: float = 0.1
    seed: int = 0


def make_lists(task: Task) -> tuple[list, list]:
    """`(train, heldout)`: lists `(prompt_ids, [response_ids, ...] best first, [score, ...] descending)`."""
    g = torch.Generator().manual_seed(task.seed)
    token_value = torch.randn(task.vocab, generator=g, dtype=torch.float64)

    def one_list():
        prompt = torch.randint(0, task.vocab, (task.prompt,), generator=g)
        responses = torch.randint(0, task.vocab, (task.list_size, task.response), generator=g)
        scores, order = token_value[responses].sum(1).sort(descending=True)
        return prompt.tolist(), responses[order].tolist(), scores.tolist()

    lists = [one_list() for _ in range(task.train + task.heldout)]
    return lists[: task.train], lists[task.train:]


def build_model(task: Task, seed: int):
    """A tiny float64 Llama with random weights from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=task.vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=task.prompt + task.response + 8, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).double()


def sequence_logps(model, batch) -> torch.Tensor:
    """`[S]` float64 log-probs of a shared-prompt or group batch's sequences: a plain log-softmax of the scored
    positions' logits (the package's kernels take float32 and below)."""
    logits = shared_logits(model, batch)
    scored = logits.reshape(-1, logits.shape[-1])[batch.token_rows]
    tok = torch.log_softmax(scored, -1).gather(1, batch.token_targets[:, None])[:, 0]
    return tok.new_zeros(batch.num_seqs).index_add(0, batch.token_seqs, tok)


def list_logps(model, lists) -> torch.Tensor:
    """`[R]` float64 log-probs of every response of `lists`, list by list (one group row per list)."""
    return sequence_logps(model, build_group_batch([(prompt, responses) for prompt, responses, _ in lists]))


def pair_logps(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """`([B], [B])` float64 log-probs of the chosen and rejected responses of `(prompt, chosen, rejected)` pairs."""
    logps = sequence_logps(model, build_shared_batch(pairs))
    return logps[: len(pairs)], logps[len(pairs):]


def _sizes_and_scores(lists):
    return [len(responses) for _, responses, _ in lists], torch.tensor([s for *_, scores in lists for s in scores])


def heldout_accuracy(model, lists, ref_logps, beta) -> float:
    """The held-out ranking accuracy: the fraction of the lists' ordered pairs whose rewards are in order."""
    sizes, scores = _sizes_and_scores(lists)
    with torch.no_grad():
        logps = list_logps(model, lists)
    return group_dpo_loss(logps, ref_logps, sizes, scores, beta=beta).ranking_accuracy.item()


def _list_loss(model, lists, ref, beta):
    sizes, scores = _sizes_and_scores(lists)
    return group_dpo_loss(list_logps(model, lists), ref, sizes, scores, loss_type="plackett_luce", beta=beta).loss


def _best_vs_worst_loss(model, lists, ref, beta):
    sizes, _ = _sizes_and_scores(lists)
    best = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    worst = best + torch.tensor(sizes) - 1
    chosen, rejected = pair_logps(model, [(prompt, responses[0], responses[-1]) for prompt, responses, _ in lists])
    return dpo_loss(chosen, rejected, ref[best], ref[worst], beta=beta, loss_type="sigmoid").loss


LOSSES = {"lists": _list_loss, "best_vs_worst": _best_vs_worst_loss}


def train_curve(task: Task, training: Training, loss: str, train, heldout) -> list[float]:
    """Held-out ranking accuracy before training and after each of `training.steps` steps of `loss` (a LOSSES
    key)."""
    model = build_model(task, training.seed)
    with torch.no_grad():
        train_ref, heldout_ref = list_logps(model, train), list_logps(model, heldout)
    starts = [0]
    for _, responses, _ in train:
        starts.append(starts[-1] + len(responses))
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    order = torch.Generator().manual_seed(training.seed)
    batches = []
    curve = [heldout_accuracy(model, heldout, heldout_ref, training.beta)]
    for _ in range(training.steps):
        if not batches:
            perm = torch.randperm(len(train), generator=order).tolist()
            batches = [perm[i: i + training.batch] for i in range(0, len(perm), training.batch)]
        picked = batches.pop(0)
        ref = torch.cat([train_ref[starts[i]: starts[i + 1]] for i in picked])
        LOSSES[loss](model, [train[i] for i in picked], ref, training.beta).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(heldout_accuracy(model, heldout, heldout_ref, training.beta))
    return curve


def steps_to(curve: list[float], target: float) -> int | None:
    """The first optimizer step after which the curve reaches `target` (0: before training), or None."""
    return next((step for step, acc in enumerate(curve) if acc >= target), None)


def compare(task: Task = Task(), training: Training = Training()) -> dict:
    """Both curves on the same lists: `{"lists": [...], "best_vs_worst": [...]}`, steps + 1 values each."""
    train, heldout = make_lists(task)
    return {loss: train_curve(task, training, loss, train, heldout) for loss in LOSSES}


def table(curves: dict, target: float) -> list[str]:
    lines = ["| step | lists (plackett_luce) held-out acc | best vs worst (sigmoid) held-out acc |", "|---|---|---|"]
    for step, (pl, bvw) in enumerate(zip(curves["lists"], curves["best_vs_worst"], strict=True)):
        lines.append(f"| {step} | {pl:.3f} | {bvw:.3f} |")
    reached = {loss: steps_to(curve, target) for loss, curve in curves.items()}
    lines += ["", f"first step at held-out ranking accuracy >= {target}: lists {reached['lists']}, "
                  f"best vs worst {reached['best_vs_worst']}"]
    return lines


def plot(curves: dict, target: float, path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["lists"], label="lists of 4 (plackett_luce)")
    ax.plot(curves["best_vs_worst"], label="best vs worst (sigmoid DPO)")
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out ranking accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Training.steps)
    parser.add_argument("--train-lists", type=int, default=Task.train, help="training lists (held-out: 64)")
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--png", default=None, help="also plot both curves into this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    curves = compare(Task(train=args.train_lists), Training(steps=args.steps))
    print("\n".join(table(curves, args.target)))
    if args.png:
        written = plot(curves, args.target, args.png)
        print(f"[group_learning] {written}" if written else "[group_learning] matplotlib is not installed: no PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
