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
import types
import typing
from pathlib import Path

from dpo_kernels.paths import StrictModeError
from dpo_kernels.trainer.errors import InputFileError, UserInputError


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _loss_param(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: value must be a number, got {value!r}") from None


def _number_or_word(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_PARSERS = {int: (int, "an integer"), float: (float, "a number"), list: (_float_list, "comma-separated numbers"),
            dict: (_loss_param, "KEY=VALUE"), str: (str, "text")}


def _non_none(kind) -> list:
    """The types an annotation allows besides None, as classes (`list[float]` as list)."""
    args = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    return [typing.get_origin(a) or a for a in args if a is not type(None)]


def _text_parser(kind):
    """How a flag's text becomes a value of the annotation `kind` (`X | None` as X; `int | str`: a number when the
    text is one, else the text), and what the text should look like."""
    kinds = _non_none(kind)
    return (_number_or_word, "a number or a word") if len(kinds) > 1 else _PARSERS[kinds[0]]


def _argparse_type(parse, expected: str):
    """`parse` as an argparse type: a ValueError becomes one usage error saying what was expected."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return convert


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flag(p: argparse.ArgumentParser, f: dataclasses.Field, kind) -> None:
    """The flag of one TrainConfig field, from its type, default and metadata."""
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = meta["help"]
    kwargs = {k: meta[k] for k in ("choices", "metavar", "nargs", "const") if k in meta}
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        parse, expected = _text_parser(kind)
        if parse is not str:
            kwargs["type"] = _argparse_type(parse, expected)
        if isinstance(default, dict):
            kwargs["action"] = "append"
        if "choices" not in kwargs and "metavar" not in kwargs:
            kwargs["metavar"] = {int: "N", float: "X"}.get(parse, "PATH")
    if default == "":
        text += " (required)"
    elif "(default" not in text and default != {}:
        text += f" (default: {default})"
    # SUPPRESS keeps unset flags out of the namespace, so that a config file's value is not overwritten by a
    # default; the help text states the default.
    p.add_argument(meta.get("flag", _flag(f.name)), dest=f.name, default=argparse.SUPPRESS, help=text, **kwargs)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from dpo_kernels.loss_op.loss_types import loss_type_help
    from dpo_kernels.trainer.config import FIELDS, field_types

    # The epilog's table is preformatted, so the description carries its own line breaks.
    p = subparsers.add_parser(
        "train", help="train a HuggingFace causal LM with DPO",
        description="Train a HuggingFace causal LM with DPO on a preference dataset, using the fused kernels.\n"
                    "Precedence: explicit flags > --config file > defaults.",
        epilog=loss_type_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="JSON (or YAML, with PyYAML) file of TrainConfig values; explicit flags override it")
    for name, f in FIELDS.items():
        _add_flag(p, f, field_types()[name])
    p.set_defaults(func=run_train, user_errors=(UserInputError, StrictModeError))
    return p


def _read_config_file(path: str) -> dict:
    """The settings of a JSON or YAML config file, with names as TrainConfig spells them."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(path, "config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(path, f"cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputFileError(path, "reading YAML needs PyYAML (pip install pyyaml); or use JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserInputError(f"{path}{where}: not valid YAML ({problem})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{path}: expected a mapping of TrainConfig fields")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def config_from_args(args: argparse.Namespace):
    """TrainConfig from defaults, then the --config file, then explicit flags; checked (`check_config`), naming
    the file for the settings that came from it."""
    from dpo_kernels.trainer.config import FIELDS, TrainConfig, check_config, check_setting, field_types

    values, sources = {}, {}
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    if getattr(args, "config", None):
        values = _read_config_file(args.config)
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise UserInputError(f"{args.config}: unknown setting(s) {unknown}")
        for name, value in values.items():
            if name in flags and name != "loss_params":
                continue  # an explicit flag overrides it; loss_params merge, and the merged mapping is checked
            if isinstance(value, str) and list in _non_none(field_types()[name]):  # a comma list, as a flag takes
                try:
                    values[name] = value = _float_list(value)
                except ValueError:
                    raise UserInputError(f"{args.config}: {name} must be comma-separated numbers, got {value!r}") \
                        from None
            check_setting(name, value, args.config)
        sources = dict.fromkeys(values, args.config)
    if "loss_params" in flags:
        flags["loss_params"] = {**values.get("loss_params", {}), **dict(flags["loss_params"])}
    values.update(flags)
    config = TrainConfig(**values)
    check_config(config, {k: v for k, v in sources.items() if k not in flags})
    return config


def run_train(args: argparse.Namespace) -> int:
    from dpo_kernels.trainer import Interrupted, NonFiniteLossError, train

    config = config_from_args(args)
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
    except Interrupted as e:
        print(f"dpo-kernels train: {e}", file=sys.stderr)
        return 128 + e.signum
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
    """Runs the command. Its user errors (`UserInputError` and `StrictModeError` for train) are one line and status
    2, a Ctrl-C that stops at once is status 130; any other exception is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except getattr(args, "user_errors", (ValueError,)) as e:
        print(f"dpo-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = "; nothing saved since the last checkpoint" if args.command == "train" else ""
        print(f"dpo-kernels {args.command}: interrupted{note}", file=sys.stderr)
        return 130
