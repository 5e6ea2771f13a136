"""`TrainConfig(packing=True)`: padding-free rows under a token cap train as the padded rows do.

Every step's loss, metrics and gradient norm, and the final evaluation's metrics, of a packed run (unshared and
shared pairs, a live or a precomputed reference, each loss backend, two
architectures: Llama with eager attention, Qwen2 with SDPA and a sliding window on one of its layers) stay within the
accuracy rule of a float64 run on padded rows, with the fp32 padded run as the baseline; a float64 packed run equals
the float64 padded run to rounding. The backbone runs on fewer positions, the cap is honoured (a sequence longer than
it gets a row of its own), bad caps are refused, and a model that cannot keep packed sequences apart trains on
padded rows with one warning (an error under strict mode).
"""
from functools import partial

import pytest
import torch
import transformers

from dpo_kernels import paths
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.hf import shared_prompt as shared_hf
from dpo_kernels.trainer import TrainConfig, loop, models, ref_logps, train
from dpo_kernels.trainer.batches import collate_pairs
from dpo_kernels.trainer.config import check_config
from dpo_kernels.trainer.data import Example, load_preference_data
from dpo_kernels.trainer.errors import UserInputError
from tests.helpers import assert_within_rule
from tests.tiny_models import tiny_setup, train_config

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 3
# Not rewards/accuracies: it counts margins above 0, and the tiny models give some pairs a margin of exactly 0 in
# float64 that float32 rounding puts on either side; the rewards and margins that decide it are compared.
KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
        "rewards/margins")
EVAL_KEYS = tuple(f"eval/{key}" for key in KEYS if key != "grad_norm")
# The tiny rows' sequences (prompt + response) hold 14 to 20 tokens and their pairs (prompt + both responses) 22 to
# 26: each cap puts about two in a row, so a micro-batch takes several rows.
CAP = 40
SHARED_CAP = 50
config = partial(train_config, batch_size=4, max_steps=STEPS, max_length=32, max_prompt_length=24,
                 loss_type="sigmoid,sft", loss_weights=[1.0, 0.5], seed=0)


def _save_qwen2(tiny, root):
    """A tiny Qwen2 with SDPA whose first layer slides a window shorter than the rows, beside the tiny tokenizer."""
    tok = tiny["tokenizer"]
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, max_window_layers=1, sliding_window=5,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return {**tiny, "model": str(root)}


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    llama = tiny_setup(tmp_path_factory.mktemp("packing"), rows=16)
    return {"llama": llama, "qwen2": _save_qwen2(llama, tmp_path_factory.mktemp("qwen2"))}


def steps(result):
    return [r for r in result.history if "grad_norm" in r]


def final_eval(result):
    return [r for r in result.history if "eval/loss" in r][-1]


def assert_run_within_rule(got, truth, baseline, what):
    """Every step's KEYS and the final evaluation's EVAL_KEYS of `got` by the accuracy rule."""
    runs = [steps(got) + [final_eval(got)], steps(truth) + [final_eval(truth)],
            steps(baseline) + [final_eval(baseline)]]
    assert len(runs[0]) == len(runs[1]) == len(runs[2]) == STEPS + 1, what
    for key in KEYS + EVAL_KEYS:
        g, t, b = (torch.tensor([r[key] for r in run if key in r], dtype=torch.float64) for run in runs)
        # fp32 rounds a value to about 1e-7 of its size, and a step adds a few such roundings.
        assert_within_rule(g, t, b, atol=1e-6 * max(1.0, t.abs().max().item()), name=f"{what} {key}")


def _load_with(attention):
    """`models.load_model` that runs the model with `attention` (the trainer loads the default, SDPA)."""
    def load(*args, **kwargs):
        model = models.load_model(*args, **kwargs)
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        return model
    return load


@pytest.mark.parametrize("arch, attention", [("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_runs_match_the_padded_run(tinies, tmp_path, monkeypatch, arch, attention):
    for module in (loop, ref_logps):
        monkeypatch.setattr(module, "load_model", _load_with(attention))
    tiny = tinies[arch]
    run = partial(config, tiny, eval_data=tiny["data"], eval_batch_size=8)
    truth = train(run(tmp_path / "truth", loss_backend="reference", precision="fp64"))
    packed64 = train(run(tmp_path / "packed64", loss_backend="reference", precision="fp64", packing=True,
                         max_row_tokens=CAP))
    # transformers' eager attention takes its softmax in float32 whatever the dtype, so a float64 run agrees to
    # float32 rounding there and to float64 rounding under SDPA.
    rel = 1e-10 if attention == "sdpa" else 1e-6
    for a, b in zip(steps(packed64) + [final_eval(packed64)], steps(truth) + [final_eval(truth)], strict=True):
        for key in KEYS + EVAL_KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), f"{arch} float64 packed {key}"
    for backend in ("fused-linear", "logits"):
        baseline = train(run(tmp_path / f"{backend}-padded", loss_backend=backend))
        for name, extra in (("packed", {"packing": True, "max_row_tokens": CAP}),
                            ("one row", {"packing": True}),
                            ("precomputed reference", {"packing": True, "max_row_tokens": CAP,
                                                       "precompute_ref": True}),
                            ("shared packed", {"packing": True, "share_prompt": True, "max_row_tokens": SHARED_CAP})):
            got = train(run(tmp_path / f"{backend}-{name}", loss_backend=backend, **extra))
            assert_run_within_rule(got, truth, baseline, f"{arch} {backend} {name}")
            assert got.path_records[0].fallbacks == ()


def _next_fit_rows(lengths, cap):
    """The tokens of each row when `lengths` fill rows in order up to `cap` (an over-long one alone in its row)."""
    rows, used = [], 0
    for n in lengths:
        if rows and used + n <= cap:
            rows[-1] += n
            used += n
        else:
            rows.append(n)
            used = n
    return rows


def test_backbone_positions_fall_with_packing(tinies, tmp_path):
    tiny = tinies["llama"]
    padded = steps(train(config(tiny, tmp_path / "padded", max_steps=1)))[0]
    packed = steps(train(config(tiny, tmp_path / "packed", max_steps=1, packing=True, max_row_tokens=CAP)))[0]
    examples = load_preference_data(tiny["data"], tiny["tokenizer"], max_length=32,
                                    max_prompt_length=24).examples
    # The first micro-batch's pairs are the first 4 of the seed's epoch permutation (`loop.Plan`).
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.keywords["seed"]))
    batch = [examples[i] for i in order[:4].tolist()]
    lengths = [len(e.chosen_ids) for e in batch] + [len(e.rejected_ids) for e in batch]
    rows = _next_fit_rows(lengths, CAP)
    assert padded["tokens/backbone"] == len(lengths) * max(lengths)
    assert len(rows) > 1 and max(rows) <= CAP
    assert packed["tokens/backbone"] == len(rows) * max(rows) < padded["tokens/backbone"]


def test_rows_respect_the_cap_and_keep_documents_apart():
    examples = [Example(2, (5, 6, 7, 8), (5, 6, 9)), Example(1, (4, 10, 11, 12, 13, 14, 15), (4, 16))]
    batch = collate_pairs(examples, 0, torch.device("cpu"), share_prompt=False, packing=True, max_row_tokens=5)
    layout = batch["labels"]
    # Sequences in order: chosen 0 (4), chosen 1 (7, over the cap: its own row), rejected 0 (3), rejected 1 (2).
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 0, 0, 0], [4, 10, 11, 12, 13, 14, 15],
                                         [5, 6, 9, 4, 16, 0, 0]]
    assert layout.position_ids.tolist()[2] == [0, 1, 2, 0, 1, 0, 0]
    assert layout.document_ids.tolist()[2] == [2, 2, 2, 3, 3, -1, -1]
    assert int(batch["num_tokens"]) == 16 and batch["input_ids"].numel() == 21
    assert layout.counts.tolist() == [2, 6, 1, 1]  # what the padded rows score per sequence
    allowed = layout.attention_mask()[2, 0]
    assert not allowed[3, :3].any() and allowed[4, 3]  # rejected 1 sees itself, never rejected 0
    assert IGNORE_INDEX not in layout.token_targets.tolist()


@pytest.mark.parametrize("settings, message", [
    ({"packing": True, "max_row_tokens": 0}, "max_row_tokens must be >= 1, got 0"),
    ({"packing": False, "max_row_tokens": 64}, "max_row_tokens \\(64\\) caps packed rows; set packing"),
    ({"packing": True, "max_row_tokens": 8.5}, "max_row_tokens must be an integer, got 8.5"),
])
def test_bad_max_row_tokens_is_refused(settings, message):
    with pytest.raises(UserInputError, match=message):
        check_config(TrainConfig(model="m", data="d.jsonl", **settings))


def test_unsupported_model_trains_on_padded_rows_with_a_warning(tinies, tmp_path, monkeypatch, force_backend):
    tiny = tinies["llama"]
    monkeypatch.delitem(shared_hf.SUPPORTED_MODELS, "LlamaForCausalLM")
    with pytest.warns(UserWarning, match="packing keeps sequences apart.*LlamaForCausalLM.*Training on padded rows"):
        fallback = train(config(tiny, tmp_path / "fallback", max_steps=1, packing=True, max_row_tokens=CAP))
    assert [(f.kind, f.cause) for f in fallback.path_records[0].fallbacks] == [(paths.PACKED_TO_PADDED,
                                                                               "LlamaForCausalLM")]
    padded = train(config(tiny, tmp_path / "padded", max_steps=1))
    assert steps(fallback)[0]["tokens/backbone"] == steps(padded)[0]["tokens/backbone"]
    assert steps(fallback)[0]["loss"] == steps(padded)[0]["loss"]
    force_backend("torch")  # strict mode refuses CPU tensors' Triton -> PyTorch fallback before the model's
    with pytest.raises(paths.StrictModeError, match="caused by LlamaForCausalLM"):
        train(config(tiny, tmp_path / "strict", packing=True, strict=True))
