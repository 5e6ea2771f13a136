"""`torch.compile` of a fused DPO step on one device: compiled against eager, bit for bit, and what compiling costs.

    python benchmarks/compile_check.py --output-dir DIR [--device cuda] [--tiny]

One step is `FusedLinearDPOLoss` over hidden states and a head (bf16 on CUDA, fp32 on the CPU) and its backward.
It is compiled with `fullgraph=True` (inductor on CUDA, "aot_eager" on the CPU, where inductor's C++ build takes
minutes) and run at two sequence lengths. The result (`compile_check.json` / `.md`) says whether loss, metrics and
gradients equal eager's with `torch.equal`, how many graphs were compiled for the two shapes (at most 2), the first
call's time (the compile) and the median step time compiled and eager.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpo_kernels  # noqa: E402
from dpo_kernels.bench.report import stamp, write_report  # noqa: E402

# (pairs, sequence lengths, hidden size, vocabulary)
FULL = (2, (2048, 1536), 4096, 128256)
TINY = (2, (24, 17), 16, 97)
FIELDS = ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_accuracy",
          "reward_margin")


def batch(pairs, seq_len, hidden_size, vocab, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) * hidden_size ** -0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), generator=g)
    labels[:, : seq_len // 4] = -100
    return hidden, weight, labels.to(device)


def run(step, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = step(h, w, labels)
    out.loss.backward()
    return [getattr(out, f).detach() for f in FIELDS] + [h.grad, w.grad]


def timed(step, args, device, iters):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        run(step, *args)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke run on the CPU)")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    pairs, seq_lens, hidden_size, vocab = TINY if args.tiny else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "inductor" if device.type == "cuda" else "aot_eager"

    loss_fn = dpo_kernels.FusedLinearDPOLoss(beta=0.1)

    def step(hidden, weight, labels):
        return loss_fn(hidden, weight, labels)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=None)
    rows = []
    for k, seq_len in enumerate(seq_lens):
        inputs = batch(pairs, seq_len, hidden_size, vocab, dtype, device, seed=k)
        t0 = time.perf_counter()
        got = run(compiled, *inputs)
        first_ms = (time.perf_counter() - t0) * 1e3
        want = run(step, *inputs)
        names = [*FIELDS, "grad_hidden", "grad_weight"]
        differ = [n for n, a, b in zip(names, got, want, strict=True) if not torch.equal(a, b)]
        rows.append({"seq_len": seq_len, "same_bits": not differ, "differ": differ, "first_call_ms": first_ms,
                     "compiled_ms": timed(compiled, inputs, device, args.iters),
                     "eager_ms": timed(step, inputs, device, args.iters)})
    result = {"stamp": stamp(device), "device": str(device), "dtype": str(dtype), "backend": backend, "pairs": pairs,
              "hidden_size": hidden_size, "vocab": vocab, "graphs_compiled": counter.frame_count, "rows": rows,
              "ok": counter.frame_count <= 2 and all(r["same_bits"] for r in rows)}
    lines = [f"# torch.compile of a fused DPO step ({device}, {result['dtype']}, {backend})", "",
             f"{pairs} pairs, H = {hidden_size}, V = {vocab}; graphs compiled for {len(seq_lens)} lengths: "
             f"{counter.frame_count}", "",
             "| T | same bits as eager | first call ms | compiled ms | eager ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['seq_len']} | {'yes' if r['same_bits'] else 'no: ' + ', '.join(r['differ'])} | "
              f"{r['first_call_ms']:.0f} | {r['compiled_ms']:.2f} | {r['eager_ms']:.2f} |" for r in rows]
    write_report(Path(args.output_dir), "compile_check", result, lines)
    print(json.dumps({k: result[k] for k in ("graphs_compiled", "ok")}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
