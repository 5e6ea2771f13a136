"""The memory profiler: peak memory of one full fused-linear DPO step (forward + backward into the hidden states and
the lm_head weight) per provider per sequence length.

Each measurement runs one warm-up step (Triton compiles, autotuning, torch.compile) and then measures a second one.
CUDA: in this process, `max_memory_allocated` during the step minus what was allocated before it (the inputs and the
weight), and the total peak. CPU: by default each measurement runs in a fresh subprocess, which reports the peak of
its resident set during the step (VmHWM reset through /proc/self/clear_refs) minus its RSS before the step; a killed
subprocess (the kernel's OOM killer) or a MemoryError counts as out of memory. A provider stops at its first out of
memory; the larger lengths are marked as not run.

`profile_shared_prompt` measures the same way one full training step of an HF Llama built from a config (the
backbone, the fused head and the backward, reference log-probs precomputed: `bench.shared_prompt`'s step) on
unshared rows and on the shared-prompt layout, at several prompt lengths P. Its CPU workers run with glibc's mmap
threshold fixed at 64 KiB: otherwise the allocator's dynamic threshold keeps the warm-up step's freed blocks in its
heap, the measured step reuses them, and the reported peak undercounts (by half or more for the shared layout).
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
DEFAULT_PROVIDERS = ("eager", "trl", "liger", "cce", "torch_native", "quack", "dpo_kernels", "dpo_kernels_low")
_RESULT_PREFIX = "DPO_KERNELS_MEMORY_RESULT "

# Shared-prompt profile: prompt lengths P, response length R and pairs B (the model: bench.shared_prompt's shapes).
SHARED_GPU_DEFAULTS = {"prompt_lens": (512, 2048, 8192, 32768), "response": 256, "pairs": 4}
SHARED_CPU_DEFAULTS = {"prompt_lens": (64, 256, 1024), "response": 32, "pairs": 4}
LAYOUTS = ("unshared", "shared")
_FAITHFUL_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


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


# The model of in-process measurements, built once (a Llama-3.2-1B-shaped model takes seconds to initialise): the
# peak is measured above what is allocated before the step, the model included.
_MODELS = {}


def measure_shared_prompt_in_process(layout, prompt, *, response, pairs, shape, attention, device):
    """Peak memory of one training step of `bench.shared_prompt` (fp32 weights; bf16 autocast on CUDA) on `pairs`
    pairs of a `prompt`-token prompt and two `response`-token responses, in `layout` ("unshared" or "shared")."""
    from dpo_kernels.bench import shared_prompt

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    shape = shared_prompt.ModelShape(**shape) if isinstance(shape, dict) else shape
    key = (shape, attention, str(device))
    if key not in _MODELS:
        _MODELS.clear()
        # Llama's default RoPE does not read max_position_embeddings, so one model serves every prompt length.
        _MODELS[key] = shared_prompt.build_model(shape, attention, torch.float32, device, max_positions=1 << 17)
    model = _MODELS[key]
    data = shared_prompt.make_pairs(pairs, prompt, response, shape.vocab)
    step, _, positions = shared_prompt.step_fn(model, data, layout == "shared", device,
                                               torch.bfloat16 if cuda else None)
    step()
    extra = peak_extra_memory(step, device)
    total = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"status": "ok", "peak_extra_bytes": extra, "peak_total_bytes": total, "positions": positions}


def measure_in_subprocess(provider_name, seq_len, *, pairs, hidden, vocab, dtype, device, compile_backend="inductor",
                          timeout_s=600):
    """The same measurement in a fresh Python process, so that one step's peak RSS is not hidden by earlier ones."""
    spec = {"provider": provider_name, "seq_len": seq_len, "pairs": pairs, "hidden": hidden, "vocab": vocab,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "compile_backend": compile_backend}
    return _run_worker(spec, timeout_s)


def measure_shared_prompt_in_subprocess(layout, prompt, *, response, pairs, shape, attention, device, timeout_s=600):
    """`measure_shared_prompt_in_process` in a fresh Python process (glibc's mmap threshold fixed: module docstring)."""
    shape = shape if isinstance(shape, dict) else shape.__dict__
    spec = {"kind": "shared-prompt", "layout": layout, "prompt": prompt, "response": response, "pairs": pairs,
            "shape": shape, "attention": attention, "device": str(device)}
    return _run_worker(spec, timeout_s, env={**os.environ, **_FAITHFUL_RSS_ENV})


def _run_worker(spec, timeout_s, env=None):
    cmd = [sys.executable, "-m", "dpo_kernels.bench.memory", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
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
    try:
        if spec.get("kind") == "shared-prompt":
            kwargs = {k: spec[k] for k in ("response", "pairs", "shape", "attention", "device")}
            result = measure_shared_prompt_in_process(spec["layout"], spec["prompt"], **kwargs)
        else:
            kwargs = {k: spec[k] for k in ("pairs", "hidden", "vocab", "device", "compile_backend")}
            result = measure_in_process(spec["provider"], spec["seq_len"], dtype=getattr(torch, spec["dtype"]),
                                        **kwargs)
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
    for provider in providers:
        if skipped[provider.name]:
            log(f"[memory] {provider.name}: skipped, {skipped[provider.name]}")
    _sweep(result, [p.name for p in providers if not skipped[p.name]], measure, device, log, on_update)
    return result


def _sweep(result, names, measure, device, log, on_update):
    """Measures each name at each length (ascending) into `result["rows"]`, stopping a name at its first out of
    memory; `result["complete"]` turns True at the end."""
    rows, x_key = result["rows"], _x_key(result)
    on_update = on_update or (lambda result: None)
    for name in names:
        stopped = None
        for x in _xs(result):
            row = {"provider": name, x_key: x}
            if stopped:
                row.update(status="not_run", note=f"after {stopped} at a shorter length")
                rows.append(row)
                continue
            t0 = time.perf_counter()
            try:
                row.update(measure(name, x))
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
            log(f"[memory] {name} {_x_name(result)}={x}: {row['status']} "
                f"{report.fmt(row.get('peak_extra_gib'))} GiB extra ({row['seconds']:.1f} s)")
            rows.append(row)
            on_update(result)
    result["complete"] = True


def profile_shared_prompt(prompt_lens=None, *, response=None, pairs=None, shape=None, attention="sdpa", device=None,
                          isolate=None, measure=None, log=print, on_update=None) -> dict:
    """Peak memory of one training step on unshared rows and on the shared-prompt layout at each prompt length P
    (ascending), B pairs of a P-token prompt and two R-token responses; a layout stops at its first out of memory.

    The step and the model are `bench.shared_prompt`'s (a Llama-3.2-1B-shaped config on CUDA, a tiny one on the
    CPU; `shape` overrides). `measure(layout, prompt)`, `isolate`, `log` and `on_update` as in `profile_memory`.
    The result has `profile_memory`'s form with the layouts as providers, `prompt` in place of `seq_len` and
    `positions` (backbone token positions) in each row.
    """
    from dpo_kernels.bench import shared_prompt

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    defaults = SHARED_GPU_DEFAULTS if cuda else SHARED_CPU_DEFAULTS
    prompt_lens = sorted(prompt_lens or defaults["prompt_lens"])
    response = defaults["response"] if response is None else response
    pairs = defaults["pairs"] if pairs is None else pairs
    if min(prompt_lens) < 1 or response < 1 or pairs < 1:
        raise ValueError(f"prompt lengths, the response length and pairs must be >= 1, got {prompt_lens}, "
                         f"{response}, {pairs}")
    shape = shape or (shared_prompt.LLAMA_1B_SHAPE if cuda else shared_prompt.CPU_SHAPE)
    isolate = not cuda if isolate is None else isolate
    if measure is None:
        fn = measure_shared_prompt_in_subprocess if isolate else measure_shared_prompt_in_process
        kwargs = dict(response=response, pairs=pairs, shape=shape, attention=attention, device=device)

        def measure(layout, prompt):
            return fn(layout, prompt, **kwargs)

    precision = "bf16 autocast" if cuda else "fp32"
    result = {
        "stamp": report.stamp(device),
        "what": "peak extra memory of one training step (HF Llama from a config: backbone + fused head + backward, "
                "reference log-probs precomputed), unshared rows vs the shared-prompt layout",
        "title": f"Peak extra memory (GiB) of one training step, unshared rows vs shared prompt: {pairs} pair(s), "
                 f"prompt P, responses R={response}; Llama H={shape.hidden} L={shape.layers} V={shape.vocab}, "
                 f"{attention}, {precision}",
        "plot_title": f"Peak memory of one training step, unshared vs shared prompt\n{pairs} pair(s), "
                      f"R={response}, Llama H={shape.hidden} L={shape.layers} V={shape.vocab}, {attention}",
        "row_name": "layout", "x_name": "P", "x_label": "prompt length P (tokens)",
        "method": "cuda max_memory_allocated minus allocated before the step" if cuda else
                  ("peak RSS minus RSS before the step, one fresh subprocess per measurement (glibc mmap threshold "
                   "64 KiB)" if isolate else "peak RSS minus RSS before the step, in this process"),
        "pairs": pairs, "response": response, "model": shape.__dict__, "attention": attention,
        "dtype": "float32", "autocast": "bfloat16" if cuda else None, "prompt_lens": prompt_lens,
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / report.GIB if cuda else None,
        "providers": [{"name": "unshared", "description": "[2B, P + R] rows, chosen then rejected",
                       "status": "ran", "note": None},
                      {"name": "shared", "description": "[B, P + 2R]: each prompt once (dpo_kernels.shared_prompt)",
                       "status": "ran", "note": None}],
        "rows": [],
        "complete": False,
    }
    _sweep(result, list(LAYOUTS), measure, device, log, on_update)
    return result


def _x_key(result) -> str:
    """What a row's length is: the sequence length T, or (shared-prompt profile) the prompt length P."""
    return "prompt" if "prompt_lens" in result else "seq_len"


def _xs(result) -> list:
    return result["prompt_lens"] if "prompt_lens" in result else result["seq_lens"]


def _x_name(result) -> str:
    return result.get("x_name", "T")


def _cell(row):
    if row is None:
        return "–"
    if row["status"] == "ok":
        return report.fmt(row.get("peak_extra_gib"))
    return {"oom": "OOM", "not_run": "–"}.get(row["status"], row["status"].upper())


def _title(result: dict) -> str:
    if "title" in result:
        return result["title"]
    return (f"Peak extra memory (GiB) of one DPO step, {result['pairs']} pair(s) x T, H={result['hidden']} "
            f"V={result['vocab']} {result['dtype']}")


def markdown_lines(result: dict) -> list:
    key, name_x = _x_key(result), _x_name(result)
    xs = _xs(result)
    by_key = {(r["provider"], r[key]): r for r in result["rows"]}
    ran = [p["name"] for p in result["providers"] if p["status"] == "ran"]
    lines = [
        "## " + _title(result) + ("" if result.get("complete", True) else " — PARTIAL (the run did not finish)"),
        "",
        f"Device and versions: {report.stamp_line(result['stamp'])}",
        f"Method: {result['method']}. OOM = out of memory (larger {name_x} not run).",
        "",
        f"| {result.get('row_name', 'provider')} | " + " | ".join(f"{name_x}={x}" for x in xs) + " |",
        "|---|" + "---|" * len(xs),
    ]
    for name in ran:
        lines.append(f"| {name} | " + " | ".join(_cell(by_key.get((name, x))) for x in xs) + " |")
    if key == "prompt":
        lines += _layout_lines(by_key, xs)
    skipped = [f"- {p['name']}: skipped, {p['note']}" for p in result["providers"] if p["status"] == "skipped"]
    notes = [f"- {r['provider']} {name_x}={r[key]}: {r['status']}: {r['note']}" for r in result["rows"]
             if r.get("note") and r["status"] != "not_run"]
    if skipped or notes:
        lines += ["", "Notes:", ""] + skipped + notes
    return lines + [""]


def _layout_lines(by_key, prompts) -> list:
    """The shared-prompt profile's extra rows: unshared / shared peak where both ran, and backbone positions."""
    def ratio(p):
        a, b = by_key.get(("unshared", p)), by_key.get(("shared", p))
        if not (a and b and a["status"] == b["status"] == "ok" and a.get("peak_extra_bytes")
                and b.get("peak_extra_bytes")):
            return "–"
        return f"{a['peak_extra_bytes'] / b['peak_extra_bytes']:.2f}"

    def positions(p):
        counts = [(by_key.get((layout, p)) or {}).get("positions") for layout in LAYOUTS]
        return " / ".join("–" if c is None else str(c) for c in counts)

    return ["| unshared / shared | " + " | ".join(ratio(p) for p in prompts) + " |",
            "| backbone positions, unshared / shared | " + " | ".join(positions(p) for p in prompts) + " |"]


def plot(result: dict, path: str) -> str:
    """Peak extra GiB against T (or P), log-log; a provider's out-of-memory length is marked with a red x."""
    fig, ax = figure(result)
    if "plot_title" in result:
        title = result["plot_title"]
    else:
        title = f"Peak memory of one DPO step, {result['pairs']} pair(s), H={result['hidden']} V={result['vocab']}"
    return report.save_figure(fig, ax, path, title, result["stamp"])


def figure(result: dict):
    """The `(figure, axes)` `plot` saves."""
    fig, ax = report.new_figure()
    # An OOM is drawn at the device's capacity when known, else just above the highest measurement.
    top = result.get("device_memory_gib") or 1.5 * max([r.get("peak_extra_gib") or 0 for r in result["rows"]] + [1e-6])
    key = _x_key(result)
    for p in result["providers"]:
        if p["status"] != "ran":
            continue
        rows = [r for r in result["rows"] if r["provider"] == p["name"]]
        ok = [r for r in rows if r["status"] == "ok" and r.get("peak_extra_gib")]
        line = ax.plot([r[key] for r in ok], [r["peak_extra_gib"] for r in ok], marker="o", label=p["name"])
        for r in rows:
            if r["status"] == "oom":
                ax.plot([r[key]], [top], marker="x", color=line[0].get_color(), markersize=10,
                        markeredgewidth=2)
                ax.annotate("OOM", (r[key], top), fontsize=7, textcoords="offset points", xytext=(4, 4))
    if result.get("device_memory_gib"):
        ax.axhline(result["device_memory_gib"], color="gray", linestyle=":", label="device memory")
    ax.set_xscale("log", base=2)
    ax.set_xticks(_xs(result), [str(t) for t in _xs(result)], fontsize=8)
    ax.minorticks_off()
    if any((r.get("peak_extra_gib") or 0) > 0 for r in result["rows"]):
        report.plain_log_axis(ax, "y")  # tiny CPU runs can measure 0 (no new pages): keep a linear axis for them
    ax.set_xlabel(result.get("x_label", "sequence length T"))
    ax.set_ylabel("peak extra memory (GiB)")
    ax.legend(fontsize=7)
    return fig, ax


def write(result: dict, output_dir: str, png: bool = True, name: str = "memory") -> dict:
    """Writes <name>.json, <name>.md and (unless `png` is False) <name>.png into `output_dir`; returns the paths."""
    return report.write_report(output_dir, name, result, markdown_lines(result), plot if png else None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="memory profiler worker (internal)")
    parser.add_argument("--worker", required=True, help="JSON spec of one measurement")
    sys.exit(_worker(parser.parse_args().worker))
