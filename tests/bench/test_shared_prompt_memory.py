"""`dpo-kernels profile-memory --share-prompt`: one training step's peak memory on unshared rows and on the
shared-prompt layout per prompt length, at tiny sizes on the CPU."""
import json

import pytest
import torch

from dpo_kernels.bench import cli, memory, shared_prompt

CPU = torch.device("cpu")
TINY = shared_prompt.ModelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=100)


def test_both_layouts_per_prompt_length_and_a_layout_stops_at_its_first_oom(tmp_path):
    calls = []

    def measure(layout, prompt):
        calls.append((layout, prompt))
        if layout == "unshared" and prompt >= 16:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at P={prompt})")
        return memory.measure_shared_prompt_in_process(layout, prompt, response=4, pairs=2, shape=TINY,
                                                       attention="sdpa", device=CPU)

    result = memory.profile_shared_prompt([32, 8, 16], response=4, pairs=2, shape=TINY, device=CPU, measure=measure,
                                          log=lambda *_: None)
    rows = {(r["provider"], r["prompt"]): r for r in result["rows"]}
    assert result["prompt_lens"] == [8, 16, 32] and result["complete"]
    assert rows["unshared", 8]["status"] == "ok" and rows["unshared", 16]["status"] == "oom"
    assert rows["unshared", 32]["status"] == "not_run" and ("unshared", 32) not in calls
    for p in (8, 16, 32):
        assert rows["shared", p]["status"] == "ok" and rows["shared", p]["positions"] == 2 * (p + 2 * 4)
    assert rows["unshared", 8]["positions"] == 2 * 2 * (8 + 4)
    paths = memory.write(result, str(tmp_path), png=False, name="shared_prompt_memory")
    markdown = open(paths["markdown"]).read()
    assert "| layout | P=8 | P=16 | P=32 |" in markdown and "| unshared | " in markdown and "| OOM | – |" in markdown
    assert "| backbone positions, unshared / shared | 48 / 32 | – / 48 | – / 80 |" in markdown
    saved = json.load(open(paths["json"]))
    assert {"stamp", "method", "prompt_lens", "response", "pairs", "model", "rows"} <= set(saved)


def test_a_fresh_subprocess_sees_the_activations_of_the_shared_step():
    # With glibc's default (dynamic) mmap threshold the warm-up step's freed blocks stay in the heap and the measured
    # step reuses them: this step's reported peak was 11 MiB against 28 MiB of saved activations.
    prompt, response, pairs = 256, 32, 4
    model = shared_prompt.build_model(shared_prompt.CPU_SHAPE, "sdpa", torch.float32, CPU, prompt + 2 * response)
    data = shared_prompt.make_pairs(pairs, prompt, response, shared_prompt.CPU_SHAPE.vocab)
    _, loss_fn, positions = shared_prompt.step_fn(model, data, True, CPU, None)
    activations = shared_prompt.saved_activation_bytes(loss_fn)
    row = memory.measure_shared_prompt_in_subprocess("shared", prompt, response=response, pairs=pairs,
                                                     shape=shared_prompt.CPU_SHAPE, attention="sdpa", device=CPU)
    assert row["status"] == "ok" and row["positions"] == positions, row
    assert row["peak_extra_bytes"] >= activations, (row, activations)


def test_cli_profile_memory_share_prompt(tmp_path, capsys):
    assert cli.main(["profile-memory", "--share-prompt", "--seq-lens", "8,16", "--response", "4", "--pairs", "1",
                     "--no-isolate", "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared_prompt_memory.json", "shared_prompt_memory.md",
                                                          "shared_prompt_memory.png"]
    assert (tmp_path / "shared_prompt_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| layout | P=8 | P=16 |" in out and "| shared |" in out


@pytest.mark.parametrize("argv, message", [
    (["--share-prompt", "--hidden", "8"], "--hidden do not apply with --share-prompt"),
    (["--share-prompt", "--providers", "eager"], "--providers do not apply"),
    (["--response", "8"], "apply with --share-prompt only"),
    (["--share-prompt", "--attention", "flash_attention_2"], "invalid choice"),
])
def test_cli_share_prompt_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["profile-memory", *argv, "--output-dir", "/nonexistent/never-written"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
