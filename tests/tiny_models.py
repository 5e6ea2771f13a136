"""Tiny tokenizers, tiny Llama models and tiny preference data for tests (no download, built in milliseconds).

    tok = build_tokenizer(tmp_path / "tok")          # word-level, with a chat template; saved when a dir is given
    model = build_llama(tok, save_dir=tmp_path / "m") # LlamaForCausalLM, hidden 32, 2 layers, vocab = tok's
    write_jsonl(tmp_path / "d.jsonl", preference_rows(16))
    tiny = tiny_setup(tmp_path, rows=8)              # tokenizer + model + data saved under one dir
    config = train_config(tiny, tmp_path / "out")    # a 2-step TrainConfig over them

`build_tokenizer(kind="bpe")` gives a character-level BPE without pre-tokenizer, so merges cross word (and
prompt/response) boundaries: "ab" is one token while "a" and "b" alone are two.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dpo_kernels.trainer import TrainConfig

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>"]

# Every word the preference rows use, so the word-level tokenizer never needs <unk> on them.
WORDS = (
    "the a an is are was what which who color of sky grass sun snow night blue green yellow white black red "
    "say repeat reply answer word twice please in uppercase lowercase hello world cat dog bird fish yes no "
    "larger smaller number one two three four five six seven eight nine ten and or not good bad I you it "
    "question : ? . , ! tell me about"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer(save_dir: str | Path | None = None, *, kind: str = "word") -> PreTrainedTokenizerFast:
    """A tiny fast tokenizer: `kind="word"` (WordLevel over WORDS, whitespace split) or `"bpe"` (character BPE
    with merges across spaces). Special tokens: <pad> <unk> <bos> <eos> and chat roles; eos is <eos>."""
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
        corpus = [" ".join(WORDS)]
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIAL_TOKENS, show_progress=False)
        corpus = ["ab ab ab abc abc the sky is blue the grass is green"] * 20 + [" ".join(WORDS)]
    else:
        raise ValueError(f"kind must be 'word' or 'bpe', got {kind!r}")
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def build_llama(tokenizer_or_vocab, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                save_dir: str | Path | None = None, tie_word_embeddings: bool = False,
                **config_kwargs) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM (fp32, eager attention, no dropout); saved when a dir is given."""
    if isinstance(tokenizer_or_vocab, int):
        vocab, pad, bos, eos = tokenizer_or_vocab, 0, 2, 3
    else:
        tok = tokenizer_or_vocab
        vocab, pad, bos, eos = len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
    return model


def preference_rows(n: int, *, seed: int = 0) -> list[dict]:
    """`n` rows of `{prompt, chosen, rejected}` plain text drawn from WORDS (deterministic for a seed).

    Responses start with a space: the trainer joins prompt and response as they are (as TRL does)."""
    rng = random.Random(seed)
    colors = ["blue", "green", "yellow", "white", "black", "red"]
    things = ["sky", "grass", "sun", "snow", "night", "cat", "dog", "bird", "fish"]
    rows = []
    for _ in range(n):
        thing = rng.choice(things)
        good, bad = rng.sample(colors, 2)
        extra = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(0, 4)))
        rows.append({
            "prompt": f"what is the color of the {thing} ? {extra}".strip(),
            "chosen": f" the {thing} is {good} .",
            "rejected": f" the {thing} is {bad} and {rng.choice(colors)} .",
        })
    return rows


def conversational_rows(n: int, *, seed: int = 0) -> list[dict]:
    """The same rows in the conversational form: prompt = list of messages, chosen/rejected = assistant turns."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
        }
        for r in preference_rows(n, seed=seed)
    ]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def tiny_setup(root: str | Path, *, rows: int = 16, seed: int = 0, kind: str = "word") -> dict:
    """Writes a tokenizer + model into `root/model` and `rows` pairs into `root/train.jsonl`; returns the paths."""
    root = Path(root)
    tok = build_tokenizer(root / "model", kind=kind)
    build_llama(tok, save_dir=root / "model", seed=seed)
    data = write_jsonl(root / "train.jsonl", preference_rows(rows, seed=seed))
    return {"model": str(root / "model"), "data": str(data), "tokenizer": tok}


def train_config(tiny: dict, output_dir: str | Path, **overrides) -> TrainConfig:
    """A TrainConfig over `tiny_setup`'s model and data: 2 steps of 2 pairs, 32 tokens (24 of prompt), lr 5e-3
    without warm-up, no progress bar or plot. `overrides` replace any field."""
    base = dict(model=tiny["model"], data=tiny["data"], output_dir=str(output_dir), batch_size=2, max_steps=2,
                max_length=32, max_prompt_length=24, lr=5e-3, warmup_ratio=0.0, progress=False, plot=False)
    return TrainConfig(**{**base, **overrides})
