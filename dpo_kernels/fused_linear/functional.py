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

Both compute in the dtype the model's own lm_head would (`head_operands`): inside an autocast region the autocast
dtype, else the inputs' own; the engine itself then runs on those explicit dtypes with autocast off.
"""
import functools
from dataclasses import dataclass, field

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear import engine, parallel
from dpo_kernels.fused_linear.plan import (
    StepPlan,
    TokenAttribution,
    TokenLayout,
    attributed_tokens,
    chunk_tokens,
    compact_tokens,
    plan_dpo_step,
    plan_logps,
)
from dpo_kernels.loss_op.loss_types import is_tied
from dpo_kernels.loss_op.op import dpo_loss_and_grads
from dpo_kernels.loss_op.spec import check_reference_logps, validate_spec
from dpo_kernels.outputs import DPOOutput
from dpo_kernels.validation import (
    check_cu_seqlens,
    check_float_dtype,
    check_ignore_index,
    check_integer_dtype,
    check_labels_in_range,
    check_ndim,
    check_not_meta,
    check_same_device,
)


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
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(hidden), cast(weight), cast(bias)


def _check_linear_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, prefix="", vocab=None):
    """Validates one (hidden, weight, bias) triple against labels (a tensor or a `TokenAttribution`); returns R, the
    number of sequences. `vocab`: the labels' range when `weight` is a shard of the head (default its rows)."""
    check_ignore_index(ignore_index)
    check_ndim(weight, 2, f"{prefix}weight", "[V, H]")
    attribution = labels if isinstance(labels, TokenAttribution) else None
    if attribution is not None:
        labels = _check_attribution(hidden, attribution, cu_seqlens, ignore_index, prefix)
    elif cu_seqlens is None:
        check_ndim(hidden, 3, f"{prefix}hidden", "[R, T, H] (or packed [N, H] with cu_seqlens)")
        check_ndim(labels, 2, "labels", "[R, T]")
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {prefix}hidden [R, T] = "
                             f"{tuple(hidden.shape[:2])}")
    else:
        check_ndim(hidden, 2, f"{prefix}hidden", "[N, H] when cu_seqlens is given")
        check_ndim(labels, 1, "labels", "[N] when cu_seqlens is given")
        if labels.shape[0] != hidden.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} tokens but {prefix}hidden has {hidden.shape[0]}")
    check_integer_dtype(labels, "labels")
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
    check_same_device(**{f"{prefix}hidden": hidden, f"{prefix}weight": weight, "labels": labels,
                         f"{prefix}bias": bias, "cu_seqlens": cu_seqlens})
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, hidden.shape[0])
    if attribution is not None:
        check_labels_in_range(labels, vocab or V, ignore_index)
        return attribution.num_seqs
    # A label tensor's range is checked by `compact_tokens`, in the one synchronization that counts its tokens.
    check_not_meta(labels=labels)
    return hidden.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _check_attribution(hidden, attribution, cu_seqlens, ignore_index, prefix):
    """Shapes and ranges of a `TokenAttribution` against `hidden` `[R, T, H]` or `[rows, H]`; returns its targets."""
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens does not apply with a TokenAttribution, which names each token's row and sequence")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"{prefix}hidden must be [R, T, H] or [rows, H] with a TokenAttribution, got shape "
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
    check_same_device(**{f"{prefix}hidden": hidden, "attribution.rows": rows, "attribution.targets": targets,
                         "attribution.seqs": seqs})
    hidden_rows = hidden.shape[0] * (hidden.shape[1] if hidden.dim() == 3 else 1)
    if rows.numel():
        # The ranges in one synchronization.
        rows_lo, rows_hi, seqs_lo, seqs_hi, ignored = torch.stack([
            rows.min().long(), rows.max().long(), seqs.min().long(), seqs.max().long(),
            (targets == ignore_index).any().long()]).tolist()
        if rows_lo < 0 or rows_hi >= hidden_rows:
            raise ValueError(f"attribution.rows must lie in [0, {hidden_rows}) (the rows of the flattened "
                             f"{prefix}hidden), got [{rows_lo}, {rows_hi}]")
        if seqs_lo < 0 or seqs_hi >= num_seqs:
            raise ValueError(f"attribution.seqs must lie in [0, {num_seqs}), got [{seqs_lo}, {seqs_hi}]")
        if ignored:
            raise ValueError(f"attribution.targets holds ignore_index ({ignore_index}): it lists scored tokens only")
    return targets


def _token_layout(labels, cu_seqlens, num_seqs, ignore_index, shift, paired, vocabs):
    """The engine's token layout; `vocabs`: the vocabulary sizes every label must fit (checked on the way)."""
    if isinstance(labels, TokenAttribution):
        return attributed_tokens(labels, paired)
    return compact_tokens(labels, cu_seqlens, num_seqs, ignore_index, shift, paired, vocabs)


def _flat(hidden):
    return hidden.reshape(-1, hidden.shape[-1])


def _token_coefficients(per_seq, layout, average):
    """d out / d token log-prob from d out / d sequence log-prob."""
    coef = per_seq.float()[layout.seq]
    return coef / layout.counts[layout.seq] if average else coef


def _weight_grad_wanted(weight, bias):
    return torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))


def _grads_of(hidden2d, weight, need_h, need_w, need_b):
    """The gradient buffers for the wanted gradients, or None when none is."""
    if not (need_h or need_w or need_b):
        return None
    return engine.Grads(hidden2d, weight, need_h, need_w, need_b)


@dataclass(frozen=True)
class _LogpsRun:
    """Everything about one `linear_sequence_logprobs` call that is not a differentiable input."""

    layout: TokenLayout
    plan: StepPlan
    num_seqs: int
    average: bool
    pass_fn: object = None


class LinearSequenceLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, run: _LogpsRun):
        ctx.save_for_backward(hidden, weight, bias)
        ctx.run = run
        loop = engine.ChunkLoop(_flat(hidden), weight, bias, run.layout, run.plan, pass_fn=run.pass_fn)
        return engine.forward_logps(loop, run.num_seqs, run.average)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        run = ctx.run
        hidden2d = _flat(hidden)
        grads = engine.Grads(hidden2d, weight, *ctx.needs_input_grad[:3])
        coef = _token_coefficients(grad_out, run.layout, run.average)
        engine.recompute_grads(engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, grads,
                                                pass_fn=run.pass_fn), coef)
        grad_w, grad_b = grads.weight_bias(weight.dtype)
        grad_h = None if grads.hidden is None else grads.hidden.view(hidden.shape)
        return grad_h, grad_w, grad_b, None


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=IGNORE_INDEX, shift=True, average=False,
                             cu_seqlens=None, memory_budget=None, vocab_parallel_group=None,
                             sequence_parallel_group=None):
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
        vocab_parallel_group, sequence_parallel_group: torch.distributed process groups over which the head's
            vocabulary or the sequences' positions are split, as `fused_linear_dpo`.
    Returns:
        `[R]` float32, the same on every rank of the groups. Differentiable w.r.t. hidden, weight and bias for any
        upstream gradient; the backward recomputes each chunk's logits.
    """
    parallel.check_groups(vocab_parallel_group, sequence_parallel_group, shift)
    weight, bias, vocab_parallel_group = parallel.local_head(weight, bias, vocab_parallel_group)
    hidden, weight, bias = head_operands(hidden, weight, bias)
    shard = None if vocab_parallel_group is None else parallel.vocab_shard(weight, vocab_parallel_group)
    num_seqs = _check_linear_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index,
                                    vocab=None if shard is None else shard.vocab)
    layout = _token_layout(labels, cu_seqlens, num_seqs, ignore_index, shift, paired=False,
                           vocabs=(weight.shape[0] if shard is None else shard.vocab,))
    if sequence_parallel_group is not None:
        layout = parallel.global_counts(layout, sequence_parallel_group)
    plan = plan_logps(layout.rows.numel(), weight.shape[0] if shard is None else shard.largest,
                      hidden.element_size(), memory_budget)
    run = _LogpsRun(layout, plan, num_seqs, bool(average),
                    None if shard is None else parallel.VocabParallelPass(shard))
    if shard is not None:
        hidden = parallel.SumGradOver.apply(hidden, shard.group)
    logps = LinearSequenceLogprobsFunction.apply(hidden, weight, bias, run)
    if sequence_parallel_group is not None:
        logps = parallel.SumOver.apply(logps, sequence_parallel_group)
    return logps


@dataclass(frozen=True)
class _DPORun:
    """Everything about one fused DPO call that is not a differentiable input.

    `grad_enabled` is read outside the Function, whose forward always runs without grad mode: under no_grad
    (evaluation with parameters that require grad) the forward must not form gradients nobody will ask for.
    `result` receives the forward's non-differentiable results by name (`DPOLossOutput` as `out`, `logps [2B]`,
    and with token stats `entropy [2B]`, `top1 [2B]`); only the loss leaves the Function as its output.
    """

    layout: TokenLayout
    plan: StepPlan
    num_pairs: int
    average: bool
    loss_fn: object
    token_stats: bool
    grad_enabled: bool
    result: dict = field(default_factory=dict, compare=False)
    pass_fn: object = None
    # Sequence parallel: the per-sequence sums are partial on each rank and summed over this group.
    sequence_group: object = None


class FusedLinearDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, run: _DPORun):
        need_h, need_w, need_b = (need and run.grad_enabled for need in ctx.needs_input_grad[:3])
        hidden2d = _flat(hidden)
        B = run.num_pairs
        ctx.run, ctx.shape = run, hidden.shape
        stats = engine.TokenStats(run.layout.rows.numel(), hidden.device) if run.token_stats else None
        if run.plan.recompute:
            loop = engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, stats=stats, pass_fn=run.pass_fn)
            logps = engine.forward_logps(loop, 2 * B, run.average)
            del loop
            if run.sequence_group is not None:
                logps = parallel.sum_over(logps, run.sequence_group)
            out, grad_c, grad_r = run.loss_fn(logps[:B], logps[B:])
            ctx.save_for_backward(hidden, weight, bias)
            ctx.seq_grad = torch.cat([grad_c, grad_r]).float()
        else:
            grads = _grads_of(hidden2d, weight, need_h, need_w, need_b)
            loop = engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, grads, stats, pass_fn=run.pass_fn)
            out, logps = engine.fused_dpo(loop, engine.PairLoss(run.layout, B, run.average, run.loss_fn))
            del loop
            # Converted in the backward: the upstream gradient then folds into the one pass that turns the fp32
            # weight-gradient accumulator into the weight's dtype.
            ctx.grads, ctx.weight_dtype = grads, weight.dtype
        run.result.update(out=out, logps=logps)
        if stats is not None:
            entropy, top1 = stats.per_sequence(run.layout, 2 * B)
            if run.sequence_group is not None:
                entropy, top1 = (parallel.sum_over(t, run.sequence_group) for t in (entropy, top1))
            run.result["entropy"], run.result["top1"] = entropy, top1
        return out.loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        run = ctx.run
        if run.plan.recompute:
            hidden, weight, bias = ctx.saved_tensors
            hidden2d = _flat(hidden)
            grads = engine.Grads(hidden2d, weight, *ctx.needs_input_grad[:3])
            coef = _token_coefficients(ctx.seq_grad, run.layout, run.average) * grad_loss.float()
            engine.recompute_grads(engine.ChunkLoop(hidden2d, weight, bias, run.layout, run.plan, grads,
                                                    pass_fn=run.pass_fn), coef)
            grad_w, grad_b = grads.weight_bias(weight.dtype)
            grad_h = None if grads.hidden is None else grads.hidden.view(ctx.shape)
            return grad_h, grad_w, grad_b, None
        if ctx.grads is None:
            raise RuntimeError("FusedLinearDPOFunction's backward ran twice: its gradients are formed in the forward "
                               "and consumed by the first backward (retain_graph is not supported)")
        grads, ctx.grads = ctx.grads, None
        grad_w, grad_b = grads.weight_bias(ctx.weight_dtype, scale=grad_loss)
        grad_h = None if grads.hidden is None else grads.scaled_hidden(grad_loss).view(ctx.shape)
        return grad_h, grad_w, grad_b, None


def _check_reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, num_pairs, hidden):
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias were given without ref_hidden")
    if ref_hidden is not None and ref_chosen_logps is not None:
        raise ValueError("pass either precomputed ref_chosen_logps/ref_rejected_logps or ref_hidden, not both")
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, num_pairs, hidden.device, "hidden")


def fused_linear_dpo(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
                     ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1,
                     loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX, shift=True,
                     memory_budget=None, token_stats=False, vocab_parallel_group=None, sequence_parallel_group=None,
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
        vocab_parallel_group: a torch.distributed process group over which the head is split by vocabulary rows:
            `weight` (`bias`, `ref_weight`, `ref_bias`) is this rank's contiguous shard `[V_r, H]`, the ranks in
            group order holding consecutive rows (shards may differ in size); hidden states and labels (global ids)
            are the same on every rank. A DTensor weight sharded on dim 0 brings its own group. `hidden.grad` is
            the full gradient on every rank, `weight.grad` the rank's shard of it.
        sequence_parallel_group: a process group over which each sequence's positions are split (with
            `shift=False`, labels aligned to positions): each rank passes its contiguous slice of every row (or
            its part of a packed batch with its own `cu_seqlens`). `hidden.grad` is exact for the rank's slice,
            `weight.grad` the rank's partial sum (a data-parallel reduction over the group adds them). Runs the
            recompute plan: the loss needs every rank's log-probs before any coefficient is known.
    Returns:
        `DPOOutput`, the same on every rank of the groups; only `loss` is differentiable (w.r.t. hidden, weight,
        bias). Response lengths passed to the loss are the numbers of scored tokens per sequence.
    """
    parallel.check_groups(vocab_parallel_group, sequence_parallel_group, shift)
    weight, bias, vocab_parallel_group = parallel.local_head(weight, bias, vocab_parallel_group)
    if ref_weight is not None:
        ref_weight, ref_bias, _ = parallel.local_head(ref_weight, ref_bias, vocab_parallel_group)
    hidden, weight, bias = head_operands(hidden, weight, bias)
    shard = None if vocab_parallel_group is None else parallel.vocab_shard(weight, vocab_parallel_group)
    vocab = None if shard is None else shard.vocab
    num_seqs = _check_linear_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, vocab=vocab)
    if num_seqs == 0 or num_seqs % 2:
        raise ValueError(f"the batch needs an even, non-zero number of sequences (B chosen then B rejected), got "
                         f"{num_seqs}")
    B = num_seqs // 2
    _check_reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, B, hidden)
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias = head_operands(ref_hidden, *((weight, bias) if ref_weight is None
                                                                       else (ref_weight, ref_bias)))
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} does not match hidden "
                             f"{tuple(hidden.shape[:-1])}")
        _check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, cu_seqlens, ignore_index, prefix="ref_",
                             vocab=vocab)
        if shard is not None and ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight must be sharded as weight: {ref_weight.shape[0]} rows on this rank, weight "
                             f"has {weight.shape[0]}")
    vocabs = (vocab or weight.shape[0],) + (() if ref_hidden is None else (vocab or ref_weight.shape[0],))
    layout = _token_layout(labels, cu_seqlens, num_seqs, ignore_index, shift, paired=True, vocabs=vocabs)
    if sequence_parallel_group is not None:
        layout = parallel.global_counts(layout, sequence_parallel_group)
    counts = layout.counts
    validate_spec(loss_type, beta, label_smoothing, counts[:B], counts[B:], loss_params)
    plan_vocab = weight.shape[0] if shard is None else shard.largest
    if sequence_parallel_group is not None:
        plan = StepPlan(chunk_tokens(plan_vocab, hidden.element_size(), memory_budget), layout.rows.numel(),
                        recompute=True, tied=is_tied(loss_type))
    else:
        pair_counts = [layout.counts_host[i] + layout.counts_host[B + i] for i in range(B)]
        plan = plan_dpo_step(pair_counts, plan_vocab, hidden.element_size(), memory_budget, loss_type,
                             weight_grad=_weight_grad_wanted(weight, bias))
    pass_fn = None if shard is None else parallel.VocabParallelPass(shard)
    if ref_hidden is not None:
        ref = _reference_logps(ref_hidden, ref_weight, ref_bias, layout, num_seqs, average, memory_budget,
                               ref_weight.shape[0] if shard is None else shard.largest, pass_fn)
        if sequence_parallel_group is not None:
            ref = parallel.sum_over(ref, sequence_parallel_group)
        ref_chosen_logps, ref_rejected_logps = ref[:B], ref[B:]
    loss_fn = functools.partial(dpo_loss_and_grads, ref_chosen_logps=ref_chosen_logps,
                                ref_rejected_logps=ref_rejected_logps, beta=beta, loss_type=loss_type,
                                label_smoothing=label_smoothing, chosen_lengths=counts[:B],
                                rejected_lengths=counts[B:], average=bool(average), **loss_params)
    run = _DPORun(layout, plan, B, bool(average), loss_fn, bool(token_stats), torch.is_grad_enabled(),
                  pass_fn=pass_fn, sequence_group=sequence_parallel_group)
    if shard is not None:
        hidden = parallel.SumGradOver.apply(hidden, shard.group)
    loss = FusedLinearDPOFunction.apply(hidden, weight, bias, run)
    return _dpo_output(loss, run, ref_chosen_logps, ref_rejected_logps)


@torch.no_grad()
def _reference_logps(ref_hidden, ref_weight, ref_bias, layout, num_seqs, average, memory_budget, plan_vocab,
                     pass_fn):
    """`[2B]` reference log-probs from the reference model's hidden states, forward only, in its own chunks."""
    plan = plan_logps(layout.rows.numel(), plan_vocab, ref_hidden.element_size(), memory_budget)
    loop = engine.ChunkLoop(_flat(ref_hidden.detach()), ref_weight.detach(),
                            None if ref_bias is None else ref_bias.detach(), layout, plan, pass_fn=pass_fn)
    return engine.forward_logps(loop, num_seqs, average)


def _dpo_output(loss, run, ref_chosen_logps, ref_rejected_logps) -> DPOOutput:
    B, result, counts = run.num_pairs, run.result, run.layout.counts
    out, logps = result["out"], result["logps"]
    entropy, top1 = result.get("entropy"), result.get("top1")
    return DPOOutput(
        loss=loss,
        chosen_logps=logps[:B],
        rejected_logps=logps[B:],
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        reward_accuracy=out.reward_accuracy,
        reward_margin=out.reward_margin,
        losses=out.losses,
        ref_chosen_logps=None if ref_chosen_logps is None else ref_chosen_logps.detach(),
        ref_rejected_logps=None if ref_rejected_logps is None else ref_rejected_logps.detach(),
        chosen_lengths=counts[:B],
        rejected_lengths=counts[B:],
        chosen_entropy_sum=None if entropy is None else entropy[:B],
        rejected_entropy_sum=None if entropy is None else entropy[B:],
        chosen_top1_count=None if top1 is None else top1[:B],
        rejected_top1_count=None if top1 is None else top1[B:],
    )
