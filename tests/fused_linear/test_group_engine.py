"""The fused linear engine on groups of K ranked responses (`fused_linear_group_dpo`, `FusedLinearGroupLoss`) and the
group loss from logits (`GroupDPOLoss`), against a float64 computation.

Truth: the float64 log-softmax of every scored row (`hidden.double() @ weight.double().T + bias`), summed per response,
then `reference.group_dpo_loss`, with autograd for the gradients. Baseline: the same code in the inputs' dtype (fp32
log-softmax for bf16 logits, as eager training code does). The accuracy rule is tests/helpers.py.
"""
import traceback

import pytest
import torch
import torch.distributed as dist

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.fused_linear import parallel
from dpo_kernels.fused_linear.parallel import ParallelOptions
from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_ONCE, STREAM_TWICE, TokenAttribution, plan_group_step
from dpo_kernels.shared_prompt import build_group_batch, unshared_group_rows
from tests.fused_linear.test_parallel import run_on_gloo_ranks
from tests.helpers import (
    DEVICES,
    DTYPE_ATOL,
    IGNORE_INDEX,
    assert_close_to_truth,
    budget,
    max_abs_error,
)
from tests.shared_prompt.test_group_batch import GROUPS

pytestmark = pytest.mark.usefixtures("single_thread")

T, H, V = 8, 16, 97
# K from 2 to 8 in one batch; response 3 (group 1) is empty.
SIZES = (2, 3, 8, 2, 5)
R = sum(SIZES)
EMPTY = 3


def make_groups(dtype=torch.float32, seed=0, sizes=SIZES, empty=(EMPTY,)):
    """`(hidden [R, T, H], weight [V, H], bias [V], labels [R, T], ref_logps [R], scores [R])`: peaked logits, a
    prompt prefix, right padding, empty responses, and scores with ties inside groups."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(sizes)
    hidden = torch.randn(rows, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :2] = IGNORE_INDEX
    lengths = torch.randint(3, T + 1, (rows,), generator=g)
    for r in range(rows):
        labels[r, lengths[r]:] = IGNORE_INDEX
    for r in empty:
        labels[r] = IGNORE_INDEX
    ref = torch.randn(rows, generator=g) * 3 - 20
    scores = torch.randint(0, 3, (rows,), generator=g).double()  # few values: ties inside groups
    return hidden, weight, bias, labels, ref, scores


def label_positions(labels):
    """The scored tokens of padded `labels` as a `TokenAttribution` (the HF shift: position t scores t + 1)."""
    seq, pos = (labels[:, 1:] != IGNORE_INDEX).nonzero().unbind(1)
    return TokenAttribution(seq * labels.shape[1] + pos, labels[seq, pos + 1], seq, labels.shape[0])


def plain_logps(h, w, b, positions, average, dtype):
    """`[R]` log-probs in `dtype` (fp32 log-softmax for half-precision logits) of the scored rows."""
    logits = torch.nn.functional.linear(h.reshape(-1, h.shape[-1]), w, b)
    logp = torch.log_softmax(logits.to(dtype if dtype == torch.float64 else torch.float32), -1)
    tok = logp[positions.rows, positions.targets]
    total = torch.zeros(positions.num_seqs, dtype=tok.dtype).index_add(0, positions.seqs, tok)
    counts = torch.bincount(positions.seqs, minlength=positions.num_seqs)
    return (total / counts.clamp_min(1) if average else total), counts


def plain_group(hidden, weight, bias, positions, sizes, scores, ref_logps, dtype, *, average=False, ref_hidden=None,
                **settings):
    """`(output of reference.group_dpo_loss, logps [R], grads of (hidden, weight, bias))`, computed in `dtype` (the
    truth in float64, the baseline in the inputs' dtype). `ref_hidden`: the reference log-probs from it, through
    the same head."""
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    b = None if bias is None else bias.to(dtype).requires_grad_()
    logps, counts = plain_logps(h, w, b, positions, average, dtype)
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logps, _ = plain_logps(ref_hidden.to(dtype), w, b, positions, average, dtype)
    elif ref_logps is not None and dtype == torch.float64:
        ref_logps = ref_logps.double()
    out = reference.group_dpo_loss(logps, ref_logps, sizes, scores, lengths=counts, average=average, **settings)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out, logps.detach(), grads


def truth_and_baseline(hidden, weight, bias, positions, sizes, scores, ref_logps, **kwargs):
    args = (hidden, weight, bias, positions, sizes, scores, ref_logps)
    return plain_group(*args, torch.float64, **kwargs), plain_group(*args, hidden.dtype, **kwargs)


def run_group(hidden, weight, bias, labels, sizes, scores=None, *, requires=(True, True, True), **kwargs):
    """`fused_linear_group_dpo` on copies of the inputs (each requiring grad as `requires` says), then backward;
    returns `(output, grads of hidden, weight, bias)` (None where not required)."""
    h, w = hidden.detach().clone().requires_grad_(requires[0]), weight.detach().clone().requires_grad_(requires[1])
    b = None if bias is None else bias.detach().clone().requires_grad_(requires[2])
    out = dpo_kernels.fused_linear_group_dpo(h, w, labels, sizes, scores, bias=b, **kwargs)
    out.loss.backward()
    return out, tuple(None if t is None else t.grad for t in (h, w, b))


def check_group(out, grads, truth, baseline, dtype, grad_names=("hidden", "weight", "bias")):
    """Every output and every gradient given (the first `len(grads)` of hidden, weight, bias) within the accuracy
    rule."""
    t_out, t_logps, t_grads = truth
    b_out, b_logps, b_grads = baseline
    assert out.loss.dtype == torch.float32 and out.logps.dtype == torch.float32
    assert out.losses.shape == (len(t_out.losses),) and out.rewards.shape == out.logps.shape == t_logps.shape
    assert_close_to_truth(out.logps, t_logps, b_logps, dtype, "logps")
    for name in ("loss", "losses", "rewards", "ranking_accuracy", "top1_accuracy"):
        assert_close_to_truth(getattr(out, name), getattr(t_out, name), getattr(b_out, name), dtype, name)
    assert out.groups_left_out.item() == t_out.groups_left_out.item()
    n = len(grads)
    for name, g, tg, bg in zip(grad_names[:n], grads, t_grads[:n], b_grads[:n], strict=True):
        assert g is not None and g.dtype == dtype, f"{name}: gradient missing or not in {dtype}"
        assert_close_to_truth(g, tg, bg, dtype, f"grad_{name}")


def assert_agree(a, b, truth, baseline, dtype, name):
    """`a` and `b`, two computations of one value, differ by no more than the accuracy rule lets either differ from
    the truth: twice plain PyTorch's error plus atol."""
    atol = DTYPE_ATOL[dtype] * max(1.0, truth.detach().abs().max().item())
    allowed = 2 * max_abs_error(baseline, truth) + atol
    assert max_abs_error(a, b) <= allowed, f"{name}: {max_abs_error(a, b):.3e} > {allowed:.3e}"


# Modes: the batch in one chunk; resident chunks of several whole groups (the K = 8 group streams); every group
# streamed (chunks of 4 tokens); recompute.
GROUP_MODES = {"one chunk": None, "resident": budget(2 * T, V, torch.float32),
               "streaming": budget(4, V, torch.float32), "low": "low"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mode", list(GROUP_MODES))
def test_every_mode_matches_float64(mode, average, device):
    hidden, weight, bias, labels, ref, scores = (t.to(device) for t in make_groups(seed=1))
    out, grads = run_group(hidden, weight, bias, labels, SIZES, scores, ref_logps=ref, average=average,
                           memory_budget=GROUP_MODES[mode])
    assert dpo_kernels.last_run().entry == "fused_linear_group_dpo"
    modes = dpo_kernels.last_run().modes
    if mode == "one chunk":
        assert modes == (RESIDENT,)
    elif mode == "resident":
        # Some chunk holds several groups, and the K = 8 group is longer than a chunk.
        assert modes.count(RESIDENT) < len(SIZES) - 1 and STREAM_TWICE in modes
    elif mode == "streaming":
        assert set(modes) == {STREAM_TWICE}
    else:
        assert modes == ()
    assert out.logps[EMPTY].item() == 0.0 and out.lengths[EMPTY].item() == 0
    cpu = [t.cpu() for t in (hidden, weight, bias, ref, scores)]
    truth, base = truth_and_baseline(cpu[0], cpu[1], cpu[2], label_positions(labels.cpu()), SIZES, cpu[4], cpu[3],
                                     average=average)
    check_group(out, [g.cpu() for g in grads], truth, base, torch.float32)


def test_group_plan():
    """Whole groups fill resident chunks; a longer group streams first, twice with a weight gradient (group
    coefficients are not tied), once without."""
    counts, chunk_budget = [3, 10, 2, 4], budget(8, V, torch.float32)
    plan = plan_group_step(counts, V, 4, chunk_budget)
    assert [(list(g.units), g.mode) for g in plan.groups] == [([1], STREAM_TWICE), ([0], RESIDENT),
                                                               ([2, 3], RESIDENT)]
    assert not plan.tied and plan.total == 19
    no_weight = plan_group_step(counts, V, 4, chunk_budget, weight_grad=False)
    assert [g.mode for g in no_weight.groups] == [STREAM_ONCE, RESIDENT, RESIDENT]
    assert plan_group_step(counts, V, 4, "low").recompute


def test_long_group_without_weight_gradient_streams_once():
    hidden, weight, bias, labels, ref, scores = make_groups(seed=2)
    out, grads = run_group(hidden, weight, None, labels, SIZES, scores, requires=(True, False, False),
                           ref_logps=ref, memory_budget=budget(4, V, torch.float32))
    modes = dpo_kernels.last_run().modes
    assert STREAM_ONCE in modes and STREAM_TWICE not in modes
    truth, base = truth_and_baseline(hidden, weight, None, label_positions(labels), SIZES, scores, ref)
    check_group(out, grads[:1], truth, base, torch.float32, grad_names=("hidden",))


LOSS_SETTINGS = {
    "plackett_luce": {},
    "plackett_luce top_k=2": {"top_k": 2},
    "plackett_luce top_k=1 sft": {"top_k": 1, "sft_weight": 0.5},
    "all_pairs sigmoid score_gap": {"loss_type": "all_pairs", "pair_weighting": "score_gap"},
    "all_pairs ipo": {"loss_type": "all_pairs", "pair_loss": "ipo"},
    "all_pairs robust smoothed": {"loss_type": "all_pairs", "pair_loss": "robust", "label_smoothing": 0.1},
    "all_pairs simpo": {"loss_type": "all_pairs", "pair_loss": "simpo", "beta": 2.0},
    "best_vs_worst": {"loss_type": "best_vs_worst", "sft_weight": 0.3},
}


@pytest.mark.parametrize("mode", ["resident", "streaming"])
@pytest.mark.parametrize("name", list(LOSS_SETTINGS))
def test_every_loss_type(name, mode):
    settings = dict(LOSS_SETTINGS[name])
    hidden, weight, bias, labels, ref, scores = make_groups(seed=3)
    if settings.get("pair_loss") == "simpo":
        ref = None  # reference-free
    out, grads = run_group(hidden, weight, bias, labels, SIZES, scores, ref_logps=ref,
                           memory_budget=GROUP_MODES[mode], **settings)
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), SIZES, scores, ref, **settings)
    check_group(out, grads, truth, base, torch.float32)
    assert (out.ref_logps is None) == (ref is None)


def test_ties_leave_groups_out_and_count_them():
    hidden, weight, bias, labels, ref, _ = make_groups(seed=4)
    scores = torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0] + [3.0] * 8 + [5.0, 4.0] + [1, 1, 2, 2, 0])  # group 2 all tied
    out, grads = run_group(hidden, weight, bias, labels, SIZES, scores, ref_logps=ref, loss_type="all_pairs",
                           memory_budget=GROUP_MODES["resident"])
    assert out.groups_left_out.item() == 2 and out.losses[0].item() == 0.0 and out.losses[2].item() == 0.0
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), SIZES, scores, ref,
                                     loss_type="all_pairs")
    check_group(out, grads, truth, base, torch.float32)


@pytest.mark.parametrize("mode", ["resident", "streaming", "low"])
def test_reference_hidden_equals_precomputed_reference(mode):
    hidden, weight, bias, labels, _, scores = make_groups(seed=5)
    ref_hidden = hidden * 0.8 + 0.1
    budget_ = GROUP_MODES[mode]
    out, grads = run_group(hidden, weight, bias, labels, SIZES, scores, ref_hidden=ref_hidden, memory_budget=budget_)
    ref_logps = dpo_kernels.linear_sequence_logprobs(ref_hidden, weight, labels, bias=bias, memory_budget=budget_)
    again, again_grads = run_group(hidden, weight, bias, labels, SIZES, scores, ref_logps=ref_logps,
                                   memory_budget=budget_)
    assert torch.equal(out.ref_logps, ref_logps) and torch.equal(out.loss, again.loss)
    for g, a in zip(grads, again_grads, strict=True):
        assert torch.equal(g, a)
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), SIZES, scores, None,
                                     ref_hidden=ref_hidden)
    check_group(out, grads, truth, base, torch.float32)


@pytest.mark.parametrize("mode", ["one chunk", "streaming", "low"])
def test_token_stats(mode):
    hidden, weight, bias, labels, ref, scores = make_groups(seed=6)
    out, _ = run_group(hidden, weight, bias, labels, SIZES, scores, ref_logps=ref, token_stats=True,
                       memory_budget=GROUP_MODES[mode])
    plain = dpo_kernels.fused_linear_group_dpo(hidden, weight, labels, SIZES, scores, bias=bias, ref_logps=ref)
    assert plain.entropy_sum is None and plain.top1_count is None
    logits = (hidden.double() @ weight.double().T + bias.double())[:, :-1]
    valid = labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1)
    entropy = (-(logp.exp() * logp).sum(-1) * valid).sum(1)
    top1 = ((logits.argmax(-1) == labels[:, 1:]) & valid).sum(1)
    baseline = torch.special.entr(torch.softmax(logits.float(), -1)).sum(-1).mul(valid).sum(1)
    assert_close_to_truth(out.entropy_sum, entropy, baseline, torch.float32, "entropy_sum")
    assert torch.equal(out.top1_count, top1) and torch.equal(out.lengths, valid.sum(1))


@pytest.mark.parametrize("mode", ["one chunk", "streaming"])
def test_bf16_inputs(mode):
    hidden, weight, bias, labels, ref, scores = make_groups(torch.bfloat16, seed=7)
    budget_ = None if mode == "one chunk" else budget(4, V, torch.bfloat16)
    out, grads = run_group(hidden, weight, bias, labels, SIZES, scores, ref_logps=ref, memory_budget=budget_)
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), SIZES, scores, ref)
    check_group(out, grads, truth, base, torch.bfloat16)


@pytest.mark.parametrize("mode", ["one chunk", "resident", "streaming"])
def test_shared_prompt_batch_equals_unshared_rows(mode):
    batch = build_group_batch(GROUPS, pack=True)
    input_ids, _, labels = unshared_group_rows(GROUPS)
    g = torch.Generator().manual_seed(8)
    rows, T_shared = batch.input_ids.shape
    shared_hidden = torch.randn(rows, T_shared, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)
    bias = torch.randn(V, generator=g) * 0.5
    # Each unshared row's scored positions hold the hidden state of the shared row that scores the same label.
    unshared_hidden = torch.zeros(*input_ids.shape, H)
    flat_pos = batch.position_ids.reshape(-1)
    unshared_hidden[batch.token_seqs, flat_pos[batch.token_rows]] = shared_hidden.reshape(-1, H)[batch.token_rows]
    scores = torch.arange(batch.num_seqs, dtype=torch.float64).remainder(3)
    sizes = batch.sizes
    budget_ = {"one chunk": None, "resident": budget(12, V, torch.float32), "streaming": budget(3, V, torch.float32)}
    shared, shared_grads = run_group(shared_hidden, weight, bias, batch.attribution, sizes, scores,
                                     memory_budget=budget_[mode], loss_type="all_pairs")
    assert dpo_kernels.last_run().shared_prompt
    unshared, unshared_grads = run_group(unshared_hidden, weight, bias, labels, sizes, scores,
                                         memory_budget=budget_[mode], loss_type="all_pairs")
    truth, base = truth_and_baseline(shared_hidden, weight, bias, batch.attribution, sizes, scores, None,
                                     loss_type="all_pairs")
    check_group(shared, shared_grads, truth, base, torch.float32)
    t_out, t_logps, t_grads = truth
    b_out, b_logps, b_grads = base
    assert_agree(shared.loss, unshared.loss, t_out.loss, b_out.loss, torch.float32, "loss")
    assert_agree(shared.logps, unshared.logps, t_logps, b_logps, torch.float32, "logps")
    assert_agree(shared_grads[1], unshared_grads[1], t_grads[1], b_grads[1], torch.float32, "grad_weight")
    # A shared row's gradient is the sum of the unshared rows' gradients at the positions it stands for.
    folded = torch.zeros(rows * T_shared, H).index_add(
        0, batch.token_rows, unshared_grads[0][batch.token_seqs, flat_pos[batch.token_rows]])
    assert_agree(shared_grads[0].reshape(-1, H), folded, t_grads[0].reshape(-1, H), b_grads[0].reshape(-1, H),
                 torch.float32, "grad_hidden")


@pytest.mark.parametrize("mode", ["one chunk", "streaming", "low"])
def test_groups_of_two_are_sigmoid_dpo(mode):
    """At K = 2 Plackett-Luce is sigmoid DPO: group g's rows (2g, 2g + 1) are pair g's chosen and rejected."""
    B = 4
    hidden, weight, bias, labels, ref, _ = make_groups(seed=9, sizes=(2,) * B, empty=(5,))
    budget_ = GROUP_MODES[mode]
    group, group_grads = run_group(hidden, weight, bias, labels, (2,) * B, ref_logps=ref, memory_budget=budget_)
    order = torch.cat([torch.arange(0, 2 * B, 2), torch.arange(1, 2 * B, 2)])  # chosen first, then rejected
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    pair = dpo_kernels.fused_linear_dpo(h[order], w, labels[order], bias=b, ref_chosen_logps=ref[order[:B]],
                                        ref_rejected_logps=ref[order[B:]], memory_budget=budget_)
    pair.loss.backward()
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), (2,) * B, None, ref)
    (t_out, t_logps, t_grads), (b_out, b_logps, b_grads) = truth, base
    assert_agree(group.loss, pair.loss, t_out.loss, b_out.loss, torch.float32, "loss")
    assert_agree(group.losses, pair.losses, t_out.losses, b_out.losses, torch.float32, "losses")
    assert_agree(group.logps[order], torch.cat([pair.chosen_logps, pair.rejected_logps]), t_logps[order],
                 b_logps[order], torch.float32, "logps")
    assert_agree(group.rewards[order], torch.cat([pair.chosen_rewards, pair.rejected_rewards]), t_out.rewards[order],
                 b_out.rewards[order], torch.float32, "rewards")
    assert group.ranking_accuracy.item() == pair.reward_accuracy.item()
    for name, g, p, tg, bg in zip(("hidden", "weight", "bias"), group_grads, (h.grad, w.grad, b.grad), t_grads,
                                  b_grads, strict=True):
        assert_agree(g, p, tg, bg, torch.float32, f"grad_{name}")


@pytest.mark.parametrize("mode", ["one chunk", "streaming"])
def test_lora_head(mode):
    """A LoRA adapter on the head (`LoraHead`, the weight frozen): the hidden-state and adapter gradients."""
    hidden, weight, bias, labels, ref, scores = make_groups(seed=13)
    g = torch.Generator().manual_seed(14)
    a, b = torch.randn(4, H, generator=g) * 0.3, torch.randn(V, 4, generator=g) * 0.3
    positions = label_positions(labels)

    def plain(dtype):
        h, la, lb = (t.to(dtype).requires_grad_() for t in (hidden, a, b))
        logits = torch.nn.functional.linear(h.reshape(-1, H), weight.to(dtype), bias.to(dtype))
        logits = logits + 0.5 * (h.reshape(-1, H) @ la.T) @ lb.T
        tok = torch.log_softmax(logits, -1)[positions.rows, positions.targets]
        logps = torch.zeros(R, dtype=dtype).index_add(0, positions.seqs, tok)
        out = reference.group_dpo_loss(logps, ref.to(dtype), SIZES, scores)
        return out, logps.detach(), torch.autograd.grad(out.loss, (h, la, lb))

    h, la, lb = (t.clone().requires_grad_() for t in (hidden, a, b))
    out = dpo_kernels.fused_linear_group_dpo(h, weight, labels, SIZES, scores, bias=bias, ref_logps=ref,
                                             memory_budget=GROUP_MODES[mode], lora=dpo_kernels.LoraHead(la, lb, 0.5))
    out.loss.backward()
    check_group(out, (h.grad, la.grad, lb.grad), plain(torch.float64), plain(torch.float32), torch.float32,
                grad_names=("hidden", "lora a", "lora b"))


def test_modules():
    hidden, weight, bias, labels, ref, scores = make_groups(seed=10)
    settings = {"loss_type": "all_pairs", "pair_loss": "ipo", "beta": 0.2, "average": True}
    module = dpo_kernels.FusedLinearGroupLoss(memory_budget=budget(4, V, torch.float32), token_stats=True,
                                              **settings)
    out = module(hidden, weight, labels, SIZES, scores, bias=bias, ref_logps=ref)
    direct = dpo_kernels.fused_linear_group_dpo(hidden, weight, labels, SIZES, scores, bias=bias, ref_logps=ref,
                                                memory_budget=budget(4, V, torch.float32), token_stats=True,
                                                **settings)
    for name, a, b in zip(out._fields, out, direct, strict=True):
        assert (a is None and b is None) or torch.equal(a, b), name
    # From logits: the same loss within the rule, every field.
    logits = (hidden @ weight.T + bias).requires_grad_()
    from_logits = dpo_kernels.GroupDPOLoss(**settings)(logits, labels, torch.tensor(SIZES), scores, ref)
    from_logits.loss.backward()
    assert logits.grad is not None and from_logits.entropy_sum is None
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), SIZES, scores, ref, **settings)
    check_group(from_logits, (), truth, base, torch.float32, grad_names=())
    assert torch.equal(from_logits.lengths, out.lengths)


@pytest.mark.parametrize("bad, message", [
    ({"group_sizes": (2, 3, 8, 2, 4)}, "sum to 19 but labels holds R = 20"),
    ({"group_sizes": (2, 3, 8, 2, 4, 1)}, "group 5 has 1 responses"),
    ({"scores": torch.zeros(19)}, r"scores must be \[R\] = \[20\]"),
    ({"ref_logps": torch.zeros(20, dtype=torch.long)}, "ref_logps must be float"),
    ({"ref_logps": torch.zeros(20), "ref_hidden": torch.zeros(20, T, H)}, "not both"),
    ({"loss_type": "sigmoid"}, "unknown group loss_type"),
    ({"top_k": 2, "loss_type": "all_pairs"}, "top_k applies to loss_type 'plackett_luce'"),
])
def test_bad_inputs_raise_one_clear_error_before_any_kernel(monkeypatch, bad, message):
    from dpo_kernels.fused_linear import engine

    def refuse(*args, **kwargs):
        raise AssertionError("the engine ran")

    monkeypatch.setattr(engine, "fused_dpo", refuse)
    monkeypatch.setattr(engine, "forward_logps", refuse)
    hidden, weight, bias, labels, ref, scores = make_groups(seed=11)
    kwargs = {"group_sizes": SIZES, "scores": scores, "ref_logps": ref, **bad}
    with pytest.raises(ValueError, match=message):
        dpo_kernels.fused_linear_group_dpo(hidden, weight, labels, bias=bias, **kwargs)


# Two gloo processes: the head split by vocabulary rows (50 + 47), or every row's positions split at CUT.
SHARDS, CUT = (50, 47), 4
PARALLEL_CASES = [f"{kind}-{mode}" for kind in ("vocab", "sequence") for mode in ("resident", "streaming", "low")]


def _parallel_case(kind, mode, rank):
    """One case on this rank, judged against the float64 truth of the whole batch: the loss and metrics, the
    rank's part of the hidden-state gradient, and the whole head gradient (shards joined, or partials summed)."""
    hidden, weight, bias, labels, ref, scores = make_groups(seed=12)
    truth, base = truth_and_baseline(hidden, weight, bias, label_positions(labels), SIZES, scores, ref)
    world = dist.group.WORLD
    span = slice(None)
    if kind == "vocab":
        off = sum(SHARDS[:rank])
        head = (weight[off : off + SHARDS[rank]], bias[off : off + SHARDS[rank]])
        options, shift, rows = ParallelOptions(vocab_group=world), True, max(SHARDS)
    else:
        span = slice(0, CUT) if rank == 0 else slice(CUT, T)
        aligned = torch.full_like(labels, IGNORE_INDEX)
        aligned[:, :-1] = labels[:, 1:]  # shift=False: position t scores the label the shifted layout gives it
        labels = aligned
        head, options, shift, rows = (weight, bias), ParallelOptions(sequence_group=world), False, V
    budget_ = {"resident": budget(2 * T, rows, torch.float32), "streaming": budget(4, rows, torch.float32),
               "low": "low"}[mode]
    out, (g_h, g_w, g_b) = run_group(hidden[:, span], head[0], head[1], labels[:, span], SIZES, scores,
                                     ref_logps=ref, shift=shift, memory_budget=budget_, parallel_options=options)
    if kind == "vocab":
        g_w, g_b = (_joined_shards(g) for g in (g_w, g_b))
    else:
        g_w, g_b = (parallel.sum_over(g, world) for g in (g_w, g_b))
    (t_out, t_logps, t_grads), (b_out, b_logps, b_grads) = truth, base
    check_group(out, (g_h, g_w, g_b), (t_out, t_logps, (t_grads[0][:, span], *t_grads[1:])),
                (b_out, b_logps, (b_grads[0][:, span], *b_grads[1:])), torch.float32)


def _joined_shards(grad):
    padded = grad.new_zeros((max(SHARDS),) + grad.shape[1:])
    padded[: grad.shape[0]] = grad
    gathered = [torch.empty_like(padded) for _ in SHARDS]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, SHARDS, strict=True)])


def _parallel_cases(rank):
    """Every case on this rank: its failure's traceback, or None, by name."""
    results = {}
    for name in PARALLEL_CASES:
        try:
            _parallel_case(*name.split("-"), rank)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    return run_on_gloo_ranks(_parallel_cases, 2, tmp_path_factory.mktemp("group_parallel"), timeout_s=120)


@pytest.mark.parametrize("name", PARALLEL_CASES)
def test_vocabulary_and_sequence_parallel(parallel_results, name):
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(parallel_results) if res.get(name, "did not run")]
    assert not errors, "\n".join(errors)
