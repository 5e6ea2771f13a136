"""The fused linear engine across processes: a vocabulary-sharded head and sequences split along time, on
torch.distributed process groups (docs/design.md, "The fused linear engine").

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
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def vocab_shard(weight, group) -> VocabShard:
    """The ranks' shard sizes, exchanged once per call (an all-gather of one integer), and this rank's place."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=weight.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device), group=group)
    sizes = torch.cat(sizes).tolist()
    rank = dist.get_rank(group)
    if min(sizes) < 1:
        raise ValueError(f"every rank of vocab_parallel_group needs a non-empty head shard, got sizes {sizes}")
    return VocabShard(group, sum(sizes[:rank]), sizes[rank], sum(sizes), max(sizes))


def check_groups(vocab_parallel_group, sequence_parallel_group, shift):
    if sequence_parallel_group is not None and shift:
        raise ValueError("sequence_parallel_group needs shift=False and labels aligned to positions: with shift the "
                         "label of a slice's last position lives on the next rank")
    for name, g in (("vocab_parallel_group", vocab_parallel_group),
                    ("sequence_parallel_group", sequence_parallel_group)):
        if g is not None and not dist.is_initialized():
            raise ValueError(f"{name} was given but torch.distributed is not initialized")


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
    return layout._replace(counts=counts, counts_host=counts_host,
                           max_count=max(layout.max_count, max(counts_host, default=0)))
