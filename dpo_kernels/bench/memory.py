"""The memory profiler: peak memory of one full fused-linear DPO step (forward + backward into the hidden states and
the lm_head weight) per provider per sequence length.

Each measurement runs one warm-up step (Triton compiles, autotuning, torch.compile) and then measures a second one.
CUDA: in this process, `max_memory_allocated` during the step minus what was allocated before it (the inputs and the
weight), and the total peak. CPU: by default each measurement runs in a fresh subprocess, which reports the peak of
its resident set during the step (VmHWM reset through /proc/self/clear_refs) minus its RSS before the step; a killed
subprocess (the kernel's OOM killer) or a MemoryError counts as out of memory. A provider stops at its first out of
memory; the larger lengths are marked as not run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from dpo_kernels.bench import compare, report
from dpo_kernels.bench.inputs import check_sizes
from dpo_kernels.bench.providers import providers_for, unavailable_reason
from dpo_kernels.bench.timing import peak_extra_memory, release_memory

GPU_DEFAULTS = {"seq_lens": (1024, 2048, 4096, 8192, 16384, 32768, 65536), "hidden": 4096, "vocab": 128256}
CPU_DEFAULTS = {"seq_lens": (256, 512, 1024, 2048), "hidden": 64, "vocab": 4096}
DEFAULT_PROVIDERS = ("eager", "trl", "liger", "cce", "dpo_kernels", "dpo_kernels_low")
_RESULT_PREFIX = "DPO_KERNELS_MEMORY_RESULT "


def measure_in_process(provider_name, seq_len, *, pairs, hidden, vocab, dtype, device, compile_backend="inductor"):
    """Peak memory of one DPO step; raises the OOM error of the device when it runs out (the caller frees)."""
    device = torch.device(device)
    provider = providers_for("linear", [provider_name])[0]
    size = compare.Size(pairs, seq_len, hidden, vocab)
    inputs = compare.make_inputs("linear", size, dtype, device)
    tensors = compare.leaves("linear", inputs)
    forward = provider.build(inputs, compile_backend=compile_backend)

    def step():
        for t in tensors:
            t.grad = None
        forward().backward()

    step()
    for t in tensors:
        t.grad = None
    extra = peak_extra_memory(step, device)
    total = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"status": "ok", "peak_extra_bytes": extra, "peak_total_bytes": total}


def measure_in_subprocess(provider_name, seq_len, *, pairs, hidden, vocab, dtype, device, compile_backend="inductor",
                          timeout_s=600):
    """The same measurement in a fresh Python process, so that one step's peak RSS is not hidden by earlier ones."""
    spec = {"provider": provider_name, "seq_len": seq_len, "pairs": pairs, "hidden": hidden, "vocab": vocab,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "compile_backend": compile_backend}
    cmd = [sys.executable, "-m", "dpo_kernels.bench.memory", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"no result within {timeout_s} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    if proc.returncode < 0:
        return {"status": "oom", "note": f"worker killed by signal {-proc.returncode} (out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "note": f"worker exit {proc.returncode}: {tail[:200]}"}


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    kwargs = {k: spec[k] for k in ("pairs", "hidden", "vocab", "device", "compile_backend")}
    try:
        result = measure_in_process(spec["provider"], spec["seq_len"], dtype=getattr(torch, spec["dtype"]), **kwargs)
    except compare.OOM_ERRORS as exc:
        result = {"status": "oom", "note": str(exc).splitlines()[0][:200] if str(exc) else "out of memory"}
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def profile_memory(seq_lens=None, *, hidden=None, vocab=None, pairs=1, provider_names=None, device=None, dtype=None,
                   isolate=None, compile_backend="inductor", measure=None, log=print, on_update=None) -> dict:
    """Measures every provider at every length (ascending), stopping a provider at its first out of memory.

    `measure(provider_name, seq_len) -> {"status": "ok"|"oom"|..., "peak_extra_bytes", ...}` may be given (tests
    inject a fake OOM this way); it may also raise the device's OOM error. Default: in-process on CUDA, a fresh
    subprocess per measurement on the CPU (`isolate` overrides). `on_update(result)` is called after every
    measurement (partial results survive a timeout); `result["complete"]` turns True at the end.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    seq_lens = sorted(seq_lens or defaults["seq_lens"])
    hidden, vocab = hidden or defaults["hidden"], vocab or defaults["vocab"]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    isolate = device.type == "cpu" if isolate is None else isolate
    check_sizes(pairs, seq_lens[0], hidden=hidden, vocab=vocab)
    all_names = [p.name for p in providers_for("linear")]
    names = list(provider_names or [n for n in DEFAULT_PROVIDERS if n in all_names])
    providers = providers_for("linear", names)
    if measure is None:
        fn = measure_in_subprocess if isolate else measure_in_process
        kwargs = dict(pairs=pairs, hidden=hidden, vocab=vocab, dtype=dtype, device=device,
                      compile_backend=compile_backend)

        def measure(name, seq_len):
            return fn(name, seq_len, **kwargs)

    skipped = {p.name: unavailable_reason(p, device) for p in providers}
    result = {
        "stamp": report.stamp(device),
        "what": "peak extra memory of one fused-linear DPO step (fwd+bwd into hidden and lm_head weight), "
                "first quarter of each row prompt",
        "method": "cuda max_memory_allocated minus allocated before the step" if device.type == "cuda" else
                  ("peak RSS minus RSS before the step, one fresh subprocess per measurement" if isolate else
                   "peak RSS minus RSS before the step, in this process"),
        "pairs": pairs, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
        "seq_lens": seq_lens,
        "device_memory_gib": (torch.cuda.get_device_properties(device).total_memory / report.GIB
                              if device.type == "cuda" else None),
        "providers": [{"name": p.name, "description": p.description,
                       "status": "skipped" if skipped[p.name] else "ran", "note": skipped[p.name]} for p in providers],
        "rows": [],
        "complete": False,
    }
    rows = result["rows"]
    on_update = on_update or (lambda result: None)
    for provider in providers:
        if skipped[provider.name]:
            log(f"[memory] {provider.name}: skipped, {skipped[provider.name]}")
            continue
        stopped = None
        for seq_len in seq_lens:
            row = {"provider": provider.name, "seq_len": seq_len}
            if stopped:
                row.update(status="not_run", note=f"after {stopped} at a shorter length")
                rows.append(row)
                continue
            t0 = time.perf_counter()
            try:
                row.update(measure(provider.name, seq_len))
            except compare.OOM_ERRORS as exc:
                row.update(status="oom", note=str(exc).splitlines()[0][:200] if str(exc) else "out of memory")
            except Exception as exc:  # noqa: BLE001  (reported in the table; the other providers go on)
                row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
            release_memory(device)
            row["seconds"] = time.perf_counter() - t0
            if row.get("peak_extra_bytes") is not None:
                row["peak_extra_gib"] = row["peak_extra_bytes"] / report.GIB
            if row.get("peak_total_bytes") is not None:
                row["peak_total_gib"] = row["peak_total_bytes"] / report.GIB
            if row["status"] != "ok":
                stopped = row["status"]
            log(f"[memory] {provider.name} T={seq_len}: {row['status']} "
                f"{report.fmt(row.get('peak_extra_gib'))} GiB extra ({row['seconds']:.1f} s)")
            rows.append(row)
            on_update(result)
    result["complete"] = True
    return result


def _cell(row):
    if row is None:
        return "–"
    if row["status"] == "ok":
        return report.fmt(row.get("peak_extra_gib"))
    return {"oom": "OOM", "not_run": "–"}.get(row["status"], row["status"].upper())


def markdown_lines(result: dict) -> list:
    by_key = {(r["provider"], r["seq_len"]): r for r in result["rows"]}
    ran = [p["name"] for p in result["providers"] if p["status"] == "ran"]
    lines = [
        f"## Peak extra memory (GiB) of one DPO step, {result['pairs']} pair(s) x T, H={result['hidden']} "
        f"V={result['vocab']} {result['dtype']}" + ("" if result.get("complete", True) else
                                                     " — PARTIAL (the run did not finish)"),
        "",
        f"Device and versions: {report.stamp_line(result['stamp'])}",
        f"Method: {result['method']}. OOM = out of memory (larger T not run).",
        "",
        "| provider | " + " | ".join(f"T={t}" for t in result["seq_lens"]) + " |",
        "|---|" + "---|" * len(result["seq_lens"]),
    ]
    for name in ran:
        lines.append(f"| {name} | " + " | ".join(_cell(by_key.get((name, t))) for t in result["seq_lens"]) + " |")
    skipped = [f"- {p['name']}: skipped, {p['note']}" for p in result["providers"] if p["status"] == "skipped"]
    notes = [f"- {r['provider']} T={r['seq_len']}: {r['status']}: {r['note']}" for r in result["rows"]
             if r.get("note") and r["status"] != "not_run"]
    if skipped or notes:
        lines += ["", "Notes:", ""] + skipped + notes
    return lines + [""]


def plot(result: dict, path: str) -> str:
    """Peak extra GiB against T, log-log; a provider's out-of-memory length is marked with a red x."""
    fig, ax = figure(result)
    title = f"Peak memory of one DPO step, {result['pairs']} pair(s), H={result['hidden']} V={result['vocab']}"
    return report.save_figure(fig, ax, path, title, result["stamp"])


def figure(result: dict):
    """The `(figure, axes)` `plot` saves."""
    fig, ax = report.new_figure()
    # An OOM is drawn at the device's capacity when known, else just above the highest measurement.
    top = result.get("device_memory_gib") or 1.5 * max([r.get("peak_extra_gib") or 0 for r in result["rows"]] + [1e-6])
    for p in result["providers"]:
        if p["status"] != "ran":
            continue
        rows = [r for r in result["rows"] if r["provider"] == p["name"]]
        ok = [r for r in rows if r["status"] == "ok" and r.get("peak_extra_gib")]
        line = ax.plot([r["seq_len"] for r in ok], [r["peak_extra_gib"] for r in ok], marker="o", label=p["name"])
        for r in rows:
            if r["status"] == "oom":
                ax.plot([r["seq_len"]], [top], marker="x", color=line[0].get_color(), markersize=10,
                        markeredgewidth=2)
                ax.annotate("OOM", (r["seq_len"], top), fontsize=7, textcoords="offset points", xytext=(4, 4))
    if result.get("device_memory_gib"):
        ax.axhline(result["device_memory_gib"], color="gray", linestyle=":", label="device memory")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["seq_lens"], [str(t) for t in result["seq_lens"]], fontsize=8)
    ax.minorticks_off()
    if any((r.get("peak_extra_gib") or 0) > 0 for r in result["rows"]):
        report.plain_log_axis(ax, "y")  # tiny CPU runs can measure 0 (no new pages): keep a linear axis for them
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("peak extra memory (GiB)")
    ax.legend(fontsize=7)
    return fig, ax


def write(result: dict, output_dir: str, png: bool = True) -> dict:
    """Writes memory.json, memory.md and (unless `png` is False) memory.png into `output_dir`; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": report.write_json(os.path.join(output_dir, "memory.json"), result),
        "markdown": report.write_markdown(os.path.join(output_dir, "memory.md"), markdown_lines(result)),
    }
    if png:
        paths["png"] = plot(result, os.path.join(output_dir, "memory.png"))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="memory profiler worker (internal)")
    parser.add_argument("--worker", required=True, help="JSON spec of one measurement")
    sys.exit(_worker(parser.parse_args().worker))
