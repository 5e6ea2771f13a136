"""The comparison sweep, the memory profiler and their command line, run at tiny sizes on the CPU."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dpo_kernels.bench import cli, compare, memory

TINY = {"linear": (compare.Size(1, 16, 16, 129),), "logits": (compare.Size(1, 16, 0, 129),),
        "loss": (compare.Size(4),)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _table_rows(markdown: str, first_cell: str) -> list:
    return [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    providers = ["dpo_kernels", "eager", "cce", "liger"]  # torch_compile: see test_bench_providers
    written = compare.run_sweep(["linear", "logits", "loss"], str(out), sizes=TINY, provider_names=providers,
                                device=CPU, compile_backend="aot_eager", iterations=(0, 2), log=lambda *_: None)
    return out, written


def test_sweep_writes_json_markdown_and_png_per_op(sweep):
    out, written = sweep
    assert set(written) == {"linear", "logits", "loss"}
    for op, paths in written.items():
        assert paths == {"json": str(out / f"{op}.json"), "markdown": str(out / f"{op}.md"),
                         "png": str(out / f"{op}.png")}
        result = json.loads((out / f"{op}.json").read_text())
        assert {"op", "title", "stamp", "dtype", "floor", "providers", "sizes", "rows"} <= set(result)
        assert {"device", "date", "versions"} <= set(result["stamp"])
        assert result["stamp"]["versions"]["torch"] and result["stamp"]["versions"]["dpo_kernels"]
        ran = [p["name"] for p in result["providers"] if p["status"] == "ran"]
        assert {"dpo_kernels", "eager"} <= set(ran)
        for row in result["rows"]:
            assert row["status"] == "ok", row
            assert row["median_ms"] > 0 and len(row["times_ms"]) == 2
            assert set(row["error_vs_eager"]) == {"loss", *compare.GRAD_NAMES[op]}
            assert row["error_vs_eager"]["loss"] < 1e-4, row
        markdown = (out / f"{op}.md").read_text()
        assert result["stamp"]["date"] in markdown and result["stamp"]["device"] in markdown
        for name in ran:
            assert len(_table_rows(markdown, name)) == 2, (name, markdown)  # timing row + error row
        _assert_png(out / f"{op}.png")


def test_sweep_reports_floors_and_their_fraction(sweep):
    out, _ = sweep
    for op in ("linear", "logits"):
        result = json.loads((out / f"{op}.json").read_text())
        floor = result["sizes"][0]["floor_ms"]
        assert floor > 0
        row = next(r for r in result["rows"] if r["provider"] == "eager")
        assert row["fraction_of_floor"] == pytest.approx(row["median_ms"] / floor)
        assert len(_table_rows((out / f"{op}.md").read_text(), "floor (ms)")) == 1
    assert json.loads((out / "loss.json").read_text())["sizes"][0]["floor_ms"] is None


def test_skipped_providers_are_noted_not_run(sweep):
    out, _ = sweep
    for op in ("linear", "logits", "loss"):
        result = json.loads((out / f"{op}.json").read_text())
        status = {p["name"]: p for p in result["providers"]}
        # CCE and Liger need CUDA (and are not installed here); on logits / the loss alone CCE is not applicable.
        for name in ("cce", "liger"):
            assert status[name]["status"] == "skipped" and status[name]["note"], status[name]
            assert f"- {name}: skipped, {status[name]['note']}" in (out / f"{op}.md").read_text()
        assert not any(r["provider"] in ("cce", "liger") for r in result["rows"])
    logits_providers = {p["name"]: p for p in json.loads((out / "logits.json").read_text())["providers"]}
    assert "not applicable" in logits_providers["cce"]["note"]


def test_a_failing_provider_is_reported_and_the_sweep_goes_on(monkeypatch, tmp_path):
    from dpo_kernels.bench.providers import linear

    def broken(inputs, **_):
        def forward():
            raise RuntimeError("kernel exploded")

        return forward

    def oom(inputs, **_):
        def forward():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 94 GiB")

        return forward

    # No requirements: the injected failures must run whether or not TRL is installed.
    patched = tuple(p.__class__(p.name, p.description, {"eager": p.build, "trl": broken}.get(p.name, oom),
                                (), p.devices, p.not_applicable) for p in linear.PROVIDERS)
    monkeypatch.setitem(compare.providers_for.__globals__["OPS"], "linear", patched)
    snapshots = []
    result = compare.run_op("linear", TINY["linear"], provider_names=["eager", "trl", "dpo_kernels"],
                            dtype=torch.float32, device=CPU, iterations=(0, 1),
                            on_update=lambda partial, redraw: snapshots.append(compare.markdown_lines(partial)))
    # a partial table after every provider, so that a stage killed by its timeout still leaves its rows
    assert len(snapshots) == 3 and all("PARTIAL" in lines[0] for lines in snapshots)
    assert "PARTIAL" not in compare.markdown_lines(result)[0]
    status = {r["provider"]: r for r in result["rows"]}
    assert status["eager"]["status"] == "ok"
    assert status["trl"]["status"] == "error" and "kernel exploded" in status["trl"]["note"]
    assert status["dpo_kernels"]["status"] == "oom" and "94 GiB" in status["dpo_kernels"]["note"]
    markdown = "\n".join(compare.markdown_lines(result))
    assert "| dpo_kernels | OOM |" in markdown and "| trl | ERROR |" in markdown


def _fake_oom_measure(real, oom_provider, oom_from):
    calls = []

    def measure(name, seq_len):
        calls.append((name, seq_len))
        if name == oom_provider and seq_len >= oom_from:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at T={seq_len})")
        return real(name, seq_len)

    return measure, calls


def test_memory_profile_stops_a_provider_at_its_first_oom(tmp_path):
    dims = dict(pairs=1, hidden=16, vocab=257, dtype=torch.float32, device=CPU)

    def real(name, seq_len):
        return memory.measure_in_process(name, seq_len, **dims)

    measure, calls = _fake_oom_measure(real, "eager", 64)
    result = memory.profile_memory([32, 64, 128], provider_names=["eager", "dpo_kernels"], measure=measure,
                                   log=lambda *_: None, **{k: dims[k] for k in ("hidden", "vocab", "device")})
    rows = {(r["provider"], r["seq_len"]): r for r in result["rows"]}
    assert rows["eager", 32]["status"] == "ok"
    assert rows["eager", 64]["status"] == "oom" and "injected" in rows["eager", 64]["note"]
    assert rows["eager", 128]["status"] == "not_run"
    assert ("eager", 128) not in calls  # stopped: never measured past its first OOM
    assert all(rows["dpo_kernels", t]["status"] == "ok" for t in (32, 64, 128))
    paths = memory.write(result, str(tmp_path))
    markdown = open(paths["markdown"]).read()
    assert "| eager | " in markdown and "| OOM | – |" in markdown
    assert len(_table_rows(markdown, "dpo_kernels")) == 1
    saved = json.load(open(paths["json"]))
    assert {"stamp", "method", "seq_lens", "providers", "rows", "hidden", "vocab", "pairs"} <= set(saved)
    _assert_png(paths["png"])


def test_memory_plot_labels_its_log_axis_with_plain_numbers(tmp_path, monkeypatch):
    gib = {"eager": (0.6, 1.3, 4.5), "dpo_kernels": (0.3, 0.35, 0.4)}
    result = {"seq_lens": [16, 32, 64], "providers": [{"name": n, "status": "ran"} for n in gib],
              "rows": [{"provider": n, "seq_len": t, "status": "ok", "peak_extra_gib": v}
                       for n, values in gib.items() for t, v in zip((16, 32, 64), values, strict=True)],
              "pairs": 1, "hidden": 8, "vocab": 64, "stamp": {}}
    labels = {}

    def capture(fig, ax, path, title, stamp):
        fig.canvas.draw()
        labels["major"] = [t.get_text() for t in ax.get_yticklabels()]
        labels["minor"] = [t.get_text() for t in ax.get_yticklabels(minor=True)]
        return path

    monkeypatch.setattr(memory.report, "save_figure", capture)
    memory.plot(result, str(tmp_path / "memory.png"))
    assert {"0.25", "0.5", "1", "2", "4"} <= set(labels["major"]), labels
    assert all(re.fullmatch(r"\d+(\.\d+)?", text) for text in labels["major"]), labels
    assert not any(labels["minor"]), labels


def test_memory_profile_in_fresh_subprocesses_sees_the_eager_logits():
    # eager materializes [2T, V] fp32 logits and their log-softmax; the fused path holds only chunks of them.
    seq_len, vocab = 1024, 8192
    logits_bytes = 2 * seq_len * vocab * 4
    result = memory.profile_memory([seq_len], hidden=32, vocab=vocab, provider_names=["eager", "dpo_kernels"],
                                   device=CPU, isolate=True, log=lambda *_: None)
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["eager"]["status"] == "ok", rows["eager"]
    assert rows["eager"]["peak_extra_bytes"] >= logits_bytes, rows["eager"]
    assert rows["dpo_kernels"]["status"] == "ok", rows["dpo_kernels"]
    # Here all 1536 scored tokens fit one default chunk, so the fused path saves "only" the log-softmax copies.
    assert rows["dpo_kernels"]["peak_extra_bytes"] < 0.75 * rows["eager"]["peak_extra_bytes"], rows
    assert "subprocess" in result["method"]


def test_cli_bench_and_profile_memory(tmp_path, capsys):
    assert cli.main(["bench", "--tiny", "--ops", "loss", "--providers", "eager,dpo_kernels",
                     "--output-dir", str(tmp_path), "--iters", "1", "--warmup", "0"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["loss.json", "loss.md", "loss.png"]
    assert cli.main(["profile-memory", "--seq-lens", "16,32", "--hidden", "8", "--vocab", "64", "--providers",
                     "eager", "--no-isolate", "--output-dir", str(tmp_path / "mem")]) == 0
    assert sorted(os.listdir(tmp_path / "mem")) == ["memory.json", "memory.md", "memory.png"]
    assert "| eager |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--ops", "attention"], "unknown op"),
    (["bench", "--providers", "eager,nope"], "unknown provider"),
    (["profile-memory", "--providers", "trl,nope"], "unknown provider"),
    (["profile-memory", "--seq-lens", "16,x"], "comma-separated integers"),
    (["profile-memory", "--seq-lens", "2"], ">= 4"),
    (["profile-memory", "--seq-lens", "16", "--vocab", "1", "--no-isolate"], "vocab"),
    (["bench", "--dtype", "int8"], "dtype"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--output-dir", "/nonexistent/never-written"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_package_command_exposes_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "dpo_kernels", "profile-memory", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--seq-lens" in out.stdout and "--vocab" in out.stdout


def test_errors_against_a_float64_eager_are_measured_on_float64_copies():
    size = (compare.Size(1, 16, 16, 129),)
    runs = {ref: compare.run_op("linear", size, provider_names=["eager"], dtype=torch.float32, device=CPU,
                                iterations=(0, 1), reference_dtype=ref)
            for ref in (None, torch.float64)}
    same, truth = (runs[ref]["rows"][0]["error_vs_eager"] for ref in (None, torch.float64))
    assert runs[None]["reference_dtype"] == "float32" and runs[torch.float64]["reference_dtype"] == "float64"
    assert all(v == 0.0 for v in same.values()), same  # eager against itself
    assert truth["loss"] < 1e-6 and all(0.0 < truth[g] < 1e-5 for g in compare.GRAD_NAMES["linear"]), truth
    assert "same inputs, eager in float64:" in "\n".join(compare.markdown_lines(runs[torch.float64]))
    args = cli.main.__globals__["argparse"].ArgumentParser()
    cli.add_subcommands(args.add_subparsers(dest="command"))
    assert args.parse_args(["bench", "--reference-dtype", "fp64"]).reference_dtype == torch.float64
