"""Two gloo processes (DDP on the CPU) train groups as one process does with the same global batch: plackett_luce,
all_pairs with groups whose scores all tie (a process's micro-batch may keep none), and `--group-by-prompt`, whose
prompts hold different numbers of pairs. Each step's loss and grad_norm equal the single process's within the
accuracy rule of a float64 run."""
import json
import multiprocessing
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dpo_kernels.trainer import train
from dpo_kernels.trainer.loop import Plan
from tests.helpers import assert_within_rule
from tests.tiny_models import tiny_setup, train_config, write_jsonl
from tests.trainer.group_rows import group_rows, repeated_prompt_rows, tied_group_rows
from tests.trainer.test_distributed import _free_port

WORLD, BATCH, ACCUM, STEPS = 2, 1, 2, 2  # a global batch of 4: one example per process and micro-batch
GROUPS = 8
TIED = {1, 2, 4, 7}

_config = partial(train_config, max_steps=STEPS, device="cpu")


def mixed_seed() -> int:
    """A seed under which every step holds tied and kept groups, so that some process's micro-batch keeps no group
    while another's keeps one."""
    def kept(seed: int, m: int, r: int) -> bool:
        return Plan(GROUPS, BATCH, WORLD, ACCUM, seed).indices(m, r)[0] not in TIED

    return next(s for s in range(200) if all(
        len({kept(s, m, r) for m in range(step * ACCUM, (step + 1) * ACCUM) for r in range(WORLD)}) == 2
        for step in range(STEPS)))


def runs(root: Path) -> dict[str, dict]:
    """Each run's data and settings: its name -> TrainConfig fields."""
    return {
        "plackett_luce": {"data": str(root / "groups.jsonl"), "loss_type": "plackett_luce"},
        "all_pairs": {"data": str(root / "tied.jsonl"), "loss_type": "all_pairs", "seed": mixed_seed()},
        "by_prompt": {"data": str(root / "pairs.jsonl"), "group_by_prompt": True},
    }


def _worker(rank, port, tiny, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # One process group for every run (the trainer joins a group that exists and leaves it open).
    torch.distributed.init_process_group("gloo")
    try:
        for name, kw in runs(Path(root)).items():
            out = Path(root) / name / "ddp"
            result = train(_config(tiny, out, batch_size=BATCH, grad_accum=ACCUM, distributed="ddp", **kw))
            if rank == 0:
                (out / "history.json").write_text(json.dumps(result.history))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_groups_as_one(tmp_path):
    tiny = tiny_setup(tmp_path / "tiny", rows=4)
    write_jsonl(tmp_path / "groups.jsonl", group_rows(GROUPS))
    write_jsonl(tmp_path / "tied.jsonl", tied_group_rows(GROUPS, TIED))
    write_jsonl(tmp_path / "pairs.jsonl", repeated_prompt_rows(GROUPS))  # 8 prompts holding 1 to 4 pairs
    tiny_paths = {"model": tiny["model"], "data": tiny["data"]}
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "dpo_kernels.trainer", "dpo_kernels.losses", __name__])
    mp.start_processes(_worker, args=(_free_port(), tiny_paths, str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="forkserver")
    for name, kw in runs(tmp_path).items():
        whole = partial(_config, tiny, batch_size=BATCH * WORLD * ACCUM, **kw)
        single = train(whole(tmp_path / name / "single")).history
        truth = train(whole(tmp_path / name / "truth", loss_backend="reference", precision="fp64")).history
        multi = json.loads((tmp_path / name / "ddp" / "history.json").read_text())
        assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
        for key in ("loss", "grad_norm"):
            got, want, baseline = (torch.tensor([r[key] for r in h], dtype=torch.float64)
                                   for h in (multi, truth, single))
            assert_within_rule(got, want, baseline, atol=1e-5, name=f"{name} {key}")
