"""The TRL drop-in on a PEFT policy whose lm_head carries a LoRA adapter: it runs fused (stock TRL 1.16 refuses such
a head, its own fused head reading `lm_head.weight` alone).

The oracle is stock TRL on the same model with the adapter merged into a plain lm_head `W' = W + s B A`: the same
logits, so the same loss and logged metrics; its gradient G of `W'` gives the adapter's, `s G A^T` for B and
`s B^T G` for A, and every other parameter's gradient is the same.
"""
import copy
import warnings

import pytest
import torch

from tests.helpers import assert_close, assert_same_trl_logs, trl_loss_and_grads
from tests.integrations.requires_trl import FusedDPOTrainer, datasets, trl
from tests.tiny_models import build_llama, build_tokenizer, preference_rows

peft = pytest.importorskip("peft", reason="PEFT comes with the trl extra")

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD = "base_model.model.lm_head"


def config(**overrides):
    return trl.DPOConfig(output_dir="/tmp/dpo_kernels_trl_test", report_to=[], save_strategy="no", use_cpu=True,
                         bf16=False, seed=0, disable_tqdm=True, per_device_train_batch_size=4, max_steps=1,
                         learning_rate=0.5, optim="sgd", logging_steps=1, **overrides)


def merged_head_copy(model):
    """`model` with its lm_head's LoRA adapter merged into a plain, trainable `nn.Linear`; and (W', s, A, B)."""
    model = copy.deepcopy(model)
    inner = model.get_base_model()
    layer = inner.lm_head
    s, a, b = layer.scaling["default"], layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    head = torch.nn.Linear(a.shape[1], b.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(layer.base_layer.weight + s * b @ a)
    inner.lm_head = head
    return model, (s, a, b)


def test_lora_lm_head_runs_fused_and_matches_the_merged_head():
    tok = build_tokenizer()
    data = datasets.Dataset.from_list(preference_rows(8))
    ref = build_llama(tok, seed=1)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    policy = peft.get_peft_model(build_llama(tok, seed=0), lora)
    merged, (s, a, b) = merged_head_copy(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = FusedDPOTrainer(model=policy, ref_model=copy.deepcopy(ref), args=config(), train_dataset=data,
                                processing_class=tok)
        stock = trl.DPOTrainer(model=merged, ref_model=copy.deepcopy(ref), args=config(), train_dataset=data,
                               processing_class=tok)
    assert not fused._dk_unsupported
    batch = next(iter(stock.get_train_dataloader()))
    (got_loss, got_grads, got_logs), (want_loss, want_grads, want_logs) = (trl_loss_and_grads(fused, batch),
                                                                           trl_loss_and_grads(stock, batch))
    assert_close("loss", got_loss, want_loss)
    assert_same_trl_logs(got_logs, want_logs)
    g = want_grads.pop(f"{HEAD}.weight")
    assert_close("grad lora_B", got_grads.pop(f"{HEAD}.lora_B.default.weight"), s * g @ a.t())
    assert_close("grad lora_A", got_grads.pop(f"{HEAD}.lora_A.default.weight"), s * b.t() @ g)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert_close(f"grad {name}", got_grads[name], grad)


def test_lora_lm_head_with_an_option_that_falls_back_is_refused():
    """TRL's own computation would ignore the adapter, so the drop-in refuses instead of falling back."""
    tok = build_tokenizer()
    data = datasets.Dataset.from_list(preference_rows(4))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lm_head carries a LoRA adapter.*use_weighting"):
            FusedDPOTrainer(model=build_llama(tok, seed=0), args=config(use_weighting=True), train_dataset=data,
                            processing_class=tok, peft_config=lora)
