"""The logsoftmax pass's persistent grid: how many programs to launch, from the compiled kernel's occupancy.

A program of the pass sweeps a row twice (statistics, then the gradient) and then moves to the row `programs`
further (docs/design.md, "The pass's grid."). The grid is sized from two things:
- what fits: how many programs an SM holds at once, from the compiled variant's registers a thread, shared memory
  and warps a program (`ProgramResources`) against the SM's register file, shared memory and threads
  (`DeviceLimits`). A persistent grid launches no more than fits, or its last programs would start only when the
  first finish;
- L2: the second sweep of a row reads L2 when the rows in flight (one a program) fit in `L2_SHARE` of it. This
  bound applies only down to one program per SM: an SM without a program does nothing, which costs more than a
  second sweep that partly reads HBM.

`DPO_KERNELS_PASS_PROGRAMS_PER_SM` (or the launcher's `programs_per_sm`) sets the programs per SM outright, past
both bounds, so that a profiler can time 1, 2 and 4.
"""
import os
from dataclasses import dataclass

import torch

PROGRAMS_PER_SM_ENV = "DPO_KERNELS_PASS_PROGRAMS_PER_SM"
# The share of L2 the rows in flight may fill, so that a row is still there when its own program sweeps it again:
# L2 is split in two partitions, and the gradient written back and the GEMM's operands compete for the rest.
L2_SHARE = 0.5


@dataclass(frozen=True)
class DeviceLimits:
    """What an SM holds at once, and how many there are. Defaults: an H100/H200 (sm_90)."""

    num_sms: int
    l2_bytes: int
    regs_per_sm: int = 65536
    shared_per_sm: int = 233472
    threads_per_sm: int = 2048
    programs_per_sm: int = 32  # resident thread blocks an SM allows, whatever their size
    shared_per_program: int = 1024  # shared memory the driver reserves for each resident program on sm_80+
    reg_granule: int = 256  # registers are allocated a warp at a time, in units of this many


@dataclass(frozen=True)
class ProgramResources:
    """What one program of a compiled variant takes: registers a thread, shared memory (bytes), warps."""

    regs: int
    shared: int
    num_warps: int


# The interpreter's stand-in device and program: one SM that holds two programs, so that a chunk of more than two
# rows gives its programs several rows each, as a GPU does.
INTERPRETER_LIMITS = DeviceLimits(num_sms=1, l2_bytes=1 << 20)
INTERPRETER_PROGRAM = ProgramResources(regs=128, shared=0, num_warps=8)


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of a CUDA device, as `torch.cuda.get_device_properties` reports them; for the interpreter
    (any other device), `INTERPRETER_LIMITS`."""
    if device.type != "cuda":
        return INTERPRETER_LIMITS
    props = torch.cuda.get_device_properties(device)
    return DeviceLimits(num_sms=props.multi_processor_count, l2_bytes=props.L2_cache_size,
                        regs_per_sm=getattr(props, "regs_per_multiprocessor", DeviceLimits.regs_per_sm),
                        shared_per_sm=props.shared_memory_per_multiprocessor,
                        threads_per_sm=props.max_threads_per_multi_processor)


def resident_programs(program: ProgramResources, limits: DeviceLimits) -> int:
    """How many programs of `program` an SM of `limits` holds at once (at least one: a program that fits no SM
    does not launch at all, and Triton says so)."""
    warp_regs = -(-program.regs * 32 // limits.reg_granule) * limits.reg_granule
    by_regs = limits.regs_per_sm // (warp_regs * program.num_warps) if program.regs > 0 else limits.programs_per_sm
    by_shared = limits.shared_per_sm // (program.shared + limits.shared_per_program)
    by_threads = limits.threads_per_sm // (program.num_warps * 32)
    return max(1, min(by_regs, by_shared, by_threads, limits.programs_per_sm))


def programs_per_sm_override(programs_per_sm: int | None = None) -> int | None:
    """`programs_per_sm` if given, else `DPO_KERNELS_PASS_PROGRAMS_PER_SM` if set, else None (the grid decides)."""
    if programs_per_sm is None:
        value = os.environ.get(PROGRAMS_PER_SM_ENV, "").strip()
        if not value:
            return None
        try:
            programs_per_sm = int(value)
        except ValueError:
            raise ValueError(f"{PROGRAMS_PER_SM_ENV} must be a positive integer, got {value!r}") from None
    if programs_per_sm < 1:
        raise ValueError(f"programs per SM must be at least 1, got {programs_per_sm}")
    return programs_per_sm


def pass_grid(num_rows: int, vocab: int, itemsize: int, limits: DeviceLimits, program: ProgramResources,
              programs_per_sm: int | None = None) -> tuple[int, int]:
    """The pass's persistent grid: `(programs, rows_in_flight)` for `num_rows` rows of `vocab` elements of
    `itemsize` bytes, programs of `program`'s size, on a device of `limits`.

    Each program sweeps one row at a time, so `rows_in_flight == programs`: as many as keep the rows in flight
    within `L2_SHARE` of L2, but at least one per SM and at most as many as the SMs hold at once
    (`resident_programs`); never more than there are rows. `programs_per_sm` (see `programs_per_sm_override`)
    replaces both bounds by that many per SM.
    """
    if num_rows <= 0:
        return 0, 0
    if programs_per_sm is not None:
        programs = programs_per_sm * limits.num_sms
    else:
        resident = resident_programs(program, limits) * limits.num_sms
        within_l2 = int(limits.l2_bytes * L2_SHARE) // max(1, vocab * itemsize)
        programs = min(resident, max(limits.num_sms, within_l2))
    programs = max(1, min(num_rows, programs))
    return programs, programs
