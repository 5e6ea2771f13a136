"""The DPO loss alone over per-sequence log-probs `[B]`, fwd+bwd, per provider (launch-bound).

`make bench` runs the pytest-benchmark suite below. Run this file directly for the per-step overhead table (target:
fwd+bwd <= 60 us per step on an H100/H200 at B = 8 ... 65536, where the step is bound by host-side overhead): `python
benchmarks/bench_dpo_loss.py [--batch 8 1024 65536] [--device cuda]`. It times back-to-back steps (`zero grads ->
dpo_loss -> loss.backward()`), synchronizing once per batch of steps, so a step costs the larger of its host time and
its device time, as in a training loop. Rows: `dpo_kernels.dpo_loss`; the raw op called directly (the floor of the
Python wrapper); eager PyTorch (the sigmoid loss and its metrics); and the autograd engine's own floor,
`x.sum().backward()`, which no op can go below."""
import argparse
import time

import torch

OP = "loss"


def test_dpo_loss(dpo_step, provider, size):
    dpo_step(OP, provider, size)


def _steps(batch, device):
    import dpo_kernels
    from dpo_kernels.bench.providers.loss import _eager_loss
    from dpo_kernels.loss_op.spec import check_loss_settings, op_params

    g = torch.Generator().manual_seed(0)
    rc = -torch.rand(batch, generator=g) * 100 - 5
    rr = -torch.rand(batch, generator=g) * 100 - 5
    pc = rc + torch.randn(batch, generator=g)
    pr = rr + torch.randn(batch, generator=g)
    rc, rr, pc, pr = (t.to(device) for t in (rc, rr, pc, pr))
    pc.requires_grad_(), pr.requires_grad_()
    op = torch.ops.dpo_kernels.dpo_loss_forward.default
    params = op_params(check_loss_settings("sigmoid", beta=0.1))

    def zero():
        pc.grad = pr.grad = None

    def fused():
        zero()
        dpo_kernels.dpo_loss(pc, pr, rc, rr, beta=0.1).loss.backward()

    def raw_op():
        zero()
        op(pc, pr, rc, rr, None, None, (0,), params)[0].backward()

    def eager():
        zero()
        _eager_loss(pc, pr, rc, rr)[0].backward()

    def engine_floor():
        zero()
        pc.sum().backward()

    return {"dpo_kernels.dpo_loss": fused, "raw op (no wrapper)": raw_op, "eager PyTorch": eager,
            "x.sum().backward() floor": engine_floor}


def time_per_step_us(step, device, seconds=0.3, repeats=7):
    """The least, over `repeats`, of the mean time per step of back-to-back steps filling about `seconds`: the
    least is the overhead itself, the others add what else ran on the machine (on a shared 2-core CPU a stalled
    OpenMP wake-up costs milliseconds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(20):
        step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    n = max(3, int(seconds / max(time.perf_counter() - start, 1e-7) / repeats))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return min(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1024, 65536])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dpo_kernels.bench.report import stamp, stamp_line

    print(f"DPO loss fwd+bwd per step (us), float32, {stamp_line(stamp(device))}; threads {torch.get_num_threads()}")
    rows = {b: {name: time_per_step_us(step, device) for name, step in _steps(b, device).items()} for b in args.batch}
    names = list(next(iter(rows.values())))
    print("| provider | " + " | ".join(f"B={b}" for b in args.batch) + " |")
    print("|---|" + "---:|" * len(args.batch))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{rows[b][name]:.1f}" for b in args.batch) + " |")


if __name__ == "__main__":
    main()
