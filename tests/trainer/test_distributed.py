"""Two gloo processes (DDP / FSDP2 on the CPU) give the loss curve of one process with the same global batch."""
import json
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dpo_kernels.trainer import TrainConfig, train
from tests.tiny_models import tiny_setup

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tiny, out, **kw) -> TrainConfig:
    base = dict(model=tiny["model"], data=tiny["data"], output_dir=str(out), max_steps=3, max_length=32,
                max_prompt_length=24, lr=5e-3, warmup_ratio=0.0, progress=False, plot=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _worker(rank, port, tiny, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # One process group for both runs (the trainer joins a group that exists and leaves it open): the spawned
    # processes pay the imports once.
    torch.distributed.init_process_group("gloo")
    try:
        for mode in MODES:
            out = Path(root) / mode
            result = train(_config(tiny, out, batch_size=2, distributed=mode))
            if rank == 0:
                (out / "history.json").write_text(json.dumps(result.history))
    finally:
        torch.distributed.destroy_process_group()


MODES = ("ddp", "fsdp")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    tiny = tiny_setup(tmp_path / "tiny", rows=12)
    single = train(_config(tiny, tmp_path / "single", batch_size=2 * WORLD)).history
    tiny_paths = {"model": tiny["model"], "data": tiny["data"]}
    # A fork server that imports the heavy modules once, then forks both workers: half the import time of spawn,
    # and unlike a plain fork the workers never inherit this process's thread pools.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "dpo_kernels.trainer", "dpo_kernels.losses", __name__])
    mp.start_processes(_worker, args=(_free_port(), tiny_paths, str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="forkserver")
    w_single = load_file(str(tmp_path / "single" / "checkpoint-3" / "model.safetensors"))
    for mode in MODES:
        multi = json.loads((tmp_path / mode / "history.json").read_text())
        assert [r["step"] for r in multi] == [r["step"] for r in single] == [1, 2, 3]
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "lr"):
            a = torch.tensor([r[key] for r in multi], dtype=torch.float64)
            b = torch.tensor([r[key] for r in single], dtype=torch.float64)
            # Same data and math; only the order of floating-point sums differs (per-rank means, all-reduce).
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, k=key, d=mode: f"{d} {k}: {m}")
        w_multi = load_file(str(tmp_path / mode / "checkpoint-3" / "model.safetensors"))
        assert w_multi.keys() == w_single.keys()
        for k in w_single:
            torch.testing.assert_close(w_multi[k], w_single[k], rtol=1e-4, atol=1e-5)
