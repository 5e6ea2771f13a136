"""Sequence log-probs and the DPO loss straight from hidden states, never materializing `[N, V]` logits.

The engine (docs/design.md, "The fused linear engine") projects only the positions that score a valid label, in
chunks of at most C tokens, through one reused `[C, V]` buffer: a cuBLAS GEMM for the logits, one Triton pass
(`logsoftmax_pass.py`) for the log-probs and, in place, their gradient, then GEMMs into fp32 gradient buffers.
Each call validates its inputs, builds one `plan.StepPlan` (chunk size, pair groups and their modes: the rule is
the docstring of `plan.py`), and hands it to the engine; `memory_model.estimate_peak_bytes` counts the same plan.

- `linear_sequence_logprobs`: the general primitive (any upstream gradient). Forward 2NHV; backward recomputes
  each chunk's logits (6NHV).
- `fused_linear_dpo` (and `losses.FusedLinearDPOLoss`): the DPO fast path. Its forward calls the DPO loss op as
  pairs complete and forms the hidden/weight/bias gradients at once (6NHV in all); the backward only scales them
  by the upstream gradient, in the same pass that converts the fp32 weight-gradient accumulator to the weight's
  dtype. With `token_stats=True` the pass that reads each token's logits also returns its
  entropy and top-1 hit, summed per sequence into the output (what TRL logs as `entropy` and
  `mean_token_accuracy`), at no extra GEMM.
- `group.fused_linear_group_dpo`: the same fast path for groups of K ranked responses; the engine's unit of
  completion is then a group instead of a pair (`units.py`), and the run path here serves both (`prepare_units`,
  `run_units`, `FusedLinearDPOFunction`).

Each takes an optional `lora=LoraHead(a, b, scaling)`: a LoRA adapter on the head, run inside the engine (`lora.py`).

Each computes in the dtype the model's own lm_head would (`head_operands`): inside an autocast region the autocast
dtype, else the inputs' own; the engine itself then runs on those explicit dtypes with autocast off.
"""
import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from dpo_kernels import paths
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear import engine
from dpo_kernels.fused_linear.lora import LoraGrads, LoraHead, check_lora
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions, options_of
from dpo_kernels.fused_linear.plan import (
    ScoredPositions,
    StepPlan,
    TokenAttribution,
    TokenLayout,
    chunk_tokens,
    plan_dpo_step,
    plan_logps,
    positions_of_attribution,
    positions_of_labels,
)
from dpo_kernels.fused_linear.rank_check import Summary
from dpo_kernels.fused_linear.units import GroupUnits, PairUnits
from dpo_kernels.loss_op.loss_types import is_tied
from dpo_kernels.loss_op.op import dpo_loss_and_grads
from dpo_kernels.loss_op.spec import check_loss_settings, check_reference_logps
from dpo_kernels.outputs import DPOOutput
from dpo_kernels.validation import (
    check_cu_seqlens,
    check_float_dtype,
    check_ignore_index,
    check_integer_dtype,
    check_ndim,
    check_not_meta,
    check_same_device,
)


def _autocast_available(device_type: str) -> bool:
    # torch.compile (torch 2.11) cannot trace `torch.amp.is_autocast_available`; a compiled call runs on a device
    # that has autocast (CPU or CUDA), so the check is needed only in eager mode (e.g. for "meta" tensors).
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def head_operands(hidden, weight, bias=None):
    """`(hidden, weight, bias)` in the dtype the model's own lm_head would compute in.

    Inside an autocast region for the tensors' device that is the autocast dtype (autocast casts every floating
    operand of a linear layer but float64), as `F.linear` would: a model with fp32 master weights must not run the
    head's GEMMs in fp32. Outside autocast the tensors are returned as they are. The casts are differentiable:
    gradients reach the caller's tensors in their own dtype.
    """
    if not isinstance(hidden, torch.Tensor):
        return hidden, weight, bias
    device = hidden.device.type
    if not (_autocast_available(device) and torch.is_autocast_enabled(device)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(hidden), cast(weight), cast(bias)


def lora_operands(lora: LoraHead | None) -> LoraHead | None:
    """The adapter's `a` and `b` in the dtype its head computes in (`head_operands`)."""
    if lora is None:
        return None
    a, b, _ = head_operands(lora.a, lora.b)
    return lora.with_factors(a, b)


def _check_lora_setting(lora, par):
    """`lora` is None or a `LoraHead`, on a whole head in one process: a vocabulary shard of B, or per-rank partial
    gradients of A and B, are not implemented."""
    if lora is not None and not isinstance(lora, LoraHead):
        raise ValueError(f"lora must be a LoraHead(a [r, H], b [V, r], scaling), got {type(lora).__name__}")
    if lora is not None and (par.vocab_group is not None or par.sequence_group is not None):
        raise ValueError("lora= does not run with vocabulary- or sequence-parallel groups")


def _lora_of(a, b, scaling):
    return None if a is None else LoraHead(a, b, scaling)


def _lora_inputs(lora):
    """`(a, b)` of the adapter as the autograd Functions take them, and its scaling (None without one)."""
    return (None, None, None) if lora is None else (lora.a, lora.b, float(lora.scaling))


def _check_head(hidden, weight, bias, prefix=""):
    """Validates one (hidden, weight, bias) triple whose hidden states passed `_check_labels`."""
    check_ndim(weight, 2, f"{prefix}weight", "[V, H]")
    check_float_dtype(hidden, f"{prefix}hidden")
    check_float_dtype(weight, f"{prefix}weight")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{prefix}weight dtype {weight.dtype} differs from {prefix}hidden dtype {hidden.dtype}")
    V, H = weight.shape
    if V == 0:
        raise ValueError(f"{prefix}weight has an empty vocabulary dimension (V = 0)")
    if hidden.shape[-1] != H:
        raise ValueError(f"{prefix}hidden size {hidden.shape[-1]} does not match {prefix}weight [V, H] = "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_ndim(bias, 1, f"{prefix}bias", "[V]")
        if bias.shape[0] != V or bias.dtype != weight.dtype:
            raise ValueError(f"{prefix}bias must be [V] = [{V}] in {weight.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
    check_same_device(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight, f"{prefix}bias": bias})


def _check_labels(hidden, labels, cu_seqlens, ignore_index):
    """Validates what the call scores (a label tensor or a `TokenAttribution`) against `hidden`; returns R, the
    number of sequences."""
    check_ignore_index(ignore_index)
    if isinstance(labels, TokenAttribution):
        _check_attribution(hidden, labels, cu_seqlens, ignore_index)
        return labels.num_seqs
    if cu_seqlens is None:
        check_ndim(hidden, 3, "hidden", "[R, T, H] (or packed [N, H] with cu_seqlens)")
        check_ndim(labels, 2, "labels", "[R, T]")
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden [R, T] = "
                             f"{tuple(hidden.shape[:2])}")
    else:
        check_ndim(hidden, 2, "hidden", "[N, H] when cu_seqlens is given")
        check_ndim(labels, 1, "labels", "[N] when cu_seqlens is given")
        if labels.shape[0] != hidden.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} tokens but hidden has {hidden.shape[0]}")
    check_integer_dtype(labels, "labels")
    check_same_device(hidden=hidden, labels=labels, cu_seqlens=cu_seqlens)
    check_not_meta(labels=labels)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, hidden.shape[0])
        return cu_seqlens.numel() - 1
    return hidden.shape[0]


def _check_attribution(hidden, attribution, cu_seqlens, ignore_index):
    """Shapes and ranges of a `TokenAttribution` against `hidden` `[R, T, H]` or `[rows, H]`."""
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens does not apply with a TokenAttribution, which names each token's row and sequence")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [R, T, H] or [rows, H] with a TokenAttribution, got shape "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    rows, targets, seqs, num_seqs = attribution
    for name, t in (("rows", rows), ("targets", targets), ("seqs", seqs)):
        check_ndim(t, 1, f"attribution.{name}", "[N]")
        check_integer_dtype(t, f"attribution.{name}")
        check_not_meta(**{f"attribution.{name}": t})
    if not rows.shape == targets.shape == seqs.shape:
        raise ValueError(f"attribution rows, targets and seqs must have one length, got {rows.numel()}, "
                         f"{targets.numel()}, {seqs.numel()}")
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"attribution.num_seqs must be a positive int, got {num_seqs!r}")
    check_same_device(**{"hidden": hidden, "attribution.rows": rows, "attribution.targets": targets,
                         "attribution.seqs": seqs})
    hidden_rows = hidden.shape[0] * (hidden.shape[1] if hidden.dim() == 3 else 1)
    if rows.numel():
        # The ranges in one synchronization.
        rows_lo, rows_hi, seqs_lo, seqs_hi, ignored = torch.stack([
            rows.min().long(), rows.max().long(), seqs.min().long(), seqs.max().long(),
            (targets == ignore_index).any().long()]).tolist()
        if rows_lo < 0 or rows_hi >= hidden_rows:
            raise ValueError(f"attribution.rows must lie in [0, {hidden_rows}) (the rows of the flattened "
                             f"hidden), got [{rows_lo}, {rows_hi}]")
        if seqs_lo < 0 or seqs_hi >= num_seqs:
            raise ValueError(f"attribution.seqs must lie in [0, {num_seqs}), got [{seqs_lo}, {seqs_hi}]")
        if ignored:
            raise ValueError(f"attribution.targets holds ignore_index ({ignore_index}): it lists scored tokens only")


def scored_positions(hidden, labels, cu_seqlens=None, ignore_index=IGNORE_INDEX, shift=True) -> ScoredPositions:
    """What the call scores, validated against `hidden` and converted once into the one type the engine's
    preparation takes, whatever the caller started from: padded labels `[R, T]`, packed labels `[N]` with
    `cu_seqlens`, or a `TokenAttribution`. One host read (two with `cu_seqlens`, whose offsets are checked first)."""
    num_seqs = _check_labels(hidden, labels, cu_seqlens, ignore_index)
    if isinstance(labels, TokenAttribution):
        return positions_of_attribution(labels, ignore_index)
    return positions_of_labels(labels, cu_seqlens, num_seqs, ignore_index, shift)


def checked_positions(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, lora) -> ScoredPositions:
    """The `ScoredPositions` of a call's labels (`scored_positions`), once the policy's head and adapter are checked
    against `hidden`."""
    positions = scored_positions(hidden, labels, cu_seqlens, ignore_index, shift)
    _check_head(hidden, weight, bias)
    if lora is not None:
        check_lora(lora, hidden, weight)
    return positions


def _device_of(hidden):
    return hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")


def _flat(hidden):
    return hidden.reshape(-1, hidden.shape[-1])


def _token_coefficients(per_seq, layout, average):
    """d out / d token log-prob from d out / d sequence log-prob."""
    coef = per_seq.float()[layout.seq]
    return coef / layout.counts[layout.seq] if average else coef


def _grads_of(hidden2d, weight, need_h, need_w, need_b, need_a=False, need_lora_b=False):
    """The gradient buffers for the wanted gradients, or None when none is."""
    if not (need_h or need_w or need_b or need_a or need_lora_b):
        return None
    lora = LoraGrads(need_a, need_lora_b) if need_a or need_lora_b else None
    return engine.Grads(hidden2d, weight, need_h, need_w, need_b, lora)


@dataclass(frozen=True)
class _LogpsRun:
    """Everything about one `linear_sequence_logprobs` call that is not a differentiable input."""

    layout: TokenLayout
    plan: StepPlan
    num_seqs: int
    average: bool
    par: HeadParallel = field(compare=False)
    lora_scaling: float | None = None  # the adapter's s, when the head carries one


def _recompute_backward(ctx, coef):
    """The gradients of `(hidden, weight, bias, lora_a, lora_b, run)` that ctx's inputs need, from the saved inputs
    and `coef [tokens]` float32, each scored token's dloss/dlogp: the engine recomputes each chunk's logits."""
    hidden, weight, bias, lora_a, lora_b = ctx.saved_tensors
    run = ctx.run
    hidden2d = _flat(hidden)
    lora = _lora_of(lora_a, lora_b, run.lora_scaling)
    grads = _grads_of(hidden2d, weight, *ctx.needs_input_grad[:5])
    if grads is None:
        return None, None, None, None, None, None
    engine.recompute_grads(engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, grads,
                                            pass_fn=run.par.pass_fn, lora=lora), coef)
    grad_w, grad_b = grads.weight_bias(weight.dtype)
    grad_a, grad_lora_b = (None, None) if grads.lora is None else grads.lora.results(lora)
    grad_h = None if grads.hidden is None else grads.hidden.view(hidden.shape)
    return grad_h, grad_w, grad_b, grad_a, grad_lora_b, None


class LinearSequenceLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, run: _LogpsRun):
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b)
        ctx.run = run
        loop = engine.ChunkLoop(_flat(hidden), weight, bias, run.layout, run.plan, pass_fn=run.par.pass_fn,
                                lora=_lora_of(lora_a, lora_b, run.lora_scaling))
        return engine.forward_logps(loop, run.num_seqs, run.average)

    @staticmethod
    def backward(ctx, grad_out):
        return _recompute_backward(ctx, _token_coefficients(grad_out, ctx.run.layout, ctx.run.average))


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=IGNORE_INDEX, shift=True, average=False,
                             cu_seqlens=None, memory_budget=None, parallel_options: ParallelOptions | None = None,
                             vocab_parallel_group=None, sequence_parallel_group=None, lora: LoraHead | None = None):
    """Per-sequence log-probabilities of the labels under `softmax(hidden @ weight.T + bias)`, chunked.

    Args:
        hidden: `[R, T, H]` float32/bfloat16/float16 last hidden states, or packed `[N, H]` with `cu_seqlens`.
        weight: `[V, H]` lm_head weight, same dtype and device as `hidden` (inside autocast both are cast to the
            autocast dtype first, see `head_operands`).
        labels: `[R, T]` (or `[N]` packed) int64; `ignore_index` marks positions that are not scored. Or a
            `plan.TokenAttribution` naming each scored token's row of the flattened hidden states, label and
            sequence (rows may repeat: the shared-prompt layout, `SharedPromptBatch.attribution`); `shift` and
            `cu_seqlens` do not apply then.
        bias: optional `[V]` lm_head bias.
        shift: position t scores label t+1 of the same sequence (HuggingFace causal LM); the last position of each
            sequence scores nothing.
        average: divide each sum by its number of scored tokens (0 for a sequence with none).
        cu_seqlens: `[R + 1]` int32/int64 offsets of the packed sequences (flash-attention varlen convention).
        memory_budget: bytes for the `[C, V]` logits buffer (default 2 GiB, C <= 8192); see `plan.py`.
        parallel_options: a `ParallelOptions` (the process groups over which the head's vocabulary or the
            sequences' positions are split, and the ranks' consistency check), as `fused_linear_dpo`;
            `vocab_parallel_group=` and `sequence_parallel_group=` are shorthands that build one.
        lora: a `LoraHead(a [r, H], b [V, r], scaling)` on the head (a PEFT LoRA lm_head): the logits are
            `hidden @ weight.T + bias + scaling * (hidden @ a.T) @ b.T`, never materialized (one process only).
    Returns:
        `[R]` float32, the same on every rank of the groups. Differentiable w.r.t. hidden, weight, bias and the
        adapter's `a` and `b` for any upstream gradient; the backward recomputes each chunk's logits.
    """
    par = HeadParallel(options_of(parallel_options, vocab_parallel_group, sequence_parallel_group), shift)
    weight, bias = par.local_head(weight, bias)
    hidden, weight, bias = head_operands(hidden, weight, bias)
    _check_lora_setting(lora, par)
    lora = lora_operands(lora)

    def prepare():
        positions = checked_positions(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, lora)
        return Summary(hidden, weight, bias, positions, settings=0), positions

    settings = ("logps", ignore_index, shift, average, memory_budget)
    positions = par.agree(prepare, settings, _device_of(hidden))
    positions.check_vocab(par.vocab(weight))
    layout = par.global_counts(positions.layout(paired=False))
    del positions  # as in `_run_dpo`: only the engine's layout stays for the step
    plan = plan_logps(layout.rows.numel(), par.plan_vocab(weight), hidden.element_size(), memory_budget)
    paths.record_engine_call("linear_sequence_logprobs", plan, hidden, weight, bias, shared_prompt=layout.rows_repeat,
                             sharded_pass=par.shard is not None)
    lora_a, lora_b, scaling = _lora_inputs(lora)
    run = _LogpsRun(layout, plan, layout.counts.numel(), bool(average), par, scaling)
    logps = LinearSequenceLogprobsFunction.apply(par.hidden_input(hidden), weight, bias, lora_a, lora_b, run)
    return par.sum_sequences_differentiable(logps)


@dataclass(frozen=True)
class _DPORun:
    """Everything about one fused DPO call (pairs or groups) that is not a differentiable input.

    `units`: how the engine's units of completion map to sequences (`units.PairUnits` or `units.GroupUnits`);
    `loss_fn(logps [R] float32) -> (out, grad [R])`: the loss over every sequence's log-prob and its d loss / d logp
    for an upstream gradient of 1 (`pairwise_loss` adapts the pairwise op).
    `grad_enabled` is read outside the Function, whose forward always runs without grad mode: under no_grad
    (evaluation with parameters that require grad) the forward must not form gradients nobody will ask for.
    `result` receives the forward's non-differentiable results by name (the loss's output as `out`, `logps [R]`,
    and with token stats `entropy [R]`, `top1 [R]`); only the loss leaves the Function as its output.
    `par`: the call's process groups (per-sequence sums are completed over the sequence group).
    `lora_scaling`: the adapter's s when the head carries one (its `a` and `b` are the Function's inputs).
    """

    layout: TokenLayout
    plan: StepPlan
    units: PairUnits | GroupUnits
    average: bool
    loss_fn: object
    token_stats: bool
    grad_enabled: bool
    par: HeadParallel = field(compare=False)
    lora_scaling: float | None = None
    result: dict = field(default_factory=dict, compare=False)


def pairwise_loss(loss_fn, num_pairs: int):
    """A loss over the `[2B]` sequence log-probs (chosen first) from the pairwise op's form
    `loss_fn(chosen [B], rejected [B]) -> (DPOLossOutput, grad_chosen [B], grad_rejected [B])`."""
    return functools.partial(_over_pairs, loss_fn, num_pairs)


def _over_pairs(loss_fn, num_pairs, logps):
    out, grad_c, grad_r = loss_fn(logps[:num_pairs], logps[num_pairs:])
    return out, torch.cat([grad_c, grad_r])


class FusedLinearDPOFunction(torch.autograd.Function):
    """The fused DPO loss of pairs or groups (`_DPORun.units`): the forward runs the plan and forms the gradients
    for an upstream gradient of 1 (or, on the recompute plan, keeps the inputs); the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, run: _DPORun):
        needs = [need and run.grad_enabled for need in ctx.needs_input_grad[:5]]
        hidden2d = _flat(hidden)
        R, par = run.units.num_seqs, run.par
        lora = _lora_of(lora_a, lora_b, run.lora_scaling)
        ctx.run, ctx.shape = run, hidden.shape
        stats = engine.TokenStats(run.layout.rows.numel(), hidden.device) if run.token_stats else None
        if run.plan.recompute:
            loop = engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, stats=stats, pass_fn=par.pass_fn,
                                    lora=lora)
            logps = par.sum_sequences(engine.forward_logps(loop, R, run.average))
            del loop
            out, seq_grad = run.loss_fn(logps)
            ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b)
            ctx.seq_grad = seq_grad.float()
        else:
            grads = _grads_of(hidden2d, weight, *needs)
            loop = engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, grads, stats, pass_fn=par.pass_fn,
                                    lora=lora)
            out, logps = engine.fused_dpo(loop, engine.SequenceLoss(run.layout, run.units, run.average,
                                                                    run.loss_fn))
            del loop
            # Converted in the backward: the upstream gradient then folds into the one pass that turns the fp32
            # weight-gradient accumulator into the weight's dtype.
            ctx.grads, ctx.weight_dtype, ctx.lora = grads, weight.dtype, lora
        run.result.update(out=out, logps=logps)
        if stats is not None:
            entropy, top1 = stats.per_sequence(run.layout, R)
            run.result["entropy"], run.result["top1"] = par.sum_sequences(entropy), par.sum_sequences(top1)
        return out.loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        run = ctx.run
        if run.plan.recompute:
            return _recompute_backward(ctx, _token_coefficients(ctx.seq_grad, run.layout, run.average)
                                       * grad_loss.float())
        if ctx.grads is None:
            raise RuntimeError("FusedLinearDPOFunction's backward ran twice: its gradients are formed in the forward "
                               "and consumed by the first backward (retain_graph is not supported)")
        grads, ctx.grads = ctx.grads, None
        grad_w, grad_b = grads.weight_bias(ctx.weight_dtype, scale=grad_loss)
        grad_a, grad_lora_b = (None, None) if grads.lora is None else grads.lora.results(ctx.lora, scale=grad_loss)
        grad_h = None if grads.hidden is None else grads.scaled_hidden(grad_loss).view(ctx.shape)
        return grad_h, grad_w, grad_b, grad_a, grad_lora_b, None


@dataclass(frozen=True)
class _DPOInputs:
    """One fused DPO call's operands after the rank's own checks: the heads in the dtype they compute in (the
    reference's None without `ref_hidden`) and what the call scores."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    ref_hidden: torch.Tensor | None
    ref_weight: torch.Tensor | None
    ref_bias: torch.Tensor | None
    positions: ScoredPositions | None  # None once the engine's layout is built (`_run_dpo`)
    lora: LoraHead | None = None  # the policy head's adapter

    @property
    def num_pairs(self) -> int:
        return self.positions.num_seqs // 2


def _check_reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, num_pairs, hidden):
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias were given without ref_hidden")
    if ref_hidden is not None and ref_chosen_logps is not None:
        raise ValueError("pass either precomputed ref_chosen_logps/ref_rejected_logps or ref_hidden, not both")
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, num_pairs, hidden.device, "hidden")


def _dpo_inputs(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, ref, loss_settings, lora=None):
    """The rank's own checks of a fused DPO call, and its scored positions (`scored_positions`).
    `ref`: `(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias)`."""
    loss_type, beta, label_smoothing, loss_params = loss_settings
    check_loss_settings(loss_type, beta=beta, label_smoothing=label_smoothing, loss_params=loss_params)
    positions = checked_positions(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, lora)
    num_seqs = positions.num_seqs
    if num_seqs == 0 or num_seqs % 2:
        raise ValueError(f"the batch needs an even, non-zero number of sequences (B chosen then B rejected), got "
                         f"{num_seqs}")
    ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias = ref
    _check_reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, num_seqs // 2, hidden)
    return _DPOInputs(hidden, weight, bias, *reference_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias),
                      positions, lora)


def reference_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias):
    """`(ref_hidden, ref_weight, ref_bias)` in the dtype they compute in and checked against `hidden`; the head
    defaults to the policy's (`weight`, `bias`). All None without `ref_hidden`."""
    if ref_hidden is None:
        return None, None, None
    ref_hidden, ref_weight, ref_bias = head_operands(ref_hidden, *((weight, bias) if ref_weight is None
                                                                   else (ref_weight, ref_bias)))
    check_ndim(ref_hidden, hidden.dim(), "ref_hidden", "the layout of hidden")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} does not match hidden "
                         f"{tuple(hidden.shape[:-1])}")
    _check_head(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    return ref_hidden, ref_weight, ref_bias


def _unit_plan(layout, units, par, inputs, memory_budget, tied, plan_units) -> StepPlan:
    """The call's plan: `plan_units(scored tokens per unit, vocab, itemsize, memory_budget)`, or under sequence
    parallelism the rank's own tokens in even chunks."""
    vocab, itemsize = par.plan_vocab(inputs.weight), inputs.hidden.element_size()
    if par.recompute:
        # The rank's own tokens in even chunks: the counts are global, and no unit is whole on one rank.
        return StepPlan(chunk_tokens(vocab, itemsize, memory_budget), layout.rows.numel(), recompute=True, tied=tied)
    return plan_units(units.token_counts(layout.counts_host), vocab, itemsize, memory_budget)


_traced_entry = None


def register_traced_entry(entry) -> None:
    """Sets the path `fused_linear_dpo` takes while torch.compile traces it: `ops.traced_fused_linear_dpo`, which
    `ops.py` registers when the package imports it. `ops.py` is built on this module's Function, so this module
    reaches it through the registration rather than an import."""
    global _traced_entry
    _traced_entry = entry


def fused_linear_dpo(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
                     ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1,
                     loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX, shift=True,
                     memory_budget=None, token_stats=False, parallel_options: ParallelOptions | None = None,
                     vocab_parallel_group=None, sequence_parallel_group=None, lora: LoraHead | None = None,
                     **loss_params) -> DPOOutput:
    """The DPO loss from the policy's last hidden states and lm_head, with its gradients formed in the forward.

    Args:
        hidden: `[2B, T, H]` float32/bfloat16/float16 (rows 0..B-1 chosen, B..2B-1 rejected; pair i is rows i and
            B+i), or packed `[N, H]` with `cu_seqlens` `[2B + 1]` (the 2B sequences chosen first).
        weight: `[V, H]` lm_head weight (same dtype; inside autocast both are cast to the autocast dtype first, see
            `head_operands`); bias: optional `[V]`.
        labels: `[2B, T]` (or `[N]`) int64, `ignore_index` on prompt and padding positions; or a
            `plan.TokenAttribution` with `num_seqs = 2B` (sequence i chosen, B + i rejected): the shared-prompt
            layout, one row per pair, its last prompt row scoring both responses' first tokens
            (`SharedPromptBatch.attribution`); `shift` and `cu_seqlens` do not apply then.
        ref_chosen_logps, ref_rejected_logps: `[B]` precomputed reference log-probs, or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states (same layout as `hidden`) and head;
            `ref_weight`/`ref_bias` default to `weight`/`bias` (a shared, frozen head). Neither: reference-free.
        beta, loss_type, label_smoothing, **loss_params: as `dpo_kernels.dpo_loss`.
        average: use per-token mean log-probs instead of sums (for policy and reference alike).
        memory_budget: None (2 GiB, C <= 8192), bytes for the `[C, V]` logits buffer, or "low" (512 MiB and the
            recompute path): see `plan.py`.
        token_stats: also fill the output's `chosen_entropy_sum`, `rejected_entropy_sum`, `chosen_top1_count`,
            `rejected_top1_count` (the policy's per-token entropy and first-argmax hits, summed per sequence), from
            the pass that already reads every logit: no extra GEMM.
        parallel_options: a `ParallelOptions`: the process groups over which the head or the sequences are split,
            and the ranks' consistency check (on by default; see `ParallelOptions`).
            Vocabulary parallel (`vocab_group`): `weight` (`bias`, `ref_weight`, `ref_bias`) is this rank's
            contiguous shard `[V_r, H]`, the ranks in group order holding consecutive rows (shards may differ in
            size); hidden states and labels (global ids) are the same on every rank. A DTensor weight sharded on
            dim 0 brings its own group. `hidden.grad` is the full gradient on every rank, `weight.grad` the rank's
            shard of it.
            Sequence parallel (`sequence_group`, with `shift=False`, labels aligned to positions): each rank passes
            its contiguous slice of every row (or its part of a packed batch with its own `cu_seqlens`).
            `hidden.grad` is exact for the rank's slice, `weight.grad` the rank's partial sum (a data-parallel
            reduction over the group adds them). Runs the recompute plan: the loss needs every rank's log-probs
            before any coefficient is known.
        vocab_parallel_group, sequence_parallel_group: shorthands for
            `parallel_options=ParallelOptions(vocab_group, sequence_group)`.
        lora: a `LoraHead(a [r, H], b [V, r], scaling)` on the policy's head (a PEFT LoRA lm_head): its logits are
            `hidden @ weight.T + bias + scaling * (hidden @ a.T) @ b.T`, never materialized; `a` and `b` get exact
            gradients (one process only). The reference head (`ref_weight`, or `weight`) carries no adapter.
    Returns:
        `DPOOutput`, the same on every rank of the groups; only `loss` is differentiable (w.r.t. hidden, weight,
        bias and the adapter's `a` and `b`). Response lengths passed to the loss are the numbers of scored tokens
        per sequence.
    """
    par = HeadParallel(options_of(parallel_options, vocab_parallel_group, sequence_parallel_group), shift)
    hidden, weight, bias, ref_weight, ref_bias, lora = local_operands(par, hidden, weight, bias, ref_weight, ref_bias,
                                                                      lora)
    loss_settings = (loss_type, beta, label_smoothing, loss_params)
    ref = (ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias)
    if torch.compiler.is_compiling() and par.vocab_group is None and par.sequence_group is None and lora is None:
        # The compiler takes the call whole, as one custom op (`ops.py`): the plan reads the device.
        return _traced_entry(hidden, weight, bias, labels, cu_seqlens, ref, loss_settings, average, ignore_index,
                             shift, memory_budget, token_stats)
    wanted = GradsWanted.current(hidden, weight, bias, lora)
    return run_fused_linear_dpo(par, hidden, weight, bias, labels, cu_seqlens, ref, loss_settings, average,
                                ignore_index, shift, memory_budget, token_stats, wanted,
                                FusedLinearDPOFunction.apply, lora)


def local_operands(par, hidden, weight, bias, ref_weight, ref_bias, lora) -> tuple:
    """`(hidden, weight, bias, ref_weight, ref_bias, lora)` as a fused call computes with them: the heads as this
    rank's shards (`HeadParallel.local_head`), the policy's operands in the dtype they compute in (`head_operands`),
    and the adapter checked against the parallel setting (`lora_operands`; None without one)."""
    weight, bias = par.local_head(weight, bias)
    if ref_weight is not None:
        ref_weight, ref_bias = par.local_head(ref_weight, ref_bias)
    hidden, weight, bias = head_operands(hidden, weight, bias)
    _check_lora_setting(lora, par)
    return hidden, weight, bias, ref_weight, ref_bias, lora_operands(lora)


def check_reference_source(ref_logps, ref_hidden, ref_weight, ref_bias) -> None:
    """A unit call's reference is its precomputed `ref_logps [R]`, or `ref_hidden` with an optional head, or none;
    ValueError for any other combination."""
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias were given without ref_hidden")
    if ref_hidden is not None and ref_logps is not None:
        raise ValueError("pass either precomputed ref_logps or ref_hidden, not both")


def unit_inputs(hidden, weight, bias, positions, ref_hidden, ref_weight, ref_bias, lora) -> tuple:
    """`(Summary, _DPOInputs)` of a checked unit call, its reference head checked too (`reference_head`): what its
    `prepare` gives `HeadParallel.agree`."""
    inputs = _DPOInputs(hidden, weight, bias, *reference_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias),
                        positions, lora)
    return Summary(hidden, weight, bias, positions, 0, inputs.ref_hidden), inputs


@dataclass(frozen=True)
class GradsWanted:
    """Which gradients a fused DPO call forms: grad mode, and whether hidden, weight, bias (and a LoRA adapter's
    `a` and `b`) require grad."""

    enabled: bool
    inputs: tuple  # (hidden, weight, bias[, lora a, lora b]): bool each

    @staticmethod
    def current(hidden, weight, bias, lora=None) -> "GradsWanted":
        params = (hidden, weight, bias) if lora is None else (hidden, weight, bias, lora.a, lora.b)
        return GradsWanted(torch.is_grad_enabled(), tuple(p is not None and p.requires_grad for p in params))

    @property
    def weight(self) -> bool:
        """Whether a weight-like gradient (weight, bias or adapter: each an accumulator over chunks) is formed."""
        return self.enabled and any(self.inputs[1:])


def run_fused_linear_dpo(par, hidden, weight, bias, labels, cu_seqlens, ref, loss_settings, average, ignore_index,
                         shift, memory_budget, token_stats, wanted: GradsWanted, apply, lora=None) -> DPOOutput:
    """`fused_linear_dpo` after its heads are local and cast: the checks, the ranks' agreement, then `_run_dpo`.
    `apply(hidden, weight, bias, lora_a, lora_b, run) -> loss` runs `FusedLinearDPOFunction` (its `apply`, or its
    forward inside the custom op of `ops.py`); `lora`: the checked `LoraHead` or None."""
    ref_chosen_logps, ref_rejected_logps = ref[:2]
    loss_type, beta, label_smoothing, loss_params = loss_settings

    def prepare():
        inputs = _dpo_inputs(hidden, weight, bias, labels, cu_seqlens, ignore_index, shift, ref, loss_settings,
                             lora)
        return Summary(inputs.hidden, inputs.weight, inputs.bias, inputs.positions, 0, inputs.ref_hidden), inputs

    settings = ("dpo", loss_type, beta, label_smoothing, sorted(loss_params.items()), ignore_index, shift, average,
                memory_budget, token_stats, ref_chosen_logps is not None, wanted.weight, wanted.enabled)
    return _run_dpo(par.agree(prepare, settings, _device_of(hidden)), par, ref_chosen_logps, ref_rejected_logps,
                    average, memory_budget, token_stats, loss_settings, wanted, apply)


def _run_dpo(inputs, par, ref_chosen_logps, ref_rejected_logps, average, memory_budget, token_stats,
             loss_settings, wanted, apply) -> DPOOutput:
    """A fused DPO call whose ranks agree: the layout, the plan, the reference log-probs, then the engine."""
    loss_type, beta, label_smoothing, loss_params = loss_settings
    B = inputs.num_pairs
    plan_units = functools.partial(plan_dpo_step, loss_type=loss_type, weight_grad=wanted.weight)
    prepared = prepare_units(inputs, PairUnits(B), par, average, memory_budget, is_tied(loss_type), plan_units,
                             "fused_linear_dpo")
    del inputs  # its positions in natural order go with it (see `prepare_units`)
    counts = prepared.layout.counts
    if prepared.ref_logps is not None:
        ref_chosen_logps, ref_rejected_logps = prepared.ref_logps[:B], prepared.ref_logps[B:]
    loss_fn = functools.partial(dpo_loss_and_grads, ref_chosen_logps=ref_chosen_logps,
                                ref_rejected_logps=ref_rejected_logps, beta=beta, loss_type=loss_type,
                                label_smoothing=label_smoothing, chosen_lengths=counts[:B],
                                rejected_lengths=counts[B:], average=bool(average), **loss_params)
    loss, run = run_units(prepared, pairwise_loss(loss_fn, B), average, token_stats, wanted, apply)
    return pairs_output(loss, run, ref_chosen_logps, ref_rejected_logps, slice(None, B), slice(B, None))


@dataclass(frozen=True)
class PreparedUnits:
    """A fused call's operands (positions dropped), layout, plan and reference log-probs (`[R]`, computed from
    `ref_hidden`; None without it), before its loss is built."""

    inputs: _DPOInputs
    par: HeadParallel
    units: PairUnits | GroupUnits
    layout: TokenLayout
    plan: StepPlan
    ref_logps: torch.Tensor | None


def prepare_units(inputs, units, par, average, memory_budget, tied, plan_units, entry) -> PreparedUnits:
    """A fused call whose ranks agree, up to its loss: the vocabulary checks, the layout in the units' order, the
    plan (`_unit_plan`), the path record under `entry`, then the reference log-probs from `ref_hidden`. The caller
    drops its own reference to `inputs`, so that the positions in natural order are freed with it."""
    inputs.positions.check_vocab(par.vocab(inputs.weight))
    if inputs.ref_hidden is not None:
        par.check_reference_head(inputs.weight, inputs.ref_weight)
        inputs.positions.check_vocab(par.vocab(inputs.ref_weight))
    layout = par.global_counts(inputs.positions.layout(paired=units.paired))
    # The positions in natural order are not needed past the layout: the engine's buffers do not share memory with
    # them (the memory model counts the engine alone).
    inputs = dataclasses.replace(inputs, positions=None)
    plan = _unit_plan(layout, units, par, inputs, memory_budget, tied, plan_units)
    paths.record_engine_call(entry, plan, inputs.hidden, inputs.weight, inputs.bias,
                             shared_prompt=layout.rows_repeat, sharded_pass=par.shard is not None)
    ref_logps = None
    if inputs.ref_hidden is not None:
        ref_logps = par.sum_sequences(_reference_logps(inputs, layout, average, memory_budget, par))
    return PreparedUnits(inputs, par, units, layout, plan, ref_logps)


def run_units(prepared, loss_fn, average, token_stats, wanted, apply) -> tuple:
    """Runs the engine on a prepared call with `loss_fn` over its `[R]` log-probs (see `_DPORun`). Returns
    `(loss, run)`: the differentiable loss, and the run whose `result` holds the other outputs."""
    inputs, par = prepared.inputs, prepared.par
    lora_a, lora_b, scaling = _lora_inputs(inputs.lora)
    run = _DPORun(prepared.layout, prepared.plan, prepared.units, bool(average), loss_fn, bool(token_stats),
                  wanted.enabled, par, scaling)
    return apply(par.hidden_input(inputs.hidden), inputs.weight, inputs.bias, lora_a, lora_b, run), run


@torch.no_grad()
def _reference_logps(inputs, layout, average, memory_budget, par):
    """`[2B]` reference log-probs (the rank's partial sums under sequence parallelism) from the reference model's
    hidden states, forward only, in its own chunks."""
    plan = plan_logps(layout.rows.numel(), par.plan_vocab(inputs.ref_weight), inputs.ref_hidden.element_size(),
                      memory_budget)
    ref_bias = None if inputs.ref_bias is None else inputs.ref_bias.detach()
    loop = engine.ChunkLoop(_flat(inputs.ref_hidden.detach()), inputs.ref_weight.detach(), ref_bias, layout, plan,
                            pass_fn=par.pass_fn)
    return engine.forward_logps(loop, layout.counts.numel(), average)


def pairs_output(loss, run, ref_chosen_logps, ref_rejected_logps, chosen, rejected) -> DPOOutput:
    """The `DPOOutput` of a fused run whose pairs' sequences are `chosen` and `rejected` (slices or `[P]` index
    tensors into the run's `[R]` sequences); the reference log-probs are the pairs' own."""
    result, counts = run.result, run.layout.counts
    out, logps = result["out"], result["logps"]
    entropy, top1 = result.get("entropy"), result.get("top1")
    return DPOOutput(
        loss=loss,
        chosen_logps=logps[chosen],
        rejected_logps=logps[rejected],
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        reward_accuracy=out.reward_accuracy,
        reward_margin=out.reward_margin,
        losses=out.losses,
        ref_chosen_logps=None if ref_chosen_logps is None else ref_chosen_logps.detach(),
        ref_rejected_logps=None if ref_rejected_logps is None else ref_rejected_logps.detach(),
        chosen_lengths=counts[chosen],
        rejected_lengths=counts[rejected],
        chosen_entropy_sum=None if entropy is None else entropy[chosen],
        rejected_entropy_sum=None if entropy is None else entropy[rejected],
        chosen_top1_count=None if top1 is None else top1[chosen],
        rejected_top1_count=None if top1 is None else top1[rejected],
    )
