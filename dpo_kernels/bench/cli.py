"""`dpo-kernels bench` and `dpo-kernels profile-memory`.

`add_subcommands(subparsers)` registers both on the package's `dpo-kernels` command; `python -m dpo_kernels.bench.cli`
runs them on their own.
"""
import argparse
import datetime
import os
import re
import sys

import torch

from dpo_kernels.bench.providers import OPS

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _csv(value: str) -> list:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_list(value: str) -> list:
    try:
        out = [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 4:
        raise argparse.ArgumentTypeError(f"sequence lengths must be integers >= 4, got {value!r}")
    return out


def _dtype(value: str) -> torch.dtype:
    if value not in _DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _reference_dtype(value: str) -> torch.dtype:
    if value in ("fp64", "float64"):
        return torch.float64
    return _dtype(value)


def default_output_dir(device: torch.device) -> str:
    """benchmarks/results/<date>-<device>/ (under the current directory)."""
    from dpo_kernels.bench.report import device_name

    name = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join("benchmarks", "results", f"{date}-{name}")


def _device(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _check_providers(names, ops) -> None:
    known = {p.name for op in ops for p in OPS[op]}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(known)}")


def _full_step(op: str, run, tiny: dict, args, device) -> None:
    """Runs a full-training-step bench (`run(out_dir, device, iterations=, **sizes)`), at its `tiny` sizes under
    --tiny, and prints its table."""
    iterations = (args.warmup, args.iters) if args.iters else (2, 7)
    paths = run(args.output_dir or default_output_dir(device), device, iterations=iterations,
                **(tiny if args.tiny else {}))
    with open(paths["markdown"]) as f:
        print(f.read(), end="")
    print(f"[bench] {op}: {paths['json']}, {paths['markdown']}")


def run_bench(args) -> int:
    from dpo_kernels.bench import compare

    device = _device(args)
    ops = [op for op in args.ops if op not in ("shared-prompt", "group", "comm", "profile")]
    if "profile" in args.ops:
        from dpo_kernels.bench import profile

        out = args.output_dir or default_output_dir(device)
        paths = profile.run(out, device, tiny=args.tiny, dtype=args.dtype, iters=args.iters)
        with open(paths["markdown"]) as f:
            print(f.read(), end="")
        print(f"[bench] profile: {paths['json']}, {paths['markdown']}")
    if "comm" in args.ops:
        from dpo_kernels.bench import comm

        out = args.output_dir or default_output_dir(device)
        paths = comm.run(out, device, sizes=comm.TINY_SIZES if args.tiny else comm.SIZES, dtype=args.dtype)
        with open(paths["markdown"]) as f:
            print(f.read(), end="")
        print(f"[bench] comm: {paths['json']}, {paths['markdown']}")
    if "shared-prompt" in args.ops:
        from dpo_kernels.bench import shared_prompt

        _full_step("shared-prompt", shared_prompt.run, {"pairs": 1, "response": 8, "shape": shared_prompt.CPU_SHAPE},
                   args, device)
    if "group" in args.ops:
        from dpo_kernels.bench import groups, shared_prompt

        _full_step("group", groups.run, {"groups": 1, "response": 4, "shape": shared_prompt.CPU_SHAPE}, args, device)
    if not ops:
        return 0
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"unknown op(s) {bad}; choose from {sorted(OPS)}")
    _check_providers(args.providers, ops)
    sizes = None
    if args.tiny:
        sizes = {"linear": (compare.Size(1, 32, 32, 257),), "logits": (compare.Size(1, 32, 0, 257),),
                 "loss": (compare.Size(8),)}
    out = args.output_dir or default_output_dir(device)
    iterations = (args.warmup, args.iters) if args.iters else None
    written = compare.run_sweep(ops, out, sizes=sizes, provider_names=args.providers, dtype=args.dtype,
                                device=device, compile_backend=args.compile_backend, iterations=iterations,
                                reference_dtype=args.reference_dtype)
    for op, paths in written.items():
        print(f"[bench] {op}: " + ", ".join(paths.values()))
    return 0


def run_profile_memory(args) -> int:
    from dpo_kernels.bench import memory

    device = _device(args)
    if args.share_prompt:
        return _profile_shared_prompt(args, device)
    if args.response is not None or args.attention is not None:
        raise ValueError("--response and --attention apply with --share-prompt only")
    _check_providers(args.providers, ["linear"])
    out = args.output_dir or default_output_dir(device)
    pairs = 1 if args.pairs is None else args.pairs
    result = memory.profile_memory(args.seq_lens, hidden=args.hidden, vocab=args.vocab, pairs=pairs,
                                   provider_names=args.providers, device=device, dtype=args.dtype,
                                   isolate=args.isolate, compile_backend=args.compile_backend,
                                   on_update=lambda partial: memory.write(partial, out, png=False))
    paths = memory.write(result, out)
    print("\n".join(memory.markdown_lines(result)))
    print("[memory] " + ", ".join(paths.values()))
    return 0


def _profile_shared_prompt(args, device) -> int:
    from dpo_kernels.bench import memory

    given = [flag for flag, value in (("--hidden", args.hidden), ("--vocab", args.vocab),
                                      ("--providers", args.providers), ("--dtype", args.dtype)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do not apply with --share-prompt, which measures the training step of "
                         "`dpo-kernels bench --ops shared-prompt` (its Llama config, fp32 weights, bf16 autocast on "
                         "CUDA)")
    out = args.output_dir or default_output_dir(device)
    result = memory.profile_shared_prompt(args.seq_lens, response=args.response, pairs=args.pairs,
                                          attention=args.attention or "sdpa", device=device, isolate=args.isolate,
                                          on_update=lambda partial: memory.write(partial, out, png=False,
                                                                                 name="shared_prompt_memory"))
    paths = memory.write(result, out, name="shared_prompt_memory")
    print("\n".join(memory.markdown_lines(result)))
    print("[memory] " + ", ".join(paths.values()))
    return 0


def _common(p) -> None:
    p.add_argument("--output-dir", default=None,
                   help="where the JSON, Markdown and PNG files go (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--providers", type=_csv, default=None,
                   help="comma-separated provider names (default: all; not installed ones are skipped with a note)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", type=_dtype, default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the torch_compile provider (default inductor)")


def add_subcommands(subparsers) -> None:
    """Registers `bench` and `profile-memory` on an argparse subparsers object; each sets `func`."""
    bench = subparsers.add_parser(
        "bench", help="side-by-side comparison sweep of every op and provider",
        description="Times one DPO step (fwd+bwd) per provider and size on the same realistic inputs and writes, per "
                    "op, <op>.json, <op>.md and <op>.png: median ms, peak extra memory, fraction of the floor and the "
                    "error vs eager. Sizes: the reference sizes of docs/design.md (Benchmarks) on CUDA, small ones on "
                    "the CPU.")
    _common(bench)
    bench.add_argument("--ops", type=_csv, default=["linear", "logits", "loss"],
                       help="comma-separated ops: linear, logits, loss (default: all); shared-prompt: the full "
                            "training step with and without the shared-prompt layout at prompt:response 1:1, 4:1, "
                            "16:1; group: the full training step of K = 4 and 8 ranked responses per prompt as "
                            "C(K,2) unshared pairs, shared-prompt pairs, one group row and pairs grouped by prompt, "
                            "at prompt:response 1:1 and 4:1; comm: the bytes the engine all-reduces per chunk and "
                            "per step under vocabulary and sequence parallelism, measured against the O(C) bound; "
                            "profile: the fp32 GEMM branch, SMs and L2, the logsoftmax pass alone per grid, and one "
                            "fused step per reference size under torch.profiler beside the cost and memory models "
                            "(profile.json, profile.md)")
    bench.add_argument("--reference-dtype", type=_reference_dtype, default=None,
                       help="fp64: measure every provider's error against eager on float64 copies of the inputs "
                            "(the truth; affordable at the CPU sizes); default: eager in the benchmark dtype")
    bench.add_argument("--tiny", action="store_true", help="one tiny size per op (a smoke run, seconds on a CPU)")
    bench.add_argument("--warmup", type=int, default=1, help="warm-up steps when --iters is given")
    bench.add_argument("--iters", type=int, default=None, help="timed steps (default 5, 50 for the loss)")
    bench.set_defaults(func=run_bench)

    mem = subparsers.add_parser(
        "profile-memory", help="peak memory of one DPO step against sequence length",
        description="Measures the peak extra memory of one fused-linear DPO step (fwd+bwd) per provider per "
                    "sequence length; a provider stops at its first out of memory. Writes memory.json, memory.md "
                    "and memory.png. Defaults: on CUDA T=1024..65536, H=4096, V=128256 (bf16); on the CPU "
                    "T=256..2048, H=64, V=4096 (fp32), one fresh subprocess per measurement (peak RSS). With "
                    "--share-prompt: one training step on unshared rows against the shared-prompt layout, per "
                    "prompt length.")
    _common(mem)
    mem.add_argument("--seq-lens", type=_int_list, default=None, help="comma-separated sequence lengths T")
    mem.add_argument("--hidden", type=int, default=None, help="hidden size H")
    mem.add_argument("--vocab", type=int, default=None, help="vocabulary size V")
    mem.add_argument("--pairs", type=int, default=None,
                     help="preference pairs per step (2 rows each; default 1, 4 with --share-prompt)")
    mem.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                     help="one fresh subprocess per measurement (default: on the CPU only)")
    mem.add_argument("--share-prompt", action="store_true",
                     help="compare one training step on unshared rows and on the shared-prompt layout (the step of "
                          "`bench --ops shared-prompt`: an HF Llama from a config, fused head, backward) at prompt "
                          "lengths --seq-lens (default 512..32768 on CUDA, 64,256,1024 on the CPU); writes "
                          "shared_prompt_memory.json/.md/.png")
    mem.add_argument("--response", type=int, default=None,
                     help="with --share-prompt: tokens per response R (default 256 on CUDA, 32 on the CPU)")
    mem.add_argument("--attention", choices=("sdpa", "eager", "flex_attention"), default=None,
                     help="with --share-prompt: the model's attention implementation (default sdpa)")
    mem.set_defaults(func=run_profile_memory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_kernels.bench.cli", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
