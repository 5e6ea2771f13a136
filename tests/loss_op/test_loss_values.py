"""The fused DPO loss op against the float64 reference: every loss type, its hyper-parameter edges, every output and
both gradients, by the accuracy rule (docs/design.md, "Numerics and the accuracy rule")."""
import math

import pytest
import torch

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.loss_op.loss_types import LOSSES
from dpo_kernels.loss_op.op import LOSS_TYPES, dpo_loss_and_grads, loss_traits
from tests.helpers import SMOOTHED, assert_within_rule


def make_inputs(batch, *, dtype=torch.float32, spread=2.0, with_ref=True, generator_seed=0):
    """Realistic summed log-probs: references of -10..-300, policy near its reference, lengths 0..200."""
    g = torch.Generator().manual_seed(generator_seed)
    rc = -torch.empty(batch, dtype=torch.float64).uniform_(10, 300, generator=g)
    rr = -torch.empty(batch, dtype=torch.float64).uniform_(10, 300, generator=g)
    pc = rc + spread * torch.randn(batch, dtype=torch.float64, generator=g)
    pr = rr + spread * torch.randn(batch, dtype=torch.float64, generator=g)
    lc = torch.randint(0, 200, (batch,), generator=g)
    lr = torch.randint(1, 200, (batch,), generator=g)
    cast = (lambda t: t.to(dtype))
    refs = (cast(rc), cast(rr)) if with_ref else (None, None)
    return (cast(pc), cast(pr)) + refs + (lc, lr)


def run_both(inputs, **kwargs):
    """(op output, op grads, truth output, truth grads, baseline output, baseline grads); baseline = plain PyTorch
    in the inputs' dtype (the reference upcasts fp16/bf16 to fp32, as eager training code does)."""
    pc, pr, rc, rr, lc, lr = inputs

    def grads_of(fn, a, b, refs):
        a = a.detach().clone().requires_grad_()
        b = b.detach().clone().requires_grad_()
        out = fn(a, b, *refs, chosen_lengths=lc, rejected_lengths=lr, **kwargs)
        ga, gb = torch.autograd.grad(out.loss, (a, b), allow_unused=True)
        zeros = torch.zeros_like(a)
        return out, (zeros if ga is None else ga, zeros if gb is None else gb)

    double = (lambda t: None if t is None else t.double())
    op_out, op_grads = grads_of(dpo_kernels.dpo_loss, pc, pr, (rc, rr))
    truth_out, truth_grads = grads_of(reference.dpo_loss, double(pc), double(pr), (double(rc), double(rr)))
    base_out, base_grads = grads_of(reference.dpo_loss, pc, pr, (rc, rr))
    return op_out, op_grads, truth_out, truth_grads, base_out, base_grads


def check_all(inputs, atol_scale=1e-6, **kwargs):
    op_out, op_grads, truth_out, truth_grads, base_out, base_grads = run_both(inputs, **kwargs)
    for field in truth_out._fields:
        truth = getattr(truth_out, field)
        atol = atol_scale * max(1.0, truth.abs().max().item() if truth.numel() else 1.0)
        assert_within_rule(getattr(op_out, field), truth, getattr(base_out, field), atol=atol, name=field)
    for name, got, truth, base in zip(("grad_chosen", "grad_rejected"), op_grads, truth_grads, base_grads, strict=True):
        assert got.dtype == inputs[0].dtype, f"{name} dtype {got.dtype} != input dtype {inputs[0].dtype}"
        atol = atol_scale * max(1e-3, truth.abs().max().item())
        assert_within_rule(got, truth, base, atol=atol, name=name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("batch", [1, 37])
def test_every_loss_type_float32(loss_type, batch):
    check_all(make_inputs(batch), loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_float64_exact(loss_type):
    """In float64 the op must agree with the float64 reference to rounding (baseline error 0, tiny atol)."""
    check_all(make_inputs(29, dtype=torch.float64), atol_scale=1e-11, loss_type=loss_type,
              label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down", "simpo", "aot_unpaired"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(loss_type, dtype):
    check_all(make_inputs(23, dtype=dtype), loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [1e-3, 10.0])
def test_beta_small_and_large(loss_type, beta):
    check_all(make_inputs(19, spread=20.0), loss_type=loss_type, beta=beta,
              label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_saturated_margins_stay_finite(loss_type):
    """Margins of +-1e4 at beta 10 saturate every sigmoid; logsigmoid must not overflow, gradients must not NaN."""
    pc, pr, rc, rr, lc, lr = make_inputs(16)
    sign = torch.tensor([1.0, -1.0]).repeat(8)
    pc = rc + 5e3 * sign
    pr = rr - 5e3 * sign
    kwargs = dict(loss_type=loss_type, beta=10.0, label_smoothing=SMOOTHED.get(loss_type, 0.0))
    check_all((pc, pr, rc, rr, lc, lr), **kwargs)
    out, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kwargs)
    assert torch.isfinite(out.loss) and torch.isfinite(out.losses).all()
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_equal_logprobs(loss_type):
    """policy == reference and chosen == rejected: the kinks (hinge, dpop's max) and sort ties (aot)."""
    pc, _, _, _, lc, lr = make_inputs(12)
    check_all((pc, pc.clone(), pc.clone(), pc.clone(), lc, lr), loss_type=loss_type,
              label_smoothing=SMOOTHED.get(loss_type, 0.0))


EPS_EDGES = [0.0, 0.25, 0.49]


@pytest.mark.parametrize("loss_type", [name for name in SMOOTHED
                                       if all(LOSSES[name].params["label_smoothing"].contains(e) for e in EPS_EDGES)])
@pytest.mark.parametrize("eps", EPS_EDGES)
def test_label_smoothing(loss_type, eps):
    check_all(make_inputs(21), loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "simpo", "dpop", "aot"])
def test_reference_free(loss_type):
    check_all(make_inputs(17, with_ref=False), loss_type=loss_type)


def test_hyper_parameters_are_used():
    inputs = make_inputs(15)
    check_all(inputs, loss_type="discopop", tau=0.7)
    check_all(inputs, loss_type="simpo", gamma=1.5, beta=2.0)
    check_all(inputs, loss_type="dpop", dpop_lambda=500.0)
    a = dpo_kernels.dpo_loss(*inputs[:4], loss_type="dpop", dpop_lambda=0.0)
    b = dpo_kernels.dpo_loss(*inputs[:4], loss_type="sigmoid")
    torch.testing.assert_close(a.loss, b.loss)  # dpop with lambda 0 is DPO


def test_combined_loss_types_with_weights_and_per_loss_smoothing():
    inputs = make_inputs(33)
    check_all(inputs, loss_type=["sigmoid", "sft", "robust", "aot"], loss_weights=[1.0, 0.3, 0.5, 2.0],
              label_smoothing=[0.0, 0.0, 0.2, 0.1])
    # TRL's sigmoid ignores label_smoothing: a per-loss list reproduces [sigmoid(eps ignored), robust(eps)].
    pc, pr, rc, rr, lc, lr = inputs
    both = dpo_kernels.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "robust"], label_smoothing=[0.0, 0.2]).loss
    parts = (dpo_kernels.dpo_loss(pc, pr, rc, rr).loss
             + dpo_kernels.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.2).loss)
    torch.testing.assert_close(both, parts)


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot_unpaired", "sft"])
def test_large_batch(loss_type):
    check_all(make_inputs(100_003), loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_in_nan_out(loss_type):
    pc, pr, rc, rr, lc, lr = make_inputs(9)
    pc[4] = math.nan
    out, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, loss_type=loss_type,
                                     label_smoothing=SMOOTHED.get(loss_type, 0.0))
    assert torch.isnan(out.loss), f"{loss_type}: a NaN log-prob gave a finite loss {out.loss.item()}"
    if not loss_traits(loss_type).couples_batch:
        assert torch.isnan(out.losses[4])
        keep = torch.arange(9) != 4
        assert torch.isfinite(out.losses[keep]).all() and torch.isfinite(gc[keep]).all()


def test_rewards_and_metrics_follow_trl_definitions():
    pc, pr, rc, rr, _, _ = make_inputs(40)
    pr[:5] = pc[:5] - rc[:5] + rr[:5]  # equal rewards: the strict '>' must not count them
    out = dpo_kernels.dpo_loss(pc, pr, rc, rr, beta=0.3)
    chosen, rejected = 0.3 * (pc.double() - rc.double()), 0.3 * (pr.double() - rr.double())
    torch.testing.assert_close(out.chosen_rewards.double(), chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.double(), rejected, rtol=1e-6, atol=1e-6)
    assert out.reward_accuracy.item() == (out.chosen_rewards > out.rejected_rewards).float().mean().item()
    assert not out.chosen_rewards.requires_grad and not out.losses.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_traits_are_honest(loss_type):
    """`tied` means grad_rejected == -grad_chosen exactly; `couples_batch` means other pairs change a pair's loss."""
    traits = loss_traits(loss_type)
    pc, pr, rc, rr, lc, lr = make_inputs(10)
    kwargs = dict(chosen_lengths=lc, rejected_lengths=lr, loss_type=loss_type,
                  label_smoothing=SMOOTHED.get(loss_type, 0.0))
    out, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, **kwargs)
    assert torch.equal(gr, -gc) == traits.tied, f"{loss_type}: tied={traits.tied} but grads say otherwise"
    pc2 = pc.clone()
    pc2[0] += 40.0  # moves pair 0 across the sort order
    out2, gc2, _ = dpo_loss_and_grads(pc2, pr, rc, rr, **kwargs)
    others_changed = not (torch.equal(out.losses[1:], out2.losses[1:]) and torch.equal(gc[1:], gc2[1:]))
    assert others_changed == traits.couples_batch, f"{loss_type}: couples_batch={traits.couples_batch}"


def test_loss_traits_combine():
    assert loss_traits(["sigmoid", "hinge"]) == (True, False)
    assert loss_traits(["sigmoid", "ipo"]) == (False, False)
    assert loss_traits(["sigmoid", "aot"]) == (True, True)


def test_and_grads_matches_autograd():
    pc, pr, rc, rr, lc, lr = make_inputs(13)
    kwargs = dict(loss_type=["apo_zero", "sft"], chosen_lengths=lc, rejected_lengths=lr)
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = dpo_kernels.dpo_loss(a, b, rc, rr, **kwargs)
    (out.loss * 3.0).backward()
    fused, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, **kwargs)
    assert gc.dtype == torch.float32 and not fused.loss.requires_grad
    torch.testing.assert_close(a.grad, 3.0 * gc)
    torch.testing.assert_close(b.grad, 3.0 * gr)
    torch.testing.assert_close(fused.loss, out.loss.detach())


def test_deterministic_across_thread_counts():
    inputs = make_inputs(20_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dpo_loss_and_grads(*inputs[:4], loss_type="aot")
        torch.set_num_threads(max(2, threads))
        many = dpo_loss_and_grads(*inputs[:4], loss_type="aot")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0].loss, many[0].loss) and torch.equal(one[1], many[1])


def test_matches_trl_loss_formulas():
    """TRL 1.16 has no standalone loss function; rebuild its per-sequence formulas from the installed source and
    compare a few loss types on float32 inputs to rtol 1e-5."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("trl")  # read the source rather than import trl (seconds of imports)
    if spec is None:
        pytest.skip("trl is not installed")
    source = (pathlib.Path(spec.origin).parent / "trainer" / "dpo_trainer.py").read_text()
    bco_block = source.split('loss_type == "bco_pair"')[1].split("elif")[0]
    assert "running" not in bco_block and "RunningMoments" not in source  # bco_pair is stateless in TRL 1.16
    F = torch.nn.functional
    pc, pr, rc, rr, _, _ = make_inputs(31)
    beta = 0.1
    c, r = pc - rc, pr - rr
    z = beta * (c - r)
    trl = {
        "sigmoid": -F.logsigmoid(z),
        "bco_pair": -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r),
        "nca_pair": -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r),
        "apo_zero": 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r),
    }
    for name, per_sequence in trl.items():
        got = dpo_kernels.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=name).loss
        torch.testing.assert_close(got, per_sequence.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [dpo_kernels.dpo_loss, reference.dpo_loss], ids=["op", "reference"])
def test_sft_without_chosen_tokens_is_finite(fn):
    """No chosen token scored anywhere in the batch: the total length is clamped to 1, as documented, so the term
    is 0 (the log-probs of empty responses are 0) with zero gradient, not 0/0."""
    pc = torch.zeros(3, requires_grad=True)
    out = fn(pc, torch.full((3,), -4.0), loss_type=["sigmoid", "sft"], chosen_lengths=torch.zeros(3, dtype=torch.long))
    out.loss.backward()
    sigmoid_only = fn(pc.detach(), torch.full((3,), -4.0)).loss
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()
    torch.testing.assert_close(out.loss, sigmoid_only)


@pytest.mark.parametrize("fn", [dpo_kernels.dpo_loss, reference.dpo_loss], ids=["op", "reference"])
def test_sft_from_per_token_means_is_the_mean_token_nll(fn):
    """`average=True`: the log-probs are per-token means, and sft is still the NLL per chosen token of the batch:
    the same value and per-token gradient as from the sums."""
    pc, pr, rc, rr, lc, lr = make_inputs(11, dtype=torch.float64)
    means = torch.where(lc > 0, pc / lc.clamp(min=1), torch.zeros_like(pc)).requires_grad_()
    sums = pc.clone().requires_grad_()
    kwargs = dict(loss_type="sft", chosen_lengths=lc, rejected_lengths=lr)
    from_means = fn(means, pr, rc, rr, average=True, **kwargs)
    from_sums = fn(sums, pr, rc, rr, **kwargs)
    torch.testing.assert_close(from_means.loss, from_sums.loss, rtol=1e-12, atol=0)
    from_means.loss.backward()
    from_sums.loss.backward()
    # d loss / d token log-prob: through the mean it is d/d mean / length (for responses with tokens).
    scored = lc > 0
    torch.testing.assert_close(means.grad[scored] / lc[scored], sums.grad[scored], rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo"])
@pytest.mark.parametrize("fn", [dpo_kernels.dpo_loss, reference.dpo_loss], ids=["op", "reference"])
def test_length_normalized_losses_from_per_token_means_normalize_once(fn, loss_type):
    """`average=True`: the log-probs (policy and reference) are per-token means, already length-normalized, so ipo,
    sigmoid_norm and simpo do not divide by the lengths again: the loss equals the one from the sums and lengths."""
    pc, pr, rc, rr, lc, lr = make_inputs(11, dtype=torch.float64)
    lc, lr = lc.clamp(min=1), lr.clamp(min=1)
    kwargs = dict(loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    from_sums = fn(pc, pr, rc, rr, **kwargs)
    from_means = fn(pc / lc, pr / lr, rc / lc, rr / lr, average=True, **kwargs)
    torch.testing.assert_close(from_means.losses, from_sums.losses, rtol=1e-10, atol=1e-12)


def test_average_must_be_a_bool():
    pc, pr, rc, rr, lc, lr = make_inputs(4)
    for fn in (dpo_kernels.dpo_loss, reference.dpo_loss):
        with pytest.raises(ValueError, match="average"):
            fn(pc, pr, rc, rr, average="yes")
