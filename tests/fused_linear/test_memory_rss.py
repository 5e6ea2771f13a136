"""The fused path's memory stays bounded as T grows with V fixed (CPU path, peak RSS of a fresh process).

One subprocess runs the fused DPO forward+backward at a short and a long T, then eager PyTorch at the short T. For
each run it resets the process's peak RSS (VmHWM) and records how far the peak rises above the resident size just
before the run: that run's extra memory. Eager must hold the `[N, V]` logits, and the measurement must see that; the
fused path must grow by far less than the eager logits would between the two lengths.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import dpo_kernels
    from dpo_kernels import reference

    H, V, CHUNK = 32, 8000, 128
    from dpo_kernels.bench.timing import current_rss as rss, peak_rss as peak, reset_peak_rss as reset_peak

    def batch(T):
        g = torch.Generator().manual_seed(T)
        hidden = torch.randn(2, T, H, generator=g).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * 0.2).requires_grad_()
        labels = torch.randint(0, V, (2, T), generator=g)
        labels[:, : T // 4] = -100
        return hidden, weight, labels

    def fused(hidden, weight, labels):
        out = dpo_kernels.fused_linear_dpo(hidden, weight, labels, memory_budget=CHUNK * V * 4)
        out.loss.backward()

    def eager(hidden, weight, labels):
        logps = reference.sequence_logprobs(hidden @ weight.T, labels)
        reference.dpo_loss(logps[:1], logps[1:]).loss.backward()

    def measure(fn, T):
        hidden, weight, labels = batch(T)
        reset_peak()
        before = rss()
        fn(hidden, weight, labels)
        return max(0, peak() - before), int((labels[:, 1:] != -100).sum())

    fused(*batch(64))  # warm-up: libraries, allocator pools
    result = {}
    for name, fn, T in (("fused_short", fused, 512), ("fused_long", fused, 4096), ("eager_short", eager, 512)):
        grown, tokens = measure(fn, T)
        result[name] = {"grown": grown, "tokens": tokens}
    json.dump(result, sys.stdout)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets /proc/self peak RSS")
def test_peak_memory_bounded_in_sequence_length():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, DPO_KERNELS_BACKEND="torch"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    V = 8000
    eager_logits = lambda tokens: tokens * V * 4  # noqa: E731  (fp32 [N, V], a lower bound for eager)
    # The measurement sees an eager run's logits ...
    assert r["eager_short"]["grown"] > eager_logits(r["eager_short"]["tokens"]), r
    # ... and the fused path grows by far less than eager's logits would from the short to the long batch.
    extra_tokens = r["fused_long"]["tokens"] - r["fused_short"]["tokens"]
    growth = r["fused_long"]["grown"] - r["fused_short"]["grown"]
    assert growth < 0.1 * eager_logits(extra_tokens), (growth, eager_logits(extra_tokens), r)
    assert r["fused_long"]["grown"] < 0.2 * eager_logits(r["fused_long"]["tokens"]), r

