"""The group (ranked-list) DPO loss op: its exactness anchors at K = 2 (plackett_luce is sigmoid DPO, all_pairs with
X is pairwise X, to the bit), every loss against the float64 reference by the accuracy rule (mixed K, ties, top_k,
score-gap weighting, sft, reference-free), the op's registration (opcheck, C++ autograd, torch.compile) and its
input validation."""
import pytest
import torch

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.loss_op.group import group_dpo_loss_and_grads
from dpo_kernels.loss_op.group_spec import GROUP_LOSS_TYPES, MAX_GROUP_SIZE, PAIR_LOSS_TYPES, check_group_settings
from dpo_kernels.loss_op.loss_types import LOSS_TYPES
from dpo_kernels.loss_op.op import dpo_loss_and_grads
from dpo_kernels.loss_op.spec import op_params
from tests.helpers import SMOOTHED, assert_within_rule

MIXED_SIZES = (2, 5, 3, 16, 4, 2, 7, 9, 11, 2, 6)  # K from 2 to the largest, mixed in one batch


def make_groups(sizes, *, dtype=torch.float32, score_levels=1000, with_ref=True, seed=0):
    """Summed log-probs of G groups (references -10..-300, policy near them), integer scores (few levels: many
    ties), lengths 0..200. Returns (policy [R], ref [R] or None, scores [R] float64, lengths [R] int64)."""
    g = torch.Generator().manual_seed(seed)
    R = sum(sizes)
    ref = -torch.empty(R, dtype=torch.float64).uniform_(10, 300, generator=g)
    policy = ref + 2.0 * torch.randn(R, dtype=torch.float64, generator=g)
    scores = torch.randint(0, score_levels, (R,), generator=g).double()
    lengths = torch.randint(0, 200, (R,), generator=g)
    return policy.to(dtype), (ref.to(dtype) if with_ref else None), scores, lengths


def loss_and_grad(fn, policy, ref, sizes, scores, **kwargs):
    x = policy.detach().clone().requires_grad_()
    out = fn(x, ref, sizes, scores, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, (x,), allow_unused=True)
    return out, torch.zeros_like(x) if grad is None else grad


def check_against_reference(inputs, sizes, atol_scale=1e-6, **kwargs):
    """Every output and the gradient of the op (inputs' dtype) against the float64 reference, by the accuracy rule;
    the baseline is the reference in the inputs' dtype."""
    policy, ref, scores, lengths = inputs
    double = (lambda t: None if t is None else t.double())
    out, grad = loss_and_grad(dpo_kernels.group_dpo_loss, policy, ref, sizes, scores, lengths=lengths, **kwargs)
    truth, truth_grad = loss_and_grad(reference.group_dpo_loss, double(policy), double(ref), sizes, scores,
                                      lengths=lengths, **kwargs)
    base, base_grad = loss_and_grad(reference.group_dpo_loss, policy, ref, sizes, scores, lengths=lengths, **kwargs)
    assert torch.equal(out.groups_left_out, truth.groups_left_out), (out.groups_left_out, truth.groups_left_out)
    for field in ("loss", "losses", "rewards", "ranking_accuracy", "top1_accuracy"):
        t = getattr(truth, field)
        atol = atol_scale * max(1.0, t.abs().max().item())
        assert_within_rule(getattr(out, field), t, getattr(base, field), atol=atol, name=field)
    assert grad.dtype == policy.dtype
    atol = atol_scale * max(1e-3, truth_grad.abs().max().item())
    assert_within_rule(grad, truth_grad, base_grad, atol=atol, name="grad")
    return out


def as_pairs(policy, ref, scores):
    """K = 2 groups as pairs: the better-scored response (the first on a tie) is the chosen one."""
    first, second = policy[0::2], policy[1::2]
    swap = scores[1::2] > scores[0::2]
    pick = (lambda a, b, s: (torch.where(s, b, a), torch.where(s, a, b)))
    pc, pr = pick(first, second, swap)
    rc, rr = (None, None) if ref is None else pick(ref[0::2], ref[1::2], swap)
    return pc, pr, rc, rr, swap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_ref", [True, False])
def test_plackett_luce_at_k2_is_sigmoid_dpo_to_the_bit(dtype, with_ref):
    G = 37
    policy, ref, scores, _ = make_groups((2,) * G, dtype=dtype, with_ref=with_ref)
    out, grad = group_dpo_loss_and_grads(policy, ref, [2] * G, scores, beta=0.3)
    pc, pr, rc, rr, swap = as_pairs(policy, ref, scores)
    pair, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, beta=0.3)
    assert torch.equal(out.loss, pair.loss) and torch.equal(out.losses, pair.losses)
    want = torch.stack([torch.where(swap, gr, gc), torch.where(swap, gc, gr)], 1).flatten()
    assert torch.equal(grad, want)
    assert torch.equal(out.ranking_accuracy, pair.reward_accuracy)
    assert torch.equal(out.top1_accuracy, pair.reward_accuracy)


@pytest.mark.parametrize("loss_type", ["all_pairs", "best_vs_worst"])
@pytest.mark.parametrize("pair_loss", PAIR_LOSS_TYPES)
def test_pairwise_types_at_k2_are_the_pairwise_loss_to_the_bit(pair_loss, loss_type):
    G = 23
    policy, ref, scores, lengths = make_groups((2,) * G, score_levels=10 ** 6, seed=1)
    assert (scores[0::2] != scores[1::2]).all()
    settings = dict(beta=0.2, label_smoothing=SMOOTHED.get(pair_loss, 0.0), gamma=0.7, tau=0.3, dpop_lambda=20.0)
    out, grad = group_dpo_loss_and_grads(policy, ref, [2] * G, scores, loss_type=loss_type, pair_loss=pair_loss,
                                         lengths=lengths, **settings)
    pc, pr, rc, rr, swap = as_pairs(policy, ref, scores)
    lc, lr = as_pairs(lengths, None, scores)[:2]
    pair, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, loss_type=pair_loss, chosen_lengths=lc, rejected_lengths=lr,
                                      **settings)
    assert torch.equal(out.loss, pair.loss) and torch.equal(out.losses, pair.losses)
    assert torch.equal(grad, torch.stack([torch.where(swap, gr, gc), torch.where(swap, gc, gr)], 1).flatten())


def test_sft_at_k2_matches_the_pairwise_sft_term():
    """sft on the best response is the pairwise sft term (its sums differ in order only: within rounding)."""
    G = 19
    policy, ref, scores, lengths = make_groups((2,) * G, dtype=torch.float64, seed=2)
    out, grad = group_dpo_loss_and_grads(policy, ref, [2] * G, scores, lengths=lengths, sft_weight=0.4)
    pc, pr, rc, rr, swap = as_pairs(policy, ref, scores)
    lc = as_pairs(lengths, None, scores)[0]
    pair, gc, gr = dpo_loss_and_grads(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4],
                                      chosen_lengths=lc)
    torch.testing.assert_close(out.loss, pair.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.losses, pair.losses, rtol=1e-12, atol=1e-12)
    want = torch.stack([torch.where(swap, gr, gc), torch.where(swap, gc, gr)], 1).flatten()
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("score_levels", [1000, 3], ids=["distinct", "ties"])
@pytest.mark.parametrize("loss_type", GROUP_LOSS_TYPES)
def test_mixed_group_sizes_against_reference(loss_type, score_levels):
    inputs = make_groups(MIXED_SIZES, score_levels=score_levels, seed=3)
    check_against_reference(inputs, MIXED_SIZES, loss_type=loss_type, beta=0.2)


@pytest.mark.parametrize("pair_loss", PAIR_LOSS_TYPES)
def test_all_pairs_every_pair_loss_float64(pair_loss):
    inputs = make_groups(MIXED_SIZES, dtype=torch.float64, score_levels=4, seed=4)
    check_against_reference(inputs, MIXED_SIZES, atol_scale=1e-11, loss_type="all_pairs", pair_loss=pair_loss,
                            label_smoothing=SMOOTHED.get(pair_loss, 0.0), gamma=0.3, tau=0.5, dpop_lambda=5.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    check_against_reference(make_groups(MIXED_SIZES, dtype=dtype, seed=5), MIXED_SIZES)


@pytest.mark.parametrize("top_k", [1, 3, 15])
def test_plackett_luce_top_k(top_k):
    inputs = make_groups(MIXED_SIZES, dtype=torch.float64, seed=6)
    check_against_reference(inputs, MIXED_SIZES, atol_scale=1e-11, top_k=top_k)


def test_top_1_is_the_best_against_all_the_others():
    policy, ref, scores, _ = make_groups((4, 6), dtype=torch.float64, seed=7)
    out = dpo_kernels.group_dpo_loss(policy, ref, [4, 6], scores, top_k=1, beta=0.5)
    rewards = 0.5 * (policy - ref)
    want = []
    for span in (slice(0, 4), slice(4, 10)):
        best = scores[span].argmax()  # distinct scores here
        want.append(-torch.log_softmax(rewards[span], 0)[best])
    torch.testing.assert_close(out.losses, torch.stack(want), rtol=1e-12, atol=1e-12)


def test_score_gap_weighting():
    inputs = make_groups(MIXED_SIZES, dtype=torch.float64, score_levels=5, seed=8)
    weighted = check_against_reference(inputs, MIXED_SIZES, atol_scale=1e-11, loss_type="all_pairs",
                                       pair_weighting="score_gap")
    plain = dpo_kernels.group_dpo_loss(*inputs[:2], MIXED_SIZES, inputs[2], loss_type="all_pairs")
    assert not torch.allclose(weighted.loss, plain.loss)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", GROUP_LOSS_TYPES)
def test_sft_on_the_best_response(loss_type, average):
    check_against_reference(make_groups(MIXED_SIZES, dtype=torch.float64, score_levels=4, seed=9), MIXED_SIZES,
                            atol_scale=1e-11, loss_type=loss_type, sft_weight=0.7, average=average)


@pytest.mark.parametrize("pair_loss", ["simpo", "sigmoid_norm", "sigmoid"])
def test_reference_free(pair_loss):
    inputs = make_groups(MIXED_SIZES, with_ref=False, seed=10)
    check_against_reference(inputs, MIXED_SIZES, loss_type="all_pairs", pair_loss=pair_loss)
    check_against_reference(inputs, MIXED_SIZES)


def test_without_scores_each_group_is_ordered_as_given():
    policy, ref, _, _ = make_groups(MIXED_SIZES, seed=11)
    descending = torch.cat([torch.arange(k, 0, -1) for k in MIXED_SIZES]).double()
    for loss_type in GROUP_LOSS_TYPES:
        given = dpo_kernels.group_dpo_loss(policy, ref, MIXED_SIZES, loss_type=loss_type)
        scored = dpo_kernels.group_dpo_loss(policy, ref, MIXED_SIZES, descending, loss_type=loss_type)
        for a, b in zip(given, scored, strict=True):
            assert torch.equal(a, b)


def test_tied_groups_are_left_out_and_counted():
    sizes = (3, 2, 4)
    policy, ref, _, _ = make_groups(sizes, dtype=torch.float64, seed=12)
    scores = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0, 0.0, 3.0, 3.0, 1.0])
    for loss_type in ("all_pairs", "best_vs_worst"):
        out = check_against_reference((policy, ref, scores, None), sizes, atol_scale=1e-11, loss_type=loss_type)
        assert out.groups_left_out.item() == 1 and out.losses[0].item() == 0.0
        kept = out.losses[1:]
        torch.testing.assert_close(out.loss, kept.mean(), rtol=1e-12, atol=0)
    # Plackett-Luce keeps a tied group, in its given order.
    out = check_against_reference((policy, ref, scores, None), sizes, atol_scale=1e-11)
    assert out.groups_left_out.item() == 0
    everything_tied = dpo_kernels.group_dpo_loss(policy[:3], ref[:3], [3], scores[:3], loss_type="all_pairs")
    assert everything_tied.loss.item() == 0.0 and everything_tied.groups_left_out.item() == 1


def test_metrics():
    # Group 1: rewards in score order (both metrics right); group 2: the best scored has the lowest reward.
    policy = torch.tensor([3.0, 2.0, 1.0, -1.0, 0.0, 5.0], dtype=torch.float64)
    scores = torch.tensor([9.0, 5.0, 1.0, 7.0, 7.0, 0.0])
    out = dpo_kernels.group_dpo_loss(policy, None, [3, 3], scores)
    # Ordered pairs: 3 in group 1 (all right); group 2: (0,2) and (1,2) wrong, the tied pair is skipped.
    assert out.ranking_accuracy.item() == pytest.approx(3 / 5)
    assert out.top1_accuracy.item() == pytest.approx(1 / 2)
    check_against_reference((policy, None, scores, None), (3, 3), atol_scale=1e-11)


def test_large_batch_deterministic_across_thread_counts():
    sizes = [2 + (g % 15) for g in range(5000)]
    policy, ref, scores, lengths = make_groups(sizes, score_levels=6, seed=13)
    threads = torch.get_num_threads()
    kwargs = dict(loss_type="all_pairs", lengths=lengths, sft_weight=0.1)
    try:
        torch.set_num_threads(1)
        one = group_dpo_loss_and_grads(policy, ref, sizes, scores, **kwargs)
        torch.set_num_threads(max(2, threads))
        many = group_dpo_loss_and_grads(policy, ref, sizes, scores, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0].loss, many[0].loss) and torch.equal(one[1], many[1])


# --- The op's registration.

def _raw_args(sizes, loss_type="plackett_luce", pair_loss="sigmoid", *, dtype=torch.float32, sft_weight=0.0,
              top_k=None, pair_weighting=None, seed=14, with_ref=True):
    policy, ref, scores, lengths = make_groups(sizes, dtype=dtype, score_levels=4, seed=seed, with_ref=with_ref)
    spec = check_group_settings(loss_type, pair_loss=pair_loss, top_k=top_k, pair_weighting=pair_weighting,
                                sft_weight=sft_weight, label_smoothing=SMOOTHED.get(pair_loss, 0.0))
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int64)
    return (policy.requires_grad_(), ref, offsets, scores, lengths.to(dtype), GROUP_LOSS_TYPES.index(loss_type),
            LOSS_TYPES.index(pair_loss), spec.top_k, spec.score_gap, op_params(spec.terms))


@pytest.mark.parametrize("case", [
    dict(loss_type="plackett_luce"), dict(loss_type="plackett_luce", top_k=2, sft_weight=0.5, with_ref=False),
    dict(loss_type="all_pairs", pair_loss="ipo", pair_weighting="score_gap"),
    dict(loss_type="best_vs_worst", pair_loss="robust"),
], ids=["pl", "pl-top2-sft-reffree", "all_pairs-ipo-gap", "bvw-robust"])
def test_opcheck(case):
    torch.library.opcheck(torch.ops.dpo_kernels.group_loss_forward, _raw_args((2, 5, 3), **case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_backward_op(dtype):
    grad_loss, grad = torch.tensor(0.7, dtype=dtype), torch.randn(13, dtype=dtype)
    torch.library.opcheck(torch.ops.dpo_kernels.group_loss_backward, (grad_loss, grad),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.testing.assert_close(torch.ops.dpo_kernels.group_loss_backward(grad_loss, grad), 0.7 * grad)


def test_autograd_runs_in_cpp():
    policy, ref, scores, _ = make_groups(MIXED_SIZES, seed=15)
    x = policy.clone().requires_grad_()
    out = dpo_kernels.group_dpo_loss(x, ref, MIXED_SIZES, scores, loss_type="all_pairs")
    assert "GroupLossFunction" in out.loss.grad_fn.name(), out.loss.grad_fn.name()
    for name in ("losses", "rewards", "ranking_accuracy", "top1_accuracy"):
        assert not getattr(out, name).requires_grad, name
    (out.loss * 2.5).backward()
    _, grad = group_dpo_loss_and_grads(policy, ref, MIXED_SIZES, scores, loss_type="all_pairs")
    torch.testing.assert_close(x.grad, 2.5 * grad)


@pytest.mark.parametrize("loss_type", GROUP_LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    policy, ref, scores, lengths = make_groups((2, 4, 3), dtype=torch.float64, score_levels=3, seed=16)

    def loss(x):
        return dpo_kernels.group_dpo_loss(x, ref, (2, 4, 3), scores, loss_type=loss_type, beta=0.5, lengths=lengths,
                                          sft_weight=0.3).loss

    assert torch.autograd.gradcheck(loss, (policy.requires_grad_(),))


def test_torch_compile_fullgraph():
    policy, ref, scores, _ = make_groups((2, 5, 3), seed=17)

    def step(x):
        out = dpo_kernels.group_dpo_loss(x, ref, (2, 5, 3), scores, beta=0.2)
        return out.loss, out.rewards, out.top1_accuracy

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    got, want = compiled(a), step(b)
    got[0].backward()
    want[0].backward()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(a.grad, b.grad)


def test_raw_op_checks_its_arguments():
    args = list(_raw_args((2, 3)))
    op = torch.ops.dpo_kernels.group_loss_forward
    with pytest.raises(RuntimeError, match=f"between 2 and {MAX_GROUP_SIZE}"):
        op(*args[:2], torch.tensor([0, 1, 5]), *args[3:])
    with pytest.raises(RuntimeError, match="from 0 to R"):
        op(*args[:2], torch.tensor([0, 2, 4]), *args[3:])
    with pytest.raises(RuntimeError, match="not a loss type of one pair"):
        op(*args[:5], 1, LOSS_TYPES.index("aot"), *args[7:])
    with pytest.raises(RuntimeError, match="hyper-parameters"):
        op(*args[:9], args[9][:-1])
    with pytest.raises(RuntimeError, match="dtype"):
        op(args[0], args[1].double(), *args[2:])


def test_the_largest_group():
    sizes = (MAX_GROUP_SIZE, 2)
    check_against_reference(make_groups(sizes, dtype=torch.float64, score_levels=5, seed=18), sizes,
                            atol_scale=1e-11, loss_type="all_pairs")


def _good():
    policy, ref, scores, lengths = make_groups((2, 3), seed=19)
    return dict(policy_logps=policy, ref_logps=ref, group_sizes=[2, 3], scores=scores, lengths=lengths)


BAD_INPUTS = {
    "group of one": (dict(group_sizes=[1, 4]), "between 2 and 16"),
    "group of 17": (dict(group_sizes=[17]), "between 2 and 16"),
    "sizes do not sum to R": (dict(group_sizes=[2, 2]), "sum to 4"),
    "float sizes": (dict(group_sizes=torch.tensor([2.0, 3.0])), "integer"),
    "no groups": (dict(group_sizes=[]), "at least one group"),
    "scores of wrong shape": (dict(scores=torch.zeros(4)), "scores has shape"),
    "boolean scores": (dict(scores=torch.ones(5, dtype=torch.bool)), "scores"),
    "2-D log-probs": (dict(policy_logps=torch.zeros(5, 1)), "1-D"),
    "integer log-probs": (dict(policy_logps=torch.zeros(5, dtype=torch.long)), "dtype"),
    "reference of wrong shape": (dict(ref_logps=torch.zeros(6)), "ref_logps has shape"),
    "unknown loss type": (dict(loss_type="listmle"), "unknown group loss_type"),
    "batch-coupled pair loss": (dict(loss_type="all_pairs", pair_loss="aot"), "couples the batch"),
    "sft as pair loss": (dict(loss_type="all_pairs", pair_loss="sft"), "sft_weight"),
    "top_k zero": (dict(top_k=0), "top_k"),
    "top_k 16": (dict(top_k=16), "top_k"),
    "top_k with all_pairs": (dict(loss_type="all_pairs", top_k=1), "top_k applies"),
    "unknown weighting": (dict(loss_type="all_pairs", pair_weighting="rank"), "pair_weighting"),
    "weighting with plackett_luce": (dict(pair_weighting="score_gap"), "applies to loss_type 'all_pairs'"),
    "weighting without scores": (dict(loss_type="all_pairs", pair_weighting="score_gap", scores=None), "needs scores"),
    "simpo without lengths": (dict(loss_type="all_pairs", pair_loss="simpo", lengths=None), "pass lengths"),
    "sft without lengths": (dict(sft_weight=0.5, lengths=None), "pass lengths"),
    "sft weight NaN": (dict(sft_weight=float("nan")), "sft_weight"),
    "loss weights": (dict(loss_weights=[1.0]), "loss_weights"),
    "beta zero": (dict(beta=0.0), "beta"),
    "robust smoothing 0.5": (dict(loss_type="all_pairs", pair_loss="robust", label_smoothing=0.5), "label_smoothing"),
}


@pytest.mark.parametrize("fn", [dpo_kernels.group_dpo_loss, reference.group_dpo_loss], ids=["op", "reference"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error(case, fn):
    changes, message = BAD_INPUTS[case]
    args = _good()
    args.update(changes)
    positional = [args.pop(k) for k in ("policy_logps", "ref_logps", "group_sizes", "scores")]
    with pytest.raises(ValueError, match=message):
        fn(*positional, **args)
