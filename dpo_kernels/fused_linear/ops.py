"""The fused DPO head as `torch.library` custom ops, so that `torch.compile(fullgraph=True)` takes it whole.

The engine plans each step from the scored-token counts it reads from the device (docs/design.md, "The fused linear
engine"); a compiler cannot trace that and need not. `dpo_kernels::fused_linear_dpo` runs the whole call (checks,
plan, engine, loss op) as one opaque op whose fake gives every output's shape from the input shapes alone, and
`dpo_kernels::fused_linear_dpo_backward` finishes it: the gradients formed in the forward scaled by the upstream
gradient, or the recompute plan's pass. Both run `FusedLinearDPOFunction`'s own forward and backward, so a compiled
step computes the bits of an eager one.

What the two share besides tensors (the plan, the token layout, the gradient buffers) stays in Python: the forward
keeps it under a handle, a one-element int64 CPU tensor it returns, whose storage owns it. Autograd saves the handle
for the backward, so the context lives exactly as long as the step's graph, as an autograd Function's would.

`fused_linear_dpo` takes this path only while torch.compile traces it and no process group splits the head (a group
cannot cross an op's schema); eager calls apply the Function directly, where the engine's trace records them. This
module registers that path with `functional` (`register_traced_entry`) when the package imports it, since it is built
on `functional`'s Function and `functional` does not import it.
"""
import weakref

import torch

from dpo_kernels.fused_linear.functional import (
    FusedLinearDPOFunction,
    GradsWanted,
    head_operands,
    register_traced_entry,
    run_fused_linear_dpo,
)
from dpo_kernels.fused_linear.parallel import HeadParallel, ParallelOptions
from dpo_kernels.fused_linear.plan import TokenAttribution, parse_memory_budget
from dpo_kernels.loss_op.loss_types import HYPER_PARAMS, LOSS_TYPES, loss_names
from dpo_kernels.loss_op.spec import LOSS_PARAM_NAMES
from dpo_kernels.outputs import DPOOutput

_NUM_HYPER_PARAMS = len(HYPER_PARAMS)


class _ContextStore(bytearray):
    """The bytes of a handle tensor; holds the call's context until the tensor's storage is freed."""


# Keyed by the address of the handle's storage: a handle's value is always 0, so two runs of the op give equal
# outputs (what `opcheck` compares), and views of the handle keep its address.
_stores = weakref.WeakValueDictionary()


def _keep(context) -> torch.Tensor:
    store = _ContextStore(8)
    store.context = context
    handle = torch.frombuffer(store, dtype=torch.int64)
    _stores[handle.untyped_storage().data_ptr()] = store
    return handle


def _context_of(handle: torch.Tensor):
    store = _stores.get(handle.untyped_storage().data_ptr())
    if store is None:
        raise RuntimeError("dpo_kernels::fused_linear_dpo_backward got a handle whose forward context is gone: the "
                           "handle must be the tensor the forward returned (not a copy of it)")
    return store.context


class _EngineContext:
    """What `FusedLinearDPOFunction` reads and writes on autograd's ctx, for its forward and backward run inside
    the custom ops."""

    def __init__(self, needs_input_grad):
        # hidden, weight and bias as given; no LoRA adapter's a and b (the op takes none), and the run.
        self.needs_input_grad = tuple(needs_input_grad) + (False, False, False)
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _loss_settings(loss_codes, params):
    """`(loss_type, beta, label_smoothing, loss_params)` from the loss op's `(loss_types, params)`: the same
    settings `check_loss_settings` normalized into them (`loss_op.spec.op_params`)."""
    names = [LOSS_TYPES[code] for code in loss_codes]
    rows = [params[i * _NUM_HYPER_PARAMS:(i + 1) * _NUM_HYPER_PARAMS] for i in range(len(names))]
    values = {name: [row[k] for row in rows] for k, name in enumerate(HYPER_PARAMS)}
    given = {name: (per_term if HYPER_PARAMS[name].per_loss else per_term[0]) for name, per_term in values.items()}
    beta, label_smoothing = given.pop("beta"), given.pop("label_smoothing")
    return names, beta, label_smoothing, given


def _op_params(loss_type, beta, label_smoothing, loss_params):
    """The loss op's `(loss_types, params)` laid out as `loss_op.spec.op_params` lays them out, without reading the
    values: torch.compile may trace a hyper-parameter as a symbolic float (one that changed between calls), which the
    op receives as it is. The values are checked inside the op (`_loss_settings` and `check_loss_settings`)."""
    names = loss_names(loss_type)
    unknown = set(loss_params) - set(LOSS_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown loss parameter(s) {sorted(unknown)}; expected some of {sorted(LOSS_PARAM_NAMES)}")
    given = {**loss_params, "beta": beta, "label_smoothing": label_smoothing}
    per_term = {}
    for name, info in HYPER_PARAMS.items():
        value = given.get(name)
        value = info.default if value is None else value
        if isinstance(value, list | tuple):
            if not info.per_loss or len(value) != len(names):
                raise ValueError(f"{name} takes {'one value per loss type' if info.per_loss else 'one value'}, "
                                 f"got {value!r} for {len(names)} loss type(s)")
            per_term[name] = list(value)
        else:
            per_term[name] = [value] * len(names)
    params = [per_term[name][index] for index in range(len(names)) for name in HYPER_PARAMS]
    return [LOSS_TYPES.index(name) for name in names], params


def _num_seqs(hidden, labels, cu_seqlens, attribution_num_seqs):
    if attribution_num_seqs > 0:
        return attribution_num_seqs
    return labels.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _loss_dtype(ref_chosen_logps, ref_rejected_logps):
    """The loss op's dtype: float64 when a reference log-prob is (`loss_op.spec.compute_dtype`)."""
    refs = (ref_chosen_logps, ref_rejected_logps)
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in refs) else torch.float32


@torch.library.custom_op("dpo_kernels::fused_linear_dpo", mutates_args=())
def fused_linear_dpo_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, attribution_rows: torch.Tensor | None,
    attribution_targets: torch.Tensor | None, attribution_seqs: torch.Tensor | None, attribution_num_seqs: int,
    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None, loss_types: list[int], params: list[float],
    average: bool, ignore_index: int, shift: bool, memory_budget: int | None, low_memory: bool, token_stats: bool,
    needs_input_grad: list[bool], grad_enabled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_linear_dpo` as one op. Arguments as there, with the labels either `labels` (with `cu_seqlens` when
    packed) or the three tensors of a `TokenAttribution` (`attribution_num_seqs` > 0), the loss settings as the
    loss op's `loss_types` and `params`, `memory_budget` None or bytes (`low_memory`: "low"), and which gradients
    the forward forms (`needs_input_grad` of hidden, weight, bias; `grad_enabled`).

    Returns `(loss [], logps [2B], chosen_rewards [B], rejected_rewards [B], reward_accuracy [], reward_margin [],
    losses [B], ref_logps [2B] (empty without ref_hidden), counts [2B] int64, entropy [2B], top1 [2B] int64 (both
    empty without token_stats), handle [1] int64 on the CPU)`; the loss float32, the loss op's outputs in its dtype.
    """
    if attribution_num_seqs > 0:
        labels = TokenAttribution(attribution_rows, attribution_targets, attribution_seqs, attribution_num_seqs)
    ref = (ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias)
    context = _EngineContext(needs_input_grad)
    out = run_fused_linear_dpo(
        HeadParallel(ParallelOptions(), shift), hidden, weight, bias, labels, cu_seqlens, ref,
        _loss_settings(loss_types, params), average, ignore_index, shift, "low" if low_memory else memory_budget,
        token_stats, GradsWanted(grad_enabled, tuple(needs_input_grad)),
        lambda *args: FusedLinearDPOFunction.forward(context, *args))
    empty = hidden.new_empty(0, dtype=torch.float32)
    ref_logps = torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]) if ref_hidden is not None else empty
    stats = ((torch.cat([out.chosen_entropy_sum, out.rejected_entropy_sum]),
              torch.cat([out.chosen_top1_count, out.rejected_top1_count])) if token_stats
             else (empty.clone(), empty.new_empty(0, dtype=torch.int64)))
    return (out.loss, torch.cat([out.chosen_logps, out.rejected_logps]), out.chosen_rewards, out.rejected_rewards,
            out.reward_accuracy, out.reward_margin, out.losses, ref_logps,
            torch.cat([out.chosen_lengths, out.rejected_lengths]), *stats, _keep(context))


@fused_linear_dpo_op.register_fake
def _fused_linear_dpo_fake(hidden, weight, bias, labels, cu_seqlens, attribution_rows, attribution_targets,
                           attribution_seqs, attribution_num_seqs, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                           ref_weight, ref_bias, loss_types, params, average, ignore_index, shift, memory_budget,
                           low_memory, token_stats, needs_input_grad, grad_enabled):
    num_seqs = _num_seqs(hidden, labels, cu_seqlens, attribution_num_seqs)
    pairs = num_seqs // 2
    dtype = _loss_dtype(ref_chosen_logps, ref_rejected_logps)

    def new(size, dtype=torch.float32):
        return hidden.new_empty(size, dtype=dtype)

    stats = (new(num_seqs), new(num_seqs, torch.int64)) if token_stats else (new(0), new(0, torch.int64))
    return (new(()), new(num_seqs), new(pairs, dtype), new(pairs, dtype), new((), dtype), new((), dtype),
            new(pairs, dtype), new(num_seqs if ref_hidden is not None else 0), new(num_seqs, torch.int64), *stats,
            torch.empty(1, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("dpo_kernels::fused_linear_dpo_backward", mutates_args=())
def fused_linear_dpo_backward_op(handle: torch.Tensor, grad_loss: torch.Tensor, hidden_shape: list[int],
                                 hidden_dtype: torch.dtype, weight_shape: list[int], weight_dtype: torch.dtype,
                                 device: torch.device, needs_input_grad: list[bool]) -> list[torch.Tensor]:
    """The gradients of hidden, weight and bias that `needs_input_grad` asks for, in that order, for the upstream
    gradient `grad_loss []` of the forward that returned `handle`; each in its input's shape and dtype."""
    grads = FusedLinearDPOFunction.backward(_context_of(handle), grad_loss)[:3]
    return [grad for grad, needed in zip(grads, needs_input_grad, strict=True) if needed]


@fused_linear_dpo_backward_op.register_fake
def _fused_linear_dpo_backward_fake(handle, grad_loss, hidden_shape, hidden_dtype, weight_shape, weight_dtype, device,
                                    needs_input_grad):
    shapes = ((hidden_shape, hidden_dtype), (weight_shape, weight_dtype), (weight_shape[:1], weight_dtype))
    return [torch.empty(shape, dtype=dtype, device=device)
            for (shape, dtype), needed in zip(shapes, needs_input_grad, strict=True) if needed]


def _setup_context(ctx, inputs, output):
    hidden, weight = inputs[:2]
    ctx.save_for_backward(output[-1])
    ctx.shapes = (list(hidden.shape), hidden.dtype, list(weight.shape), weight.dtype, hidden.device)
    ctx.formed = inputs[-2]


def _backward(ctx, grad_loss, *_):
    (handle,) = ctx.saved_tensors
    grads = iter(fused_linear_dpo_backward_op(handle, grad_loss, *ctx.shapes, ctx.formed))
    return (*(next(grads) if formed else None for formed in ctx.formed), *(None,) * 21)


torch.library.register_autograd("dpo_kernels::fused_linear_dpo", _backward, setup_context=_setup_context)


def traced_fused_linear_dpo(hidden, weight, bias, labels, cu_seqlens, ref, loss_settings, average, ignore_index, shift,
                            memory_budget, token_stats) -> DPOOutput:
    """`fused_linear_dpo` while torch.compile traces it: the op, and the `DPOOutput` from its outputs. The heads
    are local and cast already (`head_operands`)."""
    ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias = ref
    # Cast as `functional._dpo_inputs` casts it: the op may run outside the autocast region it was traced in.
    ref_hidden, ref_weight, ref_bias = head_operands(ref_hidden, ref_weight, ref_bias)
    loss_type, beta, label_smoothing, loss_params = loss_settings
    loss_codes, params = _op_params(loss_type, beta, label_smoothing, loss_params)
    attribution = labels if isinstance(labels, TokenAttribution) else TokenAttribution(None, None, None, 0)
    memory_budget = parse_memory_budget(memory_budget)
    wanted = GradsWanted.current(hidden, weight, bias)
    outputs = fused_linear_dpo_op(
        hidden, weight, bias, None if attribution.num_seqs else labels, cu_seqlens, *attribution,
        ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, list(loss_codes), list(params),
        bool(average), ignore_index, bool(shift), None if memory_budget == "low" else memory_budget,
        memory_budget == "low", bool(token_stats), list(wanted.inputs), wanted.enabled)
    loss, logps, chosen_rewards, rejected_rewards, accuracy, margin, losses, ref_logps, counts, entropy, top1 = \
        outputs[:11]
    B = logps.shape[0] // 2
    logps = logps.detach()
    if ref_hidden is not None:
        ref_chosen_logps, ref_rejected_logps = ref_logps[:B], ref_logps[B:]
    detached = (lambda t: None if t is None else t.detach())
    return DPOOutput(
        loss, logps[:B], logps[B:], chosen_rewards.detach(), rejected_rewards.detach(), accuracy.detach(),
        margin.detach(), losses.detach(), detached(ref_chosen_logps), detached(ref_rejected_logps), counts[:B],
        counts[B:], *((entropy[:B].detach(), entropy[B:].detach(), top1[:B], top1[B:]) if token_stats
                      else (None,) * 4))


register_traced_entry(traced_fused_linear_dpo)
