"""The logsoftmax pass compiles for an H100/H200 (sm_90) on any machine, GPU or not.

The interpreter runs the kernel's Python, not Triton's code generator, so this compiles the kernel ahead of time
for sm_90 as a launch at V = 128256 would specialize it (16-divisible pointers, sizes and row stride), in every
flag combination the engine uses (token statistics on and off), and checks that the chunk of logits is read, and its
gradient written, with 16-byte vector instructions; that every variant fits two programs an SM (its registers, as
the cubin reports them, its shared memory and warps); and that the code does the MUFU and barrier work the cost model
charges. It runs in a subprocess without TRITON_INTERPRET, which patches Triton's language in the test process.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from dpo_kernels.fused_linear.cost_model import H200, MODELED_PASS_PROGRAM, PASS_BARRIERS_PER_TILE, pass_ex2_per_tile
from dpo_kernels.fused_linear.pass_grid import ProgramResources, resident_programs
from tests.helpers import REPO_ROOT

V = 128256
CASES = [(dtype, write_grad, has_scale, stats) for dtype in ("bf16", "fp32") for write_grad, has_scale, stats in
         ((False, False, False), (True, False, False), (True, True, False), (False, False, True), (True, False, True),
          (True, True, True))]
# A vocabulary that is not a multiple of 16 (GPT-2's): the engine's rows are padded to 16 elements, so the loads
# (masked at V rounded up) stay vector loads; the stores, masked at V itself, do not.
ODD_V_CASES = [(dtype, write_grad, has_scale, stats, 50257) for dtype in ("bf16", "fp32")
               for write_grad, has_scale, stats in ((True, True, True), (True, False, True), (False, False, True),
                                                    (True, False, False))]


CASES_WITH_V = [(*case, V) for case in CASES]


def _name(dtype, write_grad, has_scale, stats, vocab=V):
    suffix = "" if vocab == V else f"-V{vocab}"
    return f"{dtype}-grad{int(write_grad)}-scale{int(has_scale)}-stats{int(stats)}{suffix}"


def compile_for_sm90(dtype: str, write_grad: bool, has_scale: bool, stats: bool, vocab: int = V) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dpo_kernels.fused_linear import logsoftmax_pass as op

    jit = op.logsoftmax_pass_kernel.fn
    block = op._block_v(vocab)
    constexprs = {"BLOCK_V": block, "WRITE_GRAD": write_grad, "HAS_SCALE": has_scale, "WITH_STATS": stats}
    types = {"z_ptr": f"*{dtype}", "stride_z": "i32", "labels_ptr": "*i64", "scale_ptr": "*fp32",
             "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "top1_ptr": "*i1", "num_rows": "i32", "V": "i32",
             "V_LOAD": "i32"}
    if not has_scale:
        constexprs["scale_ptr"] = None
    if not stats:
        constexprs["entropy_ptr"] = constexprs["top1_ptr"] = None
    signature = {name: "constexpr" if name in constexprs else types[name] for name in jit.arg_names}
    aligned = ["z_ptr", "stride_z", "labels_ptr", "logp_ptr", "V_LOAD"] + (["V"] if vocab % 16 == 0 else [])
    attrs = {(jit.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(jit, signature, constexprs, attrs)
    options = {"num_warps": 8 if block >= 4096 else 4}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    asm = kernel.asm
    ptx = asm["ptx"]
    return {"cubin": bool(asm.get("cubin")), "vector_load": "ld.global.v4" in ptx,
            "vector_store": "st.global.v4" in ptx, "regs": _registers(asm["cubin"]), "shared": kernel.metadata.shared,
            "num_warps": kernel.metadata.num_warps, "block": block, "ex2": ptx.count("ex2.approx"),
            "barriers": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx))}


def _registers(cubin: bytes) -> int:
    """Registers a thread of the cubin's kernel, as `cuobjdump` (shipped with Triton) reads them: what a GPU's
    `kernel.n_regs` reports, without a GPU."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pass.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.fused_linear.test_logsoftmax_pass_compile"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,write_grad,has_scale,stats", CASES)
def test_pass_compiles_for_sm90_with_vector_access(compiled, dtype, write_grad, has_scale, stats):
    result = compiled[_name(dtype, write_grad, has_scale, stats)]
    assert result["cubin"], "ptxas produced no cubin"
    assert result["vector_load"], "the logits are not read with 16-byte vector loads"
    if write_grad:
        assert result["vector_store"], "the gradient is not written with 16-byte vector stores"


@pytest.mark.parametrize("dtype,write_grad,has_scale,stats,vocab", CASES_WITH_V + ODD_V_CASES)
def test_every_variant_fits_two_programs_an_sm(compiled, dtype, write_grad, has_scale, stats, vocab):
    """Two programs of 8 warps an SM: at most 128 registers a thread (the statistics variants take no next-tile
    prefetch for that), so that `pass_grid` may launch two an SM and the cost model's stand-in program holds."""
    result = compiled[_name(dtype, write_grad, has_scale, stats, vocab)]
    program = ProgramResources(result["regs"], result["shared"], result["num_warps"])
    assert result["num_warps"] == MODELED_PASS_PROGRAM.num_warps and result["regs"] <= MODELED_PASS_PROGRAM.regs, (
        f"{_name(dtype, write_grad, has_scale, stats, vocab)}: {result['regs']} registers a thread")
    assert result["shared"] <= MODELED_PASS_PROGRAM.shared
    assert resident_programs(program, H200.limits) >= 2


@pytest.mark.parametrize("dtype,write_grad,has_scale,stats,vocab", CASES_WITH_V + ODD_V_CASES)
def test_the_code_does_the_work_the_cost_model_charges(compiled, dtype, write_grad, has_scale, stats, vocab):
    """MUFU ex2 per thread and tile as `cost_model.pass_ex2_per_tile` counts them, and no more barriers per tile
    than it charges (twice that with statistics, which the modeled step does not take)."""
    result = compiled[_name(dtype, write_grad, has_scale, stats, vocab)]
    assert result["ex2"] == pass_ex2_per_tile(result["block"], write_grad)
    assert result["barriers"] <= PASS_BARRIERS_PER_TILE * (2 if stats else 1)


@pytest.mark.parametrize("dtype,write_grad,has_scale,stats,vocab", ODD_V_CASES)
def test_pass_reads_an_odd_vocabulary_with_vector_loads(compiled, dtype, write_grad, has_scale, stats, vocab):
    result = compiled[_name(dtype, write_grad, has_scale, stats, vocab)]
    assert result["cubin"], "ptxas produced no cubin"
    assert result["vector_load"], f"V = {vocab}: the padded rows are not read with 16-byte vector loads"


if __name__ == "__main__":
    print(json.dumps({_name(*case): compile_for_sm90(*case) for case in CASES + ODD_V_CASES}))
