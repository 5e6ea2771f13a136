"""The trainer's outputs for people: `metrics.jsonl`, one line per step on the console, the curves PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def _clean(value):
    # JSON has no NaN/Infinity: a skipped (non-finite) step logs null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per record to OUTPUT_DIR/metrics.jsonl; `history` keeps this run's records.

    On resume, records past the resumed step (written by the interrupted run after its last checkpoint) are dropped
    so that the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir, *, resume_step: int | None, enabled: bool):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.history: list[dict] = []
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step:
                        kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.history.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def step_line(r: dict, total_steps: int) -> str:
    def f(key, fmt):
        v = r.get(key)
        return "nan" if v is None else format(v, fmt)

    return (f"step {r['step']}/{total_steps} | loss {f('loss', '.4f')} | acc {f('rewards/accuracies', '.2f')} | "
            f"margin {f('rewards/margins', '.4f')} | grad {f('grad_norm', '.3f')} | lr {f('lr', '.2e')} | "
            f"{f('tokens_per_sec', '.0f')} tok/s")


def plot_curves(metrics_path, png_path) -> Path | None:
    """Loss, reward accuracy and margin against step (train and eval) from metrics.jsonl, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
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
