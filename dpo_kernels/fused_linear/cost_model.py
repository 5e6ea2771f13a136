"""FLOP and HBM-byte model of one fused linear DPO step on a GPU, from the plan the engine runs.

`plan_cost` walks the same `plan.StepPlan` the engine executes (`engine.py`), group by group in its mode, and
lists every kernel of the step that touches `[C, V]`, `[V, H]` or `[n, H]` data with its FLOPs and HBM bytes: the
logits GEMM, the logsoftmax pass, the hidden-state and weight-gradient GEMMs, the fp32 hidden-state product and
its scaling and rounding, the gather of hidden rows, the accumulator's conversion (the upstream gradient and a
single streaming pair's coefficient folded into it) and the backward's scaling of what cannot fold. Each kernel
takes `max(FLOPs / peak, bytes / bandwidth)`, plus a launch latency for each kernel that is not a GEMM or a pass
and a fixed time per host-device synchronization before the first GEMM; the sum is compared with the floor
`6 N H V / peak`, the three GEMMs of N tokens at full speed and nothing else. `estimate_step_cost` builds the plan
from scored-token counts, as `memory_model.estimate_peak_bytes` does.

Assumptions (docs/design.md, "The fused linear engine"): bf16/fp16 operands on an H100/H200-class GPU (`H200`:
750 TFLOP/s dense, 4.3 TB/s, 50 MiB of L2, 132 SMs); GEMMs at peak whatever their shape; hidden states and weight
requiring gradients, no bias, an upstream gradient that is not folded away at run time; the pass reads a row once
from HBM when the rows its persistent grid keeps in flight (`logsoftmax_pass.pass_grid`) fit in half of L2, its
second sweep then hitting L2, and twice otherwise. Kilobyte-sized work (the loss op, the per-token coefficients)
counts as launches only.
"""
from dataclasses import dataclass

import torch

from dpo_kernels.fused_linear.logsoftmax_pass import pass_grid
from dpo_kernels.fused_linear.plan import RESIDENT, STREAM_ONCE, StepPlan, plan_dpo_step


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # dense bf16 tensor-core FLOP/s a large GEMM sustains
    hbm: float  # bytes/s a streaming kernel sustains
    l2_bytes: int
    num_sms: int
    launch_s: float = 4e-6  # a small kernel's launch, back to back
    sync_s: float = 50e-6  # a synchronization before the first GEMM: the queue drains, the host catches up


H200 = Device("H200", flops=750e12, hbm=4.3e12, l2_bytes=50 << 20, num_sms=132)

# Small kernels per pair group besides the modeled ones: the loss op and the bookkeeping around it
# (`PairLoss.complete`, `token_coefficients`).
SMALL_KERNELS_PER_GROUP = 16
# Host-device synchronizations before the first GEMM: the compaction's one read of the token counts.
SYNCS_BEFORE_FIRST_GEMM = 1


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float
    launch: bool = False  # a small kernel: its launch latency counts besides its bytes

    def seconds(self, device: Device) -> float:
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


class _Step:
    """Appends the kernels of the engine's operations on `[n, ...]` slices of one step."""

    def __init__(self, H, V, s, device):
        self.H, self.V, self.s, self.device = H, V, s, device
        self.kernels, self.small = [], 0
        self.acc_written = False  # the fp32 accumulator holds sums (the next GEMM into it reads it too)
        self.acc_owes = False  # a streaming pair's coefficient not yet applied

    def add(self, name, flops=0.0, nbytes=0.0, launch=False):
        self.kernels.append(Kernel(name, float(flops), float(nbytes), launch))

    def gather(self, n):
        """`hidden2d.index_select` of the chunk's rows."""
        self.add("gather hidden rows", nbytes=2 * n * self.H * self.s, launch=True)

    def project(self, n):
        """`Z = h W^T` into the logits buffer."""
        H, V, s = self.H, self.V, self.s
        self.add("logits GEMM", 2 * n * H * V, n * H * s + V * H * s + n * V * s)

    def pass_(self, n, write_grad):
        """The logsoftmax pass over `n` rows: reads each row once from HBM (twice when its rows in flight overflow
        half of L2), writes D in place when `write_grad`."""
        _, in_flight = pass_grid(n, self.V, self.s, self.device.l2_bytes, self.device.num_sms)
        reads = 1 if not write_grad or in_flight * self.V * self.s <= self.device.l2_bytes // 2 else 2
        self.add("logsoftmax pass", 0, n * self.V * self.s * (reads + (1 if write_grad else 0)))

    def hidden_gemm(self, n, out_itemsize):
        """`U = D @ W` with a result of `out_itemsize` bytes per element."""
        H, V, s = self.H, self.V, self.s
        self.add("hidden-gradient GEMM", 2 * n * V * H, n * V * s + V * H * s + n * H * out_itemsize)

    def weight_gemm(self, n, only=False):
        """`acc += D^T h` (fp32 accumulator), or the whole weight gradient in the weight's dtype (`only`)."""
        H, V, s = self.H, self.V, self.s
        if self.acc_owes:
            self.add("accumulator scale", 0, 2 * V * H * 4, launch=True)
            self.acc_owes = False
        out = V * H * s if only else V * H * 4 * (2 if self.acc_written else 1)
        self.acc_written = self.acc_written or not only
        self.add("weight-gradient GEMM", 2 * V * n * H, n * V * s + n * H * s + out)

    def rows_pass(self, name, n, bytes_per_element):
        self.add(name, 0, n * self.H * bytes_per_element, launch=True)


def plan_cost(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, itemsize: int,
              device: Device = H200) -> StepCost:
    """The kernels of one forward + backward that runs `plan` (see the module docstring)."""
    st = _Step(hidden_size, vocab, itemsize, device)
    s = itemsize
    st.rows_pass("zero hidden gradient", hidden_rows, s)
    groups = 0
    if plan.recompute:
        for a, b in plan.chunks:
            st.gather(b - a)
            st.project(b - a)
            st.pass_(b - a, write_grad=False)
        groups = 1
        for a, b in plan.chunks:
            _gradient_chunk(st, b - a, projected=False, only=plan.one_weight_gemm)
    else:
        for group in plan.groups:
            groups += 1
            if group.mode == RESIDENT:
                _resident(st, group.end - group.start, only=plan.one_weight_gemm)
            elif group.mode == STREAM_ONCE:
                _stream_once(st, group)
            else:
                _stream_twice(st, group)
    # Backward: the accumulator's conversion with the upstream gradient folded in, or the scaling of the weight
    # gradient a single GEMM wrote; the hidden-state gradient's scaling.
    V, H = vocab, hidden_size
    if st.acc_written:
        st.add("accumulator conversion", 0, V * H * 4 + V * H * s, launch=True)
    elif plan.total:
        st.add("weight-gradient scale", 0, 2 * V * H * s, launch=True)
    if not plan.recompute:
        st.rows_pass("hidden-gradient scale", hidden_rows, 2 * s)
    return StepCost(tuple(st.kernels), SYNCS_BEFORE_FIRST_GEMM, groups * SMALL_KERNELS_PER_GROUP,
                    6.0 * plan.total * hidden_size * vocab)


def _resident(st, n, only):
    if n == 0:
        return
    s = st.s
    st.gather(n)
    st.project(n)
    st.pass_(n, write_grad=True)
    st.hidden_gemm(n, 4)
    st.rows_pass("hidden-gradient scale and round", n, 4 + 4 + 4 + s)  # u *= c (r + w), u.to(dtype)
    st.rows_pass("hidden-gradient scatter", n, 2 * s)
    st.rows_pass("weight operand h * c", n, s + 4 + 4 + s)  # fp32 product, then rounded
    st.weight_gemm(n, only=only)


def _stream_once(st, group):
    s = st.s
    n = group.end - group.start
    for a, b in group.chunks:
        st.gather(b - a)
        st.project(b - a)
        st.pass_(b - a, write_grad=True)
        st.hidden_gemm(b - a, 4)
        st.weight_gemm(b - a)
    st.acc_owes = True  # folded into the conversion unless another group adds to the accumulator
    st.rows_pass("hidden-gradient scale", n, 2 * 4)
    st.rows_pass("hidden-gradient round and scatter", n, 4 + s + 2 * s)


def _stream_twice(st, group):
    for a, b in group.chunks:
        st.gather(b - a)
        st.project(b - a)
        st.pass_(b - a, write_grad=False)
    for k, (a, b) in enumerate(reversed(group.chunks)):
        _gradient_chunk(st, b - a, projected=k == 0, only=False)


def _gradient_chunk(st, n, projected, only):
    """`engine._gradient_chunk`: coefficients known, D formed in the pass, `D @ W` in the weight's dtype."""
    st.gather(n)
    if not projected:
        st.project(n)
    st.pass_(n, write_grad=True)
    st.hidden_gemm(n, st.s)
    st.rows_pass("hidden-gradient scatter", n, 2 * st.s)
    st.weight_gemm(n, only=only)


def estimate_step_cost(hidden_rows, pair_lengths, hidden_size, vocab, dtype=torch.bfloat16, memory_budget=None,
                       loss_type="sigmoid", device: Device = H200) -> StepCost:
    """`plan_cost` of the plan `fused_linear_dpo` builds for these scored tokens per pair (arguments as
    `memory_model.estimate_peak_bytes`)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    plan = plan_dpo_step(list(pair_lengths), vocab, itemsize, memory_budget, loss_type)
    return plan_cost(plan, hidden_rows, hidden_size, vocab, itemsize, device)
