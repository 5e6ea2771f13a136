"""`TrainConfig`: every setting of the trainer, written once.

Each field carries its help text, its allowed values and its check in `field(metadata=...)`. `check_config` reads
them (type, choices, range) and then checks the settings that only make sense together; `dpo-kernels train`
generates its flags from the same fields, and a config file is checked against them (docs/design.md, "The trainer").

Metadata keys: `help`; `choices`; `check`, a `Check` of the value's range; `resume`, what a resumed run does when
the value differs from the checkpoint's ("checkpoint": the checkpoint's value is used, "config": this run's value
is used, absent: the setting does not shape the run); `metavar`, `nargs`, `const`, `flag`: for the CLI only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from dpo_kernels import paths
from dpo_kernels.backend import torch_fallback_reason
from dpo_kernels.fused_linear.plan import parse_memory_budget
from dpo_kernels.loss_op import loss_types as loss_table
from dpo_kernels.loss_op.group_spec import GROUP_LOSS_TYPES, MAX_GROUP_SIZE, PAIR_LOSS_TYPES, check_group_settings
from dpo_kernels.loss_op.spec import check_loss_settings
from dpo_kernels.trainer.backends import BACKENDS
from dpo_kernels.trainer.distributed import DEVICES
from dpo_kernels.trainer.distributed import MODES as DISTRIBUTED_MODES
from dpo_kernels.trainer.errors import UserInputError
from dpo_kernels.validation import FLOAT_DTYPES

PRECISIONS = ("auto", "bf16", "fp32", "fp64")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit


class Check(NamedTuple):
    """The valid values of one setting: `ok(value)` is true for them, and `must` says which they are."""

    ok: Callable[[Any], bool]
    must: str


AT_LEAST_1 = Check(lambda v: v >= 1, ">= 1")
AT_LEAST_0 = Check(lambda v: v >= 0, ">= 0")
FRACTION = Check(lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def _setting(default, help: str, **metadata):
    """A TrainConfig field: its default and its metadata (see the module docstring)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _loss_param(name: str, default=None, **metadata):
    """A field of one of the loss op's hyper-parameters: its help text comes from the loss table."""
    param = loss_table.HYPER_PARAMS[name]
    default_text = "" if default is not None else f" (default: the loss's, {param.default:g})"
    return _setting(default, param.help + default_text, resume="config", **metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run; each field's help says what it does (`dpo-kernels train --help`)."""

    # --- what to train, on what, where to write ---
    model: str = _setting("", "policy to train: a local HF model directory or a hub id already in the local cache",
                          resume="config")
    data: str = _setting("", "training pairs: .json / .jsonl / .parquet file or a datasets.save_to_disk directory; "
                             "rows {prompt, chosen, rejected} as strings or as lists of chat messages, or groups "
                             "{prompt, responses, scores} / {prompt, ranking} (best first) for a group --loss-type")
    output_dir: str = _setting("dpo-output", "where checkpoint-STEP/, metrics.jsonl and curves.png go (must be "
                                             "writable)")
    eval_data: str | None = _setting(None, "held-out pairs, same formats; evaluated every --eval-every steps and "
                                           "at the end")
    tokenizer: str | None = _setting(None, "tokenizer path or id (default: --model)")
    ref_model: str | None = _setting(None, "a separate frozen reference model (default: a frozen copy of the "
                                           "initial policy)", resume="config")
    precompute_ref: bool = _setting(False, "compute reference log-probs once before training, cache them on disk "
                                           "(keyed by model and data) and reuse them in later runs; frees the "
                                           "reference model's memory")
    ref_cache_dir: str | None = _setting(None, "directory of the reference log-prob cache (default: "
                                               "OUTPUT_DIR/ref-cache)")
    reference_free: bool = _setting(False, "no reference model: reference log-probs are 0 (implied when every "
                                           "loss type is reference-free, e.g. simpo)", resume="config")
    model_dtype: str = _setting("float32", "dtype the weights are loaded and trained in; AdamW keeps its state "
                                           "in it too, which float16 cannot hold (refused: use bfloat16)",
                                choices=tuple(MODEL_DTYPES), resume="config")
    # --- length of the run ---
    max_steps: int = _setting(-1, "optimizer steps to run; -1 runs --epochs epochs",
                              check=Check(lambda v: v >= 1 or v == -1, ">= 1, or -1 to run `epochs` epochs"),
                              resume="config")
    epochs: int = _setting(1, "passes over the data when --max-steps is -1", check=AT_LEAST_1, resume="config")
    batch_size: int = _setting(4, "preference pairs (or groups) per micro-batch per process (2 x batch_size rows: "
                                  "chosen, then rejected)", check=AT_LEAST_1, resume="config")
    grad_accum: int = _setting(1, "micro-batches accumulated per optimizer step", check=AT_LEAST_1, resume="config")
    eval_batch_size: int | None = _setting(None, "pairs per evaluation batch (default: --batch-size)",
                                           check=AT_LEAST_1)
    stop_after_steps: int = _setting(-1, "stop with a checkpoint at this step while the LR schedule still spans "
                                         "--max-steps (for time-limited jobs; continue with --resume); -1 never")
    # --- optimizer and schedule (AdamW + transformers.get_scheduler) ---
    lr: float = _setting(1e-6, "AdamW learning rate", check=Check(lambda v: 0 < v < math.inf, "> 0 and finite"),
                         resume="checkpoint")
    weight_decay: float = _setting(0.0, "AdamW weight decay", check=Check(lambda v: 0 <= v < math.inf,
                                                                          ">= 0 and finite"), resume="checkpoint")
    adam_beta1: float = _setting(0.9, "AdamW beta1", check=FRACTION, resume="checkpoint")
    adam_beta2: float = _setting(0.999, "AdamW beta2", check=FRACTION, resume="checkpoint")
    adam_eps: float = _setting(1e-8, "AdamW epsilon (> 0: a weight whose gradient is 0 would divide 0 by 0)",
                               check=Check(lambda v: 0 < v < math.inf, "> 0 and finite"), resume="checkpoint")
    lr_scheduler: str = _setting("cosine", "schedule name for transformers.get_scheduler (cosine, linear, constant, "
                                           "constant_with_warmup, ...)", metavar="NAME", resume="config")
    warmup_steps: int = _setting(0, "warm-up steps (wins over --warmup-ratio when > 0)", check=AT_LEAST_0,
                                 resume="config")
    warmup_ratio: float = _setting(0.1, "fraction of the steps spent warming up", check=FRACTION, resume="config")
    max_grad_norm: float = _setting(1.0, "clip the global gradient norm to this; <= 0 disables clipping",
                                    check=Check(lambda v: not math.isnan(v), "a number"), resume="config")
    # --- the DPO loss (dpo_kernels.dpo_loss; hyper-parameters and their ranges: dpo_kernels.loss_op.loss_types) ---
    beta: float = _loss_param("beta", loss_table.HYPER_PARAMS["beta"].default)
    loss_type: str = _setting("sigmoid", "loss name or comma list (see the loss types below); or one group loss, "
                                         "plackett_luce, all_pairs or best_vs_worst, for rows of K ranked responses "
                                         "(pair rows then train as groups of two)", metavar="NAME",
                              resume="config")
    pair_loss: str = _setting("sigmoid", "group losses all_pairs and best_vs_worst: the pairwise loss applied to "
                                         "each ordered pair", choices=PAIR_LOSS_TYPES, metavar="NAME",
                              resume="config")
    top_k: int | None = _setting(None, "plackett_luce: score the first N places only (1 = the best against all "
                                       "the others) (default: the full ranking, K - 1 places)",
                                 check=Check(lambda v: 1 <= v < MAX_GROUP_SIZE, f"in [1, {MAX_GROUP_SIZE - 1}]"),
                                 metavar="N", resume="config")
    pair_weighting: str | None = _setting(None, "all_pairs: score_gap weighs each pair by its score gap "
                                                "(default: every pair weighs 1)",
                                          check=Check(lambda v: v == "score_gap", "score_gap"), metavar="score_gap",
                                          resume="config")
    sft_weight: float | None = _setting(None, "group losses: weight of the NLL of each group's best response (the "
                                              "pairwise losses add 'sft' to --loss-type instead) (default: 0)",
                                        check=Check(math.isfinite, "finite"), resume="config")
    loss_weights: list[float] | None = _loss_param("loss_weights", metavar="W1,W2")
    label_smoothing: float = _loss_param("label_smoothing", loss_table.HYPER_PARAMS["label_smoothing"].default)
    gamma: float | None = _loss_param("gamma")
    tau: float | None = _loss_param("tau")
    dpop_lambda: float | None = _loss_param("dpop_lambda")
    loss_params: dict[str, float] = _setting({}, "any other keyword of dpo_kernels.dpo_loss, repeatable",
                                             flag="--loss-param", metavar="KEY=VALUE", resume="config")
    group_by_prompt: bool = _setting(False, "pair rows: the pairs that share a prompt run as one group, each distinct "
                                            "response once and the prompt once, with the same pairwise loss on "
                                            "the same pairs; --batch-size then counts prompts, each with all of "
                                            "its pairs", resume="config")
    # --- tokenization ---
    max_length: int = _setting(1024, "maximum prompt + response tokens per row (responses are cut to fit)",
                               check=Check(lambda v: v >= 2, ">= 2"), resume="config")
    max_prompt_length: int = _setting(512, "maximum prompt tokens; longer prompts keep their end", check=AT_LEAST_1,
                                      resume="config")
    skip_bad_rows: bool = _setting(False, "drop malformed rows (missing field, empty text, prompt too long) and "
                                          "report how many, instead of stopping with an error naming file and row")
    # --- how the step runs ---
    loss_backend: str = _setting("fused-linear", "fused-linear: hidden states + lm_head, never the [2B,T,V] logits; "
                                                 "logits: model logits through the Triton log-prob kernel; "
                                                 "reference: plain PyTorch (for checking)",
                                 choices=BACKENDS, resume="config")
    memory_budget: int | str | None = _setting(None, "fused-linear only: bytes for its [chunk, V] logits buffer, "
                                                     "or 'low' to recompute in the backward (least memory) "
                                                     "(default: 2 GiB)", metavar="BYTES|low", resume="config")
    precision: str = _setting("auto", "auto = bf16 autocast on CUDA, none on CPU; fp64 (float64 weights, "
                                      "--loss-backend reference only) is for tests", choices=PRECISIONS,
                              resume="config")
    gradient_checkpointing: bool = _setting(False, "recompute activations in backward to save memory")
    compile: bool = _setting(False, "torch.compile the policy's forward and its DPO loss (nn.Module.compile: the "
                                    "weights and checkpoints are the same; the first steps compile)")
    share_prompt: bool = _setting(False, "run each pair's prompt through the model once: one row [prompt | chosen | "
                                         "rejected] per pair, the responses kept apart by the attention mask (the "
                                         "same numbers, fewer tokens when prompts are long); models it does not "
                                         "support train on unshared rows, with a warning. Groups always take this "
                                         "layout where the model supports it")
    packing: bool = _setting(False, "padding-free: several sequences per row (several pairs with --share-prompt, "
                                    "several groups), each its own document in the attention mask, up to "
                                    "--max-row-tokens (the same numbers, fewer backbone positions when lengths are "
                                    "uneven); models without that mask train on padded rows, with a warning")
    max_row_tokens: int | None = _setting(None, "cap on a packed row's tokens (default: one row holds the whole "
                                                "micro-batch); a sequence (or shared pair, or group) longer than the "
                                                "cap gets a row of its own", check=AT_LEAST_1)
    strict: bool = _setting(False, "turn every fallback (shared prompt -> unshared rows, packed rows -> padded "
                                   "rows, Triton -> PyTorch, which CPU tensors take unless DPO_KERNELS_BACKEND=torch) "
                                   "into an error naming the model, option or device that caused it; "
                                   "DPO_KERNELS_STRICT=1 does the same")
    distributed: str = _setting("none", "data parallelism across torchrun processes: ddp, or fsdp (FSDP2 "
                                        "fully_shard)", choices=DISTRIBUTED_MODES)
    device: str = _setting("auto", "auto picks CUDA when available", choices=DEVICES)
    seed: int = _setting(42, "seed for initialisation and data order",
                         check=Check(lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**32 - 1]"), resume="config")
    # --- logging, evaluation, checkpoints ---
    log_every: int = _setting(1, "steps between metrics.jsonl records", check=AT_LEAST_1)
    eval_every: int = _setting(0, "steps between evaluations; 0 evaluates only at the end", check=AT_LEAST_0)
    save_every: int = _setting(0, "steps between checkpoints; 0 saves only at the end", check=AT_LEAST_0)
    resume: str | None = _setting(None, "continue from a checkpoint dir; bare --resume takes the newest checkpoint "
                                        "in --output-dir", nargs="?", const="latest")
    overwrite_output_dir: bool = _setting(False, "start afresh in an --output-dir that holds an earlier run's "
                                                 "checkpoints, deleting them (without it such a start is refused)")
    max_nonfinite_steps: int = _setting(5, "stop after this many non-finite losses in a row (each one skips its "
                                           "step)", check=AT_LEAST_1)
    progress: bool = _setting(True, "tqdm progress bar; --no-progress prints one line per step instead")
    plot: bool = _setting(True, "write curves.png (loss, reward accuracy, margins) at the end")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


@functools.cache
def field_types() -> dict[str, Any]:
    """Each field's type, resolved from its annotation."""
    return typing.get_type_hints(TrainConfig)


# ------------------------------------------------------------------------------------------------- value checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _type_problem(value, kind) -> str | None:
    """What `value` must be to have the type `kind` (an annotation), or None when it has it."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else " or ".join(problems)
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if _is_int(value) else "an integer"
    if origin is float:
        return None if _is_number(value) else "a number"
    if origin is str:
        return None if isinstance(value, str) else "text"
    if origin is list:
        return None if isinstance(value, list) and all(map(_is_number, value)) else "a list of numbers"
    if origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())
        return None if ok else "a mapping of keyword to number"
    raise TypeError(f"no check for annotation {kind!r}")


def check_setting(name: str, value, source: str | None = None) -> None:
    """Raises UserInputError when `value` is not valid for the setting `name` (type, choices, range); the message
    names the setting, and `source`, the file the value came from, when given."""
    f = FIELDS[name]
    must = _type_problem(value, field_types()[name])
    if must is None and f.metadata.get("choices") and value not in f.metadata["choices"]:
        must = "one of " + ", ".join(f.metadata["choices"])
    check = f.metadata.get("check")
    if must is None and value is not None and check is not None and not check.ok(value):
        must = check.must
    if must is not None:
        where = f"{source}: " if source else ""
        raise UserInputError(f"{where}{name} must be {must}, got {value!r}{_quoted_number_hint(source, value)}")


def _quoted_number_hint(source: str | None, value) -> str:
    """A number written as text in a config file: say how to write it as a number."""
    if source is None or not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if source.lower().endswith((".yaml", ".yml")) and "e" in value.lower() and "." not in value:
        # YAML 1.1 takes an exponent as a number only after a dot.
        return f" (YAML reads {value} as text: write {value.lower().replace('e', '.0e', 1)})"
    return " (a number in quotes is text: write it without quotes)"


# ------------------------------------------------------------------------------------------------- whole config
def loss_types(c: TrainConfig) -> list[str]:
    return [t.strip() for t in c.loss_type.split(",") if t.strip()]


def is_group_loss(c: TrainConfig) -> bool:
    """Whether the run trains a group loss (`dpo_kernels.group_dpo_loss`) rather than a pairwise one."""
    return any(t in GROUP_LOSS_TYPES for t in loss_types(c))


def is_reference_free(c: TrainConfig) -> bool:
    if is_group_loss(c):
        ranking_free = c.loss_type != "plackett_luce" and loss_table.is_reference_free([c.pair_loss])
        return c.reference_free or ranking_free
    return c.reference_free or loss_table.is_reference_free(loss_types(c))


def loss_kwargs(c: TrainConfig) -> dict:
    """Keyword arguments of dpo_kernels.dpo_loss: the loss types and every hyper-parameter of the loss table the
    config sets (None leaves the loss's default), then `loss_params`."""
    types = loss_types(c)
    if not types:
        raise UserInputError("loss_type is empty")
    kwargs = {"loss_type": types[0] if len(types) == 1 else types}
    for name in loss_table.HYPER_PARAMS:
        value = getattr(c, name)
        if value is not None:
            kwargs[name] = list(value) if isinstance(value, list) else value
    kwargs.update(c.loss_params)
    return kwargs


def group_loss_kwargs(c: TrainConfig) -> dict:
    """Keyword arguments of dpo_kernels.group_dpo_loss: the group loss type, its own settings, and the pair loss's
    hyper-parameters the config sets, then `loss_params`."""
    kwargs = {"loss_type": c.loss_type.strip(), "beta": c.beta, "label_smoothing": c.label_smoothing,
              "pair_loss": c.pair_loss, "top_k": c.top_k, "pair_weighting": c.pair_weighting,
              "sft_weight": 0.0 if c.sft_weight is None else c.sft_weight}
    for name in ("gamma", "tau", "dpop_lambda"):
        if getattr(c, name) is not None:
            kwargs[name] = getattr(c, name)
    kwargs.update(c.loss_params)
    return kwargs


def device_type(c: TrainConfig) -> str:
    """The device type `distributed.setup` will pick for `c.device`."""
    return "cuda" if c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available()) else "cpu"


def precision_settings(c: TrainConfig, device: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype or None) on a device of type `device`."""
    if c.precision == "fp64":
        return torch.float64, None
    dtype = MODEL_DTYPES[c.model_dtype]
    if c.precision == "bf16" or (c.precision == "auto" and device == "cuda"):
        return dtype, torch.bfloat16
    return dtype, None


def check_config(c: TrainConfig, sources: Mapping[str, str] | None = None) -> None:
    """Raises UserInputError for a config that cannot run, and StrictModeError for a fallback that strict mode
    refuses and every step would take, before anything is loaded.

    `sources` maps a setting to the file its value came from, which the message then names.
    """
    sources = sources or {}
    for name in FIELDS:
        check_setting(name, getattr(c, name), sources.get(name))
    if not c.output_dir.strip():
        raise UserInputError("output_dir is empty (an unset shell variable?); name the directory to write to")
    if not c.model:
        raise UserInputError("model is required (a local directory or a hub id in the local cache)")
    if not c.data:
        raise UserInputError("data is required (a .json/.jsonl/.parquet file or a saved datasets directory)")
    if c.max_row_tokens is not None and not c.packing:
        raise UserInputError(f"max_row_tokens ({c.max_row_tokens}) caps packed rows; set packing with it, or drop it")
    if c.reference_free and (c.ref_model or c.precompute_ref):
        raise UserInputError("reference_free excludes ref_model and precompute_ref")
    if c.model_dtype == "float16":
        raise UserInputError(
            "model_dtype float16 cannot be trained here: AdamW keeps its state in the weights' dtype, where its "
            "eps (1e-8) is 0 and small updates vanish, so the weights turn to NaN; use bfloat16, or float32 "
            "with --precision bf16"
        )
    weights, autocast = precision_settings(c, device_type(c))
    if c.loss_backend != "reference" and (autocast or weights) not in FLOAT_DTYPES:
        setting = "precision fp64" if c.precision == "fp64" else f"model_dtype {c.model_dtype}"
        raise UserInputError(
            f"{setting} needs loss_backend reference: the {c.loss_backend} kernels take "
            f"{', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)}"
        )
    _check_lr_scheduler(c.lr_scheduler)
    try:
        parse_memory_budget(c.memory_budget)
        _check_loss_settings(c)
        _check_strict_backend(c)
    except ValueError as e:
        raise UserInputError(str(e)) from None


def _check_strict_backend(c: TrainConfig) -> None:
    """Strict mode refuses the Triton -> PyTorch fallback, which every step of the kernels' backends takes on a CPU
    device under DPO_KERNELS_BACKEND=auto: refused here, the run stops before the models load rather than at its
    first step. The reference backend runs plain PyTorch, no fallback."""
    if not (c.strict or paths.strict_enabled()) or c.loss_backend == "reference" or device_type(c) != "cpu":
        return
    reason = torch_fallback_reason(torch.empty(0))  # a CPU tensor
    if reason is not None:
        reason += "; set DPO_KERNELS_BACKEND=torch to train on the cpu device in strict mode"
        raise paths.StrictModeError(paths.Fallback(paths.TRITON_TO_TORCH, "cpu tensors", reason))


def _check_lr_scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise UserInputError(f"lr_scheduler must be one of {', '.join(names)}, got {name!r}")


def _check_loss_settings(c: TrainConfig) -> None:
    if is_group_loss(c):
        _check_group_loss_settings(c)
        return
    group_only = [name for name in ("top_k", "pair_weighting", "sft_weight") if getattr(c, name) is not None]
    if group_only:
        raise UserInputError(f"{', '.join(group_only)} apply to the group loss types ({', '.join(GROUP_LOSS_TYPES)}),"
                             f" not loss_type {c.loss_type!r}")
    kwargs = loss_kwargs(c)
    check_loss_settings(kwargs.pop("loss_type"), beta=kwargs.pop("beta"),
                        label_smoothing=kwargs.pop("label_smoothing"), loss_params=kwargs)


def _check_group_loss_settings(c: TrainConfig) -> None:
    if c.group_by_prompt:
        raise UserInputError(f"group_by_prompt groups pair rows for a pairwise loss; loss_type {c.loss_type!r} "
                             "trains group rows (and pair rows, as groups of two) without it")
    types = loss_types(c)
    if len(types) > 1:
        raise UserInputError(f"loss_type {c.loss_type!r}: a group loss ({', '.join(GROUP_LOSS_TYPES)}) runs alone, "
                             "not in a comma list (its sft term is --sft-weight)")
    if c.loss_weights is not None:
        raise UserInputError("loss_weights apply to a comma list of pairwise losses; a group loss's sft term is "
                             "--sft-weight")
    unused = [f"{name} {getattr(c, name)!r}" for name in ("pair_loss", "label_smoothing")
              if getattr(c, name) != FIELDS[name].default]
    if types[0] == "plackett_luce" and unused:
        raise UserInputError(f"loss_type 'plackett_luce' reads no pair loss, so {' and '.join(unused)} would change "
                             "nothing; a pair loss runs under --loss-type all_pairs or best_vs_worst")
    kwargs = group_loss_kwargs(c)
    check_group_settings(kwargs.pop("loss_type"), beta=kwargs.pop("beta"), pair_loss=kwargs.pop("pair_loss"),
                         top_k=kwargs.pop("top_k"), pair_weighting=kwargs.pop("pair_weighting"),
                         sft_weight=kwargs.pop("sft_weight"), label_smoothing=kwargs.pop("label_smoothing"),
                         loss_params=kwargs)


def check_saved_config(saved: Mapping, source) -> None:
    """Raises UserInputError naming `source` (a checkpoint's state file) for a setting in `saved`, the config a
    checkpoint's run wrote, that is not a valid value; settings this version does not know are ignored."""
    for name, value in saved.items():
        if name in FIELDS:
            check_setting(name, value, str(source))


def resumed_config(c: TrainConfig, saved: Mapping) -> tuple[TrainConfig, list[str]]:
    """The config a run resumed from a checkpoint runs with, and one note per run-shaping setting (metadata
    `resume`) whose value differs from `saved`, the checkpoint's config (as its JSON holds it), saying which value
    is used: the checkpoint's for the settings its optimizer and scheduler states carry, this run's for the others.
    """
    notes, restored = [], {}
    for name, f in FIELDS.items():
        kind = f.metadata.get("resume")
        if kind is None or name not in saved:
            continue
        ours, theirs = json.loads(json.dumps(getattr(c, name))), saved[name]
        if ours == theirs:
            continue
        if kind == "checkpoint":
            restored[name] = theirs
            notes.append(f"{name} {ours!r} (the checkpoint's {theirs!r} is used: its optimizer state carries it)")
        else:
            notes.append(f"{name} {ours!r} (used; the checkpoint's run had {theirs!r})")
    return dataclasses.replace(c, **restored), notes
