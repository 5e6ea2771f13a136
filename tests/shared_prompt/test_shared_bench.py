"""The shared-prompt full-step benchmark: both layouts timed at each ratio, the token counts and the ideal ratio."""
import json

import torch

from dpo_kernels.bench import shared_prompt

TINY = shared_prompt.ModelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=100)


def test_rows_hold_both_layouts_and_the_ideal_ratio(tmp_path):
    paths = shared_prompt.run(str(tmp_path), torch.device("cpu"), shape=TINY, pairs=2, response=4, ratios=(1, 4),
                              iterations=(0, 1))
    rows = json.loads(open(paths["json"]).read())["rows"]
    assert [r["ratio"] for r in rows] == ["1:1", "4:1"]
    for r in rows:
        P, R, B = r["prompt"], r["response"], r["pairs"]
        assert (r["unshared_tokens"], r["shared_tokens"]) == (2 * B * (P + R), B * (P + 2 * R))
        assert r["ideal_ratio"] == 2 * (P + R) / (P + 2 * R)
        assert r["unshared_ms"] > 0 and r["shared_ms"] > 0
        assert 0 < r["shared_saved_bytes"] < r["unshared_saved_bytes"]
    assert "| sdpa | 4:1 | 16 | 4 | 2 |" in open(paths["markdown"]).read()
