"""The trainer's outputs for people: `metrics.jsonl`, one line per step on the console, the curves PNG."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from dpo_kernels.trainer.checkpoint.atomic import no_space
from dpo_kernels.trainer.errors import DiskFullError, InputFileError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def _clean(value):
    # JSON has no NaN/Infinity: a skipped (non-finite) step logs null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_records(path) -> list[dict]:
    """The records of a metrics.jsonl file. A torn last line (a crash or a full disk mid-write) is dropped with a
    warning; any other line that is not a JSON object with an integer "step" is an InputFileError naming the line."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.decode("utf-8", errors="replace").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last and not data.endswith(b"\n"):
                warnings.warn(f"{path}: line {i + 1} is torn (cut off mid-write); dropping it", stacklevel=2)
                continue
            raise InputFileError(path, f"line {i + 1}: not valid JSON ({e.msg}); delete the line or the file") \
                from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise InputFileError(path, f"line {i + 1}: not a metrics record (a JSON object with an integer step)")
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON object per record to OUTPUT_DIR/metrics.jsonl; `history` keeps this run's records.

    On resume, records past the resumed step (written by the interrupted run after its last checkpoint) are dropped
    so that the file reads as one uninterrupted run. The file is rewritten atomically (a temporary, then a rename):
    a crash at any moment leaves the old history or the new one, never a truncated file.
    """

    def __init__(self, output_dir, *, resume_step: int | None, enabled: bool):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.history: list[dict] = []
        if not enabled:
            return
        if self.path.exists() and not self.path.is_file():
            raise InputFileError(self.path, "is not a file; move it out of the output dir")
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_records(self.path) if r["step"] <= resume_step]
        # The output dir is locked for this run, so a fixed temporary name cannot collide with another writer.
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.history.append(record)
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                problem = no_space(e)
                if problem is not None:
                    raise DiskFullError(self.path, problem=problem) from None
                raise


def step_line(r: dict, total_steps: int) -> str:
    def f(key, fmt):
        v = r.get(key)
        return "nan" if v is None else format(v, fmt)

    if "rewards/ranking_accuracy" in r:
        quality = (f"rank acc {f('rewards/ranking_accuracy', '.2f')} | top1 {f('rewards/top1_accuracy', '.2f')} | "
                   f"tau {f('rewards/kendall_tau', '.3f')}")
    else:
        quality = f"acc {f('rewards/accuracies', '.2f')} | margin {f('rewards/margins', '.4f')}"
    return (f"step {r['step']}/{total_steps} | loss {f('loss', '.4f')} | {quality} | grad {f('grad_norm', '.3f')} | "
            f"lr {f('lr', '.2e')} | {f('tokens_per_sec', '.0f')} tok/s")


def plot_curves(metrics_path, png_path) -> Path | None:
    """Loss, reward accuracy and margin against step (train and eval) from metrics.jsonl, saved as a PNG; a group
    run's plot shows its ranking accuracy and Kendall's tau instead of the accuracy and margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    if any("rewards/ranking_accuracy" in r for r in records):
        panels[1:] = [("rewards/ranking_accuracy", "ranking accuracy"), ("rewards/kendall_tau", "Kendall's tau")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for prefix, style in (("", "-"), ("eval/", "o-")):
            points = [(r["step"], r[prefix + key]) for r in records if r.get(prefix + key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label="eval" if prefix else "train", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
