"""Test setup: without a GPU, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before anything imports Triton, so this runs before the package is imported.
"""
import os
import sys

import pytest

assert "triton" not in sys.modules, "conftest must run before Triton is imported"

import torch  # noqa: E402  (torch does not import Triton eagerly)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Test modules whose assertions are bit-exact relations between kernels or runs, or byte counts: the rounding and
# the scratch of PyTorch's CPU kernels depend on the instruction set they pick at run time, so CI runs these once
# more under ATEN_CPU_CAPABILITY=avx2 (`-m machine_sensitive`) to notice a test that holds on one machine only.
MACHINE_SENSITIVE = (
    "tests/trainer/test_fixed_seed_run.py", "tests/trainer/test_crash_safety.py", "tests/trainer/test_checkpoint.py",
    "tests/trainer/test_loop.py", "tests/trainer/test_ref_logps.py", "tests/fused_linear/test_memory_model.py",
    "tests/fused_linear/test_functional.py", "tests/fused_linear/test_plan.py",
    "tests/fused_linear/test_logsoftmax_pass.py", "tests/fused_linear/test_token_stats.py",
    "tests/logprobs/test_from_logits.py", "tests/loss_op/test_loss_values.py", "tests/test_losses.py",
    "tests/shared_prompt/test_shared_fused.py", "tests/shared_prompt/test_shared_models.py",
    "tests/fused_linear/test_group_engine.py", "tests/loss_op/test_group_learning.py",
    "tests/fused_linear/test_memory_model_group.py",
)


def pytest_collection_modifyitems(config, items):
    root = config.rootpath
    for item in items:
        if item.path.relative_to(root).as_posix() in MACHINE_SENSITIVE:
            item.add_marker(pytest.mark.machine_sensitive)


@pytest.fixture
def force_backend(monkeypatch):
    """Returns a function that forces DPO_KERNELS_BACKEND for the rest of the test."""

    def force(name: str):
        monkeypatch.setenv("DPO_KERNELS_BACKEND", name)

    return force


@pytest.fixture
def single_thread():
    """One intra-op thread: tests on tiny tensors, where OpenMP threads on a 2-core runner mostly spin.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tests.tiny_models.tiny_setup` with 8 pairs, once per module: the paths of a tiny saved model and its data."""
    from tests.tiny_models import tiny_setup  # on use: it loads transformers and the trainer

    return tiny_setup(tmp_path_factory.mktemp("tiny"), rows=8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_rounds_to_nearest_bf16():
    """Triton's CPU interpreter (3.9) truncates fp32 -> bf16 where the GPU rounds to nearest even; that would put
    the interpreted kernels up to 1 ulp off and fail the accuracy rule for a reason the GPU does not have. Make the
    interpreter round like the GPU for the whole session."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        yield
        return

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode is None:
            as_bf16 = torch.from_numpy(data.view("float32").copy()).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view("uint16").reshape(data.shape)
        return original(data, src, dst, rounding_mode)

    interpreter._convert_float = convert
    yield
    interpreter._convert_float = original


@pytest.fixture(autouse=True, scope="session")
def _interpreter_takes_indices_under_numpy_2_4():
    """Triton 3.6's CPU interpreter makes an index of a scalar (a loop bound such as `range(0, V, BLOCK_V)`) with
    `int()` of its one-element array, which numpy >= 2.4 refuses (only 0-d arrays convert): every interpreted kernel
    with such a loop fails. Triton 3.7 squeezes the array first; do the same for older Triton under newer numpy."""
    try:
        import numpy as np
        import triton
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    triton_version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if original is None or triton_version >= (3, 7) or np.lib.NumpyVersion(np.__version__) < "2.4.0":
        yield
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    yield
    interpreter._patch_lang_tensor = original
