"""The three instruction-following tasks of the demo, their vocabulary and the check of an answer.

Each prompt carries an instruction; the chosen response follows it and the rejected one is the same kind of
answer that does not:

    case     "write in uppercase : cat sun >"   chosen " CAT SUN"         rejected " cat sun"
    repeat   "repeat moon 3 times >"            chosen " moon moon moon"  rejected " moon moon moon moon"
    larger   "larger of 7 and 12 >"             chosen " 12"              rejected " 7"

Both responses have the same format, so a warm-up on a mixture of them teaches the format and leaves the model
indifferent between them; only the preference data says which one follows the instruction. Every word is one token of
the demo's word-level tokenizer (`vocabulary()`).
"""
import random

NOUNS = ("cat", "dog", "sun", "moon", "tree", "bird", "fish", "star", "book", "door", "rain", "ship", "king",
         "road", "fire", "milk")
COUNTS = (2, 3, 4, 5)
NUMBERS = tuple(str(n) for n in range(20))
PROMPT_END = ">"
TASKS = ("case", "repeat", "larger")


def _case(rng: random.Random):
    words = [rng.choice(NOUNS) for _ in range(2)]
    upper = rng.random() < 0.5
    lower_answer, upper_answer = " ".join(words), " ".join(w.upper() for w in words)
    prompt = f"write in {'uppercase' if upper else 'lowercase'} : {' '.join(words)} {PROMPT_END}"
    return prompt, (upper_answer if upper else lower_answer), (lower_answer if upper else upper_answer)


def _repeat(rng: random.Random):
    word, count = rng.choice(NOUNS), rng.choice(COUNTS)
    # Always one copy too many: a single wrong alternative keeps the warm-up's mixture an exact 50/50 split.
    return f"repeat {word} {count} times {PROMPT_END}", " ".join([word] * count), " ".join([word] * (count + 1))


def _larger(rng: random.Random):
    a, b = rng.sample(range(len(NUMBERS)), 2)
    return f"larger of {a} and {b} {PROMPT_END}", str(max(a, b)), str(min(a, b))


_SAMPLERS = {"case": _case, "repeat": _repeat, "larger": _larger}


def sample(task: str, rng: random.Random) -> dict:
    """One preference pair `{task, prompt, chosen, rejected}` of `task`, drawn with `rng`."""
    prompt, chosen, rejected = _SAMPLERS[task](rng)
    # Responses start with a space, as in TRL's plain-text format: prompt + response is then readable text.
    return {"task": task, "prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}


def follows_instruction(pair: dict, answer: str) -> bool:
    """Whether a generated `answer` to `pair`'s prompt is exactly the response that follows the instruction."""
    return answer.split() == pair["chosen"].split()


def vocabulary() -> list[str]:
    """Every word the tasks use, in a fixed order (the tokenizer's ids follow it)."""
    words = ["write", "in", "uppercase", "lowercase", ":", "repeat", "times", "larger", "of", "and", PROMPT_END]
    words += list(NOUNS) + [n.upper() for n in NOUNS] + list(NUMBERS)
    assert len(set(words)) == len(words), "task words must be distinct"
    return words
