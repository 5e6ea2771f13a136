"""Pairs grouped by prompt (`fused_linear_dpo_by_prompt`): each distinct response scored once, the pairwise loss on
indexed pairs, against a float64 computation and against `fused_linear_dpo` on the same pairs as unshared rows.

Truth: the float64 log-softmax of every scored row, summed per response, gathered into the pairs, then
`reference.dpo_loss`, with autograd for the gradients. Baseline: the same in the inputs' dtype. The accuracy rule is
tests/helpers.py.
"""
import pytest
import torch

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_TWICE
from dpo_kernels.shared_prompt import build_group_batch
from tests.fused_linear.test_group_engine import (
    EMPTY,
    GROUP_MODES,
    SIZES,
    assert_agree,
    label_positions,
    make_groups,
    plain_logps,
)
from tests.helpers import DEVICES, IGNORE_INDEX, assert_close_to_truth

pytestmark = pytest.mark.usefixtures("single_thread")

# Within the groups of SIZES (offsets 0, 2, 5, 13, 15): response 5 is in three pairs, 0 on both sides of a pair
# list that repeats it, 14 in none, and the empty response 3 (group 1) is in one.
PAIRS = [(0, 1), (1, 0), (3, 4), (5, 6), (7, 5), (5, 12), (13, 14), (15, 19), (16, 17)]


def plain_pairs(hidden, weight, bias, positions, pairs, ref_logps, dtype, *, average=False, **settings):
    """`(reference.dpo_loss output, grads of (hidden, weight, bias))` in `dtype` on the indexed pairs."""
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    b = None if bias is None else bias.to(dtype).requires_grad_()
    logps, counts = plain_logps(h, w, b, positions, average, dtype)
    c, r = (torch.tensor([p[i] for p in pairs]) for i in (0, 1))
    ref = None if ref_logps is None else ref_logps.to(dtype)
    out = reference.dpo_loss(logps[c], logps[r], None if ref is None else ref[c], None if ref is None else ref[r],
                             chosen_lengths=counts[c], rejected_lengths=counts[r], average=average, **settings)
    grads = torch.autograd.grad(out.loss, [t for t in (h, w, b) if t is not None])
    return out, grads


def run_by_prompt(hidden, weight, bias, labels, sizes, pairs, **kwargs):
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    out = dpo_kernels.fused_linear_dpo_by_prompt(h, w, labels, sizes, pairs, bias=b, **kwargs)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


def check_pairs(out, grads, truth, baseline, dtype):
    (t_out, t_grads), (b_out, b_grads) = truth, baseline
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin"):
        assert_close_to_truth(getattr(out, name), getattr(t_out, name), getattr(b_out, name), dtype, name)
    for name, g, tg, bg in zip(("hidden", "weight", "bias"), grads, t_grads, b_grads, strict=True):
        assert_close_to_truth(g, tg, bg, dtype, f"grad_{name}")


LOSSES = {"sigmoid": {}, "ipo": {"loss_type": "ipo"}, "simpo": {"loss_type": "simpo", "beta": 2.0},
          "robust smoothed": {"loss_type": "robust", "label_smoothing": 0.1}, "aot (couples pairs)": {
              "loss_type": "aot"}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(GROUP_MODES))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_matches_float64(loss, mode, device):
    settings = LOSSES[loss]
    hidden, weight, bias, labels, ref, _ = (t.to(device) for t in make_groups(seed=3))
    ref_logps = None if settings.get("loss_type") == "simpo" else ref
    out, grads = run_by_prompt(hidden, weight, bias, labels, SIZES, PAIRS, ref_logps=ref_logps,
                               memory_budget=GROUP_MODES[mode], **settings)
    record = dpo_kernels.last_run()
    assert record.entry == "fused_linear_dpo_by_prompt"
    if mode == "streaming" and loss != "aot (couples pairs)":
        assert set(record.modes) == {STREAM_TWICE}
    if loss == "aot (couples pairs)" and mode != "one chunk":
        assert record.modes == ()  # a loss that couples pairs recomputes unless the batch is one chunk
    assert out.chosen_lengths[2].item() == 0 and out.losses.shape == (len(PAIRS),)
    cpu = [None if t is None else t.cpu() for t in (hidden, weight, bias, ref_logps)]
    positions = label_positions(labels.cpu())
    truth = plain_pairs(*cpu[:3], positions, PAIRS, cpu[3], torch.float64, **settings)
    base = plain_pairs(*cpu[:3], positions, PAIRS, cpu[3], torch.float32, **settings)
    check_pairs(out, [g.cpu() for g in grads], truth, base, torch.float32)


def test_equals_the_pairs_as_unshared_rows():
    """The same loss, metrics and gradients (the hidden states' summed over each response's rows) as
    `fused_linear_dpo` on the expanded pairs, within the accuracy rule; twice the same bits."""
    hidden, weight, bias, labels, ref, _ = make_groups(seed=4)
    out, grads = run_by_prompt(hidden, weight, bias, labels, SIZES, PAIRS, ref_logps=ref, average=True)
    again, grads_again = run_by_prompt(hidden, weight, bias, labels, SIZES, PAIRS, ref_logps=ref, average=True)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))
    assert torch.equal(out.loss, again.loss)
    c, r = (torch.tensor([p[i] for p in PAIRS]) for i in (0, 1))
    rows = torch.cat([c, r])
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    pairs_out = dpo_kernels.fused_linear_dpo(h[rows], w, labels[rows], bias=b, ref_chosen_logps=ref[c],
                                             ref_rejected_logps=ref[r], average=True)
    pairs_out.loss.backward()
    truth, base = (plain_pairs(hidden, weight, bias, label_positions(labels), PAIRS, ref, dt, average=True)
                   for dt in (torch.float64, torch.float32))
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        assert_agree(getattr(out, name), getattr(pairs_out, name), getattr(truth[0], name), getattr(base[0], name),
                     torch.float32, name)
    t_logps, b_logps = (plain_logps(hidden.to(dt), weight.to(dt), bias.to(dt), label_positions(labels), True, dt)[0]
                        for dt in (torch.float64, torch.float32))
    for name, seqs in (("chosen_logps", c), ("rejected_logps", r)):
        assert_agree(getattr(out, name), getattr(pairs_out, name), t_logps[seqs], b_logps[seqs], torch.float32, name)
    for name, mine, theirs, t, bg in zip(("weight", "bias"), grads[1:], (w.grad, b.grad), truth[1][1:],
                                         base[1][1:], strict=True):
        assert_agree(mine, theirs, t, bg, torch.float32, f"grad_{name}")
    assert_agree(grads[0], h.grad, truth[1][0], base[1][0], torch.float32, "grad_hidden")


def test_shared_prompt_group_rows_score_the_same_pairs():
    """A shared-prompt group batch (each prompt once, each distinct response once) gives the unshared rows' loss."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 3)]
    responses = [[torch.randint(0, 97, (n,), generator=g).tolist() for n in lens] for lens in ((4, 2, 6), (3, 5))]
    batch = build_group_batch(list(zip(prompts, responses, strict=True)))
    pairs = [(0, 1), (2, 1), (0, 2), (3, 4)]
    weight = torch.randn(97, 16, generator=g) * 0.5
    embed = torch.randn(97, 16, generator=g)
    hidden = embed[batch.input_ids]  # a "model" whose hidden state is the token's embedding: layout-independent
    shared = dpo_kernels.fused_linear_dpo_by_prompt(hidden, weight, batch.attribution, batch.group_sizes, pairs)
    rows = [p + r for p, rs in zip(prompts, responses, strict=True) for r in rs]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    starts = [len(p) for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    for i, (row, s) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, s : len(row)] = torch.tensor(row[s:])
    unshared = dpo_kernels.fused_linear_dpo_by_prompt(embed[ids], weight, labels, [3, 2], pairs)
    positions = label_positions(labels)
    c, r = (torch.tensor([p[i] for p in pairs]) for i in (0, 1))
    truth, base = (plain_pairs(embed[ids], weight, None, positions, pairs, None, dt)[0]
                   for dt in (torch.float64, torch.float32))
    assert_agree(shared.loss, unshared.loss, truth.loss, base.loss, torch.float32, "loss")
    t_logps, b_logps = (plain_logps(embed[ids].to(dt), weight.to(dt), None, positions, False, dt)[0]
                        for dt in (torch.float64, torch.float32))
    for name, seqs in (("chosen_logps", c), ("rejected_logps", r)):
        assert_agree(getattr(shared, name), getattr(unshared, name), t_logps[seqs], b_logps[seqs], torch.float32,
                     name)
    assert dpo_kernels.last_run().modes == (RESIDENT,)


@pytest.mark.parametrize("pairs, sizes, message", [
    ([(0, 2)], SIZES, "spans groups 0 and 1"),
    ([(0, 20)], SIZES, "outside"),
    ([], SIZES, "pairs is empty"),
    ([(0, 1)], (2, 3), "sum to 5"),
    ([(0, 1)], (2, 0, 18), "sizes >= 1"),
    (torch.tensor([[0.0, 1.0]]), SIZES, "integer tensor"),
])
def test_bad_pairs_are_named_before_any_kernel(pairs, sizes, message):
    hidden, weight, bias, labels, _, _ = make_groups(seed=6)
    with pytest.raises(ValueError, match=message):
        dpo_kernels.fused_linear_dpo_by_prompt(hidden, weight, labels, sizes, pairs)


def test_empty_response_stays_zero():
    hidden, weight, bias, labels, ref, _ = make_groups(seed=7)
    out = dpo_kernels.fused_linear_dpo_by_prompt(hidden, weight, labels, SIZES, PAIRS, ref_logps=ref)
    assert out.chosen_logps[2].item() == 0.0 and PAIRS[2][0] == EMPTY
