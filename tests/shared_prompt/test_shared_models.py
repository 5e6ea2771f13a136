"""HF models on the shared-prompt batch: per-sequence log-probs and gradients equal the unshared rows' (fp32, within
the accuracy rule against a float64 run of the unshared rows), for each supported architecture and attention."""

import pytest
import torch
import transformers

import dpo_kernels
from dpo_kernels import reference
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.hf import output_head
from dpo_kernels.shared_prompt import (
    SharedPromptUnsupported,
    build_shared_batch,
    check_shared_prompt_support,
    sequence_logprobs_from_hidden,
    sequence_logprobs_from_logits,
    shared_attention_mask,
    shared_backbone_hidden_states,
    shared_logits,
    truncate_pair,
)
from dpo_kernels.trainer.models import enable_checkpointing
from tests.helpers import (
    LOSS_PARAMS,
    REFERENCE_FREE,
    assert_close_to_truth,
    assert_flex_attention_within_rule,
    assert_shared_grads_within_rule,
    assert_shared_logps_within_rule,
    right_padded_rows,
    shared_logps,
    unshared_rows_logps,
    unshared_rows_truth_and_baseline,
)

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 100
WINDOW = 5  # shorter than the rows, so that sliding layers really cut
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2}


def _config(arch):
    sliding = {"sliding_window": WINDOW}
    mixed = {"use_sliding_window": True, "max_window_layers": 1, **sliding}
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON)
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON, **sliding)
    if arch == "phi3":
        return transformers.Phi3Config(**COMMON, **sliding)
    if arch == "gemma":
        return transformers.GemmaConfig(**COMMON, head_dim=8)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON, **mixed)
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=8, **mixed)
    if arch == "gemma2":
        # Final-logit soft-capping is not linear in the hidden states: the fused path refuses it (not a matter of
        # sharing), so the tiny model goes without it; attention soft-capping stays.
        return transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=None, **sliding)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**COMMON, head_dim=8, layer_types=["sliding_attention", "full_attention"],
                                             **sliding)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "phi3", "gemma", "qwen2", "qwen3", "gemma2", "gemma3"]


def build_model(arch, attention="eager", seed=0):
    config = _config(arch)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


# A one-token prompt, an empty chosen response, identical responses, prompts longer than the window.
PAIRS = [
    ([1, 5, 6, 7], [8, 9], [10, 11, 12]),
    ([4], [], [13]),
    ([1, 14, 15], [16, 17, 18], [16, 17, 18]),
    ([1, 22, 23, 24, 25, 26, 27], [28], [29, 30, 31, 32, 33]),
    ([3, 40], [41, 42, 43, 44, 45, 46], [47]),
]


def pair_rows(pairs):
    """The package's unshared layout: rows 0..B-1 prompt + chosen, B..2B-1 prompt + rejected, as
    `(tokens, prompt_length)`."""
    return [(p + c, len(p)) for p, c, _ in pairs] + [(p + r, len(p)) for p, _, r in pairs]


def unshared_rows(pairs):
    """`pair_rows` as right-padded `input_ids`, `attention_mask` and `labels`."""
    return right_padded_rows(pair_rows(pairs))


def truth_and_baseline(model, pairs, *, average=False):
    return unshared_rows_truth_and_baseline(model, pair_rows(pairs), average=average)


# transformers runs Gemma 2 with eager attention only.
ARCH_ATTENTION = [(arch, attention) for arch in ARCHS for attention in ("eager", "sdpa")
                  if (arch, attention) != ("gemma2", "sdpa")]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("arch, attention", ARCH_ATTENTION)
def test_logps_equal_the_unshared_rows(arch, attention, pack):
    model = build_model(arch, attention)
    truth, baseline = truth_and_baseline(model, PAIRS)
    assert_shared_logps_within_rule(model, build_shared_batch(PAIRS, pack=pack), truth, baseline, f"{arch} {attention}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_truncation_gives_the_unshared_rows_tokens(arch):
    model = build_model(arch, "sdpa")
    kw = {"max_length": 6, "max_prompt_length": 3, "bos_token_id": 1}
    truncated = [truncate_pair(*pair, **kw) for pair in PAIRS]
    truth, baseline = truth_and_baseline(model, truncated)
    batch = build_shared_batch(PAIRS, pack=True, **kw)
    with torch.no_grad():
        logps = sequence_logprobs_from_logits(shared_logits(model, batch), batch)
    assert_close_to_truth(logps, truth, baseline, torch.float32, "truncated")


def test_average_and_batch_padding():
    model = build_model("llama")
    truth, baseline = truth_and_baseline(model, PAIRS, average=True)
    batch = build_shared_batch(PAIRS, pad_to_multiple_of=16)
    with torch.no_grad():
        logps = sequence_logprobs_from_logits(shared_logits(model, batch), batch, average=True)
    assert_close_to_truth(logps, truth, baseline, torch.float32, "average")


def _dpo_grads(model, pairs, shared, loss_type, path="logits"):
    """Parameter gradients of a DPO loss on the policy's log-probs (the reference log-probs fixed)."""
    B = len(pairs)
    model.zero_grad(set_to_none=True)
    if shared:
        logps = shared_logps(model, build_shared_batch(pairs, pack=True), path)
    else:
        logps = unshared_rows_logps(model, pair_rows(pairs))
    ref = None if loss_type in REFERENCE_FREE else torch.linspace(-30.0, -10.0, 2 * B, dtype=logps.dtype)
    labels = unshared_rows(pairs)[2]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    out = reference.dpo_loss(logps[:B], logps[B:], None if ref is None else ref[:B], None if ref is None else ref[B:],
                             loss_type=loss_type, chosen_lengths=counts[:B], rejected_lengths=counts[B:],
                             **LOSS_PARAMS.get(loss_type, {}))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check_grads(model, loss_type, path):
    assert_shared_grads_within_rule(lambda m, shared: _dpo_grads(m, PAIRS, shared, loss_type, path), model,
                                    f"{loss_type} ")


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_llama_gradients_equal_the_unshared_rows(attention, path):
    _check_grads(build_model("llama", attention), "sigmoid", path)


@pytest.mark.parametrize("loss_type", dpo_kernels.LOSS_TYPES)
def test_every_loss_type_gives_the_unshared_gradients(loss_type):
    _check_grads(build_model("qwen2", "sdpa"), loss_type, "logits")


def test_unsupported_models_and_attention_are_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)
    with pytest.raises(SharedPromptUnsupported, match="GPT2LMHeadModel is not verified"):
        check_shared_prompt_support(transformers.GPT2LMHeadModel(config))
    model = build_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(SharedPromptUnsupported, match="flash_attention_2"):
        shared_attention_mask(model, build_shared_batch(PAIRS))
    with pytest.raises(ValueError, match="sets attention_mask and position_ids itself"):
        shared_logits(build_model("llama"), build_shared_batch(PAIRS), position_ids=None)


def test_mask_kinds_follow_the_architecture():
    batch = build_shared_batch(PAIRS)
    rows, T = batch.input_ids.shape
    eager = shared_attention_mask(build_model("llama", "eager"), batch)
    assert eager.dtype == torch.float32 and eager.shape == (rows, 1, T, T)
    assert torch.equal(eager == 0, batch.attention_mask())
    sdpa = shared_attention_mask(build_model("mistral", "sdpa"), batch)
    assert sdpa.dtype == torch.float32 and torch.equal(sdpa == 0, batch.attention_mask(WINDOW))
    assert torch.equal(sdpa != 0, sdpa == float("-inf"))
    mapping = shared_attention_mask(build_model("qwen2", "sdpa"), batch)
    assert set(mapping) == {"full_attention", "sliding_attention"}
    assert torch.equal(mapping["full_attention"] == 0, batch.attention_mask())
    assert torch.equal(mapping["sliding_attention"] == 0, batch.attention_mask(WINDOW))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shared_attention_mask(build_model("llama", "sdpa"), batch).dtype == torch.bfloat16
        assert shared_attention_mask(build_model("llama", "eager"), batch).dtype == torch.float32


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers compiles flex_attention on first use, about a minute on 2 CPU cores; the unfused reference
    implementation runs the same BlockMask and mask_mod in seconds. The compiled kernel (and its backward, which
    torch does not run on the CPU) is the GPU's part."""
    from torch.nn.attention import flex_attention as torch_flex
    from transformers.integrations import flex_attention as hf_flex

    def uncompiled(query, key, value, training=False, **kwargs):
        return torch_flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_block_mask(uncompiled_flex, arch):
    truth, baseline = truth_and_baseline(build_model(arch, "eager"), PAIRS)
    batch = build_shared_batch(PAIRS, pack=True)
    assert_flex_attention_within_rule(build_model(arch, "flex_attention"), batch, truth, baseline, WINDOW)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build_model("llama", "sdpa")
    _, plain = _dpo_grads(model, PAIRS, True, "sigmoid", "fused")
    model.train()
    enable_checkpointing(model)
    _, checkpointed = _dpo_grads(model, PAIRS, True, "sigmoid", "fused")
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=0, atol=1e-6, msg=name)


def test_bf16_autocast_stays_within_the_rule():
    model = build_model("qwen2", "sdpa")
    truth, _ = truth_and_baseline(model, PAIRS)
    ids, mask, labels = unshared_rows(PAIRS)
    batch = build_shared_batch(PAIRS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        baseline = reference.sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)
        hidden = shared_backbone_hidden_states(model, batch)
        weight, bias = output_head(model)
        logps = sequence_logprobs_from_hidden(hidden, weight, batch, bias=bias)
    assert_close_to_truth(logps, truth, baseline, torch.bfloat16, "bf16 autocast")


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_model("llama", "sdpa"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    truth, baseline = truth_and_baseline(model, PAIRS)
    batch = build_shared_batch(PAIRS, pack=True)
    with torch.no_grad():
        weight, bias = output_head(model)
        logps = sequence_logprobs_from_hidden(shared_backbone_hidden_states(model, batch), weight, batch, bias=bias)
        with model.disable_adapter():
            base_logps = sequence_logprobs_from_logits(shared_logits(model, batch), batch)
    assert_close_to_truth(logps, truth, baseline, torch.float32, "LoRA policy")
    assert not torch.allclose(logps, base_logps), "the adapter changes the log-probs (else the test proves nothing)"
