"""Median time and peak extra memory of one step, and the floors the benchmark reports against.

CUDA: CUDA events around each step, after warm-up (Triton compiles, cuBLAS heuristics, torch.compile); peak extra
memory is `max_memory_allocated` during one step minus what was allocated before it (inputs and weights excluded,
the step's gradients included). CPU: `perf_counter`, and the peak extra resident set size: the kernel's high-water
mark (`VmHWM`) is reset through `/proc/self/clear_refs` before the step and read after it (Linux only; None
elsewhere).
"""
import gc
import statistics
import time
from dataclasses import dataclass

import torch

_CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    times_ms: tuple
    peak_extra_bytes: int | None


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets the process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int | None:
    return _proc_status_bytes("VmRSS")


def peak_rss() -> int | None:
    return _proc_status_bytes("VmHWM")


def release_memory(device: torch.device) -> None:
    """Returns what a finished (or failed) step held to the device, so that the next one starts from the same state."""
    # After an OOM, reference cycles in the failed graph can hold GiBs; on the CPU refcounting suffices and a full
    # collection costs more than the tiny steps it separates.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_memory(step, device: torch.device) -> int | None:
    """Bytes one call of `step` allocates above what was allocated before it (CUDA), or its peak extra RSS (CPU)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not reset_peak_rss():
        step()
        return None
    base = current_rss()
    step()
    peak = peak_rss()
    return None if base is None or peak is None else max(0, peak - base)


def time_step(step, device: torch.device, *, warmup: int = 2, iters: int = 5, clear=None) -> Measurement:
    """Runs `step` `warmup` times, once for memory, then `iters` timed times; `clear` drops state (grads) between."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        step()
    if clear is not None:
        clear()
    peak = peak_extra_memory(step, device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return Measurement(median_ms=statistics.median(times), times_ms=tuple(times), peak_extra_bytes=peak)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Measured device copy rate in bytes/s, counting the read and the write (what a streaming kernel moves)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 24)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)

    def copies():
        for _ in range(iters):
            dst.copy_(src)

    ms = time_step(copies, device, warmup=0, iters=3).median_ms
    return 2 * nbytes * iters / (ms * 1e-3)


def bandwidth_floor_ms(rows: int, vocab: int, dtype: torch.dtype, bytes_per_s: float) -> float:
    """The logits path's floor: read the logits once forward, read them and write their gradient once backward."""
    element = torch.empty((), dtype=dtype).element_size()
    return 3 * element * rows * vocab / bytes_per_s * 1e3


def gemm_floor_ms(valid_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device,
                  *, iters: int = 5, seed: int = 0) -> float:
    """The fused-linear floor: the three GEMMs (logits, grad_h, grad_W) over the valid tokens, chunked, each a plain
    `torch.mm` in `dtype`.

    6·N·H·V FLOPs at the speed cuBLAS gives this dtype, whatever the engine's fp32-result GEMMs do on this device: a
    floor taken through them (`fused_linear/fp32_gemm.py`) would slow down with the engine when they fall back to
    upcast operands, and the ratio to the floor would hide it. Each chunk's weight product overwrites the last: the
    floor counts the FLOPs, not the accumulation.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(valid_tokens, hidden, device=device, dtype=dtype, generator=g)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g)
    grad_w = torch.empty(vocab, hidden, device=device, dtype=dtype)
    grad_h = torch.empty_like(h)
    buf = torch.empty(min(_CHUNK_TOKENS, valid_tokens), vocab, device=device, dtype=dtype)

    def three_gemms():
        for start in range(0, valid_tokens, _CHUNK_TOKENS):
            hc = h[start : start + _CHUNK_TOKENS]
            z = buf[: hc.shape[0]]
            torch.mm(hc, w.t(), out=z)
            torch.mm(z, w, out=grad_h[start : start + hc.shape[0]])
            torch.mm(z.t(), hc, out=grad_w)

    return time_step(three_gemms, device, warmup=1, iters=iters).median_ms
