"""HF models on the group batch: per-response log-probs and gradients equal the unshared rows `[prompt | response]`
(fp32, within the accuracy rule against a float64 run of the unshared rows), for each supported architecture and
attention, packed or not, K from 2 to 8 and mixed in one batch."""
import random

import pytest
import torch
import transformers

from dpo_kernels import hf
from dpo_kernels.shared_prompt import (
    SharedPromptUnsupported,
    build_group_batch,
    check_shared_prompt_support,
    shared_attention_mask,
    shared_logits,
    truncate_group,
    unshared_group_rows,
)
from tests.helpers import (
    assert_close_to_truth,
    assert_flex_attention_within_rule,
    assert_shared_grads_within_rule,
    assert_shared_logps_within_rule,
    shared_logps,
    unshared_rows_logps,
    unshared_rows_truth_and_baseline,
)
from tests.shared_prompt.test_shared_models import ARCH_ATTENTION, VOCAB, WINDOW, build_model, uncompiled_flex  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

# K = 2, 3, 5 and 8 in one batch: an empty response, identical responses, a one-token prompt, prompts longer than
# the sliding window.
GROUPS = [
    ([1, 5, 6, 7], [[8, 9], [10, 11, 12]]),
    ([4], [[], [13], [14, 15]]),
    ([1, 14, 15], [[16, 17, 18], [16, 17, 18], [19], [20, 21, 22, 23, 24, 25], [16, 17]]),
    ([1, 22, 23, 24, 25, 26, 27], [[28], [29, 30, 31, 32, 33], [34, 35], [36], [37, 38, 39, 40, 41, 42], [43],
                                   [44, 45, 46], [47, 48]]),
]


def response_rows(groups):
    """Each response's unshared row `[prompt | response]` and its prompt length, group by group."""
    return [(list(p) + list(r), len(p)) for p, responses in groups for r in responses]


def truth_and_baseline(model, groups):
    return unshared_rows_truth_and_baseline(model, response_rows(groups))


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("arch, attention", ARCH_ATTENTION)
def test_logps_equal_the_unshared_rows(arch, attention, pack):
    model = build_model(arch, attention)
    truth, baseline = truth_and_baseline(model, GROUPS)
    batch = build_group_batch(GROUPS, pack=pack)
    logps = assert_shared_logps_within_rule(model, batch, truth, baseline, f"{arch} {attention}")
    assert logps["fused"][2].item() == 0.0  # the empty response scores nothing


@pytest.mark.parametrize("K", [2, 4, 6, 8])
def test_every_group_size(K):
    rng = random.Random(K)
    groups = [([1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(0, 8))],
               [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 7))] for _ in range(K)]) for _ in range(3)]
    model = build_model("qwen2", "sdpa")
    truth, baseline = truth_and_baseline(model, groups)
    with torch.no_grad():
        logps = shared_logps(model, build_group_batch(groups, pack=True, max_row_tokens=2 * 8 * 7), "fused")
    assert_close_to_truth(logps, truth, baseline, torch.float32, f"K = {K}")


@pytest.mark.parametrize("kw, kept_groups", [
    ({"max_length": 7, "max_prompt_length": 6, "bos_token_id": 1}, (0, 1, 2, 3, 4)),  # prompts cut, BOS kept
    ({"max_length": 8}, (0, 1, 2, 3)),  # the last prompt fills max_length: its group is skipped
])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_truncation_gives_the_unshared_rows_tokens(arch, kw, kept_groups):
    groups = [*GROUPS, ([1, 50, 51, 52, 53, 54, 55, 56], [[57], [58, 59]])]
    kept = [g for g in (truncate_group(p, rs, **kw) for p, rs in groups) if g is not None]
    model = build_model(arch, "sdpa")
    truth, baseline = truth_and_baseline(model, kept)
    batch = build_group_batch(groups, pack=True, **kw)
    assert batch.kept_groups == kept_groups and batch.skipped_groups == len(groups) - len(kept_groups)
    with torch.no_grad():
        logps = shared_logps(model, batch, "logits")
    assert_close_to_truth(logps, truth, baseline, torch.float32, "truncated")


def _grads(model, groups, shared, path="logits"):
    """Parameter gradients of a weighted sum of the per-response log-probs (a stand-in for any group loss: the
    layout's part of the gradient is the same for every weight)."""
    model.zero_grad(set_to_none=True)
    if shared:
        logps = shared_logps(model, build_group_batch(groups, pack=True), path)
    else:
        logps = unshared_rows_logps(model, response_rows(groups))
    weights = torch.linspace(-1.0, 1.5, logps.numel(), dtype=logps.dtype)
    loss = (weights * logps).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("arch, attention", [("llama", "eager"), ("llama", "sdpa"), ("gemma3", "sdpa")])
def test_gradients_equal_the_unshared_rows(arch, attention, path):
    assert_shared_grads_within_rule(lambda m, shared: _grads(m, GROUPS, shared, path), build_model(arch, attention))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_attention_block_mask(uncompiled_flex, arch):  # noqa: F811
    truth, baseline = truth_and_baseline(build_model(arch, "eager"), GROUPS)
    batch = build_group_batch(GROUPS, pack=True)
    assert_flex_attention_within_rule(build_model(arch, "flex_attention"), batch, truth, baseline, WINDOW)


def test_dense_masks_are_built_from_the_group_rule():
    batch = build_group_batch(GROUPS)
    eager = shared_attention_mask(build_model("llama", "eager"), batch)
    T = batch.input_ids.shape[1]
    assert eager.shape == (4, 1, T, T) and torch.equal(eager == 0, batch.attention_mask())
    mapping = shared_attention_mask(build_model("qwen2", "sdpa"), batch)
    assert torch.equal(mapping["sliding_attention"] == 0, batch.attention_mask(WINDOW))


def test_unsupported_models_fall_back_to_the_unshared_rows():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(SharedPromptUnsupported, match="GPT2LMHeadModel is not verified"):
        check_shared_prompt_support(gpt2)
    with pytest.raises(SharedPromptUnsupported, match="GPT2LMHeadModel is not verified"):
        shared_logits(gpt2, build_group_batch(GROUPS))
    # The fallback rows, numbered as the group batch, give the same log-probs through the package's unshared path.
    model = build_model("llama", "sdpa")
    ids, mask, labels = unshared_group_rows(GROUPS)
    truth, baseline = truth_and_baseline(model, GROUPS)
    with torch.no_grad():
        unshared = hf.sequence_logprobs(model, ids, mask, labels)
        gpt2_logps = hf.sequence_logprobs(gpt2, *unshared_group_rows(GROUPS))
    assert_close_to_truth(unshared, truth, baseline, torch.float32, "fallback rows")
    assert gpt2_logps.shape == (build_group_batch(GROUPS).num_seqs,)
