"""FLOP and HBM-byte model of one fused linear DPO step on a GPU, from the engine's own trace of the plan it runs.

`plan_cost` records the engine's run of a `plan.StepPlan` on meta tensors (`dry_run.dry_run`: the engine's code and
mode functions, without memory or arithmetic) and lists every kernel the engine reports, each kernel that touches
`[C, V]`, `[V, H]` or `[n, H]` data: the logits GEMM, the logsoftmax pass, the hidden-state and weight-gradient
GEMMs, the fp32 hidden-state product's scaling and rounding, the gather and scatter of hidden rows, the
accumulator's conversion (the upstream gradient and a single streaming pair's coefficient folded into it) and the
backward's scaling of what cannot fold. Each kernel takes `max(FLOPs / peak, bytes / bandwidth)` (the pass: see
below), plus a launch latency for each kernel that is not a GEMM or a pass, a fixed number of small launches per
call of the loss op, and a fixed time per host-device synchronization before the first GEMM; the sum is compared
with the floor `6 N H V / peak`, the three GEMMs of N tokens at full speed and nothing else. `estimate_step_cost`
builds the plan from scored-token counts, as `memory_model.estimate_peak_bytes` does; `estimate_group_step_cost`
from the scored tokens per response and the group sizes of a `fused_linear_group_dpo` step (`trace_cost` sums
either trace).

The pass is charged what its compiled code does rather than the copy rate (`pass_seconds`): its HBM bytes (each row
read once and its gradient written once, plus the second sweep's reads that miss L2: the rows in flight of its
persistent grid, `pass_grid.pass_grid`, beyond half of L2), its MUFU `ex2` (per thread and tile of the first sweep
one per element and one for the running sum, per tile of the gradient sweep one per element) at the SMs' MUFU rate,
and a stall per barrier of the first sweep's block reductions. The math (MUFU and barriers, one after the other in
a program) overlaps the memory traffic by a share `pass_overlap` of the shorter of the two. These counts are those
of the sm_90 code (the compile test checks them); the MUFU rate, the barrier stall and the overlap are estimates
that only a GPU can confirm.

Assumptions (docs/design.md, "The fused linear engine"): bf16/fp16 operands on an H100/H200-class GPU (`H200`:
750 TFLOP/s dense, 4.3 TB/s, 50 MiB of L2, 132 SMs at 1.98 GHz); GEMMs at peak whatever their shape; hidden states
and weight requiring gradients, no bias, no token statistics, an upstream gradient that is not folded away at run
time; the pass's variant within 128 registers a thread (two programs an SM, as the compile test holds it).
Kilobyte-sized work (the loss op, the per-token coefficients) counts as launches only.

On an H200 this models 1.08x / 1.10x / 1.05x the 6NHV floor at 2x2048 / 2x8192 / 1x32768 (H = 4096, V = 128256,
bf16; an estimate, not a measurement).
"""
from dataclasses import dataclass

import torch

from dpo_kernels.fused_linear.dry_run import dry_run, dry_run_group
from dpo_kernels.fused_linear.logsoftmax_pass import _block_v
from dpo_kernels.fused_linear.memory_model import DTYPE_OF_ITEMSIZE
from dpo_kernels.fused_linear.pass_grid import L2_SHARE, DeviceLimits, ProgramResources, pass_grid
from dpo_kernels.fused_linear.plan import StepPlan, plan_dpo_step, plan_group_step
from dpo_kernels.fused_linear.trace import Call, Elementwise, Gemm, Pass
from dpo_kernels.fused_linear.units import GroupUnits


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # dense bf16 tensor-core FLOP/s a large GEMM sustains
    hbm: float  # bytes/s a streaming kernel sustains
    l2_bytes: int
    num_sms: int
    launch_s: float = 4e-6  # a small kernel's launch, back to back
    sync_s: float = 50e-6  # a synchronization before the first GEMM: the queue drains, the host catches up
    clock_hz: float = 1.98e9  # SM clock under load
    ex2_per_clock: int = 16  # MUFU ex2 an SM completes a clock (4 per sub-partition on sm_90)
    barrier_cycles: int = 50  # a program's stall at one barrier of a block reduction, shared-memory trip included
    pass_overlap: float = 0.5  # the share of the shorter of the pass's memory and math times hidden under the longer

    @property
    def limits(self) -> DeviceLimits:
        """The pass grid's view of the device: sm_90's register file, shared memory and threads an SM."""
        return DeviceLimits(num_sms=self.num_sms, l2_bytes=self.l2_bytes)


H200 = Device("H200", flops=750e12, hbm=4.3e12, l2_bytes=50 << 20, num_sms=132)

# The loss ops whose calls the trace counts: the pairwise op and the group op.
LOSS_OPS = ("dpo_kernels::dpo_loss_forward", "dpo_kernels::group_loss_forward")
# Small kernels per call of the loss op besides the modeled ones: the op and the bookkeeping around it
# (`SequenceLoss.complete`, `token_coefficients`).
SMALL_KERNELS_PER_LOSS_CALL = 16
# Host-device synchronizations before the first GEMM: the compaction's one read of the token counts.
SYNCS_BEFORE_FIRST_GEMM = 1
# The pass's plain gradient variant as the grid sees it: at most 128 registers a thread (the compile test's bound),
# 8 warps, 32 bytes of shared memory for the reductions.
MODELED_PASS_PROGRAM = ProgramResources(regs=128, shared=32, num_warps=8)
# Barriers per tile of the first sweep (a max and a sum across the program's warps), in the plain variant's sm_90
# code; the gradient sweep has none. The compile test checks the code compiled here has no more.
PASS_BARRIERS_PER_TILE = 6


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float
    launch: bool = False  # a small kernel: its launch latency counts besides its bytes
    pass_: Pass | None = None  # the logsoftmax pass this kernel is, charged by `pass_seconds`

    def seconds(self, device: Device) -> float:
        if self.pass_ is not None:
            return pass_seconds(self.pass_, device)
        t = max(self.flops / device.flops, self.bytes / device.hbm)
        return t + device.launch_s if self.launch else t


@dataclass(frozen=True)
class StepCost:
    """The kernels of one step, its synchronizations and small launches, and its 6NHV floor."""

    kernels: tuple
    syncs: int
    small_kernels: int
    floor_flops: float

    @property
    def gemm_flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def hbm_bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)

    def seconds(self, device: Device = H200) -> float:
        return (sum(k.seconds(device) for k in self.kernels) + self.syncs * device.sync_s
                + self.small_kernels * device.launch_s)

    def floor_seconds(self, device: Device = H200) -> float:
        return self.floor_flops / device.flops

    def ratio(self, device: Device = H200) -> float:
        """Modeled time over the floor."""
        return self.seconds(device) / self.floor_seconds(device)

    def breakdown(self, device: Device = H200) -> dict:
        """Seconds per kernel name, summed over the step."""
        out: dict = {}
        for k in self.kernels:
            out[k.name] = out.get(k.name, 0.0) + k.seconds(device)
        return out


def _pass_threads(block: int) -> int:
    return 32 * (8 if block >= 4096 else 4)


def pass_ex2_per_tile(block: int, write_grad: bool) -> int:
    """MUFU `ex2` per thread and tile of `block` elements of the pass: the first sweep's one per element and one for
    the running sum's rescale, and with `write_grad` the gradient sweep's one per element."""
    per_thread = block // _pass_threads(block)
    return per_thread + 1 + (per_thread if write_grad else 0)


def pass_l2_hit(p: Pass, device: Device) -> float:
    """The share of the second sweep's reads that find the row still in L2: all of them while the rows in flight of
    the pass's grid fit in `L2_SHARE` of L2, that share of the rows in flight beyond."""
    _, in_flight = pass_grid(p.rows, p.vocab, p.itemsize, device.limits, MODELED_PASS_PROGRAM)
    return min(1.0, device.l2_bytes * L2_SHARE / max(1, in_flight * p.vocab * p.itemsize))


def _pass_bytes(p: Pass, device: Device) -> float:
    """HBM bytes of the logsoftmax pass: each row read once, and with the gradient its second sweep's L2 misses
    read again and the gradient written once."""
    row_bytes = p.rows * p.vocab * p.itemsize
    return row_bytes * (1 + ((1 - pass_l2_hit(p, device)) + 1 if p.write_grad else 0))


def pass_seconds(p: Pass, device: Device) -> float:
    """The pass's modeled time (see the module docstring): its memory time and its math time (MUFU, then the
    barrier stalls, each program's in turn), the shorter overlapped by `device.pass_overlap`."""
    block = _block_v(p.vocab)
    tiles = -(-p.vocab // block)
    programs, _ = pass_grid(p.rows, p.vocab, p.itemsize, device.limits, MODELED_PASS_PROGRAM)
    memory = _pass_bytes(p, device) / device.hbm
    ex2 = p.rows * tiles * _pass_threads(block) * pass_ex2_per_tile(block, p.write_grad)
    mufu = ex2 / (min(programs, device.num_sms) * device.ex2_per_clock * device.clock_hz)
    barriers = -(-p.rows // programs) * tiles * PASS_BARRIERS_PER_TILE * device.barrier_cycles / device.clock_hz
    math = mufu + barriers
    return max(memory, math) + (1 - device.pass_overlap) * min(memory, math)


def plan_cost(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, itemsize: int,
              device: Device = H200, loss_type: str = "sigmoid", pair_lengths=None, lora_rank: int = 0) -> StepCost:
    """The kernels of one forward + backward that runs `plan`, from the engine's trace of it (see the module
    docstring); `pair_lengths` default to `dry_run.plan_pairs(plan)`. `lora_rank`: r of a LoRA adapter on the
    head (its rank-r GEMMs join the kernels; the weight is frozen, so its gradient GEMM leaves them)."""
    trace = dry_run(plan, hidden_rows, hidden_size, vocab, DTYPE_OF_ITEMSIZE[itemsize], loss_type, pair_lengths,
                    lora_rank=lora_rank)
    return trace_cost(trace.events, plan.total, hidden_size, vocab, device)


def trace_cost(events, total: int, hidden_size: int, vocab: int, device: Device = H200) -> StepCost:
    """The kernels of a dry run's `events` (pairs or groups) and the floor of its `total` scored tokens."""
    kernels, loss_calls = [], 0
    for e in events:
        if isinstance(e, Gemm):
            kernels.append(Kernel(e.name, float(e.flops), float(e.nbytes)))
        elif isinstance(e, Pass):
            kernels.append(Kernel("logsoftmax pass", 0.0, _pass_bytes(e, device), pass_=e))
        elif isinstance(e, Elementwise):
            kernels.append(Kernel(e.name, 0.0, float(e.nbytes), launch=True))
        elif isinstance(e, Call) and e.op in LOSS_OPS:
            loss_calls += 1
    return StepCost(tuple(kernels), SYNCS_BEFORE_FIRST_GEMM, loss_calls * SMALL_KERNELS_PER_LOSS_CALL,
                    6.0 * total * hidden_size * vocab)


def estimate_step_cost(hidden_rows, pair_lengths, hidden_size, vocab, dtype=torch.bfloat16, memory_budget=None,
                       loss_type="sigmoid", device: Device = H200, lora_rank=0) -> StepCost:
    """`plan_cost` of the plan `fused_linear_dpo` builds for these scored tokens per pair (arguments as
    `memory_model.estimate_peak_bytes`)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    plan = plan_dpo_step(list(pair_lengths), vocab, itemsize, memory_budget, loss_type)
    return plan_cost(plan, hidden_rows, hidden_size, vocab, itemsize, device, loss_type, list(pair_lengths),
                     lora_rank)


def estimate_group_step_cost(hidden_rows, response_lengths, group_sizes, hidden_size, vocab, dtype=torch.bfloat16,
                             memory_budget=None, loss_type="plackett_luce", device: Device = H200, lora_rank=0,
                             weight_grad=True) -> StepCost:
    """The kernels of the plan `fused_linear_group_dpo` builds for these scored tokens per response and group
    sizes (arguments as `memory_model.estimate_group_peak_bytes`). The floor stays 6NHV: without `weight_grad`
    the step forms no weight gradient and its ratio to that floor is below the full step's."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    group_counts = GroupUnits.of_sizes(group_sizes).token_counts(list(response_lengths))
    plan = plan_group_step(group_counts, vocab, itemsize, memory_budget, weight_grad=weight_grad)
    trace = dry_run_group(plan, hidden_rows, hidden_size, vocab, DTYPE_OF_ITEMSIZE[itemsize], response_lengths,
                          group_sizes, loss_type, lora_rank=lora_rank, weight_grad=weight_grad)
    return trace_cost(trace.events, plan.total, hidden_size, vocab, device)
