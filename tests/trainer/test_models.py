"""dpo_kernels.trainer.models: every missing or corrupt model, tokenizer or data input is one line naming the file
and the problem (the CLI exits with status 2), checked before anything trains."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dpo_kernels.cli import main as cli_main
from dpo_kernels.trainer import models
from dpo_kernels.trainer.errors import InputFileError
from tests.tiny_models import build_llama


def _model_copy(tiny, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny["model"], copy)
    return copy


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _without_tokenizer(model: Path):
    for p in model.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            p.unlink()


INPUTS = {  # name: (change the model dir M / flags, the path the error names, words of the message)
    "no such --model": (lambda m, d: ["--model", str(d / "nope")], "nope", "no such directory"),
    "--model not in the hub cache": (lambda m, d: ["--model", "no-such-org/no-such-model"], "no-such-org/no-such-model",
                                     "no model of that id in the local Hugging Face cache"),
    "no such --tokenizer": (lambda m, d: ["--tokenizer", str(d / "nope")], "nope", "no such directory"),
    "no such --ref-model": (lambda m, d: ["--ref-model", str(d / "nope")], "nope", "no such directory"),
    "no such --data": (lambda m, d: ["--data", str(d / "nope.jsonl")], "nope.jsonl", "no such file or directory"),
    "no such --eval-data": (lambda m, d: ["--eval-data", str(d / "nope.jsonl")], "nope.jsonl", "no such file"),
    "--data is a plain directory": (lambda m, d: ["--data", str(d)], str(Path("dir")), "is a directory but not"),
    "corrupt config.json": (lambda m, d: (m / "config.json").write_text("{\"vocab_size\": 3,") and [],
                            "config.json", "not valid JSON"),
    "truncated weights": (lambda m, d: _truncate(m / "model.safetensors") or [], "model.safetensors", "truncated"),
    "missing weights": (lambda m, d: (m / "model.safetensors").unlink() or [], "model", "holds no model weights"),
    "no tokenizer files": (lambda m, d: _without_tokenizer(m) or [], "model", "holds no tokenizer files"),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_a_missing_or_corrupt_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, name):
    change, named, words = INPUTS[name]
    model = _model_copy(tiny, tmp_path)
    (tmp_path / "dir").mkdir()
    flags = change(model, tmp_path / "dir" if "plain directory" in name else tmp_path)
    argv = ["train", "--model", str(model), "--data", tiny["data"], "--output-dir", str(tmp_path / "out"),
            "--batch-size", "2", "--max-steps", "1", "--max-length", "32", "--no-progress", "--no-plot", *flags]
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert named in err and words in err, err
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_check_safetensors_accepts_a_whole_file_and_names_a_cut_one(tiny, tmp_path):
    models.check_safetensors(Path(tiny["model"]) / "model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((Path(tiny["model"]) / "model.safetensors").read_bytes()[:-1])
    with pytest.raises(InputFileError, match=r"cut.safetensors: truncated or corrupt safetensors file"):
        models.check_safetensors(cut)
    cut.write_bytes(b"\x05")
    with pytest.raises(InputFileError, match="no header"):
        models.check_safetensors(cut)


def test_sharded_weights_are_checked_shard_by_shard(tiny, tmp_path):
    root = tmp_path / "sharded"
    build_llama(tiny["tokenizer"]).save_pretrained(str(root), max_shard_size="20KB")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "set-up: the model must be saved in several shards"
    models.check_model_dir(root)
    _truncate(root / shards[1])
    with pytest.raises(InputFileError, match=shards[1]):
        models.check_model_dir(root)
    (root / shards[1]).unlink()
    with pytest.raises(InputFileError, match=rf"{shards[1]}: missing \(listed in model.safetensors.index.json\)"):
        models.check_model_dir(root)


def test_load_model_and_tokenizer(tiny):
    model = models.load_model(tiny["model"], torch.float64, torch.device("cpu"))
    assert model.dtype == torch.float64 and model.config.use_cache is False
    tokenizer = models.load_tokenizer(tiny["model"])
    assert models.pad_id(tokenizer) == tokenizer.pad_token_id
    assert models.decoder_layer_types(model) == (type(model.model.layers[0]),)
