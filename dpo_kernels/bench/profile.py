"""`dpo-kernels bench --ops profile`: where one fused-linear DPO step spends its device time, beside the models.

On one GPU, in about a minute (docs/design.md, "Benchmarks"):
- the device: the branch its fp32-result GEMMs take (`fused_linear/fp32_gemm.py`), its SM count and L2 size, and
  the measured copy rate;
- the logsoftmax pass alone at C = 8192, V = 128256, for the engine's grid and for 1, 2 and 4 programs per SM: ms, the
  GB/s of the bytes it must move (the logits read once, the gradient written once) and their fraction of the copy
  rate;
- one fused step at each reference size under `torch.profiler`: device ms per kernel class (`CLASSES`) beside the
  cost model's breakdown of the same plan (`fused_linear/cost_model.py`, H200 constants), and the peak extra memory
  beside the memory model's figure for the device's branch (`fused_linear/memory_model.py`).

`tiny=True` runs the same at tiny sizes on the CPU, a smoke run for tests: the profiler's CPU activity gives CPU ms
per op class, the pass runs only in Triton's interpreter (TRITON_INTERPRET=1), and no bandwidth is claimed.
"""
import contextlib
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from dpo_kernels.backend import triton_interpreted
from dpo_kernels.bench import report
from dpo_kernels.bench.compare import GPU_SIZES, Size
from dpo_kernels.bench.inputs import make_linear_inputs
from dpo_kernels.bench.providers.common import BETA
from dpo_kernels.bench.timing import copy_bandwidth, peak_extra_memory, synchronize, time_step
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear import engine, logsoftmax_pass
from dpo_kernels.fused_linear.cost_model import H200, estimate_step_cost
from dpo_kernels.fused_linear.fp32_gemm import fp32_gemm_branch
from dpo_kernels.fused_linear.memory_model import estimate_peak_bytes

PASS_SHAPE = (8192, 128256)  # (C, V): one default chunk of the Llama-3 head
TINY_PASS_SHAPE = (6, 300)
STEP_SIZES = GPU_SIZES["linear"]
# Tiny steps: V, H and every chunk's row count differ, so each GEMM's class follows from its shapes.
TINY_STEP_SIZES = (Size(1, 24, 32, 515), Size(2, 40, 32, 515))
PROGRAMS_PER_SM = (1, 2, 4)
# (name, write_grad, stats) of the pass's variants: log-probs only, the training pass, and the TRL drop-in's.
PASS_VARIANTS = (("logp", False, False), ("logp+grad", True, False), ("logp+grad+stats", True, True))
CLASSES = ("logits GEMM", "hidden-gradient GEMM", "weight-gradient GEMM", "logsoftmax pass", "conversions",
           "loss op", "others")
# The profiler range the pass runs in during a profiled step: on the CPU its PyTorch twin is many ops.
PASS_RANGE = "dpo_kernels::logsoftmax_pass"
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")
_CONVERSION_OPS = ("aten::_to_copy", "aten::to")


def device_facts(device: torch.device, dtype: torch.dtype) -> dict:
    """The fp32 GEMM branch for `dtype` operands, SM count and L2 bytes of `device` (None off CUDA)."""
    facts = {"fp32_gemm_branch": fp32_gemm_branch(device, dtype), "num_sms": None, "l2_bytes": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(num_sms=props.multi_processor_count, l2_bytes=props.L2_cache_size)
    return facts


@contextlib.contextmanager
def labelled_pass():
    """Inside the block each of the engine's passes runs in the profiler range `PASS_RANGE`."""
    own = engine.logsoftmax_pass

    def in_range(*args, **kwargs):
        with record_function(PASS_RANGE):
            return own(*args, **kwargs)

    engine.logsoftmax_pass = in_range
    try:
        yield
    finally:
        engine.logsoftmax_pass = own


def _grids() -> list:
    """`(label, programs per SM or None)`: the engine's own grid, then `PROGRAMS_PER_SM` per SM (the pass's knob,
    `logsoftmax_pass_forward(programs_per_sm=...)`)."""
    return [("engine", None)] + [(f"{k}/SM", k) for k in PROGRAMS_PER_SM]


def profile_pass(device, rows, vocab, dtype, copy_bytes_per_s=None, iters=10, seed=0) -> list:
    """The Triton pass alone over `[rows, vocab]` logits of `dtype`: one dict per variant and grid, with its median
    ms, programs launched and, given the copy rate, GB/s of the bytes it must move and their fraction of that rate.
    Off CUDA it needs Triton's interpreter; without it the list is empty."""
    if device.type != "cuda" and not triton_interpreted():
        return []
    g = torch.Generator(device=device).manual_seed(seed)
    z = (torch.randn(rows, vocab, device=device, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=g)
    scale = torch.randn(rows, device=device, generator=g)
    out = []
    for variant, write_grad, stats in PASS_VARIANTS:
        # Values no longer matter once the gradient has overwritten the logits: the kernel does the same work.
        nbytes = rows * vocab * z.element_size() * (2 if write_grad else 1)

        for label, per_sm in _grids():
            def launch(write_grad=write_grad, stats=stats, per_sm=per_sm):
                logsoftmax_pass.logsoftmax_pass_forward(z, labels, scale if write_grad else None, write_grad, stats,
                                                        programs_per_sm=per_sm)

            grid = logsoftmax_pass.pass_launch(z, labels, scale=scale if write_grad else None, write_grad=write_grad,
                                               stats=stats, programs_per_sm=per_sm)
            m = time_step(launch, device, warmup=1, iters=iters)
            row = {"variant": variant, "grid": label, "programs": grid.programs, "median_ms": m.median_ms,
                   "gbs": None, "fraction_of_copy": None}
            if copy_bytes_per_s and device.type == "cuda":
                rate = nbytes / (m.median_ms * 1e-3)
                row.update(gbs=rate / 1e9, fraction_of_copy=rate / copy_bytes_per_s)
            out.append(row)
    return out


def _gemm_class(op, hidden: int, vocab: int) -> str:
    """The engine's GEMM an `aten::mm` / `aten::addmm` event computes, from its operands' shapes: the contraction
    over V is the hidden-gradient GEMM, V rows the weight-gradient GEMM (`Dᵀ h`), V columns the logits GEMM."""
    mats = [list(s) for s in (op.input_shapes or []) if len(s) == 2]
    if op.name != "aten::mm":  # addmm's first operand is the matrix added to
        mats = mats[1:]
    if len(mats) < 2:
        return "others"
    (m, k), (_, n) = mats[0], mats[1]
    if k == vocab:
        return "hidden-gradient GEMM"
    if m == vocab and n in (hidden, hidden + 2):  # + 2: the bias columns
        return "weight-gradient GEMM"
    if n == vocab and k == hidden:
        return "logits GEMM"
    return "others"


def kernel_class(op, kernel_name, hidden: int, vocab: int) -> str:
    """The class (`CLASSES`) of a kernel named `kernel_name` (None: the op's own CPU time) launched inside the
    profiler event `op` (None when it was launched outside any op), for a head of `hidden` x `vocab`.

    The pass and the loss op are recognised at any depth (the loss op's ATen calls, the CPU twin's ops); a GEMM by
    the shapes of the nearest GEMM op; a conversion by `.to` / `_to_copy`, or by the out-of-place multiply that
    scales the fp32 `[V, H]` accumulator into the weight's dtype."""
    if kernel_name and "logsoftmax_pass" in kernel_name:
        return "logsoftmax pass"
    chain = []
    while op is not None:
        chain.append(op)
        op = op.cpu_parent
    names = [e.name for e in chain]
    if PASS_RANGE in names:
        return "logsoftmax pass"
    if any(n.startswith("dpo_kernels::") for n in names):
        return "loss op"
    gemm = next((e for e in chain if e.name in _GEMM_OPS), None)
    if gemm is not None:
        return _gemm_class(gemm, hidden, vocab)
    if any(n in _CONVERSION_OPS for n in names):
        return "conversions"
    if chain and chain[0].name == "aten::mul":
        first = next((list(s) for s in chain[0].input_shapes or [] if s), None)
        if first == [vocab, hidden]:
            return "conversions"
    return "others"


def ms_by_class(events, hidden: int, vocab: int, device_kernels: bool) -> dict:
    """Milliseconds per class of a profiled step's events (`prof.events()`).

    `device_kernels`: each device kernel's time, classed by the innermost op it was launched from; kernels linked to
    no op (a Triton launch outside any op) by name alone. Else each CPU op's own time (a CPU run)."""
    out = dict.fromkeys(CLASSES, 0.0)
    if not device_kernels:
        for e in events:
            if e.device_type == DeviceType.CPU and not e.is_async:
                out[kernel_class(e, None, hidden, vocab)] += e.self_cpu_time_total / 1e3
        return out
    linked = Counter()
    for e in events:
        if e.device_type == DeviceType.CPU and not e.is_async and not getattr(e, "is_legacy", False):
            for k in e.kernels:
                out[kernel_class(e, k.name, hidden, vocab)] += k.duration / 1e3
                linked[k.name] += k.duration
    for e in events:
        if e.device_type == DeviceType.CUDA:
            duration = e.time_range.elapsed_us()
            seen = min(duration, linked[e.name])
            linked[e.name] -= seen
            if duration > seen:
                out[kernel_class(None, e.name, hidden, vocab)] += (duration - seen) / 1e3
    return out


def modeled_ms_by_class(cost) -> dict:
    """The cost model's milliseconds (H200) per class: its kernels by name, the loss op's small launches, and the
    synchronizations under "others"."""
    out = dict.fromkeys(CLASSES, 0.0)
    for name, seconds in cost.breakdown(H200).items():
        if name in out:
            cls = name
        elif "conversion" in name or "round" in name:
            cls = "conversions"
        else:
            cls = "others"
        out[cls] += seconds * 1e3
    out["loss op"] += cost.small_kernels * H200.launch_s * 1e3
    out["others"] += cost.syncs * H200.sync_s * 1e3
    return out


def _pair_lengths(labels: torch.Tensor, pairs: int) -> list:
    """Scored tokens per pair of HF-convention `[2B, T]` labels (position t scores labels[t + 1])."""
    valid = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return (valid[:pairs] + valid[pairs:]).tolist()


def profile_step(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """One fused-linear DPO step (`FusedLinearDPOLoss`, sigmoid, forward + backward) at `size`, after a warm-up
    step: ms per class under the profiler and in the cost model, and the peak extra memory, measured (an unprofiled
    step; peak RSS on the CPU) and modeled."""
    from dpo_kernels import FusedLinearDPOLoss

    inputs = make_linear_inputs(size.pairs, size.seq_len, size.hidden, size.vocab, dtype=dtype, device=device,
                                seed=seed)
    loss_fn = FusedLinearDPOLoss(beta=BETA)

    def clear():
        inputs.hidden.grad = inputs.weight.grad = None

    def step():
        loss_fn(inputs.hidden, inputs.weight, inputs.labels).loss.backward()

    step()  # Triton compiles, cuBLAS picks its kernels
    clear()
    peak = peak_extra_memory(step, device)
    clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labelled_pass(), profile(activities=activities, record_shapes=True) as prof:
        step()
        synchronize(device)
    clear()
    measured = ms_by_class(prof.events(), size.hidden, size.vocab, device_kernels=device.type == "cuda")
    pairs = _pair_lengths(inputs.labels, size.pairs)
    rows = 2 * size.pairs * size.seq_len
    cost = estimate_step_cost(rows, pairs, size.hidden, size.vocab, dtype)
    modeled = modeled_ms_by_class(cost)
    return {
        "size": size.label, "pairs": size.pairs, "seq_len": size.seq_len, "hidden": size.hidden, "vocab": size.vocab,
        "valid_tokens": sum(pairs),
        "time_kind": "device" if device.type == "cuda" else "cpu",
        "measured_ms": measured, "measured_total_ms": sum(measured.values()),
        "model_ms": modeled, "model_total_ms": sum(modeled.values()), "model_floor_ms": cost.floor_seconds(H200) * 1e3,
        "peak_extra_bytes": peak,
        "peak_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "model_peak_bytes": estimate_peak_bytes(rows, pairs, size.hidden, size.vocab, dtype, device=device),
    }


def run(output_dir: str, device=None, *, tiny: bool = False, dtype=None, iters=None, log=print) -> dict:
    """Runs the profile (see the module docstring) and writes `profile.json` and `profile.md` into `output_dir`,
    after each part, so that a run cut short keeps what it measured; returns the paths."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.bfloat16
    iters = iters or (1 if tiny else 10)
    rows, vocab = TINY_PASS_SHAPE if tiny else PASS_SHAPE
    result = {
        "op": "profile", "stamp": report.stamp(device), "dtype": str(dtype).replace("torch.", ""), "tiny": tiny,
        "device": device_facts(device, dtype), "copy_bandwidth_gbs": None,
        "pass": {"rows": rows, "vocab": vocab, "iters": iters, "rows_by_grid": []},
        "steps": [], "cost_model_device": H200.name, "complete": False,
    }

    def save():
        return report.write_report(output_dir, "profile", result, markdown_lines(result))

    copy_rate = copy_bandwidth(device) if device.type == "cuda" else None
    result["copy_bandwidth_gbs"] = copy_rate / 1e9 if copy_rate else None
    log(f"[profile] pass alone at C={rows}, V={vocab}, {dtype}")
    result["pass"]["rows_by_grid"] = profile_pass(device, rows, vocab, dtype, copy_rate, iters)
    save()
    for size in TINY_STEP_SIZES if tiny else STEP_SIZES:
        log(f"[profile] step at {size.label}")
        result["steps"].append(profile_step(size, device, dtype))
        save()
    result["complete"] = True
    return save()


def _fmt_bytes(n) -> str:
    return report.fmt(None if n is None else n / report.GIB)


def markdown_lines(result: dict) -> list:
    """The profile's Markdown: the device line, the pass table, the per-class table of each step."""
    facts = result["device"]
    partial = "" if result.get("complete", True) else " — PARTIAL (the run did not finish)"
    l2 = "–" if facts["l2_bytes"] is None else f"{facts['l2_bytes'] / (1 << 20):.0f} MiB"
    lines = [
        f"## Step profile ({result['dtype']}){partial}",
        "",
        f"Device and versions: {report.stamp_line(result['stamp'])}",
        f"fp32 GEMM branch ({result['dtype']}): {facts['fp32_gemm_branch']}; SMs: {facts['num_sms'] or '–'}; "
        f"L2: {l2}; copy rate: {report.fmt(result['copy_bandwidth_gbs'], 4)} GB/s",
        "",
        f"### The logsoftmax pass alone, C = {result['pass']['rows']}, V = {result['pass']['vocab']}",
        "",
    ]
    pass_rows = result["pass"]["rows_by_grid"]
    if pass_rows:
        lines += ["| variant | grid | programs | median ms | GB/s | fraction of copy rate |", "|---" * 6 + "|"]
        lines += [f"| {r['variant']} | {r['grid']} | {r['programs']} | {report.fmt(r['median_ms'])} | "
                  f"{report.fmt(r['gbs'], 4)} | {report.fmt(r['fraction_of_copy'])} |" for r in pass_rows]
    else:
        lines.append("Not run: the Triton pass needs CUDA, or TRITON_INTERPRET=1 on the CPU.")
    steps = result["steps"]
    if steps:
        kind = steps[0]["time_kind"]
        lines += ["", f"### One fused step per size: {kind} ms per class, measured / cost model "
                      f"({result['cost_model_device']})", "",
                  "| class | " + " | ".join(s["size"] for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for cls in CLASSES:
            lines.append(f"| {cls} | " + " | ".join(
                f"{report.fmt(s['measured_ms'][cls])} / {report.fmt(s['model_ms'][cls])}" for s in steps) + " |")
        lines.append("| total | " + " | ".join(
            f"{report.fmt(s['measured_total_ms'])} / {report.fmt(s['model_total_ms'])}" for s in steps) + " |")
        lines.append("| 6NHV floor (model) | " + " | ".join(report.fmt(s["model_floor_ms"]) for s in steps) + " |")
        lines.append(f"| peak extra GiB ({steps[0]['peak_kind']} / memory model) | " + " | ".join(
            f"{_fmt_bytes(s['peak_extra_bytes'])} / {_fmt_bytes(s['model_peak_bytes'])}" for s in steps) + " |")
    return lines + [""]
