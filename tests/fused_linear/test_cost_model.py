"""The FLOP and HBM-byte model of a fused step (`cost_model.py`) against the plan the engine runs.

Llama-3 8B's head (H = 4096, V = 128256) in bf16, the first quarter of each row prompt, at the three sizes of the
benchmark; the H200's numbers (750 TFLOP/s, 4.3 TB/s). The target is at most 1.10x the 6NHV floor at each.
"""
import dataclasses

import pytest
import torch

from dpo_kernels.fused_linear.cost_model import H200, estimate_step_cost, plan_cost
from dpo_kernels.fused_linear.plan import STREAM_TWICE, plan_dpo_step

H, V, S = 4096, 128256, 2
SIZES = [(2, 2048), (2, 8192), (1, 32768)]


def pairs_of(B, T):
    return [2 * (T - T // 4)] * B


@pytest.mark.parametrize("B, T", SIZES, ids=[f"{B}x{T}" for B, T in SIZES])
def test_modeled_time_within_a_tenth_of_the_floor(B, T):
    pairs = pairs_of(B, T)
    plan = plan_dpo_step(pairs, V, S, None, "sigmoid")
    cost = plan_cost(plan, 2 * B * T, H, V, S)
    N = sum(pairs)
    assert cost.floor_flops == 6 * N * H * V
    assert cost.floor_seconds(H200) == pytest.approx(6 * N * H * V / 750e12)
    # GEMM FLOPs: 6NHV, plus the logits of the tokens a pair run twice projects again (all but its last chunk).
    again = sum(g.end - g.start - (g.chunks[-1][1] - g.chunks[-1][0]) for g in plan.groups if g.mode == STREAM_TWICE)
    assert cost.gemm_flops == 6 * N * H * V + 2 * again * H * V
    assert cost.ratio(H200) <= 1.10, (B, T, cost.ratio(H200), cost.breakdown(H200))
    assert estimate_step_cost(2 * B * T, pairs, H, V).ratio() == cost.ratio()


def test_each_step_of_the_engine_is_counted():
    # 1 x 32768: one pair streamed once through 6 chunks of 8192.
    N = 49152
    cost = estimate_step_cost(32768, [N], H, V)
    by_name = {}
    for k in cost.kernels:
        by_name.setdefault(k.name, []).append(k)
    assert len(by_name["logits GEMM"]) == len(by_name["weight-gradient GEMM"]) == 6
    # The pass reads each logit once (its second sweep hits L2) and writes the gradient once.
    assert sum(k.bytes for k in by_name["logsoftmax pass"]) == 2 * N * V * S
    # The pair's coefficient and the upstream gradient fold into the accumulator's one conversion.
    assert "accumulator scale" not in by_name and "weight-gradient scale" not in by_name
    assert [k.bytes for k in by_name["accumulator conversion"]] == [V * H * (4 + S)]
    # The first weight GEMM writes the fp32 accumulator; the others read and write it.
    assert [k.bytes - 8192 * (V + H) * S for k in by_name["weight-gradient GEMM"]] == [V * H * 4] + [V * H * 8] * 5
    # 2 x 8192: the pair run after the first owes it one scale of the accumulator.
    names = [k.name for k in estimate_step_cost(4 * 8192, pairs_of(2, 8192), H, V).kernels]
    assert names.count("accumulator scale") == 1
    # 2 x 2048: one GEMM writes the weight gradient in bf16; the upstream gradient then costs a pass over it.
    names = [k.name for k in estimate_step_cost(4 * 2048, pairs_of(2, 2048), H, V).kernels]
    assert names.count("weight-gradient scale") == 1 and "accumulator conversion" not in names


def test_the_pass_reads_twice_when_its_rows_overflow_half_of_l2():
    pairs = pairs_of(2, 2048)
    N = sum(pairs)
    plan = plan_dpo_step(pairs, V, S, None, "sigmoid")
    fits = sum(k.bytes for k in plan_cost(plan, 4 * 2048, H, V, S, H200).kernels if k.name == "logsoftmax pass")
    tiny = dataclasses.replace(H200, l2_bytes=V * S)  # half of L2 holds less than one row
    spills = sum(k.bytes for k in plan_cost(plan, 4 * 2048, H, V, S, tiny).kernels if k.name == "logsoftmax pass")
    assert fits == 2 * N * V * S and spills == 3 * N * V * S


def test_recompute_costs_a_third_more_gemm_work():
    pairs = pairs_of(2, 2048)
    cost = estimate_step_cost(4 * 2048, pairs, H, V, torch.bfloat16, "low")
    assert cost.gemm_flops == 8 * sum(pairs) * H * V
