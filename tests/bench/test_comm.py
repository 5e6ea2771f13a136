"""`dpo-kernels bench --ops comm`: the counted all-reduce traffic of the fused linear engine across processes, at tiny
sizes on the CPU, against the formulas of fused_linear/parallel.py and the plan's chunks."""
import json

import pytest
import torch

from dpo_kernels.bench import cli, comm
from dpo_kernels.bench.compare import Size
from dpo_kernels.fused_linear import parallel
from dpo_kernels.fused_linear.plan import even_chunks

CPU = torch.device("cpu")


@pytest.fixture
def group():
    with comm.one_process_group(CPU) as pg:
        yield pg


def test_vocab_parallel_exchanges_twelve_bytes_per_chunk_token_whatever_v_and_h(group):
    # Same tokens (one resident chunk of the 2 x 24 scored positions), different V and H: the same exchange.
    small = comm.measure_vocab_parallel(Size(1, 32, 32, 257), 8, torch.float32, CPU, group)
    large = comm.measure_vocab_parallel(Size(1, 32, 64, 2049), 24, torch.float32, CPU, group)
    for row in (small, large):
        assert row["chunk_tokens"] == row["scored_tokens"] == 2 * 24
        assert row["chunk_passes"] == 1
        assert row["bytes_per_pass"] == row["bound_bytes_per_chunk"] == parallel.allreduce_bytes_per_chunk(48) == 576
        assert row["hidden_grad_bytes_measured"] == row["hidden_grad_bytes_formula_at_run"]
        assert row["all_gather_bytes"] == 8  # one int64 shard size per rank, one rank
    assert small["hidden_grad_bytes_measured"] == 2 * 32 * 8 * 4
    assert small["hidden_grad_bytes"] == 2 * 32 * 32 * 4  # at the size's H, from the formula
    assert small["logits_chunk_bytes"] == 48 * 257 * 4


def test_chunk_passes_follow_the_plan(group):
    size = Size(1, 32, 16, 257)
    shard = -(-size.vocab // comm.DEGREE)
    budget = 10 * shard * 4  # C = 10 tokens of the rank's shard: 48 scored tokens in 5 chunks
    resident = comm.measure_vocab_parallel(size, 8, torch.float32, CPU, group, memory_budget=budget)
    chunks = even_chunks(48, 10)
    assert resident["chunk_tokens"] == 10 and resident["chunk_passes"] == len(chunks) == 5
    assert resident["chunk_bytes_per_step"] == sum(parallel.allreduce_bytes_per_chunk(e - s) for s, e in chunks)
    # "low" recomputes every chunk in the backward: each chunk exchanges twice.
    low = comm.measure_vocab_parallel(size, 8, torch.float32, CPU, group, memory_budget="low")
    assert low["chunk_passes"] == 2 and low["chunk_bytes_per_step"] == 2 * parallel.allreduce_bytes_per_chunk(48)


def test_sequence_parallel_exchanges_o_of_b_per_step(group):
    for pairs, seq_len in ((1, 32), (3, 64)):
        row = comm.measure_sequence_parallel(Size(pairs, seq_len, 16, 257), 8, torch.float32, CPU, group)
        assert row["all_reduces"] == 2
        assert row["bytes_per_step"] == row["bound_bytes_per_step"] == 2 * pairs * 12


def test_one_process_group_refuses_a_running_group(group):
    with pytest.raises(ValueError, match="runs in one process"), comm.one_process_group(CPU):
        pass


def test_bench_ops_comm_writes_json_and_markdown(tmp_path, capsys):
    assert cli.main(["bench", "--ops", "comm", "--tiny", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "comm.json").read_text())
    assert result["op"] == "comm" and result["degree"] == comm.DEGREE and result["dtype"] == "bfloat16"
    modes = [(r["mode"], r.get("memory_budget")) for r in result["rows"]]
    assert modes == [("vocab", None), ("vocab", "low"), ("sequence", None)]
    markdown = (tmp_path / "comm.md").read_text()
    assert result["stamp"]["date"] in markdown and "| 1x32 H=32 V=257 | default | 48 | 1 | 576 B | 576 B | 1.00 |" \
        in markdown
    assert "[bench] comm:" in capsys.readouterr().out
