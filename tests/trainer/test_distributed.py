"""Two gloo processes (DDP / FSDP2 on the CPU) give the loss curve of one process with the same global batch, and the
FSDP2-sharded reference model gives the log-probs of the whole one."""
import json
import multiprocessing
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from dpo_kernels.trainer import distributed, models, train
from dpo_kernels.trainer.batches import collate_pairs
from dpo_kernels.trainer.data import load_preference_data
from dpo_kernels.trainer.ref_logps import Reference
from tests.tiny_models import tiny_setup, train_config

WORLD = 2
_config = partial(train_config, max_steps=3, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(tiny, root, ctx, **kw):
    """`(Reference, data, pad id)` of the tiny model under `ctx`."""
    c = _config(tiny, Path(root) / "ref", batch_size=2, distributed=ctx.mode, **kw)
    tok = models.load_tokenizer(c.model)
    pad = models.pad_id(tok)
    data = load_preference_data(c.data, tok, max_length=c.max_length, max_prompt_length=c.max_prompt_length)
    return Reference(c, ctx, Path(root) / "ref", torch.float32, None, pad, free=False), data, pad


def _precomputed_table(tiny, root, ctx) -> torch.Tensor:
    """The `--precompute-ref` table `[2, N]` (chosen, rejected) of every pair, in batches of 5 pairs (the last
    process's last round has none: a sharded reference repeats one)."""
    ref, data, _ = _reference(tiny, root, ctx, precompute_ref=True, eval_batch_size=5)
    ref.precompute("train", data)
    return torch.stack(ref.tables["train"])


def _live_logps(tiny, root, ctx, rank: int):
    """The live reference's log-probs `[2B]` of process `rank`'s first micro-batch, and the Reference."""
    ref, data, pad = _reference(tiny, root, ctx)
    indices = [2 * rank, 2 * rank + 1]
    batch = collate_pairs([data.examples[i] for i in indices], pad, ctx.device, share_prompt=False)
    return torch.cat(ref.logps("train", indices, batch)), ref


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
        ctx = distributed.setup("fsdp", "cpu")
        sharded_rows, live = _live_logps(tiny, root, ctx, rank)
        # Each process holds its part of the reference's weights, the root's too once a forward is over.
        weight = live.model.lm_head.weight
        chunk = -(-weight.shape[0] // WORLD)  # FSDP2 shards dim 0 in chunks of ceil(V / WORLD) rows
        assert isinstance(weight, DTensor) and weight.to_local().shape[0] == min(weight.shape[0] - rank * chunk, chunk)
        whole_rows, _ = _live_logps(tiny, root, distributed.DistContext("none"), rank)
        # The sharded forward all-gathers the same fp32 weights and runs the same ops on them as the whole model.
        assert torch.equal(sharded_rows, whole_rows), f"rank {rank}: {(sharded_rows - whole_rows).abs().max()}"
        table = _precomputed_table(tiny, root, ctx)
        torch.save(table, Path(root) / f"ref-table-{rank}.pt")
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

    # The table of the sharded reference, each process scoring half of the batches, is the one of one process.
    table = torch.load(tmp_path / "ref-table-0.pt")
    assert torch.equal(table, torch.load(tmp_path / "ref-table-1.pt"))
    single_table = _precomputed_table(tiny_paths, tmp_path / "single-ref", distributed.DistContext("none"))
    assert table.shape == (2, 12)
    # Bitwise equal when this process is fresh; after other models ran in it a row can land an ulp away (seen with
    # the TRL trainers on the CPU), so the bound is a few ulps.
    torch.testing.assert_close(table, single_table, rtol=1e-6, atol=0.0)
