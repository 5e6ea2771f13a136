"""A PEFT LoRA adapter on the lm_head inside the fused engine, against PEFT's own forward of the same layer.

The truth is PEFT's `lora.Linear` in float64 (its logits, then the plain-PyTorch log-probs and DPO loss), the
baseline the same in the inputs' dtype; every mode of the engine is checked: loss, log-probs and the gradients of
the hidden states and of the adapter's A and B, and the frozen weight gets none.
"""
import copy

import pytest
import torch

import dpo_kernels
from dpo_kernels import LoraHead, reference
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.cost_model import estimate_step_cost
from dpo_kernels.fused_linear.dry_run import dry_run
from dpo_kernels.fused_linear.plan import plan_dpo_step
from dpo_kernels.fused_linear.trace import Alloc
from tests.helpers import MODES, assert_close_to_truth, make_batch

peft = pytest.importorskip("peft", reason="PEFT is optional (pip install -e '.[trl]')")

B, T, H, V, R = 2, 9, 20, 61, 3


def peft_head(weight, bias, *, trainable_base=False, seed=0):
    """PEFT's LoRA layer over a `[V, H]` linear head, with random (not zero) A and B."""
    base = torch.nn.Linear(H, V, bias=bias is not None)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=R, lora_alpha=5, target_modules=["lm_head"], init_lora_weights=False)
    layer = peft.get_peft_model(torch.nn.ModuleDict({"lm_head": base}), config).base_model.model["lm_head"]
    for p in base.parameters():
        p.requires_grad_(trainable_base)
    return layer


def adapter_of(layer) -> LoraHead:
    return LoraHead(layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])


def head_params(layer):
    params = {"lora_a": layer.lora_A["default"].weight, "lora_b": layer.lora_B["default"].weight}
    params.update({f"base_{n}": p for n, p in layer.base_layer.named_parameters() if p.requires_grad})
    return params


def peft_dpo(layer, hidden, labels, ref_c, ref_r, dtype, loss_type):
    """PEFT's head in `dtype`: (loss, logps [2B], {name: grad}) of the plain-PyTorch DPO step."""
    layer = copy.deepcopy(layer).to(dtype)
    h = hidden.to(dtype, copy=True).requires_grad_()
    logps = reference.sequence_logprobs(layer(h), labels)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    out = reference.dpo_loss(logps[:B], logps[B:], ref_c, ref_r, loss_type=loss_type, chosen_lengths=counts[:B],
                             rejected_lengths=counts[B:])
    params = head_params(layer)
    grads = torch.autograd.grad(out.loss, [h, *params.values()])
    return out.loss, logps, dict(zip(["hidden", *params], grads, strict=True))


def check(got_loss, got_logps, got_grads, truth, baseline, dtype):
    assert_close_to_truth(got_loss, truth[0], baseline[0], dtype, "loss")
    assert_close_to_truth(got_logps, truth[1], baseline[1], dtype, "logps")
    assert set(got_grads) == set(truth[2])
    for name, g in got_grads.items():
        assert g is not None and g.dtype == dtype, f"{name}: gradient missing or not in {dtype}"
        assert_close_to_truth(g, truth[2][name], baseline[2][name], dtype, f"grad_{name}")


# sigmoid is tied (a streaming pair runs once), hinge is not (it runs twice)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_dpo_matches_peft_in_every_mode(mode, loss_type):
    hidden, weight, _, labels, _, ref_c, ref_r = make_batch(B, T, H, V)
    layer = peft_head(weight, None)
    truth = peft_dpo(layer, hidden, labels, ref_c, ref_r, torch.float64, loss_type)
    baseline = peft_dpo(layer, hidden, labels, ref_c, ref_r, torch.float32, loss_type)
    h = hidden.clone().requires_grad_()
    out = dpo_kernels.fused_linear_dpo(h, layer.base_layer.weight, labels, ref_chosen_logps=ref_c,
                                       ref_rejected_logps=ref_r, loss_type=loss_type,
                                       memory_budget=MODES[mode](T, V, torch.float32), lora=adapter_of(layer))
    out.loss.backward()
    assert layer.base_layer.weight.grad is None, "the frozen weight got a gradient"
    grads = {"hidden": h.grad, **{n: p.grad for n, p in head_params(layer).items()}}
    check(out.loss, torch.cat([out.chosen_logps, out.rejected_logps]), grads, truth, baseline, torch.float32)


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_trained_weight_and_bias_beside_the_adapter(mode):
    """A head whose weight and bias also train (and a FusedLinearDPOLoss module): their gradients are the plain
    head's, the adapter's are exact."""
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=1)
    layer = peft_head(weight, bias, trainable_base=True, seed=1)
    truth = peft_dpo(layer, hidden, labels, ref_c, ref_r, torch.float64, "sigmoid")
    baseline = peft_dpo(layer, hidden, labels, ref_c, ref_r, torch.float32, "sigmoid")
    h = hidden.clone().requires_grad_()
    loss_fn = dpo_kernels.FusedLinearDPOLoss(memory_budget=MODES[mode](T, V, torch.float32))
    out = loss_fn(h, layer.base_layer.weight, labels, bias=layer.base_layer.bias, ref_chosen_logps=ref_c,
                  ref_rejected_logps=ref_r, lora=adapter_of(layer))
    out.loss.backward()
    grads = {"hidden": h.grad, **{n: p.grad for n, p in head_params(layer).items()}}
    check(out.loss, torch.cat([out.chosen_logps, out.rejected_logps]), grads, truth, baseline, torch.float32)


@pytest.mark.parametrize("memory_budget", [None, 4 * V * 4])
def test_sequence_logprobs_match_peft_for_any_upstream_gradient(memory_budget):
    hidden, weight, _, labels, _, _, _ = make_batch(B, T, H, V, seed=2)
    layer = peft_head(weight, None, seed=2)
    upstream = torch.linspace(-1.5, 2.0, 2 * B)

    def peft_logps(dtype):
        head = copy.deepcopy(layer).to(dtype)
        h = hidden.to(dtype, copy=True).requires_grad_()
        logps = reference.sequence_logprobs(head(h), labels)
        params = head_params(head)
        grads = torch.autograd.grad((logps * upstream.to(dtype)).sum(), [h, *params.values()])
        return logps, dict(zip(["hidden", *params], grads, strict=True))

    (truth, truth_grads), (base, base_grads) = peft_logps(torch.float64), peft_logps(torch.float32)
    h = hidden.clone().requires_grad_()
    logps = dpo_kernels.linear_sequence_logprobs(h, layer.base_layer.weight, labels, memory_budget=memory_budget,
                                                 lora=adapter_of(layer))
    (logps * upstream).sum().backward()
    assert_close_to_truth(logps, truth, base, torch.float32, "logps")
    grads = {"hidden": h.grad, **{n: p.grad for n, p in head_params(layer).items()}}
    for name, g in grads.items():
        assert_close_to_truth(g, truth_grads[name], base_grads[name], torch.float32, f"grad_{name}")
    assert layer.base_layer.weight.grad is None


def test_bfloat16_within_the_accuracy_rule():
    hidden, weight, _, labels, _, ref_c, ref_r = make_batch(B, T, H, V, seed=4)
    layer = peft_head(weight, None, seed=4)
    truth = peft_dpo(layer, hidden, labels, ref_c, ref_r, torch.float64, "sigmoid")
    baseline = peft_dpo(layer, hidden, labels, ref_c, ref_r, torch.bfloat16, "sigmoid")
    head = copy.deepcopy(layer).to(torch.bfloat16)
    h = hidden.to(torch.bfloat16).requires_grad_()
    out = dpo_kernels.fused_linear_dpo(h, head.base_layer.weight, labels, ref_chosen_logps=ref_c,
                                       ref_rejected_logps=ref_r, lora=adapter_of(head))
    out.loss.backward()
    grads = {"hidden": h.grad, **{n: p.grad for n, p in head_params(head).items()}}
    check(out.loss, torch.cat([out.chosen_logps, out.rejected_logps]), grads, truth, baseline, torch.bfloat16)


def test_bad_adapters_are_refused():
    hidden, weight, _, labels, _, _, _ = make_batch(B, T, H, V)
    a, b = torch.randn(R, H), torch.randn(V, R)
    for lora, match in [(LoraHead(a[:, 1:], b, 1.0), "do not fit"), (LoraHead(a, b[1:], 1.0), "do not fit"),
                        (LoraHead(a.double(), b, 1.0), "lora.a is torch.float64"),
                        (LoraHead(a, b, float("nan")), "finite"), ((a, b, 1.0), "LoraHead")]:
        with pytest.raises(ValueError, match=match):
            dpo_kernels.fused_linear_dpo(hidden, weight, labels, lora=lora)
        with pytest.raises(ValueError, match=match):
            dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, lora=lora)


def test_models_count_the_rank_r_terms_and_no_vh_copy():
    """One resident chunk: the GEMM FLOPs are the frozen head's 4NHV plus 2NR(H + V) forward and 4NR(H + V)
    backward; no tensor the size of `[V, H]` is allocated (C < H here, so the logits buffer is smaller)."""
    H_, V_, r, pairs = 512, 1000, 8, [60, 40]
    N = sum(pairs)
    cost = estimate_step_cost(2 * 64, pairs, H_, V_, torch.bfloat16, lora_rank=r)
    assert cost.gemm_flops == 4 * N * H_ * V_ + 6 * N * r * (H_ + V_)
    names = {k.name for k in cost.kernels}
    assert {"LoRA down GEMM", "LoRA logits GEMM", "LoRA D B GEMM", "LoRA hidden-gradient GEMM",
            "LoRA A-gradient GEMM", "LoRA B-gradient GEMM"} <= names
    plan = plan_dpo_step(pairs, V_, 2, None, "sigmoid")
    trace = dry_run(plan, 2 * 64, H_, V_, torch.bfloat16, pair_lengths=pairs, lora_rank=r)
    assert max(e.nbytes for e in trace.of(Alloc)) < V_ * H_ * 2
    # The fp32 accumulators of A's and B's gradients are among the step's tensors.
    assert {r * H_ * 4, V_ * r * 4} <= {e.nbytes for e in trace.of(Alloc)}
