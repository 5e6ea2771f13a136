"""Group rows for the trainer's group tests: mixed K (2 to 5), scores with ties, drawn from the tiny tokenizer's
words (deterministic for a seed)."""
import random

from tests.tiny_models import preference_rows

COLORS = ["blue", "green", "yellow", "white", "black", "red"]


def group_rows(n: int, *, seed: int = 0, sizes=(2, 3, 4, 5)) -> list[dict]:
    """`n` rows `{prompt, responses, scores}`, K cycling through `sizes`, every third row with a tied score."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pair = preference_rows(1, seed=seed * 1000 + i)[0]
        k = sizes[i % len(sizes)]
        responses = [f" the thing is {' and '.join(rng.sample(COLORS, rng.randint(1, 3)))} ." for _ in range(k)]
        scores = [rng.randint(0, 4) for _ in range(k)]
        if i % 3 == 0:
            scores[-1] = scores[0]
        rows.append({"prompt": pair["prompt"], "responses": responses, "scores": scores})
    return rows


def tied_group_rows(n: int, tied: set[int]) -> list[dict]:
    """`group_rows(n)` where the groups numbered in `tied` give every response one score (all_pairs and
    best_vs_worst leave them out) and the others the scores 0 .. K-1."""
    rows = group_rows(n)
    for i, row in enumerate(rows):
        k = len(row["scores"])
        row["scores"] = [2] * k if i in tied else list(range(k))
    return rows


def as_ranking_rows(pair_rows: list[dict]) -> list[dict]:
    """Pair rows as group rows of two, best first."""
    return [{"prompt": r["prompt"], "ranking": [r["chosen"], r["rejected"]]} for r in pair_rows]


def repeated_prompt_rows(prompts: int, *, seed: int = 0) -> list[dict]:
    """Pair rows where each of `prompts` prompts has 1 to 4 pairs that share responses (a response is chosen in one
    pair and rejected in another, as preference sets built from ratings are), prompts interleaved in file order."""
    rng = random.Random(seed)
    rows = []
    for i, pair in enumerate(preference_rows(prompts, seed=seed)):
        responses = [f" the thing is {c} ." for c in rng.sample(COLORS, 4)]
        for _ in range(1 + i % 4):
            chosen, rejected = rng.sample(responses, 2)
            rows.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows
