"""The fused linear engine across gloo processes on the CPU against one process: a vocabulary-sharded head
(`vocab_parallel_group`, also as a DTensor) and sequences split along time (`sequence_parallel_group`); and the
ranks' consistency check, which must refuse inconsistent ranks with one ValueError on every rank.

One spawn of 4 processes runs every case, in phases over subgroups: ranks {0, 1} (even vocabulary shards) beside
{2, 3} (time slices), then {0, 1, 2} (uneven shards and slices), then all four as a 2 x 2 grid (both groups at once).
Each rank records every case's failure (or None) in a JSON file; the tests below read them. Each case is judged
against the float64 eager truth of the whole batch by the accuracy rule (tests/helpers.py): the loss and metrics on
every rank, the hidden-state gradient of the rank's part, the weight gradient of its shard (vocabulary) or the sum
of the ranks' partials (sequence); and every rank's loss and metrics must be bitwise the same.
"""
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dpo_kernels
from dpo_kernels import LOSS_TYPES, reference
from dpo_kernels.fused_linear import parallel, rank_check
from dpo_kernels.fused_linear.parallel import ParallelOptions
from tests.helpers import (
    IGNORE_INDEX,
    LOSS_PARAMS,
    REFERENCE_FREE,
    assert_within_rule,
    budget,
    check_against_truth,
    eager_dpo,
    make_batch,
)

B, T, H, V = 2, 9, 8, 37
MODES = ("resident", "streaming", "low")
# Shard sizes of the 37 vocabulary rows and cut points of the 9 positions, per group size.
SHARDS = {2: (19, 18), 3: (15, 10, 12)}
CUTS = {2: (0, 5, 9), 3: (0, 2, 6, 9)}


def _cases(kind, world):
    """Case names of one phase: every loss type in every mode, padded and packed, with the two-process groups;
    fewer with three (the uneven shards and slices) and in the 2 x 2 grid."""
    names = []
    if world == 2 and kind in ("vp", "sp"):
        for loss_type in LOSS_TYPES:
            for mode in MODES:
                for layout in ("padded", "packed"):
                    names.append(f"{kind}{world}-{loss_type}-{mode}-{layout}-sum-fp32")
        for loss_type in ("sigmoid", "sft", "simpo", "ipo"):
            names.append(f"{kind}{world}-{loss_type}-streaming-padded-average-fp32")
        names += [f"{kind}{world}-sigmoid-streaming-padded-sum-bf16", f"{kind}{world}-ipo-resident-packed-sum-bf16",
                  f"{kind}{world}-stats", f"{kind}{world}-refhidden", f"{kind}{world}-logprobs"]
        if kind == "vp":
            names.append("vp2-dtensor")
    elif kind in ("vp", "sp"):
        for loss_type in ("sigmoid", "aot", "apo_down", "sft"):
            for mode in MODES:
                names.append(f"{kind}{world}-{loss_type}-{mode}-padded-sum-fp32")
        names += [f"{kind}{world}-robust-streaming-packed-average-fp32", f"{kind}{world}-stats",
                  f"{kind}{world}-logprobs"]
    else:
        for loss_type in ("sigmoid", "aot", "sft"):
            for mode in MODES:
                names.append(f"2d4-{loss_type}-{mode}-padded-sum-fp32")
        names += ["2d4-sigmoid-low-padded-average-fp32", "2d4-stats"]
    return names


PHASES = [  # (kind, ranks) run side by side within a phase
    [("vp", (0, 1)), ("sp", (2, 3))],
    [("vp", (0, 1, 2))],
    [("sp", (0, 1, 2))],
    [("2d", (0, 1, 2, 3))],
]
ALL_CASES = [name for phase in PHASES for kind, ranks in phase for name in _cases(kind, len(ranks))]


# --- What each rank passes: its shard of the head, its slice of the positions.


def _aligned(labels):
    """Labels aligned to positions (`shift=False`): position t scores the label the shifted layout gives it."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def _positions(lengths, part, cuts):
    """Per row, the positions `[a, b)` of `part` of `parts`: with `cuts` (sequence parallel) a fixed cut of the
    time axis clipped to the row's length; without, the whole row."""
    spans = []
    for n in lengths.tolist():
        if cuts is None:
            spans.append((0, n))
        else:
            spans.append((min(cuts[part], n), min(cuts[part + 1], n)))
    return spans


def _pack(tensor, spans):
    return torch.cat([tensor[r, a:b] for r, (a, b) in enumerate(spans)])


def _cu(spans):
    return torch.tensor([0] + [b - a for a, b in spans]).cumsum(0)


class Setup:
    """The case's inputs on this rank: `part` of the positions (sequence parallel) and `shard` of the head."""

    def __init__(self, vp, sp, dtype, seed=0):
        self.vp, self.sp, self.dtype = vp, sp, dtype
        self.hidden, self.weight, self.bias, self.labels, self.lengths, self.ref_c, self.ref_r = make_batch(
            B, T, H, V, dtype, seed=seed)
        self.shift = sp is None
        if sp is not None:
            self.labels = _aligned(self.labels)
        if vp is None:
            self.off, self.rows = 0, V
        else:
            sizes = SHARDS[dist.get_world_size(vp)]
            rank = dist.get_rank(vp)
            self.off, self.rows = sum(sizes[:rank]), sizes[rank]
            self.largest = max(sizes)
        if sp is None:
            self.part, self.cut = 0, (0, T)
        else:
            cuts = CUTS[dist.get_world_size(sp)]
            self.part = dist.get_rank(sp)
            self.cut = (cuts[self.part], cuts[self.part + 1])
            self.cuts = cuts

    def shard(self, t):
        return t[self.off : self.off + self.rows]

    def whole(self, grad):
        """The head's whole gradient from this rank's: the partial sums of the sequence-parallel ranks added (in
        fp32, then rounded once, as a data-parallel reduction in fp32 would), the vocabulary shards joined in rank
        order. The accuracy rule then judges the whole gradient, as it does in one process."""
        if self.sp is not None:
            grad = parallel.sum_over(grad.float(), self.sp).to(grad.dtype)
        if self.vp is None:
            return grad
        sizes = SHARDS[dist.get_world_size(self.vp)]
        padded = grad.new_zeros((max(sizes),) + grad.shape[1:])
        padded[: grad.shape[0]] = grad
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded, group=self.vp)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])

    def inputs(self, packed):
        """`(hidden, labels, cu_seqlens, hidden_grad_of)`: the rank's inputs, and a function taking the whole
        batch's `[2B, T, H]` hidden-state gradient to the rank's part of it."""
        a, b = self.cut
        if not packed:
            return (self.hidden[:, a:b], self.labels[:, a:b], None, lambda g: g[:, a:b])
        spans = _positions(self.lengths, self.part, None if self.sp is None else self.cuts)
        return _pack(self.hidden, spans), _pack(self.labels, spans), _cu(spans), lambda g: _pack(g, spans)

    def budget_for(self, mode):
        rows = V if self.vp is None else self.largest
        return {"resident": None, "streaming": budget(4, rows, self.dtype), "low": "low"}[mode]


def _same_on_every_rank(values, group, what):
    """Every rank's `values` (a flat float64 vector) bitwise equal to rank 0's of `group`."""
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, values, group=group)
    for r, v in enumerate(gathered):
        assert torch.equal(v, gathered[0]), f"{what} differs between ranks 0 and {r}: {gathered[0]} vs {v}"


def _flat(*tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors if t is not None])


def _groups_union(vp, sp):
    return [g for g in (vp, sp) if g is not None]


def _dpo_case(name, vp, sp):
    """`KIND-LOSS-MODE-LAYOUT-AVERAGE-DTYPE`."""
    _, loss_type, mode, layout, average, dtype = name.split("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    average = average == "average"
    s = Setup(vp, sp, dtype, seed=len(name))
    ref_c, ref_r = (None, None) if loss_type in REFERENCE_FREE else (s.ref_c, s.ref_r)
    params = LOSS_PARAMS.get(loss_type, {})
    common = dict(loss_type=loss_type, average=average, **params)
    truth = _eager(s, ref_c, ref_r, torch.float64, common)
    base = _eager(s, ref_c, ref_r, dtype, common)
    hidden, labels, cu, part_of = s.inputs(layout == "packed")
    h = hidden.detach().clone().requires_grad_()
    w = s.shard(s.weight).detach().clone().requires_grad_()
    b = s.shard(s.bias).detach().clone().requires_grad_()
    out = dpo_kernels.fused_linear_dpo(h, w, labels, bias=b, cu_seqlens=cu, ref_chosen_logps=ref_c,
                                       ref_rejected_logps=ref_r, shift=s.shift, memory_budget=s.budget_for(mode),
                                       vocab_parallel_group=vp, sequence_parallel_group=sp, **common)
    out.loss.backward()
    _check_dpo(s, out, (h.grad, w.grad, b.grad), truth, base, part_of)


def _eager(s, ref_c, ref_r, dtype, common):
    return eager_dpo(s.hidden, s.weight, s.bias, s.labels, ref_c, ref_r, dtype=dtype, shift=s.shift, **common)


def _check_dpo(s, out, grads, truth, base, part_of):
    metrics = (out.loss, out.chosen_logps, out.rejected_logps, out.chosen_rewards, out.rejected_rewards, out.losses,
               out.reward_accuracy, out.reward_margin, out.chosen_lengths, out.rejected_lengths)
    for g in _groups_union(s.vp, s.sp):
        _same_on_every_rank(_flat(*metrics), g, "loss and metrics")
    grad_h, grad_w, grad_b = grads
    grad_w, grad_b = s.whole(grad_w), s.whole(grad_b)

    t_h, t_w, t_b = truth[2]
    b_h, b_w, b_b = base[2]
    if s.sp is None or s.dtype == torch.float32:
        check_against_truth(out, [grad_h, grad_w, grad_b], (truth[0], truth[1], (part_of(t_h), t_w, t_b)),
                            (base[0], base[1], (part_of(b_h), b_w, b_b)), s.dtype)
        return
    # Each rank's partial head gradient is rounded to bf16 before the ranks' sum: one rounding per rank beyond
    # what one process does, so the head's gradients may be that many bf16 ulps further from the truth.
    check_against_truth(out, [grad_h], (truth[0], truth[1], (part_of(t_h),)), (base[0], base[1], (part_of(b_h),)),
                        s.dtype, grad_names=("hidden",))
    ranks = dist.get_world_size(s.sp)
    for name, g, t, b in (("grad_weight", grad_w, t_w, b_w), ("grad_bias", grad_b, t_b, b_b)):
        assert_within_rule(g, t, b, atol=ranks * 2.0**-8 * t.abs().max().item(), name=name)


def _dtensor_case(name, vp, sp):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    s = Setup(None, None, torch.float32, seed=3)
    world = dist.get_world_size(vp)
    mesh = DeviceMesh.from_group(vp, "cpu")
    w = distribute_tensor(s.weight, mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(s.bias, mesh, [Shard(0)]).requires_grad_()
    h = s.hidden.detach().clone().requires_grad_()
    common = dict(loss_type="sigmoid", average=False)
    truth = _eager(s, s.ref_c, s.ref_r, torch.float64, common)
    base = _eager(s, s.ref_c, s.ref_r, torch.float32, common)
    out = dpo_kernels.FusedLinearDPOLoss(memory_budget=budget(4, V, torch.float32))(
        h, w, s.labels, bias=b, ref_chosen_logps=s.ref_c, ref_rejected_logps=s.ref_r)
    out.loss.backward()
    assert -(-V // world) * (world - 1) < V, "Shard(0) must leave every rank a shard here"
    _check_dpo(s, out, (h.grad, w.grad.full_tensor(), b.grad.full_tensor()), truth, base, lambda g: g)


def _stats_case(name, vp, sp):
    """Token stats (entropy sums, top-1 counts) against one process's engine on the whole batch."""
    s = Setup(vp, sp, torch.float32, seed=5)
    # Every other scored label the logits' argmax, so that top-1 hits are there to count.
    argmax = torch.nn.functional.linear(s.hidden, s.weight, s.bias).argmax(-1)
    if s.shift:
        argmax = torch.nn.functional.pad(argmax[:, :-1], (1, 0))
    hit = (s.labels != IGNORE_INDEX) & (torch.arange(T) % 2 == 0)
    s.labels = torch.where(hit, argmax, s.labels)
    hidden, labels, cu, _ = s.inputs(False)
    kwargs = dict(ref_chosen_logps=s.ref_c, ref_rejected_logps=s.ref_r, shift=s.shift, token_stats=True,
                  memory_budget=budget(4, V, torch.float32))
    one = dpo_kernels.fused_linear_dpo(s.hidden, s.weight, s.labels, bias=s.bias, **kwargs)
    out = dpo_kernels.fused_linear_dpo(hidden, s.shard(s.weight), labels, bias=s.shard(s.bias),
                                       vocab_parallel_group=vp, sequence_parallel_group=sp, **kwargs)
    for field in ("chosen_entropy_sum", "rejected_entropy_sum"):
        torch.testing.assert_close(getattr(out, field), getattr(one, field), rtol=1e-5, atol=1e-5, msg=field)
    for field in ("chosen_top1_count", "rejected_top1_count"):
        assert torch.equal(getattr(out, field), getattr(one, field)), field
    assert int(one.chosen_top1_count.sum() + one.rejected_top1_count.sum()) > 0, "no top-1 hit: a weak test"


def _refhidden_case(name, vp, sp):
    """The reference model's hidden states and its own head (sharded alike) instead of precomputed log-probs."""
    s = Setup(vp, sp, torch.float32, seed=6)
    g = torch.Generator().manual_seed(7)
    ref_hidden = torch.randn(s.hidden.shape, generator=g)
    ref_weight = s.weight + 0.1 * torch.randn(s.weight.shape, generator=g)
    with torch.no_grad():
        ref_logps = reference.sequence_logprobs(torch.nn.functional.linear(ref_hidden.double(), ref_weight.double()),
                                                s.labels, shift=s.shift)
    s.ref_c, s.ref_r = ref_logps[:B].float(), ref_logps[B:].float()
    common = dict(loss_type="sigmoid", average=False)
    truth = _eager(s, s.ref_c, s.ref_r, torch.float64, common)
    base = _eager(s, s.ref_c, s.ref_r, torch.float32, common)
    hidden, labels, cu, part_of = s.inputs(False)
    h = hidden.detach().clone().requires_grad_()
    w = s.shard(s.weight).detach().clone().requires_grad_()
    b = s.shard(s.bias).detach().clone().requires_grad_()
    a, e = s.cut
    out = dpo_kernels.fused_linear_dpo(h, w, labels, bias=b, ref_hidden=ref_hidden[:, a:e],
                                       ref_weight=s.shard(ref_weight), shift=s.shift, vocab_parallel_group=vp,
                                       sequence_parallel_group=sp, **common)
    out.loss.backward()
    _check_dpo(s, out, (h.grad, w.grad, b.grad), truth, base, part_of)


def _logprobs_case(name, vp, sp):
    """`linear_sequence_logprobs` with an arbitrary upstream gradient, sums and means."""
    s = Setup(vp, sp, torch.float32, seed=8)
    upstream = torch.randn(2 * B, generator=torch.Generator().manual_seed(9))
    for average in (False, True):
        results = []
        for dtype in (torch.float64, torch.float32):
            h, w, b = (t.detach().to(dtype, copy=True).requires_grad_() for t in (s.hidden, s.weight, s.bias))
            logps = reference.sequence_logprobs(torch.nn.functional.linear(h, w, b), s.labels, shift=s.shift,
                                                average=average)
            (logps * upstream.to(dtype)).sum().backward()
            results.append((logps, h.grad, w.grad, b.grad))
        hidden, labels, cu, part_of = s.inputs(True)
        h = hidden.detach().clone().requires_grad_()
        w = s.shard(s.weight).detach().clone().requires_grad_()
        b = s.shard(s.bias).detach().clone().requires_grad_()
        out = dpo_kernels.linear_sequence_logprobs(h, w, labels, bias=b, cu_seqlens=cu, shift=s.shift,
                                                   average=average, memory_budget=budget(4, V, torch.float32),
                                                   vocab_parallel_group=vp, sequence_parallel_group=sp)
        (out * upstream).sum().backward()
        for g in _groups_union(vp, sp):
            _same_on_every_rank(_flat(out), g, "log-probs")
        (t_out, t_h, t_w, t_b), (b_out, b_h, b_w, b_b) = results
        for what, got, t, bb in (("logps", out, t_out, b_out), ("grad_hidden", h.grad, part_of(t_h), part_of(b_h)),
                                 ("grad_weight", s.whole(w.grad), t_w, b_w), ("grad_bias", s.whole(b.grad), t_b, b_b)):
            assert_within_rule(got, t, bb, atol=1e-5, name=f"{what} (average={average})")


def _run(name, vp, sp):
    kind = name.split("-")[1]
    fn = {"stats": _stats_case, "refhidden": _refhidden_case, "logprobs": _logprobs_case,
          "dtensor": _dtensor_case}.get(kind, _dpo_case)
    fn(name, vp, sp)


def _gloo_worker(rank, world, store_path, timeout_s, body, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = body(rank)
    with open(f"{out_dir}/{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def run_on_gloo_ranks(body, world, out, *, timeout_s):
    """Runs `body(rank)` (a module-level function, as spawn pickles it) in `world` spawned gloo processes of one CPU
    thread each, in one process group; returns each rank's result, a JSON value, by rank."""
    mp.start_processes(_gloo_worker, args=(world, str(out / "store"), timeout_s, body, str(out)), nprocs=world,
                       join=True, start_method="spawn")
    return [json.loads((out / f"{r}.json").read_text()) for r in range(world)]


def _run_phases(rank):
    """Every case of the phases this rank takes part in: its failure's traceback, or None, by case name."""
    groups = {ranks: dist.new_group(list(ranks)) for ranks in ((0, 1), (2, 3), (0, 1, 2), (0, 2), (1, 3))}
    results = {}
    for phase in PHASES:
        for kind, ranks in phase:
            if rank not in ranks:
                continue
            if kind == "2d":
                vp = groups[(0, 1) if rank < 2 else (2, 3)]
                sp = groups[(0, 2) if rank % 2 == 0 else (1, 3)]
            else:
                vp, sp = (groups[ranks], None) if kind == "vp" else (None, groups[ranks])
            for name in _cases(kind, len(ranks)):
                try:
                    _run(name, vp, sp)
                    results[name] = None
                except Exception:
                    results[name] = traceback.format_exc()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    per_rank = run_on_gloo_ranks(_run_phases, 4, tmp_path_factory.mktemp("parallel"), timeout_s=120)
    merged = {}
    for r, res in enumerate(per_rank):
        for name, err in res.items():
            merged.setdefault(name, []).append(None if err is None else f"rank {r}:\n{err}")
    return merged


@pytest.mark.parametrize("name", ALL_CASES)
def test_parallel_case(results, name):
    assert name in results, f"{name} did not run"
    errors = [e for e in results[name] if e is not None]
    assert not errors, "\n".join(errors)


def test_every_rank_ran_every_case(results):
    for phase in PHASES:
        for kind, ranks in phase:
            for name in _cases(kind, len(ranks)):
                assert len(results[name]) == len(ranks), name


def test_bytes_per_chunk_are_o_of_c():
    assert parallel.allreduce_bytes_per_chunk(1000) == 1000 * 12
    assert parallel.allreduce_bytes_per_chunk(2000, token_stats=True) == 2 * parallel.allreduce_bytes_per_chunk(
        1000, token_stats=True)


def test_sequence_parallel_needs_aligned_labels():
    hidden, weight, _, labels, *_ = make_batch(1, 5, 4, 11)
    with pytest.raises(ValueError, match="shift=False"):
        dpo_kernels.fused_linear_dpo(hidden, weight, labels, sequence_parallel_group=object(), shift=True)


# --- The ranks' consistency check: two ranks, one of which passes something the other does not.

# Case -> (what rank 0 raises, what rank 1 raises): None (no error) or (exception type, text in the message). A
# case whose two ranks expect the same error must also give both ranks the very same message.
CHECKS = {
    "vp-consistent": (None, None),
    "vp-labels-shifted": ((ValueError, "vocab_parallel_group disagree on scored positions: ranks [0] hold one value; "
                                       "ranks [1] hold one value"),) * 2,
    "vp-hidden-differs": ((ValueError, "vocab_parallel_group disagree on hidden states: "),) * 2,
    "vp-batch-differs": ((ValueError, "vocab_parallel_group disagree on hidden rows: ranks [0] have 4; ranks [1] "
                                      "have 2"),) * 2,
    "vp-dtype-differs": ((ValueError, "disagree on hidden dtype: ranks [0] have float32; ranks [1] have "
                                      "bfloat16"),) * 2,
    "vp-budget-differs": ((ValueError, "vocab_parallel_group disagree on settings"),) * 2,
    "vp-logprobs-labels-shifted": ((ValueError, "vocab_parallel_group disagree on scored positions"),) * 2,
    "vp-own-error": ((ValueError, "ranks [1] refused their inputs"), (ValueError, "labels shape")),
    "vp-not-a-group": ((TypeError, "vocab_parallel_group must be a torch.distributed ProcessGroup, got str"),) * 2,
    "vp-outside-group": (None, (ValueError, "this rank is not in vocab_parallel_group")),
    "vp-check-off": (None, None),
    "vp-env-off": (None, None),
    "sp-consistent": (None, None),
    "sp-vocab-differs": ((ValueError, "sequence_parallel_group disagree on head rows: ranks [0] have 37; ranks [1] "
                                      "have 38"),) * 2,
    "sp-batch-differs": ((ValueError, "sequence_parallel_group disagree on sequences: ranks [0] have 4; ranks [1] "
                                      "have 2"),) * 2,
    "sp-dtype-differs": ((ValueError, "sequence_parallel_group disagree on hidden dtype"),) * 2,
}


def _check_case(name, group, alone, rank):
    """Runs case `name` on this rank (`alone`: a group of rank 0 only, which rank 1 is outside of)."""
    kind, what = name.split("-", 1)
    vp, sp = (group, None) if kind == "vp" else (None, group)
    s = Setup(vp, sp, torch.float32, seed=11)
    hidden, labels, _, _ = s.inputs(False)
    weight, bias = s.shard(s.weight), s.shard(s.bias)
    kwargs = dict(ref_chosen_logps=s.ref_c, ref_rejected_logps=s.ref_r, shift=s.shift)
    # The shorthand keywords, as users call it; the options object where only it can say what the case needs.
    groups = dict(vocab_parallel_group=vp, sequence_parallel_group=sp)
    if what == "not-a-group":
        groups = dict(vocab_parallel_group="tp")
    elif what == "outside-group":
        groups = dict(vocab_parallel_group=alone)
        weight, bias = s.weight, s.bias
    elif what == "check-off":
        groups = dict(parallel_options=ParallelOptions(vp, check_ranks=False))
    if rank == 1:
        if what.endswith("labels-shifted") or what in ("check-off", "env-off"):
            labels = torch.where(labels == IGNORE_INDEX, labels, (labels + 5) % V)
        elif what == "hidden-differs":
            hidden = hidden.clone()
            hidden[0, 3, 0] += 1e-3
        elif what == "batch-differs":
            hidden, labels = hidden[[0, B]], labels[[0, B]]
            kwargs.update(ref_chosen_logps=s.ref_c[:1], ref_rejected_logps=s.ref_r[:1])
        elif what == "dtype-differs":
            hidden, weight, bias = (t.bfloat16() for t in (hidden, weight, bias))
        elif what == "budget-differs":
            kwargs["memory_budget"] = "low"
        elif what == "own-error":
            labels = labels[:, :-1]
        elif what == "vocab-differs":
            weight, bias = torch.cat([weight, weight[:1]]), torch.cat([bias, bias[:1]])
    if what == "logprobs-labels-shifted":
        dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, bias=bias, shift=s.shift, **groups)
        return
    if what == "env-off":
        os.environ[parallel.CHECK_RANKS_ENV] = "0"
    try:
        out = dpo_kernels.fused_linear_dpo(hidden, weight, labels, bias=bias, **groups, **kwargs)
    finally:
        os.environ.pop(parallel.CHECK_RANKS_ENV, None)
    assert torch.isfinite(out.loss), out.loss


def _run_checks(rank):
    """What each check raised on this rank, `[type name, message, traceback]`, or None, by check name."""
    group, alone = dist.new_group([0, 1]), dist.new_group([0])
    results = {}
    for name in CHECKS:
        try:
            _check_case(name, group, alone, rank)
            results[name] = None
        except Exception as error:  # what each rank raised is the result under test
            results[name] = [type(error).__name__, str(error), traceback.format_exc()]
    return results


@pytest.fixture(scope="module")
def check_results(tmp_path_factory):
    return run_on_gloo_ranks(_run_checks, 2, tmp_path_factory.mktemp("rank_check"), timeout_s=60)


@pytest.mark.parametrize("name", list(CHECKS))
def test_inconsistent_ranks_are_refused_on_every_rank(check_results, name):
    got = [check_results[rank][name] for rank in range(2)]
    for rank, expected in enumerate(CHECKS[name]):
        if expected is None:
            assert got[rank] is None, f"rank {rank} raised:\n{got[rank][2]}"
            continue
        assert got[rank] is not None, f"rank {rank} raised nothing; expected {expected}"
        kind, message, trace = got[rank]
        assert kind == expected[0].__name__ and expected[1] in message, f"rank {rank}:\n{trace}"
    if CHECKS[name][0] == CHECKS[name][1] and got[0] is not None:
        assert got[0][1] == got[1][1], "the ranks raised different messages"


def test_checksum_is_the_same_in_blocks_and_views_and_sees_a_shift(monkeypatch):
    labels = torch.randint(0, 1000, (6, 50), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(6, 50, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    whole = [rank_check.checksum(t) for t in (labels, hidden)]
    monkeypatch.setattr(rank_check, "_BLOCK", 7)
    assert [rank_check.checksum(t) for t in (labels, hidden)] == whole
    assert rank_check.checksum(hidden.transpose(0, 1).contiguous().transpose(0, 1)) == whole[1]
    assert rank_check.checksum((labels + 5) % 1000) != whole[0]
    assert rank_check.checksum(labels.roll(1, 1)) != whole[0]
    nudged = hidden.clone()
    nudged.view(torch.int16)[2, 7, 3] += 1  # one bf16 ulp
    assert rank_check.checksum(nudged) != whole[1]


def test_options_and_shorthand_are_one_or_the_other():
    hidden, weight, _, labels, *_ = make_batch(1, 5, 4, 11)
    with pytest.raises(ValueError, match="not both"):
        dpo_kernels.fused_linear_dpo(hidden, weight, labels, parallel_options=ParallelOptions(),
                                     vocab_parallel_group=object())
    with pytest.raises(TypeError, match="parallel_options must be a ParallelOptions"):
        dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, parallel_options="tp")


def test_check_switch_reads_the_field_then_the_environment(monkeypatch):
    monkeypatch.delenv(parallel.CHECK_RANKS_ENV, raising=False)
    assert ParallelOptions().checks_ranks
    monkeypatch.setenv(parallel.CHECK_RANKS_ENV, "0")
    assert not ParallelOptions().checks_ranks
    assert ParallelOptions(check_ranks=True).checks_ranks
    monkeypatch.setenv(parallel.CHECK_RANKS_ENV, "1")
    assert not ParallelOptions(check_ranks=False).checks_ranks
