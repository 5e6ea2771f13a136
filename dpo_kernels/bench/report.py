"""Writers of the benchmark outputs: JSON, a Markdown table and a PNG, each stamped with device, versions and date.
`write_report` writes the three of one result."""
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess

import numpy as np
import torch

from dpo_kernels.bench import peers
from dpo_kernels.fused_linear.fp32_gemm import fp32_gemm_branch

GIB = float(1 << 30)
_PACKAGES = ("torch", "triton", "transformers", *peers.PACKAGES, "dpo_kernels")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# Operand dtypes whose fp32-result GEMMs the stamp names the branch of (fp32 operands take the plain ops).
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def stamp(device: torch.device) -> dict:
    """Device, library versions (None where not installed), CUDA version, git commit, the UTC date and time, and
    `fp32_gemm_branch`: `{"bfloat16": name, "float16": name}`, the branch the engine's fp32-result GEMMs take on
    `device` (`fp32_gemm.fp32_gemm_branch`; on CUDA the first stamp runs the probe)."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {p: _version(p) for p in _PACKAGES},
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "fp32_gemm_branch": {str(d).replace("torch.", ""): fp32_gemm_branch(device, d) for d in _HALF_DTYPES},
    }


def stamp_line(s: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v)
    commit = f", commit {s['git_commit']}" if s.get("git_commit") else ""
    branches = s.get("fp32_gemm_branch") or {}
    gemms = f"; fp32 GEMMs {', '.join(f'{d} {b}' for d, b in branches.items())}" if branches else ""
    return f"{s['device']}; {versions}; CUDA {s['cuda']}{commit}{gemms}; {s['date']}"


def write_report(output_dir: str, name: str, result: dict, markdown_lines: list, plot=None) -> dict:
    """Writes `<name>.json` (`result`), `<name>.md` (`markdown_lines`) and, when `plot` is given, `<name>.png`
    (`plot(result, path)`) into `output_dir`, made if missing; returns the paths: {"json", "markdown"[, "png"]}."""
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, name)
    paths = {"json": write_json(f"{base}.json", result), "markdown": write_markdown(f"{base}.md", markdown_lines)}
    if plot is not None:
        paths["png"] = plot(result, f"{base}.png")
    return paths


def write_json(path: str, payload: dict) -> str:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_jsonable)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def write_markdown(path: str, lines: list) -> str:
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def new_figure(width: float = 8.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plain_log_axis(ax, which: str = "y", base: int = 2) -> None:
    """Puts `ax`'s `which` axis on a log scale with ticks at powers of `base` labelled as plain numbers (0.25, 0.5,
    1, 2, 4) and no minor labels; matplotlib's own labels read `4×10^0` on an axis spanning less than a decade."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log", base=base)
    axis.set_major_locator(LogLocator(base=base))
    axis.set_major_formatter(FuncFormatter(plain_number))
    axis.set_minor_locator(NullLocator())
    # Limits at the enclosing powers of `base`, so that at least two ticks are labelled.
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    lo, hi = base ** math.floor(math.log(lo, base)), base ** math.ceil(math.log(hi, base))
    (ax.set_ylim if which == "y" else ax.set_xlim)(lo, hi if hi > lo else lo * base)


def plain_number(value: float, _pos=None) -> str:
    """`value` in positional notation: whole numbers as integers, others to 3 significant digits."""
    if value >= 1 and float(value).is_integer():
        return str(int(value))
    return np.format_float_positional(value, precision=3, fractional=False, trim="-")


def save_figure(fig, ax, path: str, title: str, s: dict) -> str:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    fig.text(0.01, 0.01, stamp_line(s), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
