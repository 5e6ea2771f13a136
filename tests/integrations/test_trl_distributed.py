"""FusedDPOTrainer under 2 gloo processes (accelerate's multi-CPU DDP, as torchrun would start it) on a tiny Llama.

One spawn runs three trainers on both processes: the drop-in with `precompute_ref_log_probs=True`, the drop-in with a
live reference, and stock TRL with a live reference. Stock TRL 1.16 cannot precompute under 2 processes (each
process looks for the cache file in its own temporary directory), so the precomputed columns are held against a
1-process run, and the steps against the live-reference runs.
"""
import multiprocessing
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import assert_close
from tests.integrations.requires_trl import FusedDPOTrainer, datasets, trl
from tests.tiny_models import build_llama, build_tokenizer, preference_rows

WORLD = 2
ROWS = 7            # not a multiple of WORLD x batch size: the last process's last batch repeats rows
STEPS = 2
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(cls, **config):
    tok = build_tokenizer()
    config = {"per_device_train_batch_size": 2, "max_steps": STEPS, "learning_rate": 0.5, "optim": "sgd",
              "logging_steps": 1, "use_cpu": True, **config}
    args = trl.DPOConfig(output_dir="/tmp/dpo_kernels_trl_distributed_test", report_to=[], save_strategy="no",
                         bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A reference that differs from the policy, so that rewards and margins are not all zero.
        return cls(model=build_llama(tok, seed=0), ref_model=build_llama(tok, seed=1), args=args,
                   train_dataset=datasets.Dataset.from_list(preference_rows(ROWS)), processing_class=tok)


def _ref_columns(trainer) -> torch.Tensor:
    data = trainer.train_dataset
    assert data.features["ref_chosen_logps"].dtype == data.features["ref_rejected_logps"].dtype == "float32"
    return torch.tensor([data["ref_chosen_logps"], data["ref_rejected_logps"]], dtype=torch.float32)


def _train(trainer) -> dict:
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    return {"logs": {k: [r[k] for r in logs] for k in METRICS},
            "weights": {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model)
                        .state_dict().items()}}


def _worker(rank, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    precomputed = _trainer(FusedDPOTrainer, precompute_ref_log_probs=True)
    assert precomputed.accelerator.num_processes == WORLD
    result = {"precomputed": _ref_columns(precomputed), "fused_precomputed": _train(precomputed),
              "fused": _train(_trainer(FusedDPOTrainer)), "stock": _train(_trainer(trl.DPOTrainer))}
    if rank == 0:
        torch.save(result, out_file)


def assert_same_run(name, got, want):
    for key in METRICS:
        assert_close(f"{name} {key}", got["logs"][key], want["logs"][key], atol=1e-6)
    assert got["weights"].keys() == want["weights"].keys()
    for key, value in want["weights"].items():
        assert_close(f"{name} weight {key}", got["weights"][key], value, atol=0.0)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_file = tmp_path_factory.mktemp("trl_distributed") / "rank0.pt"
    # A fork server imports the heavy modules once and forks both workers (see tests/trainer/test_distributed.py).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "trl", "datasets", "dpo_kernels.integrations.trl", __name__])
    mp.start_processes(_worker, args=(_free_port(), str(out_file)), nprocs=WORLD, join=True, start_method="forkserver")
    return torch.load(out_file)


@pytest.mark.slow
def test_precomputed_reference_across_processes_equals_one_process(two_processes):
    torch.set_num_threads(1)
    fused = _ref_columns(_trainer(FusedDPOTrainer, precompute_ref_log_probs=True))
    stock = _ref_columns(_trainer(trl.DPOTrainer, precompute_ref_log_probs=True))
    got = two_processes["precomputed"]
    assert got.shape == (2, ROWS)
    # Each process scores its share of the batches one process scores (the last one's last batch repeats row 0,
    # which the gather drops). Bitwise equal in a fresh process; a process that ran other models first can land an
    # ulp away on a row, so the bound is a few ulps of |logp| ~ 35.
    assert_close("2-process vs 1-process precomputed (drop-in)", got, fused, rtol=1e-6, atol=0.0)
    assert_close("2-process drop-in vs 1-process stock TRL precomputed", got, stock, rtol=1e-6, atol=0.0)


@pytest.mark.slow
def test_step_on_precomputed_reference_matches_live_reference(two_processes):
    assert_same_run("precomputed vs live reference", two_processes["fused_precomputed"], two_processes["fused"])


@pytest.mark.slow
def test_ddp_drop_in_matches_stock_trl(two_processes):
    assert_same_run("drop-in vs stock TRL under DDP", two_processes["fused"], two_processes["stock"])

