"""torch.compile end to end: the public entries compile with `fullgraph=True` (no graph break), give eager's loss,
metrics and gradients bit for bit (the compiled graph runs the same kernels through the custom ops), recompile at
most once as batch shapes vary, and their custom ops pass `torch.library.opcheck`.

Compiles are slow on a small CPU runner: shapes are tiny, most cases use the "aot_eager" backend (dynamo and
AOTAutograd, which is where graph breaks, fakes and the autograd registration are exercised), one uses inductor.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dpo_kernels
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear import ops
from dpo_kernels.loss_op.spec import check_loss_settings, op_params
from tests.helpers import MODES, make_batch, make_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

H, V = 8, 37
DPO_FIELDS = ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_accuracy",
              "reward_margin", "losses", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths",
              "rejected_lengths", "chosen_entropy_sum", "rejected_entropy_sum", "chosen_top1_count",
              "rejected_top1_count")


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _assert_same(got, want, name):
    if want is None:
        assert got is None, f"{name}: expected None"
        return
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{name}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    assert torch.equal(got, want), \
        f"{name}: compiled {got.flatten()[:4].tolist()} != eager {want.flatten()[:4].tolist()}"


def _fused_step(module):
    def step(hidden, weight, bias, labels, ref_c, ref_r):
        return module(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)

    return step


def _compare_fused(step, compiled, hidden, weight, bias, labels, ref_c, ref_r, scale=1.0):
    """Runs `step` eagerly and `compiled` on fresh leaves of the same tensors, and the backward of `scale * loss`;
    asserts every output and gradient equal."""
    eager_leaves, compiled_leaves = _leaves(hidden, weight, bias), _leaves(hidden, weight, bias)
    want = step(*eager_leaves, labels, ref_c, ref_r)
    got = compiled(*compiled_leaves, labels, ref_c, ref_r)
    (want.loss * scale).backward()
    (got.loss * scale).backward()
    for name, g, w in zip(DPO_FIELDS, got, want, strict=True):
        _assert_same(g, w, name)
        assert g is None or name == "loss" or not g.requires_grad, f"{name} carries gradient"
    for name, g, w in zip(("hidden", "weight", "bias"), compiled_leaves, eager_leaves, strict=True):
        if w is not None:
            _assert_same(g.grad, w.grad, f"grad_{name}")


@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
def test_fused_linear_dpo_loss_fullgraph_equals_eager(mode):
    """Every plan: gradients formed in the forward (resident, streaming) and the recompute backward (low); an
    upstream gradient that is not 1; bias and token stats."""
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, 7, H, V)
    module = dpo_kernels.FusedLinearDPOLoss(beta=0.2, memory_budget=MODES[mode](7, V, hidden.dtype), token_stats=True)
    step = _fused_step(module)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    _compare_fused(step, compiled, hidden, weight, bias, labels, ref_c, ref_r, scale=0.37)


def test_fused_linear_dpo_reference_model_and_packed_fullgraph():
    """The reference model's hidden states through the engine, and packed sequences with `cu_seqlens`."""
    hidden, weight, _, labels, _, _, _ = make_batch(2, 6, H, V, seed=1)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    cu_seqlens = torch.arange(0, 4 * 6 + 1, 6)

    def step(hidden, weight, ref_hidden):
        return dpo_kernels.fused_linear_dpo(hidden.flatten(0, 1), weight, labels.flatten(), cu_seqlens=cu_seqlens,
                                            ref_hidden=ref_hidden.flatten(0, 1), loss_type=["sigmoid", "sft"])

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (h_eager, w_eager), (h_compiled, w_compiled) = _leaves(hidden, weight), _leaves(hidden, weight)
    want, got = step(h_eager, w_eager, ref_hidden), compiled(h_compiled, w_compiled, ref_hidden)
    want.loss.backward()
    got.loss.backward()
    for name, g, w in zip(DPO_FIELDS, got, want, strict=True):
        _assert_same(g, w, name)
    _assert_same(h_compiled.grad, h_eager.grad, "grad_hidden")
    _assert_same(w_compiled.grad, w_eager.grad, "grad_weight")


def test_fused_recompiles_stay_bounded_as_shapes_vary():
    """A new batch size and length after the first compile turns the graph dynamic (one recompile); later shapes
    reuse it. A bad label still raises from inside the compiled graph."""
    torch._dynamo.reset()  # the other tests compiled the same `step` code with other modules
    module = dpo_kernels.FusedLinearDPOLoss()
    step = _fused_step(module)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for B, T in ((2, 7), (3, 9), (2, 11), (4, 5)):
        hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=B * T)
        _compare_fused(step, compiled, hidden, weight, bias, labels, ref_c, ref_r)
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 batch shapes"
    labels[0, -1] = V
    with pytest.raises(ValueError, match="outside"):
        compiled(*_leaves(hidden, weight, bias), labels, ref_c, ref_r)


def test_fused_inductor_equals_eager():
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, 5, H, V, seed=3)
    module = dpo_kernels.FusedLinearDPOLoss(loss_type="ipo", beta=0.5)
    step = _fused_step(module)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    _compare_fused(step, compiled, hidden, weight, bias, labels, ref_c, ref_r)


@pytest.mark.parametrize("average", [False, True])
def test_dpo_loss_module_and_sequence_logprobs_fullgraph(average):
    logits, labels = make_inputs(4, 6, V, torch.float32)
    ref_c, ref_r = torch.randn(2) - 20, torch.randn(2) - 20
    module = dpo_kernels.DPOLoss(beta=0.3, average=average)

    def step(logits):
        out = module(logits, labels, ref_c, ref_r)
        logps = dpo_kernels.sequence_logprobs(logits, labels, average=average)
        loss = dpo_kernels.dpo_loss(logps[:2], logps[2:], ref_c, ref_r, loss_type="hinge").loss
        return out, logps, out.loss + loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (eager_logits,), (compiled_logits,) = _leaves(logits), _leaves(logits)
    want, got = step(eager_logits), compiled(compiled_logits)
    want[2].backward()
    got[2].backward()
    for name, g, w in zip(DPO_FIELDS, got[0], want[0], strict=True):
        _assert_same(g, w, name)
    _assert_same(got[1].detach(), want[1].detach(), "sequence_logprobs")
    _assert_same(compiled_logits.grad, eager_logits.grad, "grad_logits")


def test_token_logprobs_ops_opcheck():
    logits, labels = make_inputs(3, 5, V, torch.float32)
    for shift in (True, False):
        torch.library.opcheck(torch.ops.dpo_kernels.token_logprobs,
                              (logits.clone().requires_grad_(), labels, IGNORE_INDEX, shift))
    tok, lse = torch.ops.dpo_kernels.token_logprobs(logits, labels, IGNORE_INDEX, True)
    torch.library.opcheck(torch.ops.dpo_kernels.token_logprobs_backward,
                          (logits, labels, lse, torch.randn_like(tok), IGNORE_INDEX, True))


def _fused_op_args(hidden, weight, bias, labels, *, ref=(None, None), ref_hidden=None, low_memory=False,
                   token_stats=False, loss_type="sigmoid"):
    spec = check_loss_settings(loss_type, beta=0.1)
    codes = [dpo_kernels.LOSS_TYPES.index(name) for name in spec.loss_types]
    needs = [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
    return (hidden, weight, bias, labels, None, None, None, None, 0, *ref, ref_hidden, None, None, codes,
            list(op_params(spec)), False, IGNORE_INDEX, True, None, low_memory, token_stats, needs, True)


@pytest.mark.parametrize("case", ["plain", "bias_stats_reference_model", "low"])
def test_fused_linear_dpo_op_opcheck(case):
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, 5, H, V, seed=4)
    hidden, weight, bias = _leaves(hidden, weight, bias)
    if case == "plain":
        args = _fused_op_args(hidden, weight, None, labels, ref=(ref_c, ref_r))
    elif case == "low":
        args = _fused_op_args(hidden, weight, None, labels, ref=(ref_c, ref_r), low_memory=True,
                              loss_type=["aot", "sft"])
    else:
        args = _fused_op_args(hidden, weight, bias, labels, ref_hidden=hidden.detach() * 0.9, token_stats=True)
    torch.library.opcheck(torch.ops.dpo_kernels.fused_linear_dpo, args)


def test_backward_op_needs_the_forwards_own_handle():
    with pytest.raises(RuntimeError, match="handle"):
        ops.fused_linear_dpo_backward_op(torch.tensor([-1]), torch.tensor(1.0), [2, 3, H], torch.float32, [V, H],
                                         torch.float32, torch.device("cpu"), [True, False, False])


def test_the_device_plans_compile_check_runs_at_tiny_size(tmp_path):
    """`benchmarks/compile_check.py`, the GPU slot's compile stage, at a tiny size: same bits, at most two graphs."""
    import importlib.util
    import json

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("compile_check", REPO_ROOT / "benchmarks" / "compile_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--output-dir", str(tmp_path), "--tiny", "--device", "cpu", "--iters", "1"]) == 0
    result = json.loads((tmp_path / "compile_check.json").read_text())
    assert result["ok"] and result["graphs_compiled"] <= 2
    assert [r["same_bits"] for r in result["rows"]] == [True, True]
