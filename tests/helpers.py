"""What the tests share: the accuracy rule, the devices, and the batch builders and oracles of each op's tests.

The accuracy rule (docs/design.md, "Numerics and the accuracy rule"): a kernel's result `out` is judged against the
float64 truth `truth`; its max abs error may be at most `factor` (2) times the error of plain PyTorch in the same
dtype (`baseline`), plus `atol`. NaN never passes.
"""
import copy
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.hf import output_head
from dpo_kernels.loss_op.loss_types import LOSSES
from dpo_kernels.shared_prompt import (
    sequence_logprobs_from_hidden,
    sequence_logprobs_from_logits,
    shared_attention_mask,
    shared_backbone_hidden_states,
    shared_logits,
)
from dpo_kernels.shared_prompt.batch import PAD, PROMPT

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Where tests of a forced backend put their tensors: Triton runs CUDA tensors where there is a GPU and CPU tensors in
# the interpreter elsewhere (conftest sets TRITON_INTERPRET only without CUDA); the PyTorch fallback runs on the CPU.
BACKENDS = ["triton", "torch"]


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and HAS_CUDA else "cpu")


TRITON_DEVICE = device_for("triton").type  # where the Triton kernels run: CUDA where there is one, else the interpreter


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(name, got, want, rtol=1e-4, atol=0.0):
    """`|got - want| <= rtol * max|want| + atol` elementwise at the worst element, in float64; the message names
    `name` and shows the first values of both."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err = (got - want).abs().max().item()
    allowed = rtol * want.abs().max().item() + atol
    assert err <= allowed, f"{name}: max abs diff {err:.3e} > {allowed:.3e} (got {got.flatten()[:4].tolist()}, " \
                           f"want {want.flatten()[:4].tolist()})"


def assert_within_rule(out, truth, baseline, *, atol: float, factor: float = 2.0, name: str = "output"):
    out, truth, baseline = out.detach(), truth.detach(), baseline.detach()
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(truth.shape)}"
    finite = torch.isfinite(truth)
    # Non-finite truth must be matched exactly (inf by the same inf, NaN by NaN); a finite truth by a finite value.
    same_nonfinite = (out.double() == truth.double()) | (torch.isnan(out) & torch.isnan(truth))
    bad = (~finite & ~same_nonfinite) | (finite & ~torch.isfinite(out))
    assert not bad.any(), (
        f"{name}: non-finite mismatch at {bad.nonzero()[:3].tolist()}: "
        f"got {out[bad][:3].tolist()}, expected {truth[bad][:3].tolist()}"
    )
    if out.numel() == 0:
        return
    keep = finite
    o, t, b = out.double()[keep], truth.double()[keep], baseline.double()[keep]
    err = (o - t).abs()
    allowed = factor * max_abs_error(b, t) + atol
    if err.numel() and err.max().item() > allowed:
        worst = err.argmax().item()
        where = keep.nonzero()[worst].tolist()
        raise AssertionError(
            f"{name}: max abs error {err.max().item():.3e} > allowed {allowed:.3e} "
            f"(baseline error {max_abs_error(b, t):.3e}, atol {atol:.1e}) at index {where}: "
            f"got {o[worst].item():.8g}, expected {t[worst].item():.8g}"
        )


# --- The DPO loss op.

# A label smoothing inside every range of the table, for each loss that reads it.
SMOOTHED = {name: {"robust": 0.2, "exo_pair": 1e-3}.get(name, 0.1) for name, info in LOSSES.items()
            if info.reads_label_smoothing}


# --- Fused linear DPO: batches, the eager oracle, the fused call and its check against the truth.

# (dtype, atol) pairs of the accuracy rule.
DTYPE_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}
LOSS_PARAMS = {"exo_pair": {"label_smoothing": 1e-2}, "robust": {"label_smoothing": 0.1}}
REFERENCE_FREE = {name for name, info in LOSSES.items() if info.reference_free}


def make_batch(B, T, H, V, dtype=torch.float32, *, prompt=3, empty_rows=(1,), seed=0):
    """Hidden states giving peaked logits, labels with a prompt prefix, right padding and empty responses.

    Returns (hidden [2B, T, H], weight [V, H], bias [V], labels [2B, T], lengths [2B] of the unpadded rows,
    ref_chosen [B], ref_rejected [B]).
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    lengths = torch.randint(prompt + 1, T + 1, (2 * B,), generator=g)
    lengths[0] = T
    labels[:, :prompt] = IGNORE_INDEX
    for r in range(2 * B):
        labels[r, lengths[r]:] = IGNORE_INDEX
    for r in empty_rows:
        labels[r] = IGNORE_INDEX
    ref = torch.randn(2 * B, generator=g) * 3 - 30
    return hidden, weight, bias, labels, lengths, ref[:B], ref[B:]


def eager_dpo(hidden, weight, bias, labels, ref_c, ref_r, *, loss_type, average, dtype=None, **params):
    """Plain PyTorch DPO (`reference.fused_linear_dpo` in `dtype`, float64 for the truth): (DPOOutput, logps [2B],
    grads (h, W, b)).

    Differentiates only w.r.t. the policy tensors given (bias None: no bias)."""
    dtype = dtype or hidden.dtype
    h, w = hidden.to(dtype, copy=True).requires_grad_(), weight.to(dtype, copy=True).requires_grad_()
    b = None if bias is None else bias.to(dtype, copy=True).requires_grad_()
    out = reference.fused_linear_dpo(h, w, labels, bias=b, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                     loss_type=loss_type, average=average, ignore_index=IGNORE_INDEX, **params)
    inputs = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(out.loss, inputs)
    return out, torch.cat([out.chosen_logps, out.rejected_logps]), grads


def eager_truth_and_baseline(hidden, weight, bias, labels, ref_c, ref_r, **kwargs):
    """`eager_dpo` in float64 (the accuracy rule's truth) and in the inputs' dtype (its baseline)."""
    inputs = (hidden, weight, bias, labels, ref_c, ref_r)
    return eager_dpo(*inputs, dtype=torch.float64, **kwargs), eager_dpo(*inputs, **kwargs)


def run_fused(hidden, weight, bias, labels, ref_c, ref_r, *, loss_type, average, memory_budget=None,
              cu_seqlens=None, **params):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = dpo_kernels.fused_linear_dpo(h, w, labels, bias=b, cu_seqlens=cu_seqlens, ref_chosen_logps=ref_c,
                                       ref_rejected_logps=ref_r, loss_type=loss_type, average=average,
                                       memory_budget=memory_budget, **params)
    out.loss.backward()
    grads = [t.grad for t in (h, w, b) if t is not None]
    return out, grads


def assert_close_to_truth(out, truth, baseline, dtype, name):
    """The accuracy rule with the dtype's atol relative to the values' size (log-probs reach ~100, where one fp32
    ulp is 8e-6)."""
    atol = DTYPE_ATOL[dtype] * max(1.0, truth.detach().abs().max().item() if truth.numel() else 1.0)
    assert_within_rule(out, truth, baseline, atol=atol, name=name)


def check_against_truth(out, grads, truth, baseline, dtype, grad_names=("hidden", "weight", "bias")):
    t_out, t_logps, t_grads = truth
    b_out, b_logps, b_grads = baseline
    B = t_logps.numel() // 2
    assert out.loss.dtype == torch.float32 and out.chosen_logps.dtype == torch.float32
    assert_close_to_truth(out.loss, t_out.loss, b_out.loss, dtype, "loss")
    assert_close_to_truth(out.chosen_logps, t_logps[:B], b_logps[:B], dtype, "chosen_logps")
    assert_close_to_truth(out.rejected_logps, t_logps[B:], b_logps[B:], dtype, "rejected_logps")
    assert_close_to_truth(out.chosen_rewards, t_out.chosen_rewards, b_out.chosen_rewards, dtype, "chosen_rewards")
    assert_close_to_truth(out.rejected_rewards, t_out.rejected_rewards, b_out.rejected_rewards, dtype,
                          "rejected_rewards")
    assert_close_to_truth(out.losses, t_out.losses, b_out.losses, dtype, "losses")
    for name, g, tg, bg in zip(grad_names[: len(grads)], grads, t_grads, b_grads, strict=True):
        assert g is not None and g.dtype == dtype, f"{name}: gradient missing or not in {dtype}"
        assert_close_to_truth(g, tg, bg, dtype, f"grad_{name}")


def assert_token_logprobs_within_rule(logp, z, labels, *, atol):
    """`logp [N]`, each row's log-prob of its label from logits `z [N, V]`, by the accuracy rule: the truth from
    the float64 logits, the baseline plain PyTorch's log_softmax of the upcast fp32 logits."""
    truth, baseline = (torch.log_softmax(z.to(dtype), -1).gather(1, labels[:, None])[:, 0]
                       for dtype in (torch.float64, torch.float32))
    assert_within_rule(logp, truth, baseline, atol=atol, name="token logp")


def budget(tokens, V, dtype):
    """The memory_budget that gives chunks of `tokens` tokens."""
    return tokens * V * torch.tensor([], dtype=dtype).element_size()


# Modes: one resident chunk for the batch, resident chunks of whole pairs, streaming (chunks shorter than every
# pair), recompute.
MODES = {"resident": lambda T, V, dt: None, "pairs": lambda T, V, dt: budget(2 * T, V, dt),
         "streaming": lambda T, V, dt: budget(4, V, dt), "low": lambda T, V, dt: "low"}


# --- Log-probs from logits: inputs and the check of one op against the float64 reference.

# (dtype, atol): the kernel may differ from float64 by 2x plain PyTorch's error in that dtype plus atol. Every dtype
# reduces in fp32, and sequence sums reach |100| where one fp32 ulp is 7.6e-6, so atol is that for all three (a
# real bug, e.g. a wrong row's lse or a missed zero, is of the order of a softmax probability, >= 1e-4 here).
LOGPROBS_ATOL = [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]


def make_inputs(R, T, V, dtype, *, scale=3.0, prompt=2, empty_row=0):
    """Peaked logits, labels with a prompt prefix, right padding, and one row with no valid label."""
    logits = (torch.randn(R, T, V) * scale).to(dtype)
    labels = torch.randint(0, V, (R, T))
    labels[:, :prompt] = IGNORE_INDEX
    if T > 3:
        labels[-1, -2:] = IGNORE_INDEX
    if empty_row is not None and R > 1:
        labels[empty_row] = IGNORE_INDEX
    return logits, labels


def forward_backward(fn, logits, labels, upstream, **kwargs):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, **kwargs)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


def check_against_reference(name, logits, labels, upstream, atol, **kwargs):
    fn, ref_fn = getattr(dpo_kernels, name), getattr(reference, name)
    out, grad = forward_backward(fn, logits, labels, upstream, **kwargs)
    truth, truth_grad = forward_backward(ref_fn, logits.double(), labels, upstream, **kwargs)
    base, base_grad = forward_backward(ref_fn, logits, labels, upstream, **kwargs)
    assert out.dtype == torch.float32 and grad.dtype == logits.dtype
    assert_within_rule(out, truth, base, atol=atol, name=f"{name} forward")
    assert_within_rule(grad, truth_grad, base_grad, atol=atol, name=f"{name} dlogits")
    return out, grad


# --- TRL trainers: one step's loss, gradients and logged metrics, compared with stock TRL's.

TRL_METRIC_ATOL = 1e-6


def assert_same_trl_logs(got: dict, want: dict):
    """Logged metric dicts of two TRL trainers: the same keys, every number within `assert_close`."""
    assert set(got) == set(want), f"logged keys differ: {sorted(set(got) ^ set(want))}"
    for key, value in want.items():
        if isinstance(value, (int, float)):
            assert_close(f"metric {key}", got[key], value, atol=TRL_METRIC_ATOL)


def trl_loss_and_grads(trainer, batch):
    """Loss, parameter gradients and logged metrics of one `compute_loss` + backward of a TRL trainer on `batch`."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_same_trl_step(got, want, what: str):
    """Two `trl_loss_and_grads` results: the same loss, logged metrics and gradients (of the same parameters)."""
    (got_loss, got_grads, got_logs), (want_loss, want_grads, want_logs) = got, want
    assert_close(f"{what} loss", got_loss, want_loss)
    assert_same_trl_logs(got_logs, want_logs)
    assert set(got_grads) == set(want_grads), f"{what}: gradients of different parameters"
    for name in want_grads:
        assert_close(f"{what} grad {name}", got_grads[name], want_grads[name])


def trl_train_logs(trainer):
    """The log history of `trainer.train()` without its timings."""
    trainer.train()
    return [{k: v for k, v in log.items() if "runtime" not in k and "per_second" not in k}
            for log in trainer.state.log_history]


def brute_force_mask(batch, window=None):
    """The shared-prompt attention rule written out position by position, for a pair or a group batch: a response
    position sees its document's prompt and its own earlier tokens, a prompt position the earlier prompt, padding
    earlier padding; with `window`, only keys fewer than `window` positions back. Returns bool `[rows, 1, T, T]`."""
    rows, T = batch.input_ids.shape
    out = torch.zeros(rows, 1, T, T, dtype=torch.bool)
    doc, seg, pos = batch.document_ids, batch.segment_ids, batch.position_ids
    for b in range(rows):
        for q in range(T):
            for k in range(q + 1):
                if doc[b, q] != doc[b, k]:
                    continue
                if seg[b, q] == PAD:
                    ok = seg[b, k] == PAD
                elif seg[b, q] == PROMPT:
                    ok = seg[b, k] == PROMPT
                else:
                    ok = seg[b, k] in (PROMPT, seg[b, q])  # never another response
                if ok and (window is None or pos[b, q] - pos[b, k] < window):
                    out[b, 0, q, k] = True
    return out


class OpCall(NamedTuple):
    """One aten op as `OpLog` saw it: the op (an OpOverload), and `(shape, dtype)` of each tensor among its positional
    arguments and of each tensor it returned."""
    op: torch._ops.OpOverload
    inputs: list[tuple[tuple[int, ...], torch.dtype]]
    outputs: list[tuple[tuple[int, ...], torch.dtype]]

    @property
    def name(self) -> str:
        """The op's name without namespace or overload: `"mm"` for `aten.mm.default`."""
        return self.op.overloadpacket.__name__


def _tensor_facts(values) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in values if isinstance(t, torch.Tensor)]


class OpLog(TorchDispatchMode):
    """Records every aten op run inside the block as an `OpCall`, in order, in `calls`; shapes and dtypes only, so
    that the log holds no tensor alive."""

    def __init__(self):
        super().__init__()
        self.calls: list[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append(OpCall(func, _tensor_facts(args), _tensor_facts(results)))
        return out

    def count(self, name: str) -> int:
        """How many calls ran the op `name` (any overload), e.g. `"_local_scalar_dense"`: a host sync."""
        return sum(1 for call in self.calls if call.name == name)


def right_padded_rows(rows):
    """`rows`: `(tokens, prompt_length)` each, one unshared row `[prompt | response]`. Returns int64 `input_ids`,
    `attention_mask` and `labels`, each `[len(rows), T]` right-padded to the longest row; labels are IGNORE_INDEX on
    the prompt and the padding (the model's shift applies later)."""
    T = max(len(tokens) for tokens, _ in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX)
    for i, (tokens, prompt) in enumerate(rows):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        labels[i, prompt: len(tokens)] = torch.tensor(tokens[prompt:], dtype=torch.long)
    return ids, mask, labels


def unshared_rows_logps(model, rows, *, average=False):
    """Per-row log-probs `[len(rows)]` of the unshared `rows` (`(tokens, prompt_length)` each, as
    `right_padded_rows` takes them): batched and right-padded in the model's dtype (as a trainer runs them); one row
    at a time without padding in float64 (the truth: transformers' float64 sliding-window masks add the dtype's
    minimum twice at padding, giving -inf rows and NaN that spread through the padded keys)."""
    ids, mask, labels = right_padded_rows(rows)
    if next(model.parameters()).dtype != torch.float64:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return reference.sequence_logprobs(logits, labels, average=average)
    out = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        logits = model(input_ids=ids[i: i + 1, :n], use_cache=False).logits
        out.append(reference.sequence_logprobs(logits, labels[i: i + 1, :n], average=average))
    return torch.cat(out)


def unshared_rows_truth_and_baseline(model, rows, *, average=False):
    """The unshared rows' log-probs from a float64 copy of `model` (the truth) and from `model` (the baseline)."""
    with torch.no_grad():
        baseline = unshared_rows_logps(model, rows, average=average)
        truth = unshared_rows_logps(copy.deepcopy(model).double(), rows, average=average)
    return truth, baseline


def shared_logps(model, batch, path, *, average=False):
    """Per-sequence log-probs of a shared-prompt `batch` through `model`: `path="logits"` from the full logits,
    `"fused"` from the backbone's hidden states and the output head."""
    if path == "logits":
        return sequence_logprobs_from_logits(shared_logits(model, batch), batch, average=average)
    weight, bias = output_head(model)
    hidden = shared_backbone_hidden_states(model, batch)
    return sequence_logprobs_from_hidden(hidden, weight, batch, bias=bias, average=average)


def assert_shared_logps_within_rule(model, batch, truth, baseline, name):
    """Both paths of `shared_logps` on the shared-prompt `batch`: float32 `[S]` log-probs within the accuracy rule
    against the unshared rows' `truth` (float64) and `baseline`. Returns them by path."""
    out = {}
    with torch.no_grad():
        for path in ("logits", "fused"):
            out[path] = shared_logps(model, batch, path)
            assert out[path].shape == truth.shape, (path, out[path].shape, truth.shape)
            assert_close_to_truth(out[path], truth, baseline, torch.float32, f"{name} {path} path")
    return out


def assert_shared_grads_within_rule(grads, model, name=""):
    """`grads(model, shared)` returns `(loss, {parameter name: gradient})` of one loss on the shared-prompt layout
    (`shared=True`) or on the unshared rows. The shared layout's loss and gradients from `model` must be within the
    accuracy rule against the unshared rows' from a float64 copy, the unshared rows' from `model` the baseline."""
    truth_loss, truth = grads(copy.deepcopy(model).double(), False)
    base_loss, base = grads(model, False)
    loss, got = grads(model, True)
    assert_close_to_truth(loss, truth_loss, base_loss, torch.float32, f"{name}loss")
    for param in truth:
        assert_close_to_truth(got[param], truth[param], base[param], torch.float32, f"{name}grad {param}")


def assert_flex_attention_within_rule(model, batch, truth, baseline, window):
    """`model` on flex attention: its log-probs on the shared-prompt `batch` are within the accuracy rule, and the
    BlockMask(s) it builds (one, or a dict by layer kind) hold the rule of the batch's tensor masks: each `mask_mod`
    equals `batch.attention_mask`, with `window` on sliding layers."""
    with torch.no_grad():
        logps = sequence_logprobs_from_logits(shared_logits(model, batch), batch)
    assert_close_to_truth(logps, truth, baseline, torch.float32, f"{type(model).__name__} flex")
    masks = shared_attention_mask(model, batch)
    masks = masks if isinstance(masks, dict) else {"full_attention": masks}
    rows, T = batch.input_ids.shape
    b, q, k = torch.meshgrid(torch.arange(rows), torch.arange(T), torch.arange(T), indexing="ij")
    for kind, block_mask in masks.items():
        assert block_mask.shape == (rows, 1, T, T), (kind, block_mask.shape)
        dense = block_mask.mask_mod(b, torch.zeros_like(b), q, k).unsqueeze(1)
        assert torch.equal(dense, batch.attention_mask(window if kind == "sliding_attention" else None)), kind
