"""The `dpo-kernels` command (also `python -m dpo_kernels`).

    dpo-kernels train --model PATH_OR_ID --data FILE_OR_DIR --output-dir DIR [flags]
    dpo-kernels train --config run.json --lr 5e-7          # file values, overridden by explicit flags
    dpo-kernels bench ... / dpo-kernels profile-memory ...  # when dpo_kernels.bench is importable

Every `train` flag is a field of `dpo_kernels.trainer.TrainConfig` (dashes for underscores); a config file (JSON,
or YAML when PyYAML is installed) uses the same names with either spelling.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# field -> (help, argparse kwargs). Defaults come from TrainConfig, so they are written once.
_TRAIN_FLAGS: dict[str, tuple[str, dict]] = {
    "model": ("policy to train: a local HF model directory or a hub id already in the local cache", {}),
    "data": ("training pairs: .json / .jsonl / .parquet file or a datasets.save_to_disk directory; rows "
             "{prompt, chosen, rejected} as strings or as lists of chat messages", {}),
    "eval_data": ("held-out pairs, same formats; evaluated every --eval-every steps and at the end", {}),
    "output_dir": ("where checkpoint-STEP/, metrics.jsonl and curves.png go (must be writable)", {}),
    "tokenizer": ("tokenizer path or id (default: --model)", {}),
    "ref_model": ("a separate frozen reference model (default: a frozen copy of the initial policy)", {}),
    "precompute_ref": ("compute reference log-probs once before training, cache them on disk (keyed by "
                       "model and data) and reuse them in later runs; frees the reference model's memory", {}),
    "ref_cache_dir": ("directory of the reference log-prob cache (default: OUTPUT_DIR/ref-cache)", {}),
    "reference_free": ("no reference model: reference log-probs are 0 (implied by --loss-type simpo)", {}),
    "model_dtype": ("dtype the weights are loaded and trained in", {"choices": ["float32", "bfloat16", "float16",
                                                                               "float64"]}),
    "max_steps": ("optimizer steps to run; -1 runs --epochs epochs", {"type": int}),
    "epochs": ("passes over the data when --max-steps is -1", {"type": int}),
    "batch_size": ("preference pairs per micro-batch per process", {"type": int}),
    "grad_accum": ("micro-batches accumulated per optimizer step", {"type": int}),
    "eval_batch_size": ("pairs per evaluation batch (default: --batch-size)", {"type": int}),
    "stop_after_steps": ("stop with a checkpoint at this step while the LR schedule still spans --max-steps "
                         "(for time-limited jobs; continue with --resume); -1 never", {"type": int}),
    "lr": ("AdamW learning rate", {"type": float}),
    "weight_decay": ("AdamW weight decay", {"type": float}),
    "adam_beta1": ("AdamW beta1", {"type": float}),
    "adam_beta2": ("AdamW beta2", {"type": float}),
    "adam_eps": ("AdamW epsilon", {"type": float}),
    "lr_scheduler": ("schedule name for transformers.get_scheduler (cosine, linear, constant, "
                     "constant_with_warmup, ...)", {}),
    "warmup_steps": ("warm-up steps (wins over --warmup-ratio when > 0)", {"type": int}),
    "warmup_ratio": ("fraction of the steps spent warming up", {"type": float}),
    "max_grad_norm": ("clip the global gradient norm to this; <= 0 disables clipping", {"type": float}),
    "beta": ("DPO temperature beta (rewards are beta * (policy - reference) log-probs)", {"type": float}),
    "loss_type": ("loss name or comma list, from dpo_kernels.LOSS_TYPES (sigmoid, hinge, ipo, exo_pair, "
                  "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                  "sigmoid_norm, sft, simpo, dpop)", {}),
    "loss_weights": ("comma list of weights, one per --loss-type", {"type": _float_list, "metavar": "W1,W2"}),
    "label_smoothing": ("label smoothing for conservative DPO; eps for robust / exo_pair", {"type": float}),
    "gamma": ("SimPO target reward margin (default: the op's, 0.5)", {"type": float}),
    "tau": ("DiscoPOP temperature (default: the op's, 0.05)", {"type": float}),
    "dpop_lambda": ("DPO-Positive penalty weight (default: the op's, 50)", {"type": float}),
    "max_length": ("maximum prompt + response tokens per row (responses are cut to fit)", {"type": int}),
    "max_prompt_length": ("maximum prompt tokens; longer prompts keep their end", {"type": int}),
    "skip_bad_rows": ("drop malformed rows (missing field, empty text, prompt too long) and report how many, "
                      "instead of stopping with an error naming file and row", {}),
    "loss_backend": ("fused-linear: hidden states + lm_head, never the [2B,T,V] logits; logits: model logits "
                     "through the Triton log-prob kernel; reference: plain PyTorch (for checking)",
                     {"choices": ["fused-linear", "logits", "reference"]}),
    "memory_budget": ("fused-linear only: bytes for its [chunk, V] logits buffer, or 'low' to recompute in the "
                      "backward (least memory) (default: 2 GiB)", {}),
    "precision": ("auto = bf16 autocast on CUDA, none on CPU; fp64 is for tests",
                  {"choices": ["auto", "bf16", "fp32", "fp64"]}),
    "gradient_checkpointing": ("recompute activations in backward to save memory", {}),
    "distributed": ("data parallelism across torchrun processes: ddp, or fsdp (FSDP2 fully_shard)",
                    {"choices": ["none", "ddp", "fsdp"]}),
    "device": ("auto picks CUDA when available", {"choices": ["auto", "cpu", "cuda"]}),
    "seed": ("seed for initialisation and data order", {"type": int}),
    "log_every": ("steps between metrics.jsonl records", {"type": int}),
    "eval_every": ("steps between evaluations; 0 evaluates only at the end", {"type": int}),
    "save_every": ("steps between checkpoints; 0 saves only at the end", {"type": int}),
    "resume": ("continue from a checkpoint dir; bare --resume takes the newest checkpoint in --output-dir",
               {"nargs": "?", "const": "latest"}),
    "max_nonfinite_steps": ("stop after this many non-finite losses in a row (each one skips its step)",
                            {"type": int}),
    "progress": ("tqdm progress bar; --no-progress prints one line per step instead", {}),
    "plot": ("write curves.png (loss, reward accuracy, margins) at the end", {}),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_loss_param(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: value must be a number, got {value!r}") from None


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from dpo_kernels.trainer import TrainConfig

    defaults = {f.name: f for f in dataclasses.fields(TrainConfig)}
    p = subparsers.add_parser(
        "train", help="train a HuggingFace causal LM with DPO",
        description="Train a HuggingFace causal LM with DPO on a preference dataset, using the fused kernels. "
                    "Precedence: explicit flags > --config file > defaults.",
    )
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="JSON (or YAML, with PyYAML) file of TrainConfig values; explicit flags override it")
    for name, (text, kwargs) in _TRAIN_FLAGS.items():
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(kwargs)
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" not in kwargs and "metavar" not in kwargs:
            word = {"loss_type": "NAME", "lr_scheduler": "NAME", "memory_budget": "BYTES|low"}.get(name, "PATH")
            kwargs["metavar"] = {int: "N", float: "X"}.get(kwargs.get("type"), word)
        if "(default" not in text:
            text += " (required)" if default == "" else f" (default: {default})"
        # SUPPRESS keeps unset flags out of the namespace, so that a config file's value is not overwritten by a
        # default; the help text states the default.
        p.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=text, **kwargs)
    p.add_argument("--loss-param", dest="loss_params", action="append", type=_parse_loss_param,
                   default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   help="any other keyword of dpo_kernels.dpo_loss, repeatable")
    p.set_defaults(func=run_train)
    return p


def _read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file not found: {path}")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from None
        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
    return {k.replace("-", "_"): v for k, v in values.items()}


def config_from_args(args: argparse.Namespace):
    """TrainConfig from defaults, then the --config file, then explicit flags."""
    from dpo_kernels.trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    if getattr(args, "config", None):
        values = _read_config_file(args.config)
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{args.config}: unknown setting(s) {unknown}")
    flags = {k: v for k, v in vars(args).items() if k in names}
    if "loss_params" in flags:
        flags["loss_params"] = {**values.get("loss_params", {}), **dict(flags["loss_params"])}
    values.update(flags)
    if isinstance(values.get("loss_weights"), str):
        values["loss_weights"] = [float(v) for v in values["loss_weights"].split(",")]
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    from dpo_kernels.trainer import NonFiniteLossError, train

    config = config_from_args(args)
    if not config.model or not config.data:
        raise ValueError("--model and --data are required (as flags or in the --config file)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        result = train(config)
    except NonFiniteLossError as e:
        print(f"dpo-kernels train: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 prints the summary
    summary = {"global_step": result.global_step, "final_checkpoint": result.final_checkpoint,
               "skipped_steps": result.skipped_steps, "dropped_rows": result.dropped_rows,
               **result.eval_metrics}
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-kernels",
        description="Exact, fast, memory-lean DPO: train models, run the benchmarks, profile memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    try:
        from dpo_kernels.bench.cli import add_subcommands
    except ImportError:
        add_subcommands = None  # the benchmark tools are optional
    if add_subcommands is not None:
        add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"dpo-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2
