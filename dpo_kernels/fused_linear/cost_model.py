"""FLOP and HBM-byte model of one fused linear DPO step on a GPU, from the engine's own trace of the plan it runs.

`plan_cost` records the engine's run of a `plan.StepPlan` on meta tensors (`dry_run.dry_run`: the engine's code and
mode functions, without memory or arithmetic) and lists every kernel the engine reports, each kernel that touches
`[C, V]`, `[V, H]` or `[n, H]` data: the logits GEMM, the logsoftmax pass, the hidden-state and weight-gradient
GEMMs, the fp32 hidden-state product's scaling and rounding, the gather and scatter of hidden rows, the
accumulator's conversion (the upstream gradient and a single streaming pair's coefficient folded into it) and the
backward's scaling of what cannot fold. Each kernel takes `max(FLOPs / peak, bytes / bandwidth)`, plus a launch
latency for each kernel that is not a GEMM or a pass, a fixed number of small launches per call of the loss op,
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

from dpo_kernels.fused_linear.dry_run import dry_run
from dpo_kernels.fused_linear.logsoftmax_pass import pass_grid
from dpo_kernels.fused_linear.memory_model import DTYPE_OF_ITEMSIZE
from dpo_kernels.fused_linear.plan import StepPlan, plan_dpo_step
from dpo_kernels.fused_linear.trace import Call, Elementwise, Gemm, Pass


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

# Small kernels per call of the loss op besides the modeled ones: the op and the bookkeeping around it
# (`PairLoss.complete`, `token_coefficients`).
SMALL_KERNELS_PER_LOSS_CALL = 16
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


def _pass_bytes(p: Pass, device: Device) -> int:
    """HBM bytes of the logsoftmax pass: each row read once (twice when the rows in flight overflow half of L2),
    and written once when it writes the gradient."""
    _, in_flight = pass_grid(p.rows, p.vocab, p.itemsize, device.l2_bytes, device.num_sms)
    reads = 1 if not p.write_grad or in_flight * p.vocab * p.itemsize <= device.l2_bytes // 2 else 2
    return p.rows * p.vocab * p.itemsize * (reads + (1 if p.write_grad else 0))


def plan_cost(plan: StepPlan, hidden_rows: int, hidden_size: int, vocab: int, itemsize: int,
              device: Device = H200, loss_type: str = "sigmoid", pair_lengths=None, lora_rank: int = 0) -> StepCost:
    """The kernels of one forward + backward that runs `plan`, from the engine's trace of it (see the module
    docstring); `pair_lengths` default to `dry_run.plan_pairs(plan)`. `lora_rank`: r of a LoRA adapter on the
    head (its rank-r GEMMs join the kernels; the weight is frozen, so its gradient GEMM leaves them)."""
    events = dry_run(plan, hidden_rows, hidden_size, vocab, DTYPE_OF_ITEMSIZE[itemsize], loss_type,
                     pair_lengths, lora_rank=lora_rank).events
    kernels, loss_calls = [], 0
    for e in events:
        if isinstance(e, Gemm):
            kernels.append(Kernel(e.name, float(e.flops), float(e.nbytes)))
        elif isinstance(e, Pass):
            kernels.append(Kernel("logsoftmax pass", 0.0, float(_pass_bytes(e, device))))
        elif isinstance(e, Elementwise):
            kernels.append(Kernel(e.name, 0.0, float(e.nbytes), launch=True))
        elif isinstance(e, Call) and e.op == "dpo_kernels::dpo_loss_forward":
            loss_calls += 1
    return StepCost(tuple(kernels), SYNCS_BEFORE_FIRST_GEMM, loss_calls * SMALL_KERNELS_PER_LOSS_CALL,
                    6.0 * plan.total * hidden_size * vocab)


def estimate_step_cost(hidden_rows, pair_lengths, hidden_size, vocab, dtype=torch.bfloat16, memory_budget=None,
                       loss_type="sigmoid", device: Device = H200, lora_rank=0) -> StepCost:
    """`plan_cost` of the plan `fused_linear_dpo` builds for these scored tokens per pair (arguments as
    `memory_model.estimate_peak_bytes`)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    plan = plan_dpo_step(list(pair_lengths), vocab, itemsize, memory_budget, loss_type)
    return plan_cost(plan, hidden_rows, hidden_size, vocab, itemsize, device, loss_type, list(pair_lengths),
                     lora_rank)
