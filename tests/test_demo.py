"""The `make demo` pieces: committed tokenizer, synthetic data, and a shortened demo that must visibly learn."""
import json
import os
import random
import subprocess
import sys

import pytest

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "demo")
sys.path.insert(0, DEMO_DIR)

import build_tokenizer  # noqa: E402  (the demo's modules live beside its scripts)
import make_dataset  # noqa: E402
import tasks  # noqa: E402
from batches import encode  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer.DEFAULT_DIR, local_files_only=True)


def test_committed_tokenizer_is_what_the_script_builds(tokenizer):
    built = build_tokenizer.build_tokenizer()
    assert tokenizer.get_vocab() == built.get_vocab(), "rerun python/demo/build_tokenizer.py and commit its output"
    text = "write in uppercase : cat sun > CAT SUN"
    assert tokenizer(text)["input_ids"] == built(text)["input_ids"]
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "<eos>")


def test_dataset_is_deterministic_and_holds_out_its_eval_prompts(tokenizer):
    train, held_out = make_dataset.make_splits(300, 30, seed=3)
    assert (train, held_out) == make_dataset.make_splits(300, 30, seed=3)
    assert make_dataset.make_splits(300, 30, seed=4) != (train, held_out)
    assert not {p["prompt"] for p in held_out} & {p["prompt"] for p in train}
    assert len({p["prompt"] for p in held_out}) == 30
    assert {p["task"] for p in held_out} == set(tasks.TASKS)
    unk = tokenizer.unk_token_id
    for pair in train + held_out:
        assert pair["chosen"] != pair["rejected"]
        assert tasks.follows_instruction(pair, pair["chosen"]) and not tasks.follows_instruction(pair, pair["rejected"])
        for text in (pair["prompt"], pair["chosen"], pair["rejected"]):
            assert unk not in tokenizer(text)["input_ids"], text


def test_task_rules_are_right():
    # Checked against the instruction's plain meaning, not against the generator's own output.
    assert tasks.follows_instruction({"chosen": " 12"}, "12")
    larger = [tasks.sample("larger", random.Random(i)) for i in range(50)]
    for pair in larger:
        a, b = (int(w) for w in pair["prompt"].split()[2:5:2])
        assert int(pair["chosen"]) == max(a, b) and int(pair["rejected"]) == min(a, b)
    repeat = tasks.sample("repeat", random.Random(0))
    word, count = repeat["prompt"].split()[1:3]
    assert repeat["chosen"].split() == [word] * int(count)
    case = tasks.sample("case", random.Random(1))
    words = case["prompt"].split(":")[1].split()[:-1]
    upper = "uppercase" in case["prompt"]
    assert case["chosen"].split() == [w.upper() if upper else w for w in words]


def test_bad_split_sizes_are_refused():
    with pytest.raises(ValueError, match="eval_pairs"):
        make_dataset.make_splits(10, 0)
    with pytest.raises(ValueError, match="ran out of prompts"):
        make_dataset.make_splits(10, 3 * 70)  # the repeat task has 64 distinct prompts


def test_demo_scores_the_tokens_the_trainer_trains_on(tokenizer):
    # The demo's own evaluation must measure the same log-probs as the trainer's data pipeline optimizes.
    from dpo_kernels.trainer.data import tokenize_pair

    _, held_out = make_dataset.make_splits(1, 12, seed=0)
    for pair in held_out:
        example = tokenize_pair(tokenizer, pair, max_length=32, max_prompt_length=24)
        chosen, prompt_len = encode(tokenizer, pair["prompt"], pair["chosen"])
        rejected, _ = encode(tokenizer, pair["prompt"], pair["rejected"])
        assert (list(example.chosen_ids), list(example.rejected_ids), example.prompt_len) == (
            chosen, rejected, prompt_len)


@pytest.mark.slow
def test_quick_demo_learns_the_preference(tmp_path):
    # A subprocess, as `make demo` runs it: the script sets torch's thread count, which must not leak into the suite.
    proc = subprocess.run(
        [sys.executable, os.path.join(DEMO_DIR, "run_demo.py"), "--quick", "--no-progress",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    before, after = summary["before"], summary["after"]
    report = json.dumps({k: v for k, v in summary.items() if k in ("before", "after")}, indent=1)[:3000]
    # The warm-up teaches the formats, not the preference: the reference is near chance on it.
    assert 0.25 <= before["preference_accuracy"] <= 0.75, report
    assert 0.2 <= before["follows_instruction"] <= 0.8, report
    # DPO learns it: held-out rewards rank the pairs, and the model's own answers follow the instructions more often.
    assert after["reward_accuracy"] >= 0.9, report
    assert after["follows_instruction"] >= before["follows_instruction"] + 0.15, report
    # The trainer's fused-linear evaluation agrees with the demo's logits-path one (ties aside, strict > vs 1/2).
    n = summary["settings"]["eval_pairs"]
    assert abs(summary["trainer_eval"]["eval/rewards/accuracies"] - after["reward_accuracy"]) <= 1 / n + 1e-6, report
    assert os.path.getsize(summary["plot"]) > 1000
    assert "OK: reward accuracy" in proc.stdout
