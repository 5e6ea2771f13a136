"""The nn.Modules: DPOLoss (from logits) against the float64 reference, and FusedLinearDPOLoss agreeing with it."""
import pytest
import torch

import dpo_kernels
from dpo_kernels import reference
from tests.helpers import (
    IGNORE_INDEX,
    LOSS_PARAMS,
    assert_close_to_truth,
    make_batch,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _reference_dpo(logits, labels, ref_c, ref_r, loss_type, average, **params):
    logps = reference.sequence_logprobs(logits, labels, average=average)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    B = labels.shape[0] // 2
    rc = None if ref_c is None else ref_c.to(logps.dtype)
    rr = None if ref_r is None else ref_r.to(logps.dtype)
    out = reference.dpo_loss(logps[:B], logps[B:], rc, rr, loss_type=loss_type, chosen_lengths=counts[:B],
                             rejected_lengths=counts[B:], average=average, **params)
    return out, logps


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", ["sigmoid", "sft"]])
def test_dpo_loss_module_matches_reference(loss_type, dtype, average):
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(3, 9, 24, 1000, seed=41)
    if loss_type == "simpo":
        ref_c = ref_r = None
    params = {"loss_weights": [1.0, 0.5]} if isinstance(loss_type, list) else LOSS_PARAMS.get(loss_type, {})
    logits = torch.nn.functional.linear(hidden, weight, bias).to(dtype)
    truth_logits = logits.double().requires_grad_()
    truth, truth_logps = _reference_dpo(truth_logits, labels, ref_c, ref_r, loss_type, average, **params)
    (truth_grad,) = torch.autograd.grad(truth.loss, truth_logits)
    base_logits = logits.clone().requires_grad_()
    base, base_logps = _reference_dpo(base_logits, labels, ref_c, ref_r, loss_type, average, **params)
    (base_grad,) = torch.autograd.grad(base.loss, base_logits)

    x = logits.clone().requires_grad_()
    module = dpo_kernels.DPOLoss(beta=0.1, loss_type=loss_type, average=average, **params)
    out = module(x, labels, ref_c, ref_r)
    out.loss.backward()
    assert isinstance(out, dpo_kernels.DPOOutput)
    assert_close_to_truth(out.loss, truth.loss, base.loss, dtype, "loss")
    assert_close_to_truth(out.chosen_logps, truth_logps[:3], base_logps[:3], dtype, "chosen_logps")
    assert_close_to_truth(out.rejected_rewards, truth.rejected_rewards, base.rejected_rewards, dtype, "rejected_rw")
    assert_close_to_truth(x.grad, truth_grad, base_grad, dtype, "grad_logits")
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    assert out.chosen_lengths.tolist() == counts[:3].tolist() and out.rejected_lengths.tolist() == counts[3:].tolist()
    assert not out.chosen_logps.requires_grad and not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("memory_budget", [None, 4 * 1000 * 4, "low"])
def test_fused_module_agrees_with_logits_module(memory_budget):
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, 10, 24, 1000, seed=42)
    kwargs = dict(beta=0.3, loss_type="nca_pair", average=True)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    from_logits = dpo_kernels.DPOLoss(**kwargs)(torch.nn.functional.linear(h1, w1, b1), labels, ref_c, ref_r)
    from_logits.loss.backward()
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    fused_module = dpo_kernels.FusedLinearDPOLoss(memory_budget=memory_budget, **kwargs)
    fused = fused_module(h2, w2, labels, bias=b2, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    fused.loss.backward()
    for name in dpo_kernels.DPOOutput._fields:
        a, b = getattr(fused, name), getattr(from_logits, name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for a, b, name in ((h2.grad, h1.grad, "hidden"), (w2.grad, w1.grad, "weight"), (b2.grad, b1.grad, "bias")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)
    assert "nca_pair" in repr(fused_module)


def test_fused_module_token_stats_match_the_functional():
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, 10, 24, 1000, seed=43)
    module = dpo_kernels.FusedLinearDPOLoss(beta=0.2, memory_budget="low", token_stats=True)
    out = module(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    want = dpo_kernels.fused_linear_dpo(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c,
                                        ref_rejected_logps=ref_r, beta=0.2, token_stats=True)
    for name in ("chosen_entropy_sum", "rejected_entropy_sum", "chosen_top1_count", "rejected_top1_count"):
        got, expected = getattr(out, name), getattr(want, name)
        assert got is not None and got.shape == (2,), name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
    # The empty chosen response (row 1) has no token: nothing to sum.
    assert out.rejected_entropy_sum[1] > 0 and out.chosen_entropy_sum[1] == 0 and out.chosen_top1_count[1] == 0


def test_dpo_loss_module_bad_input():
    logits = torch.randn(3, 5, 50)
    labels = torch.randint(0, 50, (3, 5))
    with pytest.raises(ValueError, match="even"):
        dpo_kernels.DPOLoss()(logits, labels)
    with pytest.raises(ValueError, match="labels"):
        dpo_kernels.DPOLoss()(logits[:2], labels[:2, :4])
    with pytest.raises(ValueError, match="both"):
        dpo_kernels.DPOLoss()(logits[:2], labels[:2], torch.zeros(1), None)


def test_dpo_loss_module_checks_labels_once(monkeypatch):
    """The label-range check is a reduction plus a device sync on CUDA: one per step, not one per layer of glue."""
    from dpo_kernels import validation as _validation

    calls = []
    real = _validation.check_labels_in_range

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_validation, "check_labels_in_range", counting)
    logits = torch.randn(4, 6, 50)
    labels = torch.randint(0, 50, (4, 6))
    dpo_kernels.DPOLoss()(logits, labels)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="outside"):
        dpo_kernels.DPOLoss()(logits, labels.masked_fill(labels == labels[0, 3], 50))


def _mean_chosen_token_nll(logits, labels):
    tok = reference.token_logprobs(logits.double(), labels)
    B = labels.shape[0] // 2
    return -tok[:B].sum() / (labels[:B, 1:] != IGNORE_INDEX).sum()


@pytest.mark.parametrize("average", [False, True])
def test_dpo_loss_module_sft_is_the_mean_chosen_token_nll(average):
    """With or without `average`, the sft term is the NLL per chosen token of the batch (not divided by the lengths
    a second time when the log-probs are already means)."""
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(3, 9, 24, 100, seed=44)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    out = dpo_kernels.DPOLoss(loss_type="sft", average=average)(logits, labels, ref_c, ref_r)
    torch.testing.assert_close(out.loss.double(), _mean_chosen_token_nll(logits, labels), rtol=1e-5, atol=1e-6)


def test_fused_module_sft_average_is_the_mean_chosen_token_nll():
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(3, 9, 24, 100, seed=44)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    out = dpo_kernels.FusedLinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[0.0, 1.0], average=True)(
        hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    torch.testing.assert_close(out.loss.double(), _mean_chosen_token_nll(logits, labels), rtol=1e-5, atol=1e-6)


def test_dpo_loss_module_checks_settings_before_the_logits(monkeypatch):
    """Bad hyper-parameters or reference log-probs fail before the pass over the logits, and settings already at
    construction."""
    import dpo_kernels.losses as losses

    passes = []
    monkeypatch.setattr(losses, "sequence_logprobs", lambda *args, **kwargs: passes.append(1))
    logits, labels = torch.randn(4, 6, 50), torch.randint(0, 50, (4, 6))
    with pytest.raises(ValueError, match="beta"):
        dpo_kernels.DPOLoss(beta=-0.1)
    module = dpo_kernels.DPOLoss()
    for attribute, value, message in (("beta", 0.0, "beta"), ("label_smoothing", 1.5, "label_smoothing"),
                                      ("loss_type", "kto", "loss_type"), ("average", "yes", "average")):
        bad = dpo_kernels.DPOLoss()
        setattr(bad, attribute, value)
        with pytest.raises(ValueError, match=message):
            bad(logits, labels)
    for ref_c, ref_r, message in ((torch.zeros(3), torch.zeros(3), "shape"),
                                  (torch.zeros(2, dtype=torch.long), torch.zeros(2), "dtype"),
                                  (torch.zeros(2, device="meta"), torch.zeros(2, device="meta"), "meta"),
                                  (torch.zeros(2), None, "both")):
        with pytest.raises(ValueError, match=message):
            module(logits, labels, ref_c, ref_r)
    assert not passes


def test_meta_tensors_get_a_clear_error():
    """Shapes alone cannot run these modules (the labels' values are read up front): one ValueError naming the meta
    tensor rather than `Tensor.item()` failing inside a check."""
    labels = torch.zeros(2, 5, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="logits is a meta tensor"):
        dpo_kernels.DPOLoss()(torch.randn(2, 5, 11, device="meta"), labels)
    with pytest.raises(ValueError, match="labels is a meta tensor"):
        dpo_kernels.FusedLinearDPOLoss()(torch.randn(2, 5, 8, device="meta"), torch.randn(11, 8, device="meta"),
                                         labels)


def _composed(hidden, weight, bias, labels, ref_c, ref_r, loss_type, average, **params):
    """linear -> reference.sequence_logprobs -> reference.dpo_loss, written out: what the eager oracle is made of."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logps = reference.sequence_logprobs(logits, labels, average=average)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    B = labels.shape[0] // 2
    out = reference.dpo_loss(logps[:B], logps[B:], ref_c, ref_r, loss_type=loss_type, chosen_lengths=counts[:B],
                             rejected_lengths=counts[B:], average=average, **params)
    return out, logps, counts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type, average", [("sigmoid", False), ("ipo", True), (["robust", "sft"], True),
                                                ("simpo", False)], ids=["sigmoid", "ipo-avg", "robust+sft-avg",
                                                                        "simpo"])
def test_reference_fused_linear_dpo_is_the_composed_oracle(loss_type, average, dtype):
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(3, 9, 24, 100, seed=45)
    if loss_type == "simpo":
        ref_c = ref_r = None
    params = {"label_smoothing": [0.1, 0.0]} if isinstance(loss_type, list) else LOSS_PARAMS.get(loss_type, {})
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    got = reference.fused_linear_dpo(leaves[0], leaves[1], labels, bias=leaves[2], ref_chosen_logps=ref_c,
                                     ref_rejected_logps=ref_r, loss_type=loss_type, average=average, **params)
    got_grads = torch.autograd.grad(got.loss, leaves)
    want, want_logps, counts = _composed(*leaves, labels, ref_c, ref_r, loss_type, average, **params)
    want_grads = torch.autograd.grad(want.loss, leaves)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert isinstance(got, dpo_kernels.DPOOutput) and got.loss.dtype == compute
    for name in ("loss", "chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin", "losses"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.chosen_logps, want_logps[:3]) and torch.equal(got.rejected_logps, want_logps[3:])
    assert got.chosen_lengths.tolist() == counts[:3].tolist() and got.rejected_lengths.tolist() == counts[3:].tolist()
    assert not got.chosen_logps.requires_grad and not got.losses.requires_grad
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == dtype and torch.equal(g, w)


def test_reference_fused_linear_dpo_matches_the_fused_engine():
    hidden, weight, bias, labels, _, ref_c, ref_r = make_batch(2, 10, 24, 300, seed=46)
    kwargs = dict(beta=0.2, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5])
    truth = reference.fused_linear_dpo(hidden.double(), weight.double(), labels, bias=bias.double(),
                                       ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, **kwargs)
    fused = dpo_kernels.fused_linear_dpo(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c,
                                         ref_rejected_logps=ref_r, **kwargs)
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "losses", "ref_chosen_logps",
                 "chosen_lengths"):
        torch.testing.assert_close(getattr(fused, name).double(), getattr(truth, name).double(), rtol=1e-5,
                                   atol=1e-5, msg=name)
