"""The comparison sweep: for each op, provider x size -> median ms, peak extra memory, fraction of the floor, and
the error of the loss and of each gradient against eager PyTorch on the same inputs.

All providers of a size receive the same tensors (realistic, peaked; first quarter of each row is prompt; one dtype).
The floors: for the logits path the bandwidth floor (3 bytes-per-element passes over the logits at the measured copy
rate), for the fused linear path the 6NHV floor (the three chunked GEMMs over the valid tokens, measured here). The
DPO loss alone is launch-bound and has no floor.
"""
from dataclasses import dataclass

import torch

from dpo_kernels.bench import inputs as bench_inputs
from dpo_kernels.bench import report
from dpo_kernels.bench.providers import OP_TITLES, providers_for, unavailable_reason
from dpo_kernels.bench.timing import bandwidth_floor_ms, copy_bandwidth, gemm_floor_ms, release_memory, time_step

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


@dataclass(frozen=True)
class Size:
    """One benchmark size; `hidden`/`vocab` are 0 where the op has none."""

    pairs: int
    seq_len: int = 0
    hidden: int = 0
    vocab: int = 0

    @property
    def label(self) -> str:
        if not self.seq_len:
            return f"B={self.pairs}"
        dims = f" H={self.hidden}" if self.hidden else ""
        return f"{self.pairs}x{self.seq_len}{dims} V={self.vocab}"


# The reference logits size (docs/design.md, "Benchmarks"): [4*4096, V] logits are 2 pairs of 4096 tokens.
GPU_SIZES = {
    "linear": (Size(2, 2048, 4096, 128256), Size(2, 8192, 4096, 128256), Size(1, 32768, 4096, 128256)),
    "logits": (Size(2, 4096, 0, 128256),),
    "loss": (Size(8), Size(64), Size(1024), Size(65536)),
}
CPU_SIZES = {
    "linear": (Size(1, 64, 48, 1000), Size(2, 96, 64, 3001)),
    "logits": (Size(1, 64, 0, 1000), Size(2, 48, 0, 3001)),
    "loss": (Size(8), Size(1024)),
}
# (warm-up, timed iterations) after the error-checking step, itself a first warm-up; the launch-bound loss gets more.
ITERATIONS = {"linear": (1, 5), "logits": (1, 5), "loss": (10, 50)}
GRAD_NAMES = {
    "linear": ("grad_hidden", "grad_weight"),
    "logits": ("grad_logits",),
    "loss": ("grad_policy_chosen", "grad_policy_rejected"),
}


def cast_inputs(op: str, inputs, dtype: torch.dtype):
    """The same inputs with their floating-point leaves as new leaves in `dtype` (the eager reference's copies)."""
    def leaf(t):
        return t.detach().to(dtype).requires_grad_()

    if op == "linear":
        return bench_inputs.LinearInputs(leaf(inputs.hidden), leaf(inputs.weight), inputs.labels, inputs.targets)
    if op == "logits":
        return bench_inputs.LogitsInputs(leaf(inputs.logits), inputs.labels, inputs.targets)
    return bench_inputs.LossInputs(leaf(inputs.policy_chosen), leaf(inputs.policy_rejected),
                                   inputs.ref_chosen.to(dtype), inputs.ref_rejected.to(dtype))


def _eager_reference(op: str, inputs, tensors, dtype):
    """Eager's loss and gradients on `inputs` (on copies in `dtype` when given): what the errors are measured
    against."""
    eager = providers_for(op, ["eager"])[0]
    if dtype is None:
        return loss_and_grads(eager.build(inputs), tensors)
    copies = cast_inputs(op, inputs, dtype)
    return loss_and_grads(eager.build(copies), leaves(op, copies))


def make_inputs(op: str, size: Size, dtype: torch.dtype, device: torch.device, seed: int = 0):
    if op == "linear":
        return bench_inputs.make_linear_inputs(size.pairs, size.seq_len, size.hidden, size.vocab, dtype=dtype,
                                               device=device, seed=seed)
    if op == "logits":
        return bench_inputs.make_logits_inputs(size.pairs, size.seq_len, size.vocab, dtype=dtype, device=device,
                                               seed=seed)
    return bench_inputs.make_loss_inputs(size.pairs, device=device, seed=seed)


def leaves(op: str, inputs) -> tuple:
    if op == "linear":
        return inputs.hidden, inputs.weight
    if op == "logits":
        return (inputs.logits,)
    return inputs.policy_chosen, inputs.policy_rejected


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def relative_error(value: torch.Tensor, truth: torch.Tensor, rows: int = 4096) -> float:
    """`||value - truth|| / ||truth||` in fp32 (fp64 against a float64 truth), in row chunks so that no full-size
    copy is made."""
    value, truth = value.detach().reshape(-1, value.shape[-1]), truth.detach().reshape(-1, truth.shape[-1])
    dtype = torch.promote_types(truth.dtype, torch.float32)
    diff = ref = 0.0
    for start in range(0, truth.shape[0], rows):
        t = truth[start : start + rows].to(dtype)
        diff += (value[start : start + rows].to(dtype) - t).pow(2).sum().item()
        ref += t.pow(2).sum().item()
    return (diff ** 0.5) / max(ref ** 0.5, 1e-30)


def loss_and_grads(forward, tensors):
    """One forward + backward: the detached loss and the gradients of `tensors`."""
    _clear_grads(tensors)
    loss = forward()
    loss.backward()
    return loss.detach().reshape(1), [t.grad for t in tensors]


def floor_ms(op: str, size: Size, dtype, device, valid_tokens: int, bytes_per_s: float | None) -> float | None:
    if op == "linear":
        return gemm_floor_ms(valid_tokens, size.hidden, size.vocab, dtype, device)
    if op == "logits" and bytes_per_s:
        return bandwidth_floor_ms(2 * size.pairs * size.seq_len, size.vocab, dtype, bytes_per_s)
    return None


def _run_provider(provider, op, inputs, tensors, device, reference, settings) -> dict:
    row = {"provider": provider.name, "status": "ok", "note": None}
    try:
        forward = provider.build(inputs, compile_backend=settings["compile_backend"])
        loss, grads = loss_and_grads(forward, tensors)
        if reference is not None:
            ref_loss, ref_grads = reference
            errors = {"loss": relative_error(loss, ref_loss)}
            errors.update({n: relative_error(g, r) for n, g, r in zip(GRAD_NAMES[op], grads, ref_grads, strict=True)})
            row["error_vs_eager"] = errors
        del loss, grads

        def step():
            _clear_grads(tensors)
            forward().backward()

        warmup, iters = settings["iterations"]
        m = time_step(step, device, warmup=warmup, iters=iters, clear=lambda: _clear_grads(tensors))
        row.update(median_ms=m.median_ms, times_ms=list(m.times_ms),
                   peak_extra_gib=None if m.peak_extra_bytes is None else m.peak_extra_bytes / report.GIB)
    except OOM_ERRORS as exc:
        row.update(status="oom", note=f"out of memory: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    except Exception as exc:  # noqa: BLE001  (one failing provider must not end the sweep; it is reported)
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    finally:
        _clear_grads(tensors)
        release_memory(device)
    return row


def run_op(op, sizes, *, provider_names=None, dtype=torch.bfloat16, device=None, compile_backend="inductor",
           iterations=None, seed=0, bytes_per_s=None, reference_dtype=None, on_update=None) -> dict:
    """Runs the sweep of one op and returns its result dict (what `write_op` saves).

    The errors are measured against eager PyTorch on the same inputs, in `reference_dtype` when given (float64 on
    the CPU gives the truth), else in `dtype`.

    `on_update(result, redraw)` is called after every provider row (redraw False) and after every size but the last
    (redraw True), so that a caller can save partial results (a GPU slot's stage can time out); `result["complete"]`
    turns True at the end, when the caller writes everything once more.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    providers = providers_for(op, provider_names)
    skipped = {p.name: unavailable_reason(p, device) for p in providers}
    settings = {"compile_backend": compile_backend, "iterations": iterations or ITERATIONS[op]}
    if op == "logits" and bytes_per_s is None:
        bytes_per_s = copy_bandwidth(device)
    on_update = on_update or (lambda result, redraw: None)
    result = {
        "op": op,
        "title": OP_TITLES[op],
        "stamp": report.stamp(device),
        "dtype": str(dtype).replace("torch.", ""),
        "beta": 0.1,
        "prompt_fraction": bench_inputs.PROMPT_FRACTION,
        "floor": {"linear": "6NHV: three chunked GEMMs over the valid tokens, measured on this device",
                  "logits": "bandwidth: 3 * element size * rows * V bytes at the measured copy rate",
                  "loss": None}[op],
        "copy_bandwidth_gbs": bytes_per_s / 1e9 if bytes_per_s else None,
        "compile_backend": compile_backend,
        "reference_dtype": str(reference_dtype or dtype).replace("torch.", ""),
        "iterations": list(settings["iterations"]),
        "providers": [{"name": p.name, "description": p.description,
                       "status": "skipped" if skipped[p.name] else "ran", "note": skipped[p.name]}
                      for p in providers],
        "sizes": [],
        "rows": [],
        "complete": False,
    }
    for index, size in enumerate(sizes):
        inputs = make_inputs(op, size, dtype, device, seed)
        tensors = leaves(op, inputs)
        valid = getattr(inputs, "valid_tokens", 0)
        floor = floor_ms(op, size, dtype, device, valid, bytes_per_s)
        result["sizes"].append({"label": size.label, "pairs": size.pairs, "seq_len": size.seq_len,
                                "hidden": size.hidden, "vocab": size.vocab, "valid_tokens": valid or None,
                                "floor_ms": floor})
        reference = None
        try:
            reference = _eager_reference(op, inputs, tensors, reference_dtype)
        except OOM_ERRORS:
            _clear_grads(tensors)
        release_memory(device)
        for provider in providers:
            if skipped[provider.name]:
                continue
            row = _run_provider(provider, op, inputs, tensors, device, reference, settings)
            if reference is None and row["status"] == "ok":
                row["note"] = "eager ran out of memory: no error vs eager"
            row["size"] = size.label
            if floor and row.get("median_ms"):
                row["floor_ms"], row["fraction_of_floor"] = floor, row["median_ms"] / floor
            result["rows"].append(row)
            on_update(result, False)
        del inputs, tensors, reference
        release_memory(device)
        if index < len(sizes) - 1:
            on_update(result, True)
    result["complete"] = True
    return result


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return row["status"].upper()
    frac = f" / {row['fraction_of_floor']:.2f}×" if row.get("fraction_of_floor") else ""
    return f"{report.fmt(row['median_ms'])} / {report.fmt(row.get('peak_extra_gib'))}{frac}"


def markdown_lines(result: dict) -> list:
    """The op's Markdown: stamp, one timing row per provider, one error row per provider, skipped providers."""
    labels = [s["label"] for s in result["sizes"]]
    by_key = {(r["provider"], r["size"]): r for r in result["rows"]}
    ran = [p["name"] for p in result["providers"] if p["status"] == "ran"]
    partial = "" if result.get("complete", True) else " — PARTIAL (the run did not finish)"
    lines = [
        f"## {result['title']} ({result['dtype']}){partial}",
        "",
        f"Device and versions: {report.stamp_line(result['stamp'])}",
        f"Each cell: median ms / peak extra GiB / fraction of the floor ({result['floor'] or 'no floor'}). "
        f"Prompt fraction {result['prompt_fraction']}, beta {result['beta']}.",
        "",
        "| provider | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    floors = [report.fmt(s["floor_ms"]) for s in result["sizes"]]
    if any(s["floor_ms"] for s in result["sizes"]):
        lines.append("| floor (ms) | " + " | ".join(floors) + " |")
    for name in ran:
        lines.append(f"| {name} | " + " | ".join(_cell(by_key.get((name, label))) for label in labels) + " |")
    reference = result.get("reference_dtype", result["dtype"])
    against = "same inputs and dtype" if reference == result["dtype"] else f"same inputs, eager in {reference}"
    lines += ["", f"Relative error vs eager (loss; gradients), {against}:", "",
              "| provider | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name in ran:
        cells = []
        for label in labels:
            errors = (by_key.get((name, label)) or {}).get("error_vs_eager")
            cells.append("; ".join(f"{k} {v:.1e}" for k, v in errors.items()) if errors else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"- {r['provider']} at {r['size']}: {r['status']}: {r['note']}" for r in result["rows"] if r["note"]]
    skipped = [f"- {p['name']}: skipped, {p['note']}" for p in result["providers"] if p["status"] == "skipped"]
    if notes or skipped:
        lines += ["", "Notes:", ""] + skipped + notes
    return lines + [""]


def plot(result: dict, path: str) -> str:
    """Grouped bars: median ms per provider at each size (log scale), the floor as a black tick."""
    fig, ax = report.new_figure()
    labels = [s["label"] for s in result["sizes"]]
    ran = [p["name"] for p in result["providers"] if p["status"] == "ran"]
    by_key = {(r["provider"], r["size"]): r for r in result["rows"]}
    width = 0.8 / max(1, len(ran))
    for i, name in enumerate(ran):
        xs, ys = [], []
        for j, label in enumerate(labels):
            row = by_key.get((name, label))
            if row and row.get("median_ms"):
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(row["median_ms"])
        ax.bar(xs, ys, width=width, label=name)
    for j, s in enumerate(result["sizes"]):
        if s["floor_ms"]:
            ax.hlines(s["floor_ms"], j - 0.45, j + 0.45, colors="black", linestyles="--",
                      label="floor" if j == 0 else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("median ms (fwd+bwd)")
    report.plain_log_axis(ax, "y", base=10)
    ax.legend(fontsize=7)
    return report.save_figure(fig, ax, path, f"{result['title']} ({result['dtype']})", result["stamp"])


def write_op(result: dict, output_dir: str, png: bool = True) -> dict:
    """Writes `<op>.json`, `<op>.md` and (unless `png` is False) `<op>.png` into `output_dir`; returns the paths."""
    return report.write_report(output_dir, result["op"], result, markdown_lines(result), plot if png else None)


def run_sweep(ops, output_dir, *, sizes=None, provider_names=None, dtype=None, device=None,
              compile_backend="inductor", iterations=None, reference_dtype=None, log=print) -> dict:
    """Runs and writes every op in `ops`; sizes default to the reference sizes (docs/design.md, "Benchmarks") on
    CUDA, small ones on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bytes_per_s = copy_bandwidth(device) if "logits" in ops else None
    written = {}
    for op in ops:
        names = None
        if provider_names:
            known = {p.name for p in providers_for(op)}
            names = [n for n in provider_names if n in known]
        log(f"[bench] {op}: {', '.join(s.label for s in sizes[op])} on {report.device_name(device)}, {dtype}")
        result = run_op(op, sizes[op], provider_names=names, dtype=dtype, device=device,
                        compile_backend=compile_backend, iterations=iterations, bytes_per_s=bytes_per_s,
                        reference_dtype=reference_dtype,
                        on_update=lambda partial, redraw: write_op(partial, output_dir, png=redraw))
        written[op] = write_op(result, output_dir)
        log("\n".join(markdown_lines(result)))
    return written
