"""The thin DPO trainer: any HuggingFace causal LM, a preference dataset, the fused kernels.

    from dpo_kernels.trainer import TrainConfig, train
    result = train(TrainConfig(model="path/or/id", data="pairs.jsonl", output_dir="out", max_steps=100))

The loop is meant to be read in one sitting: every knob is a field of `TrainConfig` (config.py), and `train` shows the
step (forward, loss, backward, clip, step, zero_grad) with one log line per step. The pieces it leans on live in
small modules: `data` (rows -> batches), `forward` (the loss backends), `ref_logps` (precomputed reference
log-probs), `checkpoint` (atomic checkpoints), `distributed` (DDP/FSDP2), `metrics_log` (metrics and plots).

Data order is a pure function of (seed, epoch), and a checkpoint stores the optimizer, scheduler and RNG states, so a
resumed run reproduces the numbers of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpo_kernels.trainer import checkpoint, distributed, models
from dpo_kernels.trainer.config import TrainConfig, check_config, is_reference_free, loss_kwargs, precision_settings
from dpo_kernels.trainer.data import PreferenceData, collate, load_preference_data, to_device
from dpo_kernels.trainer.errors import InputFileError
from dpo_kernels.trainer.forward import DPOForward
from dpo_kernels.trainer.metrics_log import PLOT_FILE, MetricsLog, plot_curves, step_line
from dpo_kernels.trainer.models import decoder_layer_types, enable_checkpointing, load_model, load_tokenizer
from dpo_kernels.trainer.ref_logps import Reference


@dataclass
class TrainResult:
    output_dir: str
    global_step: int                       # optimizer steps taken in total (resumed runs count from the start)
    final_checkpoint: str | None           # OUTPUT_DIR/checkpoint-STEP written at the end
    history: list[dict]                    # every metrics.jsonl record of this run (train steps and evals)
    eval_metrics: dict                     # the last evaluation ({} without eval_data)
    skipped_steps: int = 0                 # steps skipped because the loss was not finite
    dropped_rows: int = 0                  # rows dropped by skip_bad_rows
    plot_path: str | None = None


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run has diverged."""


# ---------------------------------------------------------------------------------------------------- set-up steps
def resolve_resume(c: TrainConfig) -> Path | None:
    if not c.resume:
        return None
    path = checkpoint.latest_checkpoint(c.output_dir) if c.resume == "latest" else Path(c.resume)
    if path is None:
        raise InputFileError(c.output_dir, "resume=latest but it holds no complete checkpoint-STEP directory")
    checkpoint.read_state(path)  # every field and file checked before anything is loaded or written
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ data positions
@dataclass
class Plan:
    """How the data maps onto steps: every global micro-batch takes `batch_size * world` pairs of an epoch's
    permutation (seeded by seed + epoch); process r takes the r-th slice. Incomplete global batches are dropped."""

    num_pairs: int
    batch_size: int
    world: int
    grad_accum: int
    seed: int
    total_steps: int = 0

    @property
    def micro_per_epoch(self) -> int:
        return self.num_pairs // (self.batch_size * self.world)

    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.grad_accum

    def indices(self, micro: int, rank: int) -> list[int]:
        epoch, j = divmod(micro, self.micro_per_epoch)
        perm = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (j * self.world + rank) * self.batch_size
        return perm[start:start + self.batch_size].tolist()


def make_plan(c: TrainConfig, data: PreferenceData, world: int) -> Plan:
    plan = Plan(len(data), c.batch_size, world, c.grad_accum, c.seed)
    per_step = c.batch_size * world * c.grad_accum
    if plan.steps_per_epoch() < 1:
        raise ValueError(f"{c.data} has {len(data)} usable pairs, fewer than one optimizer step needs "
                         f"(batch_size {c.batch_size} x processes {world} x grad_accum {c.grad_accum} = {per_step})")
    plan.total_steps = c.max_steps if c.max_steps > 0 else c.epochs * plan.steps_per_epoch()
    return plan





# ---------------------------------------------------------------------------------------------------- evaluation
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def batch_metrics(out) -> list[float]:
    """The METRIC_KEYS of one forward, as floats, in that order (one device sync)."""
    values = [out.loss.detach(), out.chosen_rewards.mean(), out.rejected_rewards.mean(), out.reward_accuracy,
              out.reward_margin, out.chosen_logps.mean(), out.rejected_logps.mean()]
    return torch.stack([v.double() for v in values]).tolist()


@torch.no_grad()
def evaluate(module, data: PreferenceData, ref: Reference, c: TrainConfig, ctx, pad_id: int) -> dict:
    """Mean of each metric over all held-out pairs (every process evaluates all of them, in the same order, so
    FSDP's collectives line up; only rank 0 writes)."""
    bs = c.eval_batch_size or c.batch_size
    module.eval()
    totals, count = [0.0] * len(METRIC_KEYS), 0
    for start in range(0, len(data), bs):
        indices = list(range(start, min(start + bs, len(data))))
        batch = to_device(collate([data.examples[i] for i in indices], pad_id), ctx.device)
        ref_c, ref_r = ref.logps("eval", indices, batch)
        out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], ref_c, ref_r)
        totals = [t + v * len(indices) for t, v in zip(totals, batch_metrics(out), strict=True)]
        count += len(indices)
    module.train()
    return {f"eval/{k}": v / count for k, v in zip(METRIC_KEYS, totals, strict=True)}


# ------------------------------------------------------------------------------------------------------ the loop
def train(config: TrainConfig) -> TrainResult:
    """Runs DPO as `config` says and returns what happened; see TrainConfig for every field.

    Raises ValueError for bad settings, data (naming file and row) or an unwritable output dir before training
    starts, and NonFiniteLossError after `max_nonfinite_steps` non-finite losses in a row.
    """
    check_config(config)
    ctx = distributed.setup(config.distributed, config.device)
    try:
        with checkpoint.claim_output_dir(config.output_dir, ctx) as out_dir:
            return _train(config, ctx, out_dir)
    finally:
        ctx.close()


def _train(c: TrainConfig, ctx, out_dir: Path) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    resume_dir = resolve_resume(c)
    if resume_dir is None and ctx.is_main and checkpoint.latest_checkpoint(out_dir) is not None:
        warnings.warn(f"{out_dir} already holds checkpoints; starting from scratch and overwriting them "
                      "(pass resume='latest' / --resume to continue instead)", stacklevel=2)
    seed_everything(c.seed)

    tokenizer = load_tokenizer(c.tokenizer or c.model)
    pad = models.pad_id(tokenizer)
    data_kwargs = {"max_length": c.max_length, "max_prompt_length": c.max_prompt_length,
                   "skip_bad_rows": c.skip_bad_rows}
    train_data = load_preference_data(c.data, tokenizer, **data_kwargs)
    eval_data = load_preference_data(c.eval_data, tokenizer, **data_kwargs) if c.eval_data else None
    plan = make_plan(c, train_data, ctx.world)

    dtype, autocast_dtype = precision_settings(c, ctx.device.type)
    ref = Reference(c, ctx, out_dir, dtype, autocast_dtype, pad, free=is_reference_free(c))
    if c.precompute_ref and not ref.free:
        ref.precompute("train", train_data)
        if eval_data is not None:
            ref.precompute("eval", eval_data)

    policy = load_model(resume_dir or c.model, dtype, ctx.device)
    if c.gradient_checkpointing:
        enable_checkpointing(policy)
    policy.train()
    budget = c.memory_budget if c.memory_budget in (None, "low") else int(c.memory_budget)
    dpo = DPOForward(policy, c.loss_backend, loss_kwargs(c), autocast_dtype, memory_budget=budget)
    model = distributed.wrap(dpo, ctx, decoder_layer_types(policy))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                                  weight_decay=c.weight_decay)
    warmup = c.warmup_steps if c.warmup_steps > 0 else int(c.warmup_ratio * plan.total_steps)
    scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=plan.total_steps)

    step, skipped, nonfinite_run = 0, 0, 0
    if resume_dir is not None:
        state = checkpoint.restore_state(resume_dir, ctx=ctx, dpo=dpo, optimizer=optimizer, scheduler=scheduler,
                                         total_steps=plan.total_steps, data_fingerprint=train_data.fingerprint,
                                         data_source=c.data)
        step, skipped, nonfinite_run = state.step, state.skipped_steps, state.nonfinite_run

    log = MetricsLog(out_dir, resume_step=step if resume_dir else None, enabled=ctx.is_main)
    stop_at = min(plan.total_steps, c.stop_after_steps) if c.stop_after_steps > 0 else plan.total_steps
    bar = tqdm(total=plan.total_steps, initial=step, disable=not (c.progress and ctx.is_main), desc="dpo")
    eval_metrics, last_saved = {}, None
    is_ddp = c.distributed == "ddp"

    def save(at_step: int) -> Path:
        state = checkpoint.TrainState(at_step, plan.total_steps, skipped, nonfinite_run, train_data.fingerprint,
                                      dataclasses.asdict(c))
        return checkpoint.save_state(out_dir, state, ctx=ctx, dpo=dpo, optimizer=optimizer, scheduler=scheduler,
                                     tokenizer=tokenizer, sharded=c.distributed == "fsdp")

    while step < stop_at:
        t0 = time.perf_counter()
        sums, tokens, finite = [0.0] * len(METRIC_KEYS), 0, True
        for a in range(c.grad_accum):
            micro = step * c.grad_accum + a
            indices = plan.indices(micro, ctx.rank)
            batch = to_device(collate([train_data.examples[i] for i in indices], pad), ctx.device)
            ref_c, ref_r = ref.logps("train", indices, batch)
            # DDP all-reduces gradients only on the last micro-batch of the step.
            sync = model.no_sync() if is_ddp and a < c.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], ref_c, ref_r)  # forward
                (out.loss / c.grad_accum).backward()                                                    # backward
            values = batch_metrics(out)
            finite = finite and math.isfinite(values[0])
            sums = [s + v / c.grad_accum for s, v in zip(sums, values, strict=True)]
            tokens += int(batch["num_tokens"])
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)                                  # clip
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        finite = ctx.all_true(finite) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()                                                                            # step
            nonfinite_run = 0
        else:
            skipped += 1
            nonfinite_run += 1
        optimizer.zero_grad(set_to_none=True)                                                          # zero_grad
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (the step is spent); torch warns about the order.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        step += 1

        metrics = ctx.mean(sums + [float(tokens)])
        elapsed = time.perf_counter() - t0
        record = {"step": step, "epoch": step * c.grad_accum / plan.micro_per_epoch,
                  **dict(zip(METRIC_KEYS, metrics[:-1], strict=True)), "grad_norm": grad_norm, "lr": lr,
                  "tokens_per_sec": metrics[-1] * ctx.world / max(elapsed, 1e-9), "skipped_steps": skipped}
        if not finite:
            record["loss"] = float("nan")
        if step % c.log_every == 0 or step == stop_at:
            log.write(record)
            if ctx.is_main and not c.progress:
                print(step_line(record, plan.total_steps), flush=True)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                        margin=f"{record['rewards/margins']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        if nonfinite_run >= c.max_nonfinite_steps:
            bar.close()
            raise NonFiniteLossError(
                f"stopping at step {step}: {nonfinite_run} non-finite losses in a row ({skipped} skipped in all); "
                "lower lr, check the data, or try precision fp32"
            )
        if eval_data is not None and c.eval_every > 0 and step % c.eval_every == 0 and step < stop_at:
            eval_metrics = evaluate(_eval_module(model, c), eval_data, ref, c, ctx, pad)
            log.write({"step": step, **eval_metrics})
        if c.save_every > 0 and step % c.save_every == 0 and step < stop_at:
            save(step)
            last_saved = step
    bar.close()

    if eval_data is not None:
        eval_metrics = evaluate(_eval_module(model, c), eval_data, ref, c, ctx, pad)
        log.write({"step": step, **eval_metrics})
    final_checkpoint = save(step) if last_saved != step else out_dir / f"{checkpoint.PREFIX}{step}"
    plot_path = None
    if c.plot and ctx.is_main:
        plot_path = str(plot_curves(log.path, out_dir / PLOT_FILE))
    ctx.barrier()
    return TrainResult(output_dir=str(out_dir), global_step=step, final_checkpoint=str(final_checkpoint),
                       history=log.history, eval_metrics=eval_metrics, skipped_steps=skipped,
                       dropped_rows=train_data.dropped, plot_path=plot_path)


def _eval_module(model, c: TrainConfig):
    # DDP's forward bookkeeping expects a backward; evaluation runs the module inside (FSDP needs its own forward).
    return distributed.unwrap(model) if c.distributed == "ddp" else model
