"""The thin DPO trainer: any HuggingFace causal LM, a preference dataset, the fused kernels.

    from dpo_kernels.trainer import TrainConfig, train
    result = train(TrainConfig(model="path/or/id", data="pairs.jsonl", output_dir="out", max_steps=100))

The loop is meant to be read in one sitting: every knob is a field of `TrainConfig` (config.py), `build_run` does
the set-up (tokenizer, data, reference, policy, optimizer, schedule, resume) into a `Run`, and `run_loop` shows the
step (forward, loss, backward, clip, step, zero_grad) with one log line per step. The pieces it leans on live in
small modules: `data` (rows -> batches), `forward` (the loss backends), `ref_logps` (precomputed reference
log-probs), `checkpoint` (atomic checkpoints), `distributed` (DDP/FSDP2), `metrics_log` (metrics and plots).
The first SIGINT or SIGTERM ends the run after its step with a checkpoint (`StopRequest`, `Interrupted`).

Data order is a pure function of (seed, epoch), and a checkpoint stores the optimizer, scheduler and RNG states, so a
resumed run reproduces the numbers of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_kernels import paths
from dpo_kernels.fused_linear.plan import parse_memory_budget
from dpo_kernels.integrations import hf
from dpo_kernels.trainer import checkpoint, distributed, models
from dpo_kernels.trainer.batches import collate_pairs, packing_problem, shared_prompt_problem
from dpo_kernels.trainer.config import (
    TrainConfig,
    check_config,
    check_saved_config,
    group_loss_kwargs,
    is_group_loss,
    is_reference_free,
    loss_kwargs,
    loss_types,
    precision_settings,
    resumed_config,
)
from dpo_kernels.trainer.data import PreferenceData, load_preference_data
from dpo_kernels.trainer.errors import InputFileError, UserInputError
from dpo_kernels.trainer.forward import DPOForward
from dpo_kernels.trainer.group_batches import collate_any_groups
from dpo_kernels.trainer.group_data import as_groups, group_by_prompt
from dpo_kernels.trainer.group_forward import GroupDPOForward, PromptGroupDPOForward
from dpo_kernels.trainer.group_metrics import GroupMetrics
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
    skipped_groups: int = 0                # groups whose prompt left no room for a response (truncation)
    plot_path: str | None = None
    path_records: list = dataclasses.field(default_factory=list)  # dpo_kernels.paths: the run's, its first step's


class NonFiniteLossError(RuntimeError):
    """The run has diverged: too many non-finite losses in a row, or a step that left non-finite weights."""


# ---------------------------------------------------------------------------------------------------- set-up steps
def resolve_resume(c: TrainConfig, run_id: str) -> Path | None:
    """The checkpoint dir to resume (the newest of the run `run_id` for resume="latest"), or None for a fresh start;
    its every field, file and setting checked before anything is loaded."""
    if not c.resume:
        return None
    path = checkpoint.latest_checkpoint(c.output_dir, run_id) if c.resume == "latest" else Path(c.resume)
    if path is None:
        raise InputFileError(c.output_dir, "resume=latest but it holds no complete checkpoint-STEP directory")
    state = checkpoint.read_state(path)
    check_saved_config(state.config, path / checkpoint.STATE_FILE)
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
    # The last permutation drawn, by (seed, epoch): `Run.loss_divisor` reads every micro-batch of a step.
    _drawn: tuple = dataclasses.field(default=(None, None), repr=False, compare=False)

    @property
    def micro_per_epoch(self) -> int:
        return self.num_pairs // (self.batch_size * self.world)

    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.grad_accum

    def permutation(self, epoch: int) -> torch.Tensor:
        """`[num_pairs]` int64: the order of epoch `epoch`."""
        key, perm = self._drawn
        if key != (self.seed, epoch):
            perm = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._drawn = ((self.seed, epoch), perm)
        return perm

    def indices(self, micro: int, rank: int) -> list[int]:
        epoch, j = divmod(micro, self.micro_per_epoch)
        start = (j * self.world + rank) * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size].tolist()


def make_plan(c: TrainConfig, data: PreferenceData, world: int) -> Plan:
    plan = Plan(len(data), c.batch_size, world, c.grad_accum, c.seed)
    per_step = c.batch_size * world * c.grad_accum
    if plan.steps_per_epoch() < 1:
        what = {"pair": "pairs", "group": "groups", "prompt_group": "prompts (pairs grouped by prompt)"}[data.kind]
        raise UserInputError(f"{c.data} has {len(data)} usable {what}, fewer than one optimizer step needs "
                             f"(batch_size {c.batch_size} x processes {world} x grad_accum {c.grad_accum} = "
                             f"{per_step})")
    plan.total_steps = c.max_steps if c.max_steps > 0 else c.epochs * plan.steps_per_epoch()
    return plan


# ---------------------------------------------------------------------------------------------------- evaluation
# Group losses that leave a group whose scores all tie out of their mean (it has no ordered pair).
TIE_DROPPING_LOSSES = ("all_pairs", "best_vs_worst")
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def batch_metrics(out) -> list[float]:
    """The METRIC_KEYS of one forward, as floats, in that order (one device sync)."""
    values = [out.loss.detach(), out.chosen_rewards.mean(), out.rejected_rewards.mean(), out.reward_accuracy,
              out.reward_margin, out.chosen_logps.mean(), out.rejected_logps.mean()]
    return torch.stack([v.double() for v in values]).tolist()


class PairMetrics:
    """A pair run's metrics: `values(out, batch)` of one forward, `record(values, pairs)` of their mean (the
    interface of `group_metrics.GroupMetrics`). Every value is a mean over the loss's items (`loss_items`)."""

    loss_means = len(METRIC_KEYS)

    def values(self, out, batch: dict) -> list[float]:
        return batch_metrics(out)

    def record(self, values: list[float], pairs: int) -> dict:
        return dict(zip(METRIC_KEYS, values, strict=True))


def collate(examples, pad_id: int, device, *, share_prompt: bool, kind: str, packing: bool,
            max_row_tokens: int | None) -> dict:
    """The batch of pairs (`collate_pairs`), or of groups of either kind (`collate_any_groups`)."""
    if kind == "pair":
        return collate_pairs(examples, pad_id, device, share_prompt=share_prompt, packing=packing,
                             max_row_tokens=max_row_tokens)
    return collate_any_groups(examples, pad_id, device, share_prompt=share_prompt, packing=packing,
                              max_row_tokens=max_row_tokens)


def loss_items(examples, kind: str, loss_type: str) -> int:
    """What the loss of a batch of `examples` averages over, counted from their scores on the host: a
    `--group-by-prompt` batch's pairs (its prompts hold different numbers of them), the groups `all_pairs` and
    `best_vs_worst` keep (those with two different scores: a group whose scores all tie is left out of the mean),
    else the examples (pairs, or plackett_luce's groups, every one kept)."""
    if kind == "prompt_group":
        return sum(len(e.pairs) for e in examples)
    if kind == "group" and loss_type in TIE_DROPPING_LOSSES:
        return sum(len(set(e.scores)) > 1 for e in examples)
    return len(examples)


def weighed(values: list[float], loss_means: int, op, loss_items: float, examples: float) -> list[float]:
    """`op(value, loss_items)` for the first `loss_means` of `values` (a metrics object's `values()`: means over the
    loss's items), `op(value, examples)` for the others (means over the batch's examples)."""
    return [op(v, loss_items if k < loss_means else examples) for k, v in enumerate(values)]


def module_args(batch: dict, refs: tuple) -> tuple:
    """The loss module's arguments after the batch tensors: the reference log-probs, then a group batch's
    `GroupInfo` or a `--group-by-prompt` batch's `PairIndex`."""
    extra = batch.get("group", batch.get("pairs"))
    return refs if extra is None else (*refs, extra)


@torch.no_grad()
def evaluate(module, data: PreferenceData, ref: Reference, c: TrainConfig, ctx, pad_id: int, metrics) -> dict:
    """Mean of each metric over all held-out pairs or groups (every process evaluates all of them, in the same
    order, so FSDP's collectives line up; only rank 0 writes)."""
    bs = c.eval_batch_size or c.batch_size
    module.eval()
    totals, items, count = None, 0, 0
    for start in range(0, len(data), bs):
        indices = list(range(start, min(start + bs, len(data))))
        examples = [data.examples[i] for i in indices]
        batch = collate(examples, pad_id, ctx.device, share_prompt=c.share_prompt, kind=data.kind,
                        packing=c.packing, max_row_tokens=c.max_row_tokens)
        out = module(batch["input_ids"], batch["attention_mask"], batch["labels"],
                     *module_args(batch, ref.logps("eval", indices, batch)))
        kept = loss_items(examples, data.kind, c.loss_type.strip())
        values = weighed(metrics.values(out, batch), metrics.loss_means, operator.mul, kept, len(examples))
        totals = values if totals is None else [t + v for t, v in zip(totals, values, strict=True)]
        items += kept
        count += len(examples)
    module.train()
    # Without any loss item (every group tied) the loss totals are 0, and so is the loss, as the op's over none.
    means = weighed(totals, metrics.loss_means, operator.truediv, max(items, 1), count)
    return {f"eval/{k}": v for k, v in metrics.record(means, count).items()}


# ---------------------------------------------------------------------------------------------------------- set-up
@dataclass
class Run:
    """Everything the loop needs, built by `build_run`; `state` is where the run is (what a checkpoint stores)."""

    c: TrainConfig
    ctx: distributed.DistContext
    out_dir: Path
    tokenizer: Any
    pad: int
    train_data: PreferenceData
    eval_data: PreferenceData | None
    plan: Plan
    ref: Reference
    dpo: DPOForward               # the policy and its loss: what the optimizer updates and a checkpoint saves
    model: torch.nn.Module        # `dpo` as it runs: wrapped for DDP, sharded for FSDP
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: checkpoint.TrainState
    resumed: bool
    path: paths.PathRecord | None = None  # the run's own record: shared prompt or not, its fallbacks
    saved_step: int | None = None
    metrics: Any = dataclasses.field(default_factory=PairMetrics)  # PairMetrics or group_metrics.GroupMetrics

    def micro_batch(self, micro: int):
        """Global micro-batch `micro`'s share of this process: (batch tensors, the loss module's arguments after
        the batch's, `module_args`)."""
        indices = self.plan.indices(micro, self.ctx.rank)
        batch = collate([self.train_data.examples[i] for i in indices], self.pad, self.ctx.device,
                        share_prompt=self.c.share_prompt, kind=self.train_data.kind, packing=self.c.packing,
                        max_row_tokens=self.c.max_row_tokens)
        return batch, module_args(batch, self.ref.logps("train", indices, batch))

    def loss_divisor(self, micro: int) -> float:
        """What this process's micro-batch `micro` divides its loss (and its metrics' loss means) by, so that the
        step's gradient, once DDP or FSDP averages the processes' gradients, is the mean over the step's loss items
        (`loss_items`): the micro-batches per step where each holds as many, else (`--group-by-prompt`, and groups
        that all_pairs or best_vs_worst may leave out) the step's items over this micro-batch's items times the
        processes. A micro-batch without any item has a loss of 0, which its infinite divisor keeps at 0 without a
        0 / 0 (its backward still runs: DDP and FSDP reduce gradients in every process's backward)."""
        kind, loss_type = self.train_data.kind, self.c.loss_type.strip()
        if kind == "pair" or (kind == "group" and loss_type not in TIE_DROPPING_LOSSES):
            return self.c.grad_accum
        examples = self.train_data.examples

        def items(m: int, rank: int) -> int:
            return loss_items([examples[i] for i in self.plan.indices(m, rank)], kind, loss_type)

        own = items(micro, self.ctx.rank)
        if own == 0:
            return math.inf
        first = micro - micro % self.c.grad_accum
        step = sum(items(m, r) for m in range(first, first + self.c.grad_accum) for r in range(self.ctx.world))
        return step / (own * self.ctx.world)

    def gradient_sync(self, last: bool):
        """DDP all-reduces gradients only on the last micro-batch of a step."""
        return self.model.no_sync() if self.c.distributed == "ddp" and not last else contextlib.nullcontext()

    def evaluate(self) -> dict:
        # DDP's forward bookkeeping expects a backward; evaluation runs the module inside (FSDP needs its own).
        module = distributed.unwrap(self.model) if self.c.distributed == "ddp" else self.model
        return evaluate(module, self.eval_data, self.ref, self.c, self.ctx, self.pad, self.metrics)

    def save(self) -> Path:
        """The checkpoint of the current step, written unless this run already wrote it."""
        path = self.out_dir / f"{checkpoint.PREFIX}{self.state.step}"
        if self.saved_step != self.state.step:
            broken = nonfinite_weight(self.model, self.ctx)
            if broken is not None:
                raise NonFiniteLossError(f"not saving {path.name}: parameter {broken} holds NaN or inf")
            self.state.config = dataclasses.asdict(self.c)
            path = checkpoint.save_state(self.out_dir, self.state, ctx=self.ctx, dpo=self.dpo,
                                         optimizer=self.optimizer, scheduler=self.scheduler,
                                         tokenizer=self.tokenizer, sharded=self.c.distributed == "fsdp")
            self.saved_step = self.state.step
        return path


def build_run(c: TrainConfig, ctx, out_dir: Path, run_id: str) -> Run:
    """Loads the tokenizer, data, reference and policy, builds the optimizer and schedule, and restores them (and
    the RNG states) from the checkpoint to resume. `run_id`: the run `out_dir` holds (`checkpoint.own_output_dir`)."""
    from transformers import get_scheduler

    resume_dir = resolve_resume(c, run_id)
    seed_everything(c.seed)

    tokenizer = load_tokenizer(c.tokenizer or c.model)
    pad = models.pad_id(tokenizer)
    data_kwargs = {"max_length": c.max_length, "max_prompt_length": c.max_prompt_length,
                   "skip_bad_rows": c.skip_bad_rows}
    train_data = fit_data_to_loss(load_preference_data(c.data, tokenizer, **data_kwargs), c)
    eval_data = fit_data_to_loss(load_preference_data(c.eval_data, tokenizer, **data_kwargs), c) \
        if c.eval_data else None
    plan = make_plan(c, train_data, ctx.world)
    kind = train_data.kind
    if kind != "pair":
        # Groups run in the shared layout wherever the model supports it (below: else unshared rows, one warning).
        c = dataclasses.replace(c, share_prompt=True)

    dtype, autocast_dtype = precision_settings(c, ctx.device.type)
    ref = Reference(c, ctx, out_dir, dtype, autocast_dtype, pad, free=is_reference_free(c),
                    group=kind != "pair")
    if c.precompute_ref and not ref.free:
        ref.precompute("train", train_data)
        if eval_data is not None:
            ref.precompute("eval", eval_data)

    policy = load_model(resume_dir or c.model, dtype, ctx.device)
    broken = nonfinite_weight(policy, ctx)
    if broken is not None:
        raise InputFileError(resume_dir or c.model, f"parameter {broken} holds NaN or inf: these weights cannot be "
                                                    "trained (resume an earlier checkpoint, or load other weights)")
    if c.gradient_checkpointing:
        enable_checkpointing(policy)
    policy.train()
    problem = shared_prompt_problem(policy, ref.model) if c.share_prompt else None
    fallbacks = ()
    if problem is not None:
        message = f"share_prompt: {problem} Training on unshared rows."
        fallbacks = (paths.fallback(paths.SHARED_TO_UNSHARED, problem.model or "the model", message,
                                    warn=message if ctx.is_main else None, stacklevel=3),)
        c = dataclasses.replace(c, share_prompt=False)
    problem = packing_problem(policy, ref.model) if c.packing else None
    if problem is not None:
        message = (f"packing keeps sequences apart with the shared-prompt layout's attention mask: {problem} "
                   "Training on padded rows.")
        fallbacks += (paths.fallback(paths.PACKED_TO_PADDED, problem.model or "the model", message,
                                     warn=message if ctx.is_main else None, stacklevel=3),)
        c = dataclasses.replace(c, packing=False, max_row_tokens=None)
    check_backend_fits(policy, c)
    forward, kwargs = {"pair": (DPOForward, loss_kwargs(c)), "group": (GroupDPOForward, group_loss_kwargs(c)),
                       "prompt_group": (PromptGroupDPOForward, loss_kwargs(c))}[kind]
    dpo = forward(policy, c.loss_backend, kwargs, autocast_dtype, memory_budget=parse_memory_budget(c.memory_budget))
    if c.compile:
        dpo.compile()
    model = distributed.wrap(dpo, ctx, decoder_layer_types(policy))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                                  weight_decay=c.weight_decay)
    warmup = c.warmup_steps if c.warmup_steps > 0 else int(c.warmup_ratio * plan.total_steps)
    scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=plan.total_steps)

    state = checkpoint.TrainState(0, plan.total_steps, data_fingerprint=train_data.fingerprint, run_id=run_id)
    if resume_dir is not None:
        state = checkpoint.restore_state(resume_dir, ctx=ctx, dpo=dpo, optimizer=optimizer, scheduler=scheduler,
                                         total_steps=plan.total_steps, data_fingerprint=train_data.fingerprint,
                                         data_source=c.data)
        state.total_steps = plan.total_steps
        c, notes = resumed_config(c, state.config)
        if notes and ctx.is_main:
            warnings.warn(f"resuming from {resume_dir} with settings that differ from its run: " + "; ".join(notes),
                          stacklevel=3)
    path = paths.record(paths.PathRecord("trainer", shared_prompt=c.share_prompt, fallbacks=fallbacks))
    metrics = GroupMetrics(max(e.size for d in (train_data, eval_data) if d for e in d.examples)) \
        if kind == "group" else PairMetrics()
    return Run(c, ctx, out_dir, tokenizer, pad, train_data, eval_data, plan, ref, dpo, model, optimizer, scheduler,
               state, resumed=resume_dir is not None, path=path, metrics=metrics)


def fit_data_to_loss(data: PreferenceData, c: TrainConfig) -> PreferenceData:
    """Pair rows train under a group loss as groups of two (chosen first), or with `group_by_prompt` as one group
    per prompt; group rows need a group loss."""
    if is_group_loss(c):
        return as_groups(data)
    if c.group_by_prompt and data.kind == "pair":
        return group_by_prompt(data)
    if data.kind == "group":
        pair = loss_types(c)[0] if len(loss_types(c)) == 1 else "sigmoid"
        raise UserInputError(f"{data.source} holds groups of ranked responses, which the pairwise loss_type "
                             f"{c.loss_type!r} cannot train; use a group loss, e.g. --loss-type all_pairs "
                             f"--pair-loss {pair} (or plackett_luce)")
    return data


def check_backend_fits(policy, c: TrainConfig) -> None:
    """The fused-linear backend needs a linear lm_head (a PEFT LoRA adapter on it included): say so before the first
    step, not at it."""
    if c.loss_backend == "fused-linear":
        try:
            hf.fused_head(policy)
        except ValueError as e:
            raise UserInputError(f"loss_backend fused-linear cannot train {c.model}: {e} (--loss-backend logits "
                                 "runs it)") from None


# ------------------------------------------------------------------------------------------------------ the loop
def train(config: TrainConfig) -> TrainResult:
    """Runs DPO as `config` says and returns what happened; see TrainConfig for every field.

    Raises UserInputError for bad settings, data (naming file and row), checkpoints or an unwritable output dir
    before training starts; NonFiniteLossError after `max_nonfinite_steps` non-finite losses in a row or a step
    that leaves non-finite weights; Interrupted after the checkpoint written on SIGINT or SIGTERM.
    """
    check_config(config)
    ctx = distributed.setup(config.distributed, config.device)
    try:
        with checkpoint.claim_output_dir(config.output_dir, ctx) as out_dir, paths.strict_mode(config.strict):
            run_id = checkpoint.own_output_dir(out_dir, ctx, resume=config.resume,
                                               overwrite=config.overwrite_output_dir)
            run = build_run(config, ctx, out_dir, run_id)
            with StopRequest(announce=ctx.is_main) as stop:
                return run_loop(run, stop)
    finally:
        ctx.close()


def run_loop(run: Run, stop: StopRequest) -> TrainResult:
    """The steps: forward, backward, clip, step, zero_grad, one log line each; evaluations and checkpoints as the
    config says; after a signal, a checkpoint and `Interrupted`."""
    from tqdm.auto import tqdm

    c, ctx, s, plan = run.c, run.ctx, run.state, run.plan
    params = [p for p in run.model.parameters() if p.requires_grad]
    log = MetricsLog(run.out_dir, resume_step=s.step if run.resumed else None, enabled=ctx.is_main)
    stop_at = min(plan.total_steps, c.stop_after_steps) if c.stop_after_steps > 0 else plan.total_steps
    bar = tqdm(total=plan.total_steps, initial=s.step, disable=not (c.progress and ctx.is_main), desc="dpo")
    eval_metrics, path_records = {}, None
    while s.step < stop_at:
        t0 = time.perf_counter()
        sums, tokens, backbone, finite = None, 0, 0, True
        with paths.collect() as step_records:
            for a in range(c.grad_accum):
                batch, args = run.micro_batch(s.step * c.grad_accum + a)
                divisor = run.loss_divisor(s.step * c.grad_accum + a)
                with run.gradient_sync(last=a == c.grad_accum - 1):
                    out = run.model(batch["input_ids"], batch["attention_mask"], batch["labels"], *args)  # forward
                    (out.loss / divisor).backward()                                                      # backward
                values = run.metrics.values(out, batch)
                finite = finite and math.isfinite(values[0])
                if sums is None:
                    sums = [0.0] * len(values)
                # A group batch's per-group sums and counts weigh as its groups: micro-batches hold as many.
                values = weighed(values, run.metrics.loss_means, operator.truediv, divisor, c.grad_accum)
                sums = [t + v for t, v in zip(sums, values, strict=True)]
                tokens += int(batch["num_tokens"])
                backbone += batch["input_ids"].numel()  # positions the policy ran on, padding included
        if path_records is None:
            path_records = [run.path, *step_records]
            if ctx.is_main:
                for line in paths.summary_lines(path_records):
                    tqdm.write(f"dpo_kernels path: {line}")
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)                                  # clip
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = run.optimizer.param_groups[0]["lr"]
        finite = ctx.all_true(finite) and math.isfinite(grad_norm)
        broken = None
        if finite:
            run.optimizer.step()                                                                        # step
            broken = nonfinite_weight(run.model, ctx)
            s.nonfinite_run = 0
        else:
            s.skipped_steps += 1
            s.nonfinite_run += 1
        run.optimizer.zero_grad(set_to_none=True)                                                      # zero_grad
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (the step is spent); torch warns about the order.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            run.scheduler.step()
        s.step += 1

        record = step_record(run, sums, tokens, backbone, finite, grad_norm, lr, time.perf_counter() - t0)
        if s.step % c.log_every == 0 or s.step == stop_at:
            log.write(record)
            if ctx.is_main and not c.progress:
                print(step_line(record, plan.total_steps), flush=True)
        bar.update(1)
        bar.set_postfix(progress_fields(record))
        if broken is not None or s.nonfinite_run >= c.max_nonfinite_steps:
            bar.close()
            raise NonFiniteLossError(divergence_message(run, broken, lr))
        if stop.requested(ctx):
            bar.close()
            raise Interrupted(stop.signum, s.step, run.save())
        if run.eval_data is not None and c.eval_every > 0 and s.step % c.eval_every == 0 and s.step < stop_at:
            eval_metrics = run.evaluate()
            log.write({"step": s.step, **eval_metrics})
        if c.save_every > 0 and s.step % c.save_every == 0 and s.step < stop_at:
            run.save()
    bar.close()

    if run.eval_data is not None:
        eval_metrics = run.evaluate()
        log.write({"step": s.step, **eval_metrics})
    final_checkpoint = run.save()
    plot_path = None
    if c.plot and ctx.is_main:
        plot_path = str(plot_curves(log.path, run.out_dir / PLOT_FILE))
    ctx.barrier()
    return TrainResult(output_dir=str(run.out_dir), global_step=s.step, final_checkpoint=str(final_checkpoint),
                       history=log.history, eval_metrics=eval_metrics, skipped_steps=s.skipped_steps,
                       dropped_rows=run.train_data.dropped, skipped_groups=run.train_data.skipped,
                       plot_path=plot_path,
                       path_records=path_records or [run.path])


def step_record(run: Run, sums: list[float], tokens: int, backbone: int, finite: bool, grad_norm: float, lr: float,
                elapsed: float) -> dict:
    """The metrics.jsonl record of the step just taken (metrics averaged over processes; loss NaN when skipped).
    `tokens/backbone`: the token positions (padding included) the policy's backbone ran on in the step, all
    processes together; the shared-prompt layout shows its saving there."""
    metrics = run.ctx.mean(sums + [float(tokens), float(backbone)])
    record = {"step": run.state.step, "epoch": run.state.step * run.c.grad_accum / run.plan.micro_per_epoch,
              **run.metrics.record(metrics[:-2], run.plan.batch_size * run.ctx.world * run.c.grad_accum),
              "grad_norm": grad_norm, "lr": lr,
              "tokens_per_sec": metrics[-2] * run.ctx.world / max(elapsed, 1e-9),
              "tokens/backbone": round(metrics[-1] * run.ctx.world),
              "skipped_steps": run.state.skipped_steps}
    if not finite:
        record["loss"] = float("nan")
    return record


def progress_fields(record: dict) -> dict:
    """The progress bar's fields: loss, accuracy (a group run's ranking accuracy), margin (pairs) and tokens/s."""
    fields = {"loss": f"{record['loss']:.4f}"}
    if "rewards/ranking_accuracy" in record:
        fields["rank_acc"] = f"{record['rewards/ranking_accuracy']:.2f}"
    else:
        fields.update(acc=f"{record['rewards/accuracies']:.2f}", margin=f"{record['rewards/margins']:.3f}")
    fields["tok_s"] = f"{record['tokens_per_sec']:.0f}"
    return fields


# -------------------------------------------------------------------------------------------------- stopping early
def nonfinite_weight(model: torch.nn.Module, ctx) -> str | None:
    """The name of a parameter holding NaN or inf after an optimizer step (on any process), or None.

    One max-abs reduction per parameter (NaN propagates through it) and one device sync per step."""
    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()
             if p.requires_grad]
    named = [(n, p.detach()) for n, p in named if p.numel() > 0]
    peaks = torch.stack([torch.linalg.vector_norm(p, float("inf")).float() for _, p in named])
    bad = (~torch.isfinite(peaks)).nonzero().flatten().tolist()
    if ctx.all_true(not bad):
        return None
    return named[bad[0]][0] if bad else "a parameter held by another process"


def divergence_message(run: Run, broken: str | None, lr: float) -> str:
    """Why the run stops: a run of non-finite losses, or the parameter `broken` a step left non-finite."""
    s = run.state
    if broken is None:
        return (f"stopping at step {s.step}: {s.nonfinite_run} non-finite losses in a row ({s.skipped_steps} "
                "skipped in all); lower lr, check the data, or try precision fp32")
    dtype = str(next(run.dpo.parameters()).dtype).removeprefix("torch.")
    return (f"stopping at step {s.step}: its optimizer step left non-finite weights ({broken}, {dtype}) although "
            f"the loss and gradients were finite: the AdamW update overflowed (lr {lr:g}, weight_decay "
            f"{run.c.weight_decay:g}); nothing of this step is saved; lower lr or weight_decay")


class StopRequest:
    """Turns the first SIGINT or SIGTERM into a request that the loop honours after its step (it saves a checkpoint
    and raises Interrupted); a second SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the
    main thread, and the previous ones are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool):
        self.announce = announce
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:
                # os.write: print() could re-enter a write the main thread is in the middle of.
                os.write(2, f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                            "(Ctrl-C again stops at once)\n".encode())
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def requested(self, ctx) -> bool:
        """Whether any process got a signal (all processes stop at the same step)."""
        return not ctx.all_true(self.signum is None)


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after saving the checkpoint of its last step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to "
                         f"{checkpoint} (continue with --resume)")
