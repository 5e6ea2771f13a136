"""Builds the demo's word-level tokenizer and saves it to python/demo/tokenizer/ (committed; rerun to rebuild).

    python python/demo/build_tokenizer.py [--output-dir DIR]

One token per task word (see tasks.vocabulary()), case-sensitive, split on whitespace and punctuation, plus
`<pad>`, `<unk>` and `<eos>`. Saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(DIR)` loads it offline.
"""
import argparse
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402  (sibling module of this script)

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<eos>"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = list(SPECIAL_TOKENS.values()) + tasks.vocabulary()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Without a decoder, decode() would glue the words together.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=64, **SPECIAL_TOKENS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=DEFAULT_DIR, help="where to save (default: %(default)s)")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(args.output_dir)
    # transformers 5 records its own class name, which transformers 4 cannot load; the generic name loads in both.
    config_path = os.path.join(args.output_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"saved a {len(tokenizer)}-token word-level tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
