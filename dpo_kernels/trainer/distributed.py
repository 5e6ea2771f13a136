"""torch.distributed for the trainer: process group from torchrun's environment, DDP / FSDP2 wrapping, reductions.

Launch with `torchrun --nproc-per-node N dpo-kernels train ... --distributed ddp|fsdp`. Each process takes
`batch_size` pairs of every global micro-batch of `N * batch_size` pairs, so a run with the same global batch on one
process sees the same data and (up to summation order) the same losses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dpo_kernels.trainer.errors import UserInputError

MODES = ("none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DistContext:
    mode: str
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Element-wise mean of `values` over ranks (identity on one process)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self._comm_device())
        dist.all_reduce(t)
        return t.item() == 0.0

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice not in DEVICES:
        raise UserInputError(f"device must be one of {', '.join(DEVICES)}, got {choice!r}")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserInputError("device=cuda was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(mode: str, device: str = "auto") -> DistContext:
    """Joins (or creates) the process group torchrun describes in RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    if mode not in MODES:
        raise UserInputError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return DistContext(mode, device=_pick_device(device, 0))
    if "RANK" not in os.environ and not dist.is_initialized():
        raise UserInputError(
            f"--distributed {mode} needs a process group: launch with torchrun "
            f"(torchrun --nproc-per-node N -m dpo_kernels train ... --distributed {mode})"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    dev = _pick_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def wrap(module: nn.Module, ctx: DistContext, layer_types: tuple[type, ...] = ()) -> nn.Module:
    """DDP around `module`, or FSDP2 `fully_shard` on each decoder layer and then on `module` (in place)."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if ctx.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for sub in module.modules():
            if layer_types and isinstance(sub, layer_types):
                fully_shard(sub)
        fully_shard(module)
        return module
    return module


def shard_frozen(module: nn.Module, ctx: DistContext, layer_types: tuple[type, ...] = ()) -> nn.Module:
    """A module that only runs no-grad forwards (the reference model): under fsdp sharded as `wrap` shards the
    policy, so each process holds 1/N of its weights; as it is otherwise (DDP has no gradient to synchronize).
    Call `reshard_root` after each of its forwards."""
    return wrap(module, ctx, layer_types) if ctx.mode == "fsdp" else module


def reshard_root(module: nn.Module) -> None:
    """Frees the parameters an FSDP2 root gathered for its forward (the embeddings, final norm and lm_head outside
    the decoder layers): a root keeps them until the backward, which a frozen module never runs."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module
