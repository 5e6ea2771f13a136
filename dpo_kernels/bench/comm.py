"""`dpo-kernels bench --ops comm`: the bytes the fused linear engine all-reduces across processes, per chunk and per
step, measured at the reference sizes and held against the O(C) bound (docs/design.md, "The fused linear engine").

Each measurement runs one DPO step (forward and backward, sigmoid loss) of `fused_linear_dpo` in a process group of
one process and counts what it hands to `torch.distributed.all_reduce` and `all_gather`. What a rank exchanges
depends on its own inputs and on the chunk size C, not on the number of processes P, so one process measures the
traffic of one rank of P by taking that rank's inputs:

  vocabulary parallel  the rank's head shard `[ceil(V / P), H]`; per chunk pass an all-reduce MAX of `[C]` fp32 and
                       a SUM of `[C, 2]` fp32 (`parallel.allreduce_bytes_per_chunk`: 12·C bytes, whatever V and H);
                       once per call the hidden-state gradient `[2B, T, H]` (`parallel.hidden_grad_allreduce_bytes`)
                       and the shard sizes (one int64 per rank, all-gathered).
  sequence parallel    the last rank's slice of `T / P` positions of every row (`shift=False`); per step the scored-
                       token counts `[2B]` int64 and the partial log-probs `[2B]` fp32: O(B), no per-chunk exchange.

Both run as production runs do, with the ranks' consistency check off (`ParallelOptions(check_ranks=False)`); on,
it adds one all-gather of `rank_check.SUMMARY_BYTES` per rank and group per call, which under vocabulary
parallelism replaces the shard sizes' one.
The bytes are those handed to the collective; a ring all-reduce sends and receives about 2(P-1)/P of them per rank.
On the CPU the hidden size is cut to CPU_HIDDEN (the chunk exchanges do not depend on H); the hidden-state gradient
is then reported from its formula at the size's H, beside the bytes measured at the H that ran.
"""
import contextlib

import torch
import torch.distributed as dist

from dpo_kernels.bench import inputs as bench_inputs
from dpo_kernels.bench import report
from dpo_kernels.bench.compare import GPU_SIZES, Size
from dpo_kernels.fused_linear import parallel
from dpo_kernels.fused_linear.functional import fused_linear_dpo
from dpo_kernels.fused_linear.parallel import ParallelOptions

DEGREE = 8           # P: the tensor- (vocabulary) and context- (sequence) parallel degree whose rank is measured
CPU_HIDDEN = 16
BUDGETS = (None, "low")
SIZES = GPU_SIZES["linear"]
TINY_SIZES = (Size(1, 32, 32, 257),)


def sequence_parallel_bytes_per_step(num_seqs: int) -> int:
    """Bytes one rank all-reduces per step under sequence parallelism: the scored-token counts `[2B]` int64 and the
    partial log-probs `[2B]` fp32. O(B), independent of T, V and H."""
    return num_seqs * (8 + 4)


@contextlib.contextmanager
def counted_collectives():
    """Records `(collective, op, shape, bytes)` for every `torch.distributed.all_reduce` and `all_gather` call
    inside the block (bytes: the tensor handed in; for an all-gather, the gathered total)."""
    calls = []
    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(("all_reduce", str(op).rsplit(".", 1)[-1], tuple(tensor.shape),
                      tensor.numel() * tensor.element_size()))
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    def counting_all_gather(tensor_list, tensor, group=None, async_op=False):
        calls.append(("all_gather", None, tuple(tensor.shape), tensor.numel() * tensor.element_size()
                      * len(tensor_list)))
        return all_gather(tensor_list, tensor, group=group, async_op=async_op)

    dist.all_reduce, dist.all_gather = counting_all_reduce, counting_all_gather
    try:
        yield calls
    finally:
        dist.all_reduce, dist.all_gather = all_reduce, all_gather


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """The default process group of this one process (gloo on the CPU, NCCL on CUDA), destroyed on exit."""
    if dist.is_initialized():
        raise ValueError("bench --ops comm runs in one process, outside torch.distributed (a group of one measures "
                         "one rank's traffic)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _step(calls, inputs, labels, **kwargs):
    """One forward and backward; returns the calls of each."""
    out = fused_linear_dpo(inputs.hidden, inputs.weight, labels, **kwargs)
    forward = list(calls)
    out.loss.backward()
    return forward, calls[len(forward):]


def measure_vocab_parallel(size: Size, hidden: int, dtype, device, group, memory_budget=None) -> dict:
    """The traffic of one rank of DEGREE holding `ceil(V / DEGREE)` head rows, one step at `size` (H = `hidden`)."""
    shard = -(-size.vocab // DEGREE)
    inputs = bench_inputs.make_linear_inputs(size.pairs, size.seq_len, hidden, shard, dtype=dtype, device=device)
    with counted_collectives() as calls:
        forward, backward = _step(calls, inputs, inputs.labels, memory_budget=memory_budget,
                                  parallel_options=ParallelOptions(vocab_group=group, check_ranks=False))
    # A chunk pass starts with the MAX of its [C] maxima; the hidden-state gradient is the backward's [2B, T, H].
    grad = [c for c in backward if len(c[2]) == 3]
    per_chunk = [c for c in forward + backward if c[0] == "all_reduce" and len(c[2]) < 3]
    passes = []
    for c in per_chunk:
        if c[1] == "MAX":
            passes.append([])
        passes[-1].append(c)
    chunk_rows = max(p[0][2][0] for p in passes)
    per_pass = max(sum(c[3] for c in p) for p in passes)
    itemsize = inputs.hidden.element_size()
    bound = parallel.allreduce_bytes_per_chunk(chunk_rows)
    return {
        "mode": "vocab", "size": size.label, "pairs": size.pairs, "seq_len": size.seq_len, "hidden": size.hidden,
        "vocab": size.vocab, "shard_rows": shard, "run_hidden": hidden, "memory_budget": memory_budget,
        "chunk_tokens": chunk_rows, "chunk_passes": len(passes), "scored_tokens": inputs.valid_tokens,
        "bytes_per_pass": per_pass, "bound_bytes_per_chunk": bound, "fraction_of_bound": per_pass / bound,
        "chunk_bytes_per_step": sum(c[3] for c in per_chunk),
        "logits_chunk_bytes": chunk_rows * size.vocab * itemsize,
        "hidden_grad_bytes_measured": sum(c[3] for c in grad),
        "hidden_grad_bytes_formula_at_run": parallel.hidden_grad_allreduce_bytes(
            2 * size.pairs * size.seq_len, hidden, itemsize),
        "hidden_grad_bytes": parallel.hidden_grad_allreduce_bytes(2 * size.pairs * size.seq_len, size.hidden,
                                                                  itemsize),
        "all_gather_bytes": sum(c[3] for c in forward if c[0] == "all_gather"),
        "calls": len(forward) + len(backward),
    }


def measure_sequence_parallel(size: Size, hidden: int, dtype, device, group) -> dict:
    """The traffic of the last rank of DEGREE holding positions `[T - T/DEGREE, T)` of every row (the full head)."""
    inputs = bench_inputs.make_linear_inputs(size.pairs, size.seq_len, hidden, size.vocab, dtype=dtype,
                                             device=device)
    local = max(1, size.seq_len // DEGREE)
    hidden_slice = inputs.hidden.detach()[:, -local:].clone().requires_grad_()
    sliced = type(inputs)(hidden_slice, inputs.weight, inputs.labels[:, -local:], inputs.targets[:, -local:])
    with counted_collectives() as calls:
        forward, backward = _step(calls, sliced, sliced.targets, shift=False,
                                  parallel_options=ParallelOptions(sequence_group=group, check_ranks=False))
    bound = sequence_parallel_bytes_per_step(2 * size.pairs)
    total = sum(c[3] for c in forward + backward)
    return {"mode": "sequence", "size": size.label, "pairs": size.pairs, "seq_len": size.seq_len,
            "hidden": size.hidden, "vocab": size.vocab, "local_positions": local, "run_hidden": hidden,
            "all_reduces": len(forward) + len(backward), "bytes_per_step": total, "bound_bytes_per_step": bound,
            "fraction_of_bound": total / bound}


def run(output_dir, device, *, sizes=SIZES, dtype=None, hidden=None) -> dict:
    """Measures every size in both modes (vocabulary parallel at each of BUDGETS), writes comm.json and comm.md into
    `output_dir` and returns their paths. `dtype`: default bf16, the reference sizes' dtype on every device (it sets
    C and the hidden-state gradient's bytes). `hidden` overrides each size's H for the run (default: CPU_HIDDEN on
    the CPU, the size's own on CUDA)."""
    dtype = dtype or torch.bfloat16
    result = {"op": "comm", "stamp": report.stamp(device), "dtype": str(dtype).replace("torch.", ""),
              "degree": DEGREE, "rows": []}
    with one_process_group(device) as group:
        for size in sizes:
            run_hidden = hidden or (size.hidden if device.type == "cuda" else min(size.hidden, CPU_HIDDEN))
            for budget in BUDGETS:
                result["rows"].append(measure_vocab_parallel(size, run_hidden, dtype, device, group, budget))
            result["rows"].append(measure_sequence_parallel(size, run_hidden, dtype, device, group))
    return report.write_report(output_dir, "comm", result, markdown_lines(result))


def _bytes(n) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def markdown_lines(result: dict) -> list:
    P = result["degree"]
    vocab = [r for r in result["rows"] if r["mode"] == "vocab"]
    seq = [r for r in result["rows"] if r["mode"] == "sequence"]
    lines = [
        f"## Communication of the fused linear engine across processes ({result['dtype']})",
        "",
        f"Device and versions: {report.stamp_line(result['stamp'])}",
        f"Bytes one rank of P = {P} hands to all-reduce in one DPO step (forward + backward), counted on the real "
        "engine in a group of one process given that rank's inputs.",
        "",
        f"Vocabulary parallel (each rank a [ceil(V/{P}), H] shard of the head): per chunk pass, against the O(C) bound "
        "12·C (`parallel.allreduce_bytes_per_chunk`) and the C·V logits an exchange of logits would move; once per "
        "call, the hidden-state gradient [2B, T, H] (`parallel.hidden_grad_allreduce_bytes`).",
        "",
        "| size | budget | C | chunk passes | bytes per pass | bound 12·C | per pass / bound | logits C·V | "
        "chunk bytes per step | hidden grad (once) | measured at H |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in vocab:
        budget = "default" if r["memory_budget"] is None else str(r["memory_budget"])
        measured = f"{_bytes(r['hidden_grad_bytes_measured'])} at H={r['run_hidden']}"
        lines.append(f"| {r['size']} | {budget} | {r['chunk_tokens']} | {r['chunk_passes']} | "
                     f"{_bytes(r['bytes_per_pass'])} | {_bytes(r['bound_bytes_per_chunk'])} | "
                     f"{r['fraction_of_bound']:.2f} | {_bytes(r['logits_chunk_bytes'])} | "
                     f"{_bytes(r['chunk_bytes_per_step'])} | {_bytes(r['hidden_grad_bytes'])} | {measured} |")
    lines += [
        "",
        f"Sequence parallel (each rank T/{P} positions of every row, the whole head): per step, against the O(B) "
        "bound 2B·(8 + 4) (counts int64 and partial log-probs fp32); no per-chunk exchange.",
        "",
        "| size | positions per rank | all-reduces | bytes per step | bound | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for r in seq:
        lines.append(f"| {r['size']} | {r['local_positions']} | {r['all_reduces']} | {_bytes(r['bytes_per_step'])} "
                     f"| {_bytes(r['bound_bytes_per_step'])} | {r['fraction_of_bound']:.2f} |")
    return lines + [""]
