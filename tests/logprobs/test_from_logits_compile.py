"""The Triton kernels compile for an H100/H200 (sm_90) on any machine, GPU or not.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every interpreted test and still
fail to compile, or compile to scalar loads that would miss the bandwidth target. This compiles both kernels ahead
of time for sm_90 with the specialization a real launch at V = 128256 gets (16-divisible pointers, sizes and
strides) and checks that the logits are read and written with 16-byte vector instructions.

The compile runs in a subprocess without TRITON_INTERPRET: the interpreter patches Triton's language objects in
the test process, which breaks the real code generator there.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

V = 128256
CASES = [(kind, dtype) for kind in ("fwd", "bwd") for dtype in ("bf16", "fp32")]


def compile_for_sm90(kind: str, dtype: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dpo_kernels.logprobs import from_logits as op

    if kind == "fwd":
        kernel, block_v = op.token_logprobs_fwd_kernel, op._fwd_block_v(V)
        num_warps = op._fwd_num_warps(block_v)
        types = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "tok_ptr": "*fp32", "lse_ptr": "*fp32"}
        aligned = ["logits_ptr", "labels_ptr", "tok_ptr", "lse_ptr", "V", "stride_lr", "stride_lt"]
    else:
        kernel, block_v = op.token_logprobs_bwd_kernel, op._bwd_block_v(V)
        num_warps = op._bwd_num_warps(block_v)
        types = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32"}
        types.update({"dlogits_ptr": f"*{dtype}", "stride_dr": "i64"})
        aligned = ["logits_ptr", "dlogits_ptr", "V", "stride_lr", "stride_lt", "stride_dr", "stride_dt"]
    types["stride_lr"] = "i64"
    jit = kernel.fn
    constexprs = {"SHIFT": True, "BLOCK_V": block_v}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in jit.arg_names}
    attrs = {(jit.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(jit, signature, constexprs, attrs)
    asm = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm
    ptx = asm["ptx"]
    vector = {"vector_load": "ld.global.v4" in ptx, "vector_store": "st.global.v4" in ptx}
    return {"cubin": bool(asm.get("cubin")), **vector}


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.logprobs.test_from_logits_compile"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,dtype", CASES)
def test_kernel_compiles_for_sm90_with_vector_access(compiled, kind, dtype):
    result = compiled[f"{kind}-{dtype}"]
    assert result["cubin"], "ptxas produced no cubin"
    assert result["vector_load"], "the logits are not read with 16-byte vector loads"
    if kind == "bwd":
        assert result["vector_store"], "dlogits is not written with 16-byte vector stores"


if __name__ == "__main__":
    print(json.dumps({f"{kind}-{dtype}": compile_for_sm90(kind, dtype) for kind, dtype in CASES}))
