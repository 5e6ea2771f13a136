"""Sequence log-probs and the DPO loss straight from hidden states, never materializing `[N, V]` logits.

The engine (DESIGN.md 4.2, `_fused_linear_engine.py`) projects only the positions that score a valid label, in
chunks of at most C tokens, through one reused `[C, V]` buffer: a cuBLAS GEMM for the logits, one Triton pass
(`logsoftmax_pass.py`) for the log-probs and, in place, their gradient, then GEMMs into fp32 gradient buffers.

- `linear_sequence_logprobs`: the general primitive (any upstream gradient). Forward 2NHV; backward recomputes
  each chunk's logits (6NHV).
- `fused_linear_dpo` (and `losses.FusedLinearDPOLoss`): the DPO fast path. Its forward calls the DPO loss op as
  pairs complete and forms the hidden/weight/bias gradients at once (6NHV in all); the backward only scales them
  by the upstream gradient. Chunk size and mode follow `memory_budget` (rule in `_chunking.py`): resident chunks
  of whole pairs, pairs longer than a chunk streamed through the weight-gradient accumulator (or run twice when it
  already holds other pairs or the loss's chosen and rejected coefficients are not tied), and the recompute path
  (8NHV, least memory) for `memory_budget="low"` and for losses that couple pairs through their log-probs (aot,
  aot_unpaired) when the batch is not resident. Peak memory of a step: `_memory_model.estimate_peak_bytes`.
  With `token_stats=True` the pass that reads each token's logits also returns its entropy and top-1 hit, summed
  per sequence into the output (what TRL logs as `entropy` and `mean_token_accuracy`), at no extra GEMM.
"""
import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear import engine
from dpo_kernels.fused_linear.plan import chunk_tokens, compact_tokens
from dpo_kernels.loss_op.loss_types import couples_logps, is_tied
from dpo_kernels.loss_op.op import dpo_loss_and_grads
from dpo_kernels.loss_op.spec import validate_spec
from dpo_kernels.outputs import DPOOutput
from dpo_kernels.validation import (
    check_float_dtype,
    check_ignore_index,
    check_integer_dtype,
    check_labels_in_range,
    check_ndim,
    check_same_device,
)


def _check_linear_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index, prefix=""):
    """Validates one (hidden, weight, bias) triple against labels; returns R, the number of sequences."""
    check_ignore_index(ignore_index)
    check_ndim(weight, 2, f"{prefix}weight", "[V, H]")
    if cu_seqlens is None:
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
        _check_cu_seqlens(cu_seqlens, hidden.shape[0])
    check_labels_in_range(labels, V, ignore_index)
    return hidden.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _check_cu_seqlens(cu_seqlens, total):
    check_ndim(cu_seqlens, 1, "cu_seqlens", "[R + 1]")
    check_integer_dtype(cu_seqlens, "cu_seqlens")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets (one sequence), got {cu_seqlens.numel()}")
    cu = cu_seqlens.long()
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0].item()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()[:16]}")
    if cu[-1].item() != total:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {total}, got {cu[-1].item()}")


def _flat(hidden):
    return hidden.reshape(-1, hidden.shape[-1])


def _token_coefficients(per_seq, layout, average):
    """d out / d token log-prob from d out / d sequence log-prob."""
    coef = per_seq.float()[layout.seq]
    return coef / layout.counts[layout.seq] if average else coef


class LinearSequenceLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, layout, num_seqs, average, chunk):
        ctx.save_for_backward(hidden, weight, bias)
        ctx.args = (layout, average, chunk)
        return engine.sequence_logps(_flat(hidden), weight, bias, layout, num_seqs, average, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        layout, average, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        hidden2d = _flat(hidden)
        grads = engine.Grads(hidden2d, weight, need_h, need_w, need_b)
        coef = _token_coefficients(grad_out, layout, average)
        engine.recompute_grads(hidden2d, weight, bias, layout, coef, chunk, grads)
        grad_w, grad_b = grads.weight_bias(weight.dtype)
        grad_h = None if grads.hidden is None else grads.hidden.view(hidden.shape)
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=IGNORE_INDEX, shift=True, average=False,
                             cu_seqlens=None, memory_budget=None):
    """Per-sequence log-probabilities of the labels under `softmax(hidden @ weight.T + bias)`, chunked.

    Args:
        hidden: `[R, T, H]` float32/bfloat16/float16 last hidden states, or packed `[N, H]` with `cu_seqlens`.
        weight: `[V, H]` lm_head weight, same dtype and device as `hidden`.
        labels: `[R, T]` (or `[N]` packed) int64; `ignore_index` marks positions that are not scored.
        bias: optional `[V]` lm_head bias.
        shift: position t scores label t+1 of the same sequence (HuggingFace causal LM); the last position of each
            sequence scores nothing.
        average: divide each sum by its number of scored tokens (0 for a sequence with none).
        cu_seqlens: `[R + 1]` int32/int64 offsets of the packed sequences (flash-attention varlen convention).
        memory_budget: bytes for the `[C, V]` logits buffer (default 2 GiB, C <= 8192); see `_chunking.py`.
    Returns:
        `[R]` float32. Differentiable w.r.t. hidden, weight and bias for any upstream gradient; the backward
        recomputes each chunk's logits.
    """
    num_seqs = _check_linear_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index)
    layout = compact_tokens(labels, cu_seqlens, num_seqs, ignore_index, shift, paired=False)
    chunk = chunk_tokens(weight.shape[0], hidden.element_size(), memory_budget)
    return LinearSequenceLogprobsFunction.apply(hidden, weight, bias, layout, num_seqs, bool(average), chunk)


class _DPORun:
    """Everything about one fused DPO call that is not a differentiable input."""

    def __init__(self, layout, num_pairs, average, chunk, tied, recompute, loss_fn, token_stats):
        self.layout, self.num_pairs, self.average, self.chunk = layout, num_pairs, average, chunk
        self.tied, self.recompute, self.loss_fn, self.token_stats = tied, recompute, loss_fn, token_stats
        # Read outside the Function: its forward always runs without grad mode. Under no_grad (evaluation with
        # parameters that require grad) the forward must not form gradients nobody will ask for.
        self.grad_enabled = torch.is_grad_enabled()


class FusedLinearDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        need_h, need_w, need_b = (need and run.grad_enabled for need in ctx.needs_input_grad[:3])
        hidden2d = _flat(hidden)
        B = run.num_pairs
        ctx.run, ctx.shape = run, hidden.shape
        stats = engine.TokenStats(run.layout.rows.numel(), hidden.device) if run.token_stats else None
        if run.recompute:
            logps = engine.sequence_logps(hidden2d, weight, bias, run.layout, 2 * B, run.average, run.chunk, stats)
            out, grad_c, grad_r = run.loss_fn(logps[:B], logps[B:])
            ctx.save_for_backward(hidden, weight, bias)
            ctx.seq_grad = torch.cat([grad_c, grad_r]).float()
        else:
            grads = engine.Grads(hidden2d, weight, need_h, need_w, need_b) if (need_h or need_w or need_b) else None
            out, logps = engine.fused_dpo(hidden2d, weight, bias, run.layout, B, run.average, run.chunk, run.tied,
                                          run.loss_fn, grads, stats)
            ctx.grads = None
            if grads is not None:
                grad_w, grad_b = grads.weight_bias(weight.dtype)
                grad_h = None if grads.hidden is None else grads.hidden.view(hidden.shape)
                ctx.grads = [grad_h, grad_w, grad_b]
        metrics = (logps[:B], logps[B:], out.chosen_rewards, out.rejected_rewards, out.reward_accuracy,
                   out.reward_margin, out.losses)
        if stats is not None:
            entropy, top1 = stats.per_sequence(run.layout, 2 * B)
            metrics += (entropy[:B], entropy[B:], top1[:B], top1[B:])
        ctx.mark_non_differentiable(*metrics)
        return (out.loss.float(),) + metrics

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        run = ctx.run
        if run.recompute:
            hidden, weight, bias = ctx.saved_tensors
            hidden2d = _flat(hidden)
            grads = engine.Grads(hidden2d, weight, *ctx.needs_input_grad[:3])
            coef = _token_coefficients(ctx.seq_grad, run.layout, run.average) * grad_loss.float()
            engine.recompute_grads(hidden2d, weight, bias, run.layout, coef, run.chunk, grads)
            grad_w, grad_b = grads.weight_bias(weight.dtype)
            grad_h = None if grads.hidden is None else grads.hidden.view(ctx.shape)
            return grad_h, grad_w, grad_b, None
        if ctx.grads is None:
            raise RuntimeError("FusedLinearDPOFunction's backward ran twice: its gradients are formed in the forward "
                               "and consumed by the first backward (retain_graph is not supported)")
        grads, ctx.grads = ctx.grads, None
        # Scaled in place: the buffers belong to this call, and a second copy of [V, H] would cost memory.
        return tuple(None if g is None else g.mul_(grad_loss) for g in grads) + (None,)


def _check_reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, num_pairs, hidden):
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias were given without ref_hidden")
    if ref_hidden is not None and ref_chosen_logps is not None:
        raise ValueError("pass either precomputed ref_chosen_logps/ref_rejected_logps or ref_hidden, not both")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != (num_pairs,):
            raise ValueError(f"{name} must be a float tensor of shape [B] = [{num_pairs}], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def fused_linear_dpo(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
                     ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1,
                     loss_type="sigmoid", label_smoothing=0.0, average=False, ignore_index=IGNORE_INDEX, shift=True,
                     memory_budget=None, token_stats=False, **loss_params) -> DPOOutput:
    """The DPO loss from the policy's last hidden states and lm_head, with its gradients formed in the forward.

    Args:
        hidden: `[2B, T, H]` float32/bfloat16/float16 (rows 0..B-1 chosen, B..2B-1 rejected; pair i is rows i and
            B+i), or packed `[N, H]` with `cu_seqlens` `[2B + 1]` (the 2B sequences chosen first).
        weight: `[V, H]` lm_head weight (same dtype); bias: optional `[V]`.
        labels: `[2B, T]` (or `[N]`) int64, `ignore_index` on prompt and padding positions.
        ref_chosen_logps, ref_rejected_logps: `[B]` precomputed reference log-probs, or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states (same layout as `hidden`) and head;
            `ref_weight`/`ref_bias` default to `weight`/`bias` (a shared, frozen head). Neither: reference-free.
        beta, loss_type, label_smoothing, **loss_params: as `dpo_kernels.dpo_loss`.
        average: use per-token mean log-probs instead of sums (for policy and reference alike).
        memory_budget: None (2 GiB, C <= 8192), bytes for the `[C, V]` logits buffer, or "low" (512 MiB and the
            recompute path): see `_chunking.py`.
        token_stats: also fill the output's `chosen_entropy_sum`, `rejected_entropy_sum`, `chosen_top1_count`,
            `rejected_top1_count` (the policy's per-token entropy and first-argmax hits, summed per sequence), from
            the pass that already reads every logit: no extra GEMM.
    Returns:
        `DPOOutput`; only `loss` is differentiable (w.r.t. hidden, weight, bias). Response lengths passed to the
        loss are the numbers of scored tokens per sequence.
    """
    num_seqs = _check_linear_inputs(hidden, weight, labels, bias, cu_seqlens, ignore_index)
    if num_seqs == 0 or num_seqs % 2:
        raise ValueError(f"the batch needs an even, non-zero number of sequences (B chosen then B rejected), got "
                         f"{num_seqs}")
    B = num_seqs // 2
    _check_reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, B, hidden)
    if ref_hidden is not None:
        ref_weight, ref_bias = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} does not match hidden "
                             f"{tuple(hidden.shape[:-1])}")
        _check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, cu_seqlens, ignore_index, prefix="ref_")
    layout = compact_tokens(labels, cu_seqlens, num_seqs, ignore_index, shift, paired=True)
    counts = layout.counts
    validate_spec(loss_type, beta, label_smoothing, counts[:B], counts[B:], loss_params)
    chunk = chunk_tokens(weight.shape[0], hidden.element_size(), memory_budget)
    if ref_hidden is not None:
        with torch.no_grad():
            ref_chunk = chunk_tokens(ref_weight.shape[0], ref_hidden.element_size(), memory_budget)
            ref = engine.sequence_logps(_flat(ref_hidden.detach()), ref_weight.detach(),
                                        None if ref_bias is None else ref_bias.detach(), layout, num_seqs, average,
                                        ref_chunk)
        ref_chosen_logps, ref_rejected_logps = ref[:B], ref[B:]

    def loss_fn(chosen, rejected):
        return dpo_loss_and_grads(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta=beta,
                                  loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=counts[:B],
                                  rejected_lengths=counts[B:], **loss_params)

    recompute = memory_budget == "low" or (couples_logps(loss_type) and layout.rows.numel() > chunk)
    run = _DPORun(layout, B, bool(average), chunk, is_tied(loss_type), recompute, loss_fn,
                  bool(token_stats))
    outputs = FusedLinearDPOFunction.apply(hidden, weight, bias, run)
    ref_c = None if ref_chosen_logps is None else ref_chosen_logps.detach()
    ref_r = None if ref_rejected_logps is None else ref_rejected_logps.detach()
    return DPOOutput(*outputs[:8], ref_c, ref_r, counts[:B], counts[B:], *outputs[8:])
