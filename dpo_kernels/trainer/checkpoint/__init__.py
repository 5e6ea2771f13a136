"""Training checkpoints: `OUTPUT_DIR/checkpoint-STEP/`, saved (`save_state`) and restored (`restore_state`) here.

A checkpoint holds the policy (`save_pretrained`, safetensors) and tokenizer, `optimizer.pt` and `scheduler.pt`
(tensors and plain containers, loaded with `torch.load(weights_only=True)`: nothing is unpickled), `rng_state.pt`
(each rank's torch RNG states) and `trainer_state.json` (a `TrainState`: step, counters, each rank's Python and NumPy
RNG states, the data fingerprint, the run's id and its settings under "config").

Crash safety (docs/design.md, "Crash safety") rests on three modules, one job each:
- `output_dir`: the run's lock on the directory, recovery of interrupted saves, which run the directory holds;
- `atomic`: writes that leave the old data or the new, never a mix, and full-disk detection;
- `state`: the names on disk, `TrainState`, and `read_state`, which validates every field and file before the run
  loads anything.
A save writes `.tmp-checkpoint-STEP-ID/`, `trainer_state.json` last (its presence marks a complete copy), syncs it to
disk and renames it into place. Re-saving a step renames the existing copy to `.old-checkpoint-STEP-ID` first and
deletes it only once the new copy is in place: at every moment a complete copy exists under one of the names.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

from dpo_kernels.trainer.checkpoint.atomic import fsync_dir, fsync_file, no_space, replace_dir, torch_save, write_file
from dpo_kernels.trainer.checkpoint.output_dir import (
    LOCK_FILE,
    RUN_FILE,
    claim_output_dir,
    current_run_id,
    own_output_dir,
    recover_interrupted_saves,
)
from dpo_kernels.trainer.checkpoint.rng import (
    is_torch_rng_state,
    python_rng_state,
    rng_tensors,
    set_python_rng_state,
    set_rng_tensors,
)
from dpo_kernels.trainer.checkpoint.state import (
    OLD_PREFIX,
    PREFIX,
    STATE_FILE,
    TENSOR_FILES,
    TMP_PREFIX,
    TrainState,
    checkpoint_dirs,
    latest_checkpoint,
    load_tensors,
    read_run_id,
    read_state,
)
from dpo_kernels.trainer.errors import DiskFullError, InputFileError, UserInputError

__all__ = ["LOCK_FILE", "PREFIX", "RUN_FILE", "STATE_FILE", "TENSOR_FILES", "TrainState", "checkpoint_dirs",
           "claim_output_dir", "current_run_id", "latest_checkpoint", "load_tensors", "own_output_dir",
           "python_rng_state", "read_run_id", "read_state", "recover_interrupted_saves", "restore_state",
           "rng_tensors", "save_state", "set_python_rng_state", "set_rng_tensors", "write_checkpoint", "write_file"]


def save_state(output_dir, state: TrainState, *, ctx, dpo, optimizer, scheduler, tokenizer,
               sharded: bool = False) -> Path:
    """Writes `output_dir/checkpoint-{state.step}` and returns its path (call on every rank).

    Gathers the full (unsharded when `sharded`) model and optimizer states and every rank's RNG states; rank 0
    writes. `dpo` is the module the optimizer was built on; its `.model` is the policy that is saved.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    model_state = get_model_state_dict(dpo.model, options=options) if sharded else None
    optim_state = get_optimizer_state_dict(dpo, optimizer, options=options)
    rng = ctx.gather_objects(rng_tensors())
    py_rng = ctx.gather_objects(python_rng_state())
    path = Path(output_dir) / f"{PREFIX}{state.step}"
    failure = None
    if ctx.is_main:
        try:
            write_checkpoint(output_dir, state.step, model=dpo.model, tokenizer=tokenizer,
                             model_state_dict=model_state, optimizer_state=optim_state,
                             scheduler_state=scheduler.state_dict(), rng_per_rank=rng,
                             trainer_state=dataclasses.asdict(dataclasses.replace(state, rng=py_rng)))
        except Exception as e:
            failure = e
    # Every process learns whether the write succeeded (rather than waiting for process 0 at a barrier).
    main_failure = ctx.gather_objects(None if failure is None else (isinstance(failure, UserInputError),
                                                                    str(failure)))[0]
    if failure is not None:
        raise failure
    if main_failure is not None:
        user_error, message = main_failure
        raise (UserInputError if user_error else RuntimeError)(f"process 0 could not save {path}: {message}")
    return path


def write_checkpoint(output_dir, step: int, *, model, tokenizer, model_state_dict, optimizer_state, scheduler_state,
                     rng_per_rank: list[dict], trainer_state: dict) -> Path:
    """Writes `output_dir/checkpoint-{step}` by renames only (rank 0) and returns its path.

    `model_state_dict` is the full state dict to save, or None for `model.state_dict()`. Raises DiskFullError when
    the device fills up; the partial copy is removed either way and an existing checkpoint-STEP stays as it was.
    """
    out = Path(output_dir)
    final = out / f"{PREFIX}{step}"
    tag = uuid.uuid4().hex[:8]
    tmp = out / f"{TMP_PREFIX}{step}-{tag}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), state_dict=model_state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, obj in zip(TENSOR_FILES, (optimizer_state, scheduler_state, rng_per_rank), strict=True):
            write_file(tmp / name, lambda f, obj=obj: torch_save(obj, f))
        for p in tmp.iterdir():
            if p.is_file():
                fsync_file(p)
        # Written last, once the rest is on disk: its presence is what marks the copy complete.
        write_file(tmp / STATE_FILE, lambda f: f.write(json.dumps(trainer_state, indent=1).encode()))
        fsync_file(tmp / STATE_FILE)
        fsync_dir(tmp)
        replace_dir(tmp, final, out / f"{OLD_PREFIX}{step}-{tag}")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = no_space(e)
        if problem is not None:
            raise DiskFullError(final, "the partial copy is removed and earlier checkpoints are intact; make room "
                                       "and continue with --resume", problem) from None
        raise
    return final


# ------------------------------------------------------------------------------------------------------ restoring
def restore_state(checkpoint, *, ctx, dpo, optimizer, scheduler, total_steps: int, data_fingerprint: str,
                  data_source: str = "the training data") -> TrainState:
    """Restores the optimizer, scheduler and this rank's RNG states from a checkpoint dir and returns its TrainState.

    The weights are loaded separately (the policy is built from the checkpoint dir). Raises InputFileError, before
    changing any state, for a step past `total_steps`, other data, another number of processes or a file that does
    not load or fit.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    root = Path(checkpoint)
    state = read_state(root)
    state_file = root / STATE_FILE
    if state.step > total_steps:
        raise InputFileError(state_file, f"step {state.step} is past this run's last step {total_steps} "
                                         "(raise max_steps to continue it)")
    if state.data_fingerprint != data_fingerprint:
        raise InputFileError(root, f"was trained on other data (token fingerprint differs from {data_source})")
    if len(state.rng) != ctx.world:
        # A step takes batch_size x processes x grad_accum pairs: on another number of processes the steps that
        # follow would take other pairs than the saved run's.
        raise InputFileError(state_file, f"saved by {len(state.rng)} process(es); this run has {ctx.world}: resume "
                                         f"it on {len(state.rng)}, or the data order would differ from its run's")
    optimizer_state = load_tensors(root / "optimizer.pt")
    scheduler_state = load_tensors(root / "scheduler.pt")
    rng = load_tensors(root / "rng_state.pt")
    if not isinstance(rng, list) or len(rng) <= ctx.rank or not is_torch_rng_state(rng[ctx.rank]):
        raise InputFileError(root / "rng_state.pt", "not a list of per-process torch RNG states for this run")

    try:
        set_optimizer_state_dict(dpo, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        raise InputFileError(root / "optimizer.pt", f"does not fit this model's parameters ({type(e).__name__}: "
                                                    f"{e})") from None
    try:
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputFileError(root / "scheduler.pt", f"not a learning-rate scheduler state ({e})") from None
    set_rng_tensors(rng[ctx.rank])
    set_python_rng_state(state.rng[ctx.rank])
    return state


