"""The example scripts in python/ run end to end at a tiny size (in-process, to share the imports)."""
import importlib.util
import math
import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "python"


pytestmark = pytest.mark.usefixtures("single_thread")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_trains(losses, steps):
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert min(losses[1:]) < losses[0], f"loss never went below its start: {losses}"


def test_plain_pytorch_loop():
    assert_trains(load("plain_pytorch_loop").main(["--tiny", "--steps", "6"]), 6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_logits_dpo_loss(loss_type):
    assert_trains(load("logits_dpo_loss").main(["--tiny", "--steps", "4", "--loss-type", loss_type]), 4)


def test_trl_dropin(tmp_path, monkeypatch):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    losses = load("trl_dropin").main(["--tiny", "--steps", "4", "--output-dir", os.fspath(tmp_path)])
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
