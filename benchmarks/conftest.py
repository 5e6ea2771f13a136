"""pytest-benchmark setup shared by the op suites (`make bench`).

The suites time exactly what `dpo-kernels bench` compares and what the tests check: the providers and inputs of
`dpo_kernels.bench`. Sizes are the reference sizes (docs/design.md, "Benchmarks") on CUDA (bf16) and small ones on the
CPU (fp32), where the package's ops take their PyTorch fallback. A provider that is not installed, not applicable or
cannot run on this device is skipped with its reason; one that runs out of memory is skipped as such."""
import pytest
import torch

from dpo_kernels.bench import compare
from dpo_kernels.bench.providers import providers_for, unavailable_reason
from dpo_kernels.bench.report import GIB, stamp, stamp_line
from dpo_kernels.bench.timing import peak_extra_memory, release_memory, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZES = compare.GPU_SIZES if DEVICE.type == "cuda" else compare.CPU_SIZES
ROUNDS = {"linear": 5, "logits": 5, "loss": 50}
_STAMP = stamp(DEVICE)


def pytest_generate_tests(metafunc):
    """A suite declares `OP = "<op>"`; its test gets every (provider, size) of that op, size-major so that one
    size's inputs are built once."""
    op = getattr(metafunc.module, "OP", None)
    if op and {"provider", "size"} <= set(metafunc.fixturenames):
        cases = [(p.name, size) for size in SIZES[op] for p in providers_for(op)]
        ids = [f"{size.label.replace(' ', '_')}-{name}" for name, size in cases]
        metafunc.parametrize("provider, size", cases, ids=ids)


def pytest_report_header(config):
    return f"dpo_kernels benchmarks on {stamp_line(_STAMP)}; dtype {DTYPE}"


class _LastInputs:
    """Keeps only the latest size's inputs alive: the section 7 sizes take GiBs each."""

    key = None
    value = None

    def get(self, op, size):
        if self.key != (op, size):
            self.key = self.value = None
            release_memory(DEVICE)
            self.value, self.key = compare.make_inputs(op, size, DTYPE, DEVICE), (op, size)
        return self.value


_INPUTS = _LastInputs()


@pytest.fixture
def dpo_step(benchmark):
    """`dpo_step(op, provider_name, size)` benchmarks one fwd+bwd step and records its peak extra memory."""

    def run(op, provider_name, size):
        provider = providers_for(op, [provider_name])[0]
        reason = unavailable_reason(provider, DEVICE)
        if reason:
            pytest.skip(f"{provider_name}: {reason}")
        inputs = _INPUTS.get(op, size)
        tensors = compare.leaves(op, inputs)

        def clear():
            for t in tensors:
                t.grad = None

        try:
            forward = provider.build(inputs)

            def step():
                clear()
                forward().backward()
                synchronize(DEVICE)

            step()  # warm-up: compilation, autotuning
            clear()
            peak = peak_extra_memory(step, DEVICE)
            benchmark.extra_info.update(
                op=op, provider=provider_name, size=size.label, dtype=str(DTYPE), device=_STAMP["device"],
                versions=_STAMP["versions"], date=_STAMP["date"],
                peak_extra_gib=None if peak is None else peak / GIB,
            )
            benchmark.pedantic(step, rounds=ROUNDS[op], iterations=1, warmup_rounds=1)
        except compare.OOM_ERRORS as exc:
            pytest.skip(f"{provider_name} at {size.label}: out of memory ({str(exc).splitlines()[0][:120]})")
        finally:
            clear()
            release_memory(DEVICE)

    return run
