"""Benchmarks and profilers: the comparison sweep (`dpo-kernels bench`) and the memory profiler
(`dpo-kernels profile-memory`).

Modules, one job each:
    inputs      realistic, peaked inputs shared by every provider (Zipf-like vocabulary, a likely label token)
    providers/  one DPO step per provider and op (this package, eager, torch.compile, TRL, Liger, CCE)
    timing      median time and peak extra memory of a step; the bandwidth and GEMM floors
    compare     the comparison sweep: provider x size -> time, memory, fraction of the floor, error vs eager
    memory      the memory profiler: peak memory of one DPO step against sequence length
    comm        the bytes the fused engine all-reduces across processes
    shared_prompt  the shared-prompt full training step against unshared rows
    groups      the ranked-group full training step against its pairs (unshared, shared-prompt, grouped by prompt)
    peers       the peer packages and their pinned versions (standard library only)
    profile     the step profiler: the pass per grid, device ms per kernel class beside the cost and memory models
    report      the JSON, Markdown and PNG writer, each stamped with device, versions and date
    cli         the `bench` and `profile-memory` subcommands
"""
