"""A PEFT model whose lm_head carries a LoRA adapter, through model access (`hf.fused_head`, `hf.sequence_logprobs`)
and the trainer's fused-linear backend, against PEFT's own forward (`model(...).logits`) in fp32."""
import pytest
import torch

from dpo_kernels import hf, reference
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.trainer.forward import DPOForward, reference_logps
from tests.helpers import assert_close
from tests.tiny_models import build_llama

peft = pytest.importorskip("peft", reason="PEFT is optional (pip install -e '.[trl]')")

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 53


def adapted(*, tie=False, **config):
    """A tiny Llama with a random (not zero) LoRA adapter on the lm_head (and q_proj)."""
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"], "init_lora_weights": False, **config}
    return peft.get_peft_model(build_llama(VOCAB, hidden=16, layers=1, tie_word_embeddings=tie),
                               peft.LoraConfig(**config))


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (4, 7), generator=g)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    labels[3, 5:] = IGNORE_INDEX
    return ids, torch.ones_like(ids), labels


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [False, True])
def test_sequence_logprobs_and_gradients_match_peft(tie):
    model = adapted(tie=tie)
    ids, mask, labels = batch()
    weight, _, lora = hf.fused_head(model)
    assert lora is not None and not weight.requires_grad
    if tie:
        assert weight is hf.unwrap_model(model).model.embed_tokens.weight
    with pytest.raises(ValueError, match="LoRA"):
        hf.output_head(model)
    upstream = torch.tensor([1.0, -0.5, 2.0, 0.25])
    logps = hf.sequence_logprobs(model, ids, mask, labels)
    (logps * upstream).sum().backward()
    got = {n: p.grad.clone() for n, p in trainable(model).items()}
    model.zero_grad(set_to_none=True)
    want = reference.sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)
    (want * upstream).sum().backward()
    assert_close("logps", logps, want)
    assert any("lm_head.lora" in n for n in got)
    for name, p in trainable(model).items():
        assert_close(f"grad {name}", got[name], p.grad)
    assert weight.grad is None


def test_adapters_that_do_not_act_leave_the_plain_head():
    model = adapted()
    with model.disable_adapter():
        assert hf.fused_head(model).lora is None
    model.merge_adapter()
    assert hf.fused_head(model).lora is None
    model.unmerge_adapter()
    saved = adapted(target_modules=["q_proj"], modules_to_save=["lm_head"])
    weight, _, lora = hf.fused_head(saved)
    assert lora is None and weight.requires_grad
    assert weight is hf.unwrap_model(saved).lm_head.modules_to_save["default"].weight


@pytest.mark.parametrize("config, match", [({"lora_dropout": 0.1}, "dropout"), ({"use_dora": True}, "DoRA"),
                                           ({"lora_bias": True}, "bias")])
def test_adapters_the_engine_cannot_run_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        hf.fused_head(adapted(**config))


def test_trainer_fused_linear_backend_matches_peft_logits():
    """`dpo-kernels train`'s fused-linear loss on a PEFT policy equals its reference backend, which reads the
    model's own logits: loss, metrics and every trainable parameter's gradient, the lm_head's adapter included."""
    ids, mask, labels = batch()
    ref_c, ref_r = torch.tensor([-20.0, -25.0]), torch.tensor([-22.0, -21.0])
    results = []
    for backend in ("fused-linear", "reference"):
        model = adapted()
        forward = DPOForward(model, backend, {"beta": 0.1, "loss_type": "sigmoid"})
        out = forward(ids, mask, labels, ref_c, ref_r)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in trainable(model).items()}))
    (got, got_grads), (want, want_grads) = results
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert_close(field, getattr(got, field), getattr(want, field))
    assert set(got_grads) == set(want_grads) and any("lm_head.lora_B" in n for n in got_grads)
    for name, grad in want_grads.items():
        assert_close(f"grad {name}", got_grads[name], grad)
    # The no-grad reference pass of the same backend runs the adapter too.
    model = adapted()
    with torch.no_grad():
        want_logps = reference.sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert_close("reference_logps", reference_logps(model, "fused-linear", ids, mask, labels), want_logps)
