"""The group full-step benchmark: every layout at each K and P:R, the backbone tokens each runs, the ideal ratio,
and the same loss from every layout of the same objective (fp32, within the accuracy rule against float64 unshared
rows)."""
import json
from math import comb

import pytest
import torch

from dpo_kernels import reference
from dpo_kernels.bench import cli, groups, shared_prompt
from tests.helpers import assert_close_to_truth, unshared_rows_truth_and_baseline

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = groups.ModelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=100)
CPU = torch.device("cpu")


def test_rows_hold_every_layout_and_the_token_counts(tmp_path):
    G = 2
    paths = groups.run(str(tmp_path), CPU, shape=TINY, groups=G, response=4, iterations=(0, 1))
    rows = json.loads(open(paths["json"]).read())["rows"]
    assert [(r["K"], r["ratio"]) for r in rows[:: len(groups.LAYOUTS)]] == [(4, "1:1"), (4, "4:1"), (8, "1:1"),
                                                                           (8, "4:1")]
    for start in range(0, len(rows), len(groups.LAYOUTS)):
        by_layout = {r["layout"]: r for r in rows[start: start + len(groups.LAYOUTS)]}
        assert list(by_layout) == list(groups.LAYOUTS)
        a = by_layout["a pairs"]
        K, P, R, M = a["K"], a["prompt"], a["response"], comb(a["K"], 2)
        expected = {"a pairs": 2 * G * M * (P + R), "b shared pairs": G * M * (P + 2 * R),
                    "c group all_pairs": G * (P + K * R), "c group plackett_luce": G * (P + K * R),
                    "d group by prompt": G * (P + K * R)}
        for layout, r in by_layout.items():
            assert r["positions"] == r["tokens"] == expected[layout], layout  # equal lengths: no padding
            assert r["ideal_ratio"] == a["positions"] / r["positions"]
            assert r["saved_bytes"] > 0 and r["peak_bytes"] is None  # CPU: no allocator peak
        for layout in ("b shared pairs", "c group all_pairs", "d group by prompt"):
            assert by_layout[layout]["positions"] < a["positions"]
            assert by_layout[layout]["saved_bytes"] < a["saved_bytes"]
    text = open(paths["markdown"]).read()
    assert "| sdpa | 8 | 4:1 | 16 | 4 | 2 | d group by prompt |" in text


def test_the_cli_writes_one_table_row_per_setting_and_layout(tmp_path, capsys):
    argv = ["bench", "--ops", "group", "--tiny", "--device", "cpu", "--output-dir", str(tmp_path), "--warmup", "0",
            "--iters", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| sdpa |")]
    assert len(rows) == len(groups.GROUP_SIZES) * len(groups.RATIOS) * len(groups.LAYOUTS)
    assert (tmp_path / "groups.json").exists() and printed.count(str(tmp_path / "groups.md")) == 1


# Two prompts given interleaved, responses of different lengths (padding in the unshared rows), a response shared by
# two pairs, an empty response.
PAIRS = [
    ([1, 5, 6], [7, 8], [9]),
    ([2, 3], [10, 11, 12, 13], [14, 15]),
    ([1, 5, 6], [7, 8], [16, 17, 18]),
    ([1, 5, 6], [16, 17, 18], []),
    ([2, 3], [14, 15], [19]),
]


def test_group_by_prompt_holds_each_distinct_response_once():
    grouped = groups.group_by_prompt(PAIRS)
    assert grouped.groups == [([1, 5, 6], [[7, 8], [9], [16, 17, 18], []]),
                              ([2, 3], [[10, 11, 12, 13], [14, 15], [19]])]
    responses = [r for _, rs in grouped.groups for r in rs]
    for (_, chosen, rejected), c, r in zip(PAIRS, grouped.chosen.tolist(), grouped.rejected.tolist(), strict=True):
        assert (responses[c], responses[r]) == (chosen, rejected)


def test_every_layout_gives_the_loss_of_the_float64_unshared_rows():
    model = shared_prompt.build_model(TINY, "sdpa", torch.float32, CPU, max_positions=64)
    data = [([1, 5, 6], [[7, 8], [9, 10, 11, 12], [13], []]), ([2, 3, 4, 20, 21], [[14, 15, 16], [17], [18, 19]])]
    grouped = groups.group_by_prompt(groups.all_pairs(data))
    assert grouped.groups == data
    rows = [(p + r, len(p)) for p, responses in data for r in responses]
    truth, baseline = unshared_rows_truth_and_baseline(model, rows)
    ref = groups.reference_logps(data)
    c, r = grouped.chosen, grouped.rejected
    pair_loss = {dt: reference.dpo_loss(logps[c], logps[r], ref[c].to(dt), ref[r].to(dt)).loss
                 for dt, logps in ((torch.float64, truth), (torch.float32, baseline))}
    pl_loss = {dt: reference.group_dpo_loss(logps, ref.to(dt), [4, 3]).loss
               for dt, logps in ((torch.float64, truth), (torch.float32, baseline))}
    # K differs between the two groups, so all_pairs (a mean of per-group means) weighs pairs unlike the pair
    # layouts; its truth is the group op's reference.
    all_pairs_loss = {dt: reference.group_dpo_loss(logps, ref.to(dt), [4, 3], loss_type="all_pairs").loss
                      for dt, logps in ((torch.float64, truth), (torch.float32, baseline))}
    expected = {"a pairs": pair_loss, "b shared pairs": pair_loss, "d group by prompt": pair_loss,
                "c group all_pairs": all_pairs_loss, "c group plackett_luce": pl_loss}
    for layout in groups.LAYOUTS:
        with torch.no_grad():
            loss = groups.step_of(model, layout, data, CPU, None).loss()
        want = expected[layout]
        assert_close_to_truth(loss, want[torch.float64], want[torch.float32], torch.float32, layout)
