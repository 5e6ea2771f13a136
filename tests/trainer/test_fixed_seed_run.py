"""A fixed-seed training run ends in the same weights, bit for bit, as the package's recorded run.

Refactors of the engine, the loss op or the trainer must not change a single number. The hashes below were recorded
on the CPU with torch 2.13 (on this code and on its layout before the op packages existed, which gave the same bits);
other torch versions or devices may round differently, so the test runs only where the record was made.
"""
import hashlib
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.trainer import TrainConfig, train
from tests.tiny_models import tiny_setup

RECORDED_TORCH = "2.13."
RECORDED = {
    "fused-linear": "e4485614bcb97b566c498c836ff07bc84917939f4608fd2fdef40aaba860c16a",
    "logits": "bc6081c8c12f5ed982c9f3a153efdc9a2cede58ecc97736f03f4aa4deba75ed0",
}

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not torch.__version__.startswith(RECORDED_TORCH) or platform.machine() != "x86_64",
                       reason=f"the hashes were recorded with torch {RECORDED_TORCH}x on x86_64 CPUs"),
]


def weights_hash(checkpoint) -> str:
    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("backend", sorted(RECORDED))
def test_final_weights_hash_as_recorded(tmp_path, backend):
    tiny = tiny_setup(tmp_path / "tiny", rows=12)
    result = train(TrainConfig(model=tiny["model"], data=tiny["data"], output_dir=str(tmp_path / backend),
                               batch_size=2, max_steps=3, max_length=32, max_prompt_length=24, lr=5e-3,
                               warmup_ratio=0.0, progress=False, plot=False, loss_backend=backend,
                               loss_type="sigmoid,sft", loss_weights=[1.0, 0.5], seed=0))
    assert weights_hash(result.final_checkpoint) == RECORDED[backend]
