"""The fused linear engine across processes: a vocabulary-sharded head and sequences split along time, on
torch.distributed process groups (docs/design.md, "The fused linear engine", "Across processes").

`ParallelOptions` is the one argument that says how the head is split (the `vocab_parallel_group=` and
`sequence_parallel_group=` keywords are shorthands that build it); `HeadParallel` is its per-call form: it checks
the groups and that the ranks agree (`rank_check.py`), finds the local head and its shard, and owns every exchange
the call needs (global counts, sums over ranks), so that the API runs one code path with or without groups.

Vocabulary parallel (`vocab_parallel_group`): rank r holds rows `[off_r, off_r + V_r)` of the head (a contiguous
shard; shards may differ in size) and the same hidden states and global labels as every other rank. Each chunk's
logits `Z_r = h W_r^T` stay on their rank; the pass (`VocabParallelPass`, in place of `logsoftmax_pass`) exchanges
only per-token numbers: an all-reduce MAX of the `[C]` row maxima, then one all-reduce SUM of `[C, 2]` (the sum of
`exp(Z_r - max)` and the label's logit, which one rank owns and the others add as 0), plus the entropy term and an
all-reduce MIN of the first argmax with token stats. Every rank then holds the global log-sum-exp and the same
token log-probs, so the loss, its coefficients and every metric are the same on every rank; each rank writes its
own shard of `D = scale * (onehot - softmax(Z))`, so the weight (and bias) gradient it forms is its shard of the
unsharded one. The hidden-state gradient is the sum over ranks of `D_r W_r`: `SumGradOver` all-reduces it once per
call, in the backward, as Megatron's copy-to-tensor-parallel region does. The chunks must be the same on every rank
(the exchange runs once per chunk), so the plan's chunk size is taken from the largest shard.

Sequence parallel (`sequence_parallel_group`, labels aligned to positions, `shift=False`): rank r holds a slice of
each sequence's positions. Its token log-probs are complete (the softmax is over the vocabulary, not time), but a
sequence's log-prob is the sum over ranks: the scored-token counts are all-reduced once (the lengths the loss reads
and the divisor of `average` are then global), each rank sums (divides) its own tokens, and one all-reduce SUM of
the `[2B]` partial log-probs completes every sequence before the loss op runs, once, on the whole batch. Every rank
thus gets the same loss and coefficients; the rank's hidden-state gradient is exact for its slice and its weight
gradient is its partial sum (the data-parallel reduction over the group adds the partials).
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dpo_kernels.fused_linear import rank_check

# fp32 represents every integer below 2**24 exactly: the largest vocabulary whose first-argmax column the token stats
# may carry in a float.
_MAX_STATS_VOCAB = 1 << 24


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows `[offset, offset + local)` of a head of `vocab` rows split over `group`; `largest` is the
    largest rank's `local` (the plan's chunk size comes from it, so every rank cuts the same chunks)."""

    group: object
    offset: int
    local: int
    vocab: int
    largest: int


def _dtensor_type():
    """The DTensor class, or None while `torch.distributed.tensor` is not loaded: no DTensor can exist before it is,
    and importing it here would add close to half a second to `import dpo_kernels`."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _dtensor_group(tensor, name):
    """The process group of a DTensor sharded on dim 0 (replicated on every other mesh dimension)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tensor.placements
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if len(sharded) != 1 or placements[sharded[0]].dim != 0 or not all(
            isinstance(p, (Shard, Replicate)) for p in placements):
        raise ValueError(f"{name} as a DTensor must be sharded on dim 0 over one mesh dimension (Shard(0)) and "
                         f"replicated over the others, got placements {placements}")
    return mesh.get_group(sharded[0])


def local_head(weight, bias, group):
    """`(weight, bias, group)` with DTensors replaced by their local shards (differentiable: gradients reach the
    DTensors) and the group taken from the weight's mesh when not given."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(weight, DTensor):
        if DTensor is not None and isinstance(bias, DTensor):
            raise ValueError("bias is a DTensor but weight is not: pass both sharded alike")
        return weight, bias, group
    mesh_group = _dtensor_group(weight, "weight")
    if group is not None and group is not mesh_group:
        raise ValueError("vocab_parallel_group differs from the group of the weight's device mesh")
    if bias is not None:
        if not isinstance(bias, DTensor) or _dtensor_group(bias, "bias") is not mesh_group:
            raise ValueError("with a DTensor weight the bias must be a DTensor sharded on dim 0 on the same mesh")
        bias = bias.to_local()
    return weight.to_local(), bias, mesh_group


def _shard_sizes(weight, group) -> list:
    """The ranks' shard sizes, without the consistency check: an all-gather of one integer."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=weight.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device), group=group)
    return torch.cat(sizes).tolist()


def _vocab_shard(sizes, group) -> VocabShard:
    rank = dist.get_rank(group)
    if min(sizes) < 1:
        raise ValueError(f"every rank of vocab_parallel_group needs a non-empty head shard, got sizes {sizes}")
    return VocabShard(group, sum(sizes[:rank]), sizes[rank], sum(sizes), max(sizes))


CHECK_RANKS_ENV = "DPO_KERNELS_CHECK_RANKS"


@dataclass(frozen=True)
class ParallelOptions:
    """How the fused head is split across processes; the `parallel_options=` argument of `fused_linear_dpo`,
    `linear_sequence_logprobs` and `FusedLinearDPOLoss`.

    vocab_group: a process group over which the head is split by vocabulary rows: each rank passes its
        contiguous shard `[V_r, H]`, the ranks in group order holding consecutive rows; hidden states and labels
        (global ids) are the same on every rank. A DTensor weight sharded on dim 0 brings its own group.
    sequence_group: a process group over which each sequence's positions are split (`shift=False`, labels aligned
        to positions): each rank passes its contiguous slice of every row, or its part of a packed batch.
    check_ranks: check on every call, before any other collective, that the ranks agree (shapes, dtypes, shard
        sizes, settings, and under vocabulary parallelism the labels and hidden states, by checksum), so that
        inconsistent ranks raise one ValueError on every rank rather than compute a wrong loss or abort a
        collective. None: on unless the environment sets DPO_KERNELS_CHECK_RANKS=0. Cost per group and call: an
        all-gather of `rank_check.SUMMARY_BYTES` per rank (one round trip, which under vocabulary parallelism also
        carries the shard sizes), one host read, and an integer pass over the hidden states under vocabulary
        parallelism. Turn it off for production runs once a job has been checked.
    """

    vocab_group: object = None
    sequence_group: object = None
    check_ranks: bool | None = None

    @property
    def checks_ranks(self) -> bool:
        if self.check_ranks is not None:
            return bool(self.check_ranks)
        return os.environ.get(CHECK_RANKS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def options_of(parallel_options, vocab_parallel_group, sequence_parallel_group) -> ParallelOptions:
    """The call's options: `parallel_options`, or those the shorthand keywords build (not both)."""
    if parallel_options is None:
        return ParallelOptions(vocab_parallel_group, sequence_parallel_group)
    if not isinstance(parallel_options, ParallelOptions):
        raise TypeError(f"parallel_options must be a ParallelOptions, got {type(parallel_options).__name__}")
    if vocab_parallel_group is not None or sequence_parallel_group is not None:
        raise ValueError("pass the groups either in parallel_options=ParallelOptions(...) or as "
                         "vocab_parallel_group= / sequence_parallel_group=, not both")
    return parallel_options


def _check_group(group, name):
    """A process group this rank belongs to: TypeError for anything else, ValueError for a group without it."""
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"this rank is not in {name}: torch.distributed.new_group gives a rank outside the group "
                         f"a placeholder; call without {name} on ranks outside it")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{name} was given but torch.distributed is not initialized")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this rank (global rank {dist.get_rank()}) is not in {name}")


class HeadParallel:
    """One call's `ParallelOptions` at work: the groups checked, the local head, the shard, the exchanges.

    Without groups every method is the identity (or the local size), so the API runs one code path. Order of use:
    `local_head` for each head, `agree` once (the first collective), then the rest.
    """

    def __init__(self, options: ParallelOptions, shift: bool):
        if options.sequence_group is not None and shift:
            raise ValueError("sequence_parallel_group needs shift=False and labels aligned to positions: with shift "
                             "the label of a slice's last position lives on the next rank")
        for group, name in ((options.vocab_group, "vocab_parallel_group"),
                            (options.sequence_group, "sequence_parallel_group")):
            if group is not None:
                _check_group(group, name)
        self.vocab_group, self.sequence_group = options.vocab_group, options.sequence_group
        self.check = options.checks_ranks
        self.shard = None

    def local_head(self, weight, bias):
        """`(weight, bias)` with DTensors replaced by their local shards; a DTensor's mesh group becomes the
        vocabulary group when none was given."""
        weight, bias, group = local_head(weight, bias, self.vocab_group)
        if group is not self.vocab_group:
            _check_group(group, "the weight's device mesh group")
            self.vocab_group = group
        return weight, bias

    @property
    def recompute(self) -> bool:
        """Sequence parallel runs the recompute plan: the loss needs every rank's log-probs before any coefficient
        is known."""
        return self.sequence_group is not None

    def agree(self, prepare, settings, device):
        """Runs `prepare()` (this rank's own checks; returns `(summary, result)`), then, before any other
        collective, the ranks' consistency check and the shard sizes. Returns `result`. `settings`: what else must
        be the same on every rank (loss, budget, flags); `device`: where the summary goes (the collectives').

        With the check on, a rank whose own checks fail still joins the all-gathers (as refused), and every rank
        gathers in every group before comparing: every rank raises, none waits in a collective another rank left."""
        if not self.check:
            summary, result = prepare()
            if self.vocab_group is not None:
                self.shard = _vocab_shard(_shard_sizes(summary.weight, self.vocab_group), self.vocab_group)
            return result
        try:
            summary, result = prepare()
        except ValueError:
            for group in self._groups():
                rank_check.gather(rank_check.refused(device), group)
            raise
        summary.settings = rank_check.settings_fingerprint(settings)
        vocab_rows = sequence_rows = None
        vocab, refused = summary.weight.shape[0], 0
        if self.vocab_group is not None:
            vocab_rows = rank_check.gather(summary.tensor(-1, replicated=True), self.vocab_group)
            sizes = [r[rank_check.FIELDS.index("head rows")] for r in vocab_rows]
            vocab, refused = sum(sizes), max(r[0] for r in vocab_rows)
        if self.sequence_group is not None:
            local = summary.tensor(vocab, replicated=False)
            local[0] = refused
            sequence_rows = rank_check.gather(local, self.sequence_group)
        if vocab_rows is not None:
            rank_check.compare(vocab_rows, rank_check.VOCAB_FIELDS, "vocab_parallel_group")
            self.shard = _vocab_shard(sizes, self.vocab_group)
        if sequence_rows is not None:
            rank_check.compare(sequence_rows, rank_check.SEQUENCE_FIELDS, "sequence_parallel_group")
        return result

    def _groups(self):
        return [g for g in (self.vocab_group, self.sequence_group) if g is not None]

    def vocab(self, weight) -> int:
        """The labels' range: the whole vocabulary, of which `weight` may be this rank's shard."""
        return weight.shape[0] if self.shard is None else self.shard.vocab

    def plan_vocab(self, weight) -> int:
        """The rows the plan sizes its chunks for: the largest shard, so that every rank cuts the same chunks."""
        return weight.shape[0] if self.shard is None else self.shard.largest

    def check_reference_head(self, weight, ref_weight):
        if self.shard is not None and ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight must be sharded as weight: {ref_weight.shape[0]} rows on this rank, weight "
                             f"has {weight.shape[0]}")

    @property
    def pass_fn(self):
        """The pass over a chunk's logits: None (`logsoftmax_pass`) or the vocabulary-sharded one."""
        return None if self.shard is None else VocabParallelPass(self.shard)

    def global_counts(self, layout):
        """The layout with each sequence's count summed over the sequence group (see `global_counts`)."""
        return layout if self.sequence_group is None else global_counts(layout, self.sequence_group)

    def sum_sequences(self, t):
        """Per-sequence partial sums `t` completed over the sequence group (no autograd)."""
        return t if self.sequence_group is None else sum_over(t, self.sequence_group)

    def sum_sequences_differentiable(self, t):
        return t if self.sequence_group is None else SumOver.apply(t, self.sequence_group)

    def hidden_input(self, hidden):
        """The hidden states as the engine's Function takes them: under vocabulary parallelism their gradient is
        summed over the shards' ranks in the backward (`SumGradOver`)."""
        return hidden if self.shard is None else SumGradOver.apply(hidden, self.shard.group)


def _all_reduce(t, op, group):
    dist.all_reduce(t, op=op, group=group)
    return t


class VocabParallelPass:
    """`logsoftmax_pass` over a vocabulary shard: same arguments and results, with the global labels and the
    log-sum-exp over every rank's shard. PyTorch ops, fp32 math on the chunk: besides the exponentials' `[C, V_r]`
    fp32 temporary, a second one for bf16/fp16 chunks and for fp32 chunks the pass must not overwrite."""

    def __init__(self, shard: VocabShard):
        self.shard = shard

    def __call__(self, z, labels, *, scale=None, write_grad=False, stats=False):
        shard, group = self.shard, self.shard.group
        if stats and shard.vocab >= _MAX_STATS_VOCAB:
            raise ValueError(f"token stats under vocab parallel need V < 2**24, got {shard.vocab}")
        zf = z.float()
        if zf is z and not write_grad:
            zf = z.clone()
        local = labels - shard.offset
        owned = (local >= 0) & (local < shard.local)
        label_logit = torch.where(owned, zf.gather(1, torch.where(owned, local, 0).unsqueeze(1)).squeeze(1), 0.0)
        local_max = zf.amax(1)
        local_first = zf.argmax(1) + shard.offset if stats else None
        m = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
        # Rows whose logits are all -inf shift by 0, as logsumexp does: exp(-inf - -inf) would be NaN.
        shift = torch.where(m == float("-inf"), 0.0, m)
        x = zf.sub_(shift.unsqueeze(1))
        e = x.exp()
        packed = [e.sum(1), label_logit]
        if stats:
            # Terms with e = 0 (a -inf logit) add nothing, the limit of p log p; where() keeps -inf * 0 out.
            packed.append(e.mul_(torch.where(e > 0, x, 0.0)).sum(1))
        del e
        summed = _all_reduce(torch.stack(packed, 1), dist.ReduceOp.SUM, group)
        log_total = summed[:, 0].log()
        logp = summed[:, 1] - (shift + log_total)
        if stats:
            entropy = log_total - summed[:, 2] / summed[:, 0]
            # The first column attaining the global max: ranks hold increasing columns, so the smallest candidate.
            first = torch.where(local_max == m, local_first, shard.vocab)
            top1 = _all_reduce(first, dist.ReduceOp.MIN, group) == labels
        if write_grad:
            # exp(Z - lse) with lse - shift = log(total): softmax(Z) on this shard.
            d = x.sub_(log_total.unsqueeze(1)).exp_().neg_()
            # The onehot on the rows whose label this shard owns, by gather and scatter: `nonzero` would make the
            # host wait for the device once per chunk.
            col = torch.where(owned, local, 0).unsqueeze(1)
            picked = d.gather(1, col)
            d.scatter_(1, col, torch.where(owned.unsqueeze(1), picked + 1.0, picked))
            if scale is not None:
                d.mul_(scale.unsqueeze(1))
            if d is not z:
                z.copy_(d)
        return (logp, entropy, top1) if stats else logp


def allreduce_bytes_per_chunk(rows: int, token_stats: bool = False) -> int:
    """Bytes one rank all-reduces per chunk of `rows` tokens under vocabulary parallelism: `[C]` fp32 maxima,
    `[C, 2]` fp32 sums (`[C, 3]` with token stats) and, with token stats, `[C]` int64 first-argmax columns. O(C),
    independent of V and H."""
    return rows * 4 * (1 + (3 if token_stats else 2)) + (rows * 8 if token_stats else 0)


def hidden_grad_allreduce_bytes(tokens: int, hidden_size: int, itemsize: int) -> int:
    """Bytes one rank all-reduces once per call for the hidden-state gradient under vocabulary parallelism (the
    rows of the flattened hidden states, `[rows, H]` in their dtype)."""
    return tokens * hidden_size * itemsize


class SumGradOver(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over `group`. Each rank's engine forms `D_r W_r`, its
    share of the hidden-state gradient; the sum is the unsharded gradient on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM, ctx.group), None


class SumOver(torch.autograd.Function):
    """All-reduce SUM forward; identity backward (every rank then holds the same sum and receives the same upstream
    gradient, which is the gradient of its own addend)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.contiguous().clone(), dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over(t, group):
    """`t` summed over `group` (a new tensor; no autograd)."""
    return _all_reduce(t.detach().contiguous().clone(), dist.ReduceOp.SUM, group)


def global_counts(layout, group):
    """The layout with each sequence's scored-token count summed over the sequence-parallel group: the lengths the
    loss reads and the divisor of `average`. Slots stay local (a token's place among the rank's own tokens)."""
    counts = sum_over(layout.counts, group)
    counts_host = counts.tolist()
    # The constructor, not `layout._replace`, which torch 2.11's dynamo returns empty (docs/design.md, "Where code
    # runs"): this path runs eagerly today, and stays right if a compiled caller ever reaches it.
    return type(layout)(layout.rows, layout.targets, layout.seq, layout.slot, counts, counts_host,
                        max(layout.max_count, max(counts_host, default=0)), layout.rows_repeat)
