"""Loading the policy, the reference and the tokenizer, with every missing or corrupt file reported as one line.

A model is a local directory or a hub id already in the local Hugging Face cache (nothing is downloaded). Before
transformers reads it, the directory is checked: `config.json` parses, weights are present, and every safetensors
file is as long as its header says (a truncated download or copy is the common corruption). What transformers still
refuses becomes an `InputFileError` naming the directory.
"""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import torch

from dpo_kernels.trainer.errors import InputFileError, UserInputError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Any one of these lets AutoTokenizer build a tokenizer without a download.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tiktoken.model", "tokenizer.tiktoken")


def resolve_model_dir(name_or_path, what: str = "model") -> Path:
    """The local directory of a model (or tokenizer): `name_or_path` itself, or its snapshot in the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise InputFileError(path, f"is a file; the {what} must be a directory (or a hub id in the local cache)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:  # an invalid repo id, or one missing from the cache: both mean "not found" here
        raise InputFileError(name_or_path, "no such directory, and no model of that id in the local Hugging Face "
                                           "cache (nothing is downloaded)") from None


def check_safetensors(path) -> dict[str, list[int]]:
    """Raises InputFileError unless `path` is a safetensors file as long as its header says; returns the shape of
    each tensor it holds."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputFileError(path, f"truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise InputFileError(path, f"truncated safetensors file ({size} bytes; the header alone needs "
                                       f"{8 + header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputFileError(path, "corrupt safetensors file (its header is not valid JSON)") from None
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise InputFileError(path, "corrupt safetensors file (its header lacks tensor offsets)") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise InputFileError(path, f"truncated or corrupt safetensors file ({size} bytes, its header describes "
                                   f"{expected})")
    return {k: v.get("shape") for k, v in header.items() if k != "__metadata__"}


def _read_json(path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(path, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputFileError(path, f"expected a JSON object, got {type(value).__name__}")
    return value


def check_model_dir(root) -> None:
    """Raises InputFileError for a model directory without a readable config.json or complete weights."""
    root = Path(root)
    config = root / "config.json"
    if not config.is_file():
        raise InputFileError(root, "no config.json: not a Hugging Face model directory")
    _read_json(config)
    present = [name for name in WEIGHT_FILES if (root / name).is_file()]
    if not present:
        raise InputFileError(root, f"holds no model weights (none of {', '.join(WEIGHT_FILES)})")
    shapes = {}
    if present[0] == "model.safetensors":
        shapes = {k: (present[0], v) for k, v in check_safetensors(root / present[0]).items()}
    elif present[0] == "model.safetensors.index.json":
        index = _read_json(root / present[0])
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise InputFileError(root / present[0], "lists no weight files (empty 'weight_map')")
        for shard in shards:
            if not (root / shard).is_file():
                raise InputFileError(root / shard, f"missing (listed in {present[0]})")
            shapes.update({k: (shard, v) for k, v in check_safetensors(root / shard).items()})
    _check_shapes_fit_config(root, shapes)


def _check_shapes_fit_config(root: Path, shapes: dict[str, tuple[str, list[int]]]) -> None:
    """Raises InputFileError when a saved tensor's shape is not the one config.json gives its parameter.

    The model is built on the meta device (no memory, no weights), and only names that both sides know are
    compared: architectures that rename keys at load, or that transformers cannot build here, are left to the load.
    """
    if not shapes:
        return
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(str(root), local_files_only=True)
            with torch.device("meta"):
                expected = {k: list(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception:  # noqa: BLE001 (any failure to build leaves the check to the load, which names its problem)
        return
    for name, (file, shape) in shapes.items():
        if name in expected and shape != expected[name]:
            raise InputFileError(root / file, f"tensor {name} has shape {shape}, but config.json gives it "
                                              f"{expected[name]}: the weights and the config are of different models")


def load_model(name_or_path, dtype: torch.dtype, device: torch.device, what: str = "model"):
    """A causal LM from a local directory or the local HF cache, in `dtype` on `device`, without its KV cache."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    root = resolve_model_dir(name_or_path, what)
    check_model_dir(root)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(root), dtype=dtype, local_files_only=True)
    except UserInputError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise InputFileError(root, f"cannot load the {what}: {_first_line(e)}") from None
    model.config.use_cache = False
    return model.to(device)


def load_tokenizer(name_or_path):
    """The tokenizer of a local directory or the local HF cache; it needs a pad or an EOS token for padding."""
    from transformers import AutoTokenizer

    root = resolve_model_dir(name_or_path, "tokenizer")
    for name in ("config.json", "tokenizer_config.json"):  # AutoTokenizer reads both when present
        if (root / name).is_file():
            _read_json(root / name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        # Without its files transformers blames a missing package (sentencepiece, tiktoken): name the real cause.
        if not any((root / name).is_file() for name in TOKENIZER_FILES):
            raise InputFileError(root, f"holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                                       "pass --tokenizer with a directory that has them") from None
        raise InputFileError(root, f"cannot load the tokenizer: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise InputFileError(root, "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token "
                                   "and save it")
    return tokenizer


def pad_id(tokenizer) -> int:
    """The id padding uses: the pad token, else EOS (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def enable_checkpointing(model) -> None:
    # transformers >= 5.x renames gradient_checkpointing_enable to activation_checkpointing_enable.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layer_types(model) -> tuple[type, ...]:
    """The model's decoder layer classes (FSDP shards each layer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]

