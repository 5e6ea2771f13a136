"""dpo_kernels.hf (model access): HF causal LMs through the fused engine, judged against float64 eager logits."""
import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, GraniteConfig, GraniteForCausalLM

from dpo_kernels import hf, reference
from dpo_kernels.fused_linear import engine
from dpo_kernels.integrations.packing import next_token_labels, pack_rows
from dpo_kernels.integrations.token_metrics import token_sums
from tests.helpers import OpLog, assert_within_rule
from tests.tiny_models import build_llama

VOCAB = 61


pytestmark = pytest.mark.usefixtures("single_thread")


def batch(rows=4, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, length - r:] = 0  # right padding of 0..rows-1 tokens
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    labels[rows - 1] = -100  # an empty response scores 0
    return ids, mask, labels


def eager_logprobs(model, ids, mask, labels):
    return reference.sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_logprobs_and_grads_match_float64(tied):
    model = build_llama(VOCAB, tie_word_embeddings=tied)
    ids, mask, labels = batch()
    weight, bias = hf.output_head(model)
    assert bias is None
    assert weight is (model.model.embed_tokens.weight if tied else model.lm_head.weight)

    truth_model = copy.deepcopy(model).double()
    baseline_model = copy.deepcopy(model)
    truth = eager_logprobs(truth_model, ids, mask, labels)
    baseline = eager_logprobs(baseline_model, ids, mask, labels)
    got = hf.sequence_logprobs(model, ids, mask, labels)
    assert got.dtype == torch.float32 and got[-1].item() == 0.0
    assert_within_rule(got, truth, baseline, atol=1e-5, name="logps")

    upstream = torch.linspace(-1.0, 1.5, ids.shape[0])
    for out in (got, truth, baseline):
        (out * upstream.to(out.dtype)).sum().backward()
    for name in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        params = [dict(m.named_parameters()).get(name) for m in (model, truth_model, baseline_model)]
        if params[0] is None:  # lm_head.weight is not a separate parameter when tied
            continue
        assert_within_rule(params[0].grad, params[1].grad, params[2].grad, atol=1e-6, name=f"grad {name}")


def test_reference_mode_has_no_graph_and_packed_matches_padded():
    model = build_llama(VOCAB)
    ids, mask, labels = batch()
    padded = hf.sequence_logprobs(model, ids, mask, labels, reference=True)
    assert not padded.requires_grad
    packed = pack_rows(ids, mask, labels)
    got = hf.sequence_logprobs(model, packed.input_ids, None, packed.labels, cu_seqlens=packed.cu_seqlens,
                               position_ids=packed.position_ids, reference=True)
    torch.testing.assert_close(got, padded, rtol=1e-5, atol=1e-5)


def test_bias_is_used():
    model = build_llama(VOCAB)
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.linspace(-2, 2, VOCAB))
    model.lm_head = head
    ids, mask, labels = batch()
    weight, bias = hf.output_head(model)
    assert bias is head.bias
    hf.check_output_head(model, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(hf.sequence_logprobs(model, ids, mask, labels),
                                   eager_logprobs(model, ids, mask, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cohere", "granite"])
def test_constant_logit_multiplier_is_folded_in(kind):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "cohere":
        model, expected = CohereForCausalLM(CohereConfig(logit_scale=0.25, **common)), 0.25
    else:
        model, expected = GraniteForCausalLM(GraniteConfig(logits_scaling=8.0, **common)), 1 / 8.0
    assert hf.logit_multiplier(model) == pytest.approx(expected)
    ids, mask, labels = batch()
    hf.check_output_head(model, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(hf.sequence_logprobs(model, ids, mask, labels),
                                   eager_logprobs(model, ids, mask, labels), rtol=1e-5, atol=1e-5)


def test_soft_capped_logits_are_refused():
    from transformers import Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=8, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    with pytest.raises(ValueError, match="soft-caps its logits"):
        hf.output_head(model)
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="soft-caps its logits"):
        hf.sequence_logprobs(model, ids, mask, labels)


def test_check_output_head_catches_an_unknown_logit_transform():
    model = build_llama(VOCAB)
    forward = model.forward

    def doubled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match="not hidden @ lm_head.weight"):
        hf.check_output_head(model, ids, mask)


def test_bad_inputs_and_adapted_head_are_refused():
    model = build_llama(VOCAB)
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="labels"):
        hf.sequence_logprobs(model, ids, mask, labels[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        hf.sequence_logprobs(model, ids[0], mask[0], labels[0])
    model.lm_head.lora_A = torch.nn.ModuleDict()
    with pytest.raises(ValueError, match="LoRA"):
        hf.output_head(model)


def test_packing_helpers():
    ids, mask, labels = batch()
    packed = pack_rows(ids, mask, labels)
    lengths = mask.sum(1)
    assert packed.cu_seqlens.tolist() == [0] + lengths.cumsum(0).tolist()
    assert packed.position_ids[0, : lengths[0]].tolist() == list(range(lengths[0]))
    nxt, row = next_token_labels(packed.labels, packed.cu_seqlens)
    padded_nxt, padded_row = next_token_labels(labels)
    keep = mask.reshape(-1).bool()
    assert torch.equal(nxt, padded_nxt[keep]) and torch.equal(row, padded_row[keep])
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, left, labels)


def test_token_sums_match_logits():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 16, generator=g, dtype=torch.float64), torch.randn(37, 16, generator=g,
                                                                                       dtype=torch.float64)
    bias = torch.randn(37, generator=g, dtype=torch.float64)
    # Token 5 duplicates token 2 and row 1 points at both: label 5 ties the earlier maximum, which TRL does not
    # count as a top-1 hit (argmax takes the first maximum).
    weight[5], bias[5] = weight[2], bias[2]
    hidden[1] = 10 * weight[2]
    logits = hidden @ weight.T + bias
    labels = logits.argmax(-1)
    labels[::2] = torch.tensor([0, 1, 5, 7, 9])
    labels[1], labels[4] = 5, -100
    row = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    sums = token_sums(hidden, weight, bias, labels, row, 2, full=True)
    valid = labels != -100
    chosen = valid & (row < 2)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    hit = logits.argmax(-1) == labels
    assert logits[1].max() == logits[1, 5] and not hit[1]
    close = dict(rtol=1e-4, atol=1e-5)  # sums are accumulated in float32
    torch.testing.assert_close(sums.entropy_sum.double(), entropy[valid].sum(), **close)
    torch.testing.assert_close(sums.chosen_logit_sum.double(), logits.mean(-1)[chosen].sum(), **close)
    torch.testing.assert_close(sums.rejected_logit_sum.double(), logits.mean(-1)[valid & (row >= 2)].sum(), **close)
    assert sums.chosen_top1.item() == (hit & chosen).sum().item() > 0
    assert sums.chosen_tokens.item() == chosen.sum().item()


def test_token_sums_make_no_float32_copy_of_the_head():
    """The mean logit needs `W.sum(0)` in fp32; an fp32 copy of a bf16 `[V, H]` head (2 GiB at Llama-3 8B) must
    not be made on the way, on any device: every op's outputs are checked through a dispatch mode."""
    g = torch.Generator().manual_seed(0)
    vocab, hid = 301, 24
    hidden = torch.randn(10, hid, generator=g).bfloat16()
    weight, bias = torch.randn(vocab, hid, generator=g).bfloat16(), torch.randn(vocab, generator=g).bfloat16()
    labels = torch.randint(0, vocab, (10,), generator=g)
    row = torch.arange(10) // 5
    with OpLog() as log:
        sums = token_sums(hidden, weight, bias, labels, row, 1, full=False)
    copies = [call for call in log.calls if ((vocab, hid), torch.float32) in call.outputs]
    assert not copies, copies
    logits = hidden.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(sums.chosen_logit_sum.double(), logits.mean(-1)[:5].sum(), rtol=1e-4, atol=1e-3)


def test_sequence_logprobs_under_autocast_computes_the_head_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast an fp32 model's lm_head runs in bf16; so must the fused engine (fp32 hidden states and
    an fp32 head would make its GEMMs fp32, many times slower on a GPU). Gradients still reach the fp32 weight."""
    model = build_llama(VOCAB)
    ids, mask, labels = batch()
    seen = []
    forward_logps = engine.forward_logps

    def spy(loop, *args, **kwargs):
        seen.append((loop.hidden2d.dtype, loop.weight.dtype))
        return forward_logps(loop, *args, **kwargs)

    monkeypatch.setattr(engine, "forward_logps", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hf.sequence_logprobs(model, ids, mask, labels)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    want = reference.sequence_logprobs(logits.float(), labels)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.5)
    got.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.dtype == torch.float32
    seen.clear()
    hf.sequence_logprobs(model, ids, mask, labels, reference=True)
    assert seen == [(torch.float32, torch.float32)]


def test_model_access_imports_no_feature_above_it():
    # A fresh interpreter, so that import order is the one a user's first `import dpo_kernels.hf` gives.
    code = ("import sys, dpo_kernels.hf; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('dpo_kernels.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    loaded = set(ast.literal_eval(out))
    assert "hf" in loaded and not loaded & {"integrations", "shared_prompt", "trainer", "bench"}, loaded


def test_the_import_paths_user_code_uses_name_the_same_objects():
    from dpo_kernels import integrations, shared_prompt
    from dpo_kernels.integrations import hf as integrations_hf

    for name in ("backbone_hidden_states", "check_output_head", "logit_multiplier", "output_head",
                 "packed_position_ids", "sequence_logprobs", "unwrap_model"):
        assert getattr(integrations_hf, name) is getattr(hf, name), name
    for name in ("backbone_hidden_states", "output_head", "sequence_logprobs", "unwrap_model"):
        assert getattr(integrations, name) is getattr(hf, name), name
    for name in ("SUPPORTED_MODELS", "SharedPromptUnsupported", "check_shared_prompt_support",
                 "shared_attention_mask", "shared_backbone_hidden_states", "shared_logits"):
        assert getattr(shared_prompt, name) is getattr(hf, name), name
