"""The DPO loss as a torch.library op: opcheck, torch.compile, gradcheck, input validation, and the CUDA sources
compile-checked with nvcc."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.loss_op.op import LOSS_TYPES
from dpo_kernels.loss_op.spec import check_loss_settings, op_params
from tests.helpers import DEVICES, REPO_ROOT, SMOOTHED

ROOT = str(REPO_ROOT)
# The op's integer code of each loss type (its index in the table).
CODE = {name: code for code, name in enumerate(LOSS_TYPES)}


def _params(codes, **settings):
    """The op's `params` for the loss types `codes`: `settings` as `dpo_loss` takes them, the table's defaults else."""
    beta = settings.pop("beta", 0.1)
    label_smoothing = settings.pop("label_smoothing", 0.0)
    return op_params(check_loss_settings([LOSS_TYPES[c] for c in codes], beta=beta, label_smoothing=label_smoothing,
                                         loss_params=settings))


def _inputs(batch, dtype=torch.float64, device="cpu"):
    rc = -torch.rand(batch, dtype=dtype, device=device) * 100 - 5
    rr = -torch.rand(batch, dtype=dtype, device=device) * 100 - 5
    pc = rc + torch.randn(batch, dtype=dtype, device=device)
    pr = rr + torch.randn(batch, dtype=dtype, device=device)
    lc = torch.randint(1, 50, (batch,), device=device).to(dtype)
    lr = torch.randint(1, 50, (batch,), device=device).to(dtype)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "loss_types",
    [[i] for i in range(len(LOSS_TYPES))] + [[CODE["sigmoid"], CODE["sft"], CODE["aot"]],
                                             [CODE["aot_unpaired"], CODE["simpo"], CODE["dpop"]]],
    ids=lambda t: "+".join(LOSS_TYPES[i] for i in t),
)
def test_opcheck(loss_types, device):
    pc, pr, rc, rr, lc, lr = _inputs(11, torch.float32, device)
    smoothing = [SMOOTHED.get(LOSS_TYPES[i], 0.0) for i in loss_types]
    weights = [1.0 + 0.5 * k for k in range(len(loss_types))]
    params = _params(loss_types, loss_weights=weights, label_smoothing=smoothing, gamma=0.7, tau=0.2,
                     dpop_lambda=30.0)
    args = (pc.requires_grad_(), pr.requires_grad_(), rc, rr, lc, lr, loss_types, params)
    torch.library.opcheck(torch.ops.dpo_kernels.dpo_loss_forward, args)


@pytest.mark.parametrize("average", [False, True])
def test_opcheck_reference_free(average):
    pc, pr, _, _, lc, lr = _inputs(5, torch.float32)
    types = [CODE["sft"], CODE["sigmoid"]]
    torch.library.opcheck(torch.ops.dpo_kernels.dpo_loss_forward,
                          (pc.requires_grad_(), pr, None, None, lc, None, types, _params(types), average))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_backward_op(dtype, device):
    """The backward op is called from the C++ autograd node, also while AOTAutograd traces the backward."""
    grad_loss = torch.tensor(0.7, dtype=dtype, device=device)
    gc, gr = torch.randn(13, dtype=dtype, device=device), torch.randn(13, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.dpo_kernels.dpo_loss_backward, (grad_loss, gc, gr),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    got_c, got_r = torch.ops.dpo_kernels.dpo_loss_backward(grad_loss, gc, gr)
    torch.testing.assert_close(got_c.double(), 0.7 * gc.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got_r.double(), 0.7 * gr.double(), rtol=1e-6, atol=0)


def test_backward_op_checks_its_arguments():
    op = torch.ops.dpo_kernels.dpo_loss_backward
    g, v = torch.tensor(1.0), torch.ones(4)
    with pytest.raises(RuntimeError, match="one shape"):
        op(g, v, torch.ones(5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(g, v, v.double())
    with pytest.raises(RuntimeError, match="one element"):
        op(torch.ones(2), v, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_autograd_runs_in_cpp(dtype):
    """The graph node is the C++ autograd function (no Python between forward and backward); only `loss` is
    differentiable, the other outputs cannot silently take part in a backward."""
    pc, pr, rc, rr, _, _ = _inputs(7, dtype)
    pc.requires_grad_(), pr.requires_grad_()
    out = dpo_kernels.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair")
    node = out.loss.grad_fn  # bf16 inputs are cast to float32 before the op; the loss is still its output
    assert "DpoLossFunction" in node.name(), node.name()
    for name in ("chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin", "losses"):
        assert not getattr(out, name).requires_grad, name
    raw = torch.ops.dpo_kernels.dpo_loss_forward(pc.float(), pr.float(), rc.float(), rr.float(), None, None,
                                                 [CODE["bco_pair"]], _params([CODE["bco_pair"]]))
    with pytest.raises(RuntimeError, match="does not require grad"):
        raw[1].sum().backward()
    (out.loss * 2.5).backward()
    want_c, want_r = torch.autograd.grad(
        reference.dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), loss_type="bco_pair").loss * 2.5,
        (pc, pr))
    assert pc.grad.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(pc.grad.double(), want_c.double(), **tol)
    torch.testing.assert_close(pr.grad.double(), want_r.double(), **tol)


def test_cached_spec_still_validates():
    """The validated hyper-parameters are cached per call signature; the cache must never let a bad value through
    (True == 1 and hash alike) nor serve one spec's constants to another."""
    pc, pr, rc, rr, lc, lr = _inputs(6, torch.float64)
    assert dpo_kernels.dpo_loss(pc, pr, rc, rr, beta=1).loss.isfinite()
    with pytest.raises(ValueError, match="beta"):
        dpo_kernels.dpo_loss(pc, pr, rc, rr, beta=True)
    dpo_kernels.dpo_loss(pc, pr, rc, rr, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
    with pytest.raises(ValueError, match="length-normalized"):
        dpo_kernels.dpo_loss(pc, pr, rc, rr, loss_type="simpo", chosen_lengths=lc)
    import numpy as np

    for kwargs in (dict(beta=0.3), dict(beta=np.float64(0.3)), dict(beta=0.7, loss_type=("sigmoid", "hinge")),
                   dict(beta=0.7, loss_type=["sigmoid", "hinge"], loss_weights=(1.0, 3.0)),
                   dict(beta=0.7, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5])):
        got = dpo_kernels.dpo_loss(pc, pr, rc, rr, **kwargs).loss
        torch.testing.assert_close(got, reference.dpo_loss(pc, pr, rc, rr, **kwargs).loss, rtol=1e-12, atol=1e-12)


def test_unread_lengths_do_not_change_the_result():
    """Lengths reach the op only when a term reads them; integer lengths beside sigmoid must not matter."""
    pc, pr, rc, rr, lc, lr = _inputs(9, torch.float32)
    with_lengths = dpo_kernels.dpo_loss(pc, pr, rc, rr, chosen_lengths=lc.long(), rejected_lengths=lr.long())
    without = dpo_kernels.dpo_loss(pc, pr, rc, rr)
    for a, b in zip(with_lengths, without, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_type", ["sigmoid", ["ipo", "aot"]], ids=["sigmoid", "ipo+aot"])
def test_torch_compile_fullgraph(loss_type):
    pc, pr, rc, rr, lc, lr = _inputs(9, torch.float32)

    def step(pc, pr):
        out = dpo_kernels.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, chosen_lengths=lc,
                                   rejected_lengths=lr)
        return out.loss, out.reward_accuracy, out.chosen_rewards

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    got = compiled(a, b)
    got[0].backward()
    a2, b2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    want = step(a2, b2)
    want[0].backward()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert not got[1].requires_grad and not got[2].requires_grad
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type, device):
    pc, pr, rc, rr, lc, lr = _inputs(6, torch.float64, device)
    kwargs = dict(beta=0.5, loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0), chosen_lengths=lc,
                  rejected_lengths=lr)

    def loss(pc, pr):
        return dpo_kernels.dpo_loss(pc, pr, rc, rr, **kwargs).loss

    assert torch.autograd.gradcheck(loss, (pc.requires_grad_(), pr.requires_grad_()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 513, 4097, 1_000_003])  # 4097: the first multi-block size
@pytest.mark.parametrize("loss_type", ["sigmoid", "aot", "sft", "ipo"])
def test_cuda_matches_cpu(loss_type, batch):
    pc, pr, rc, rr, lc, lr = _inputs(batch, torch.float64)
    kwargs = dict(loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    cpu = dpo_kernels.loss_op.op.dpo_loss_and_grads(pc, pr, rc, rr, **kwargs)
    dev = [t.cuda() for t in (pc, pr, rc, rr, lc, lr)]
    gpu = dpo_kernels.loss_op.op.dpo_loss_and_grads(*dev[:4], chosen_lengths=dev[4], rejected_lengths=dev[5],
                                                      loss_type=loss_type)
    for c, g in zip(cpu[0] + cpu[1:], gpu[0] + gpu[1:], strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-12)
    again = dpo_kernels.loss_op.op.dpo_loss_and_grads(*dev[:4], chosen_lengths=dev[4], rejected_lengths=dev[5],
                                                        loss_type=loss_type)
    assert torch.equal(again[0].loss, gpu[0].loss), "the CUDA reduction must be deterministic"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("average", [False, True])
def test_cuda_sft_matches_cpu_from_means_and_without_tokens(average):
    pc, pr, rc, rr, lc, lr = _inputs(37, torch.float64)
    for lengths in (lc, torch.zeros_like(lc)):
        cpu = dpo_kernels.loss_op.op.dpo_loss_and_grads(pc, pr, rc, rr, loss_type=["sft", "sigmoid"],
                                                        chosen_lengths=lengths, average=average)
        gpu = dpo_kernels.loss_op.op.dpo_loss_and_grads(pc.cuda(), pr.cuda(), rc.cuda(), rr.cuda(),
                                                        loss_type=["sft", "sigmoid"], chosen_lengths=lengths.cuda(),
                                                        average=average)
        for c, g in zip(cpu[0] + cpu[1:], gpu[0] + gpu[1:], strict=True):
            assert torch.isfinite(c).all()
            torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-12)


def _good():
    pc, pr, rc, rr, lc, lr = _inputs(4, torch.float32)
    return dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                chosen_lengths=lc, rejected_lengths=lr)


def _with(**changes):
    args = _good()
    kwargs = {k: args.pop(k) for k in ("chosen_lengths", "rejected_lengths")}
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    positional = [args[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                    "ref_rejected_logps")]
    return positional, kwargs


BAD_INPUTS = {
    "mismatched shapes": (dict(policy_rejected_logps=torch.zeros(5)), "shape"),
    "2-D input": (dict(policy_chosen_logps=torch.zeros(2, 2)), "1-D"),
    "empty batch": (dict(policy_chosen_logps=torch.zeros(0), policy_rejected_logps=torch.zeros(0)), "empty"),
    "integer log-probs": (dict(policy_chosen_logps=torch.zeros(4, dtype=torch.int64)), "dtype"),
    "not a tensor": (dict(policy_rejected_logps=[0.0] * 4), "torch.Tensor"),
    "mixed devices": (dict(ref_chosen_logps=torch.zeros(4, device="meta")), "meta"),
    "one reference only": (dict(ref_rejected_logps=None), "both"),
    "boolean lengths": (dict(chosen_lengths=torch.ones(4, dtype=torch.bool)), "token counts"),
    "lengths of wrong shape": (dict(rejected_lengths=torch.ones(3)), "rejected_lengths"),
    "missing lengths (ipo)": (dict(loss_type="ipo", rejected_lengths=None), "length-normalized"),
    "missing lengths (sigmoid_norm)": (dict(loss_type="sigmoid_norm", chosen_lengths=None), "length-normalized"),
    "missing lengths (simpo)": (dict(loss_type="simpo", chosen_lengths=None), "length-normalized"),
    "missing lengths (sft)": (dict(loss_type="sft", chosen_lengths=None), "chosen_lengths"),
    "unknown loss type": (dict(loss_type="kto"), "unknown loss_type"),
    "empty loss list": (dict(loss_type=[]), "non-empty"),
    "too many loss types": (dict(loss_type=["sigmoid"] * 17), "at most"),
    "beta zero": (dict(beta=0.0), "beta"),
    "beta negative": (dict(beta=-0.1), "beta"),
    "beta NaN": (dict(beta=float("nan")), "beta"),
    "beta bool": (dict(beta=True), "beta"),
    "robust eps 0.5": (dict(loss_type="robust", label_smoothing=0.5), "0 <= label_smoothing < 0.5"),
    "robust eps negative": (dict(loss_type="robust", label_smoothing=-0.1), "0 <= label_smoothing < 0.5"),
    "exo_pair eps 0": (dict(loss_type="exo_pair", label_smoothing=0.0), "0 < label_smoothing < 1"),
    "sigmoid eps > 1": (dict(loss_type="sigmoid", label_smoothing=1.5), "0 <= label_smoothing <= 1"),
    "discopop tau 0": (dict(loss_type="discopop", tau=0.0), "tau > 0"),
    "simpo gamma negative": (dict(loss_type="simpo", gamma=-1.0), "gamma >= 0"),
    "dpop lambda negative": (dict(loss_type="dpop", dpop_lambda=-1.0), "dpop_lambda >= 0"),
    "weights length": (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
    "smoothing length": (dict(loss_type=["sigmoid", "hinge"], label_smoothing=[0.0] * 3), "label_smoothing"),
    "weight infinite": (dict(loss_weights=[float("inf")]), "loss_weights"),
    "unknown loss parameter": (dict(discopop_tau=0.1), "unknown loss parameter"),
}


@pytest.mark.parametrize("fn", [dpo_kernels.dpo_loss, reference.dpo_loss], ids=["op", "reference"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error(case, fn):
    changes, message = BAD_INPUTS[case]
    positional, kwargs = _with(**changes)
    with pytest.raises(ValueError, match=message):
        fn(*positional, **kwargs)


def test_raw_op_checks_its_arguments():
    pc, pr, rc, rr, lc, lr = _inputs(4, torch.float32)
    op = torch.ops.dpo_kernels.dpo_loss_forward
    sigmoid = [CODE["sigmoid"]]
    with pytest.raises(RuntimeError, match="dtype"):
        op(pc, pr, rc.double(), rr, None, None, sigmoid, _params(sigmoid))
    with pytest.raises(RuntimeError, match="length-normalized"):
        op(pc, pr, rc, rr, None, None, [CODE["ipo"]], _params([CODE["ipo"]]))
    with pytest.raises(RuntimeError, match="unknown loss type code"):
        op(pc, pr, rc, rr, None, None, [99], _params(sigmoid))
    with pytest.raises(RuntimeError, match="hyper-parameters per loss type"):
        op(pc, pr, rc, rr, None, None, sigmoid, _params(sigmoid)[:-1])
    with pytest.raises(RuntimeError, match="hyper-parameters per loss type"):
        op(pc, pr, rc, rr, None, None, sigmoid * 2, _params(sigmoid))
    two = list(_params(sigmoid * 2))
    two[len(two) // 2] *= 2  # the second term's beta: the rewards read one
    with pytest.raises(RuntimeError, match="beta must be the same"):
        op(pc, pr, rc, rr, None, None, sigmoid * 2, two)


def test_raw_op_reads_each_terms_hyper_parameters():
    """Two terms of one loss type with different gamma, label_smoothing and weight: each reads its own row of
    `params`, so the pair of terms gives the sum of the two single-term calls (each weighted by its row)."""
    pc, pr, rc, rr, lc, lr = _inputs(8, torch.float64)
    op = torch.ops.dpo_kernels.dpo_loss_forward
    simpo = CODE["simpo"]
    rows = [dict(gamma=0.3, label_smoothing=0.1, loss_weights=0.5), dict(gamma=1.2, label_smoothing=0.0,
                                                                        loss_weights=2.0)]
    both = op(pc, pr, rc, rr, lc, lr, [simpo, simpo], sum((_params([simpo], **row) for row in rows), ()))
    single = [op(pc, pr, rc, rr, lc, lr, [simpo], _params([simpo], **row)) for row in rows]
    assert not torch.allclose(single[0][0], single[1][0])
    for output in (0, 1, 6, 7):  # loss, losses, grad_chosen, grad_rejected
        torch.testing.assert_close(both[output], single[0][output] + single[1][output], rtol=1e-12, atol=0)


def _nvcc():
    return shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    """The device code includes only CUDA headers and csrc/dpo_loss_math.h, so nvcc alone must compile it."""
    cmd = [_nvcc(), "-arch=sm_90", "-std=c++17", "-O3", "-Werror", "all-warnings", "-I", os.path.join(ROOT, "csrc"),
           "-c", source, "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}"


@pytest.mark.slow  # parsing torch's headers takes about 8 s on 2 cores
@pytest.mark.skipif(shutil.which("g++") is None or not os.path.exists("/usr/local/cuda/include/cuda_runtime_api.h"),
                    reason="needs g++ and the CUDA headers")
def test_cuda_binding_parses(tmp_path):
    """Syntax-checks the torch-facing CUDA binding (csrc/cuda/*.cpp) with g++. The CPU torch wheel lacks one
    generated CUDA header (cuda_cmake_macros.h); an empty stand-in is enough to parse."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [str(tmp_path)] + include_paths() + ["/usr/local/cuda/include", os.path.join(ROOT, "csrc"),
                                                    sysconfig.get_paths()["include"]]
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))):
        cmd = ["g++", "-fsyntax-only", "-std=c++17", "-w"] + [f"-I{p}" for p in includes] + [source]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"g++ failed on {source}:\n{result.stderr[-4000:]}"


def test_import_without_the_extension_says_how_to_build_it():
    # A fresh interpreter in which `dpo_kernels._C` cannot be found, as on a checkout that was never built.
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'dpo_kernels._C':\n"
        "            raise ImportError('No module named dpo_kernels._C')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "try:\n"
        "    import dpo_kernels\n"
        "except ImportError as error:\n"
        "    print('IMPORT-ERROR:', error)\n"
        "else:\n"
        "    print('IMPORTED')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "make install" in result.stdout and "build_ext --inplace" in result.stdout
