"""FusedDPOTrainer(share_prompt=True) gives stock TRL 1.16's numbers on a tiny Llama (CPU, fp32) while the policy and
the reference run each pair's prompt once.

Stock TRL is the oracle: both trainers start from the same weights and seed and see the same batch. Loss, gradients,
weight updates and logged metrics agree to rtol 1e-4 (metrics with a 1e-6 absolute floor: `logits/*` of a fresh head
are ~1e-5). A forward pre-hook on the backbone records the rows it ran, so each test also shows that the prompt was
shared (B rows, or one packed row, instead of 2B).
"""
import copy
import warnings

import pytest

from dpo_kernels import paths
from tests.helpers import (
    assert_close,
    assert_same_trl_logs,
    assert_same_trl_step,
    trl_loss_and_grads,
    trl_train_logs,
)
from tests.integrations.requires_trl import FusedDPOTrainer, datasets, patch_dpo_trainer, trl
from tests.tiny_models import build_llama, build_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = 4


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    return {"tok": tok, "data": datasets.Dataset.from_list(preference_rows(PAIRS)),
            "policy": build_llama(tok, seed=0), "ref": build_llama(tok, seed=1)}


def build(cls, tiny, *, policy=None, ref=True, share_prompt=None, strict=None, peft_config=None, quiet=True,
          **config):
    config = {"per_device_train_batch_size": PAIRS, "max_steps": 1, "learning_rate": 0.5, "optim": "sgd",
              "logging_steps": 1, **config}
    args = trl.DPOConfig(output_dir="/tmp/dpo_kernels_trl_shared_test", report_to=[], save_strategy="no",
                         use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0, **config)
    kwargs = {} if share_prompt is None else {"share_prompt": share_prompt}
    if strict is not None:
        kwargs["strict"] = strict
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return cls(model=copy.deepcopy(policy or tiny["policy"]), ref_model=copy.deepcopy(tiny["ref"]) if ref else None,
                   args=args, train_dataset=tiny["data"], processing_class=tiny["tok"], **kwargs)


def backbone_rows(trainer):
    """The `input_ids` shapes the policy's (and reference's) backbone runs on, recorded as they happen."""
    shapes = []
    for model in {id(m): m for m in (trainer.model, trainer.ref_model) if m is not None}.values():
        backbone = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        backbone.register_forward_pre_hook(lambda _, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    return shapes






def test_a_training_step_matches_stock_with_each_prompt_run_once(tiny):
    stock, shared = build(trl.DPOTrainer, tiny), build(FusedDPOTrainer, tiny, share_prompt=True)
    assert shared._dk_share_prompt
    stock_rows, shared_rows = backbone_rows(stock), backbone_rows(shared)
    assert_same_trl_logs(trl_train_logs(shared)[0], trl_train_logs(stock)[0])
    before = dict(tiny["policy"].named_parameters())
    for (name, p), (_, q) in zip(shared.model.named_parameters(), stock.model.named_parameters(), strict=True):
        assert_close(f"update of {name}", p.detach() - before[name], q.detach() - before[name])
    # Policy and reference: 2B unshared rows each in stock TRL, B shared rows each here, and fewer positions.
    assert [s[0] for s in stock_rows] == [2 * PAIRS] * 2 and [s[0] for s in shared_rows] == [PAIRS] * 2
    assert shared_rows[0][0] * shared_rows[0][1] < stock_rows[0][0] * stock_rows[0][1]


@pytest.mark.parametrize("loss_type", [["ipo", "sft"], ["aot", "sigmoid_norm"], ["exo_pair"]])
def test_loss_types_match_stock(tiny, loss_type):
    # ipo and sigmoid_norm divide by completion lengths, sft averages chosen tokens, aot sorts across the batch,
    # exo_pair reads label_smoothing.
    config = {"loss_type": loss_type, "loss_weights": [1.0, 0.5][: len(loss_type)], "label_smoothing": 1e-3}
    stock = build(trl.DPOTrainer, tiny, **config)
    shared = build(FusedDPOTrainer, tiny, share_prompt=True, **config)
    rows = backbone_rows(shared)
    batch = next(iter(stock.get_train_dataloader()))
    assert_same_trl_step(trl_loss_and_grads(shared, batch), trl_loss_and_grads(stock, batch), loss_type)
    assert [r[0] for r in rows] == [PAIRS, PAIRS]


def test_precomputed_reference_is_shared_too(tiny):
    stock = build(trl.DPOTrainer, tiny, precompute_ref_log_probs=True)
    shared = build(FusedDPOTrainer, tiny, share_prompt=True, precompute_ref_log_probs=True)
    rows = backbone_rows(shared)
    batch = next(iter(stock.get_train_dataloader()))
    ref_batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    got, want = shared.compute_ref_log_probs(shared.ref_model, ref_batch), stock.compute_ref_log_probs(
        stock.ref_model, ref_batch)
    for name, g, w in zip(("ref_chosen_logps", "ref_rejected_logps"), got, want, strict=True):
        assert_close(name, g, w)
        assert_close(f"precomputed {name}", shared.train_dataset[name], stock.train_dataset[name])
    assert_same_trl_step(trl_loss_and_grads(shared, batch), trl_loss_and_grads(stock, batch), "precomputed reference")
    assert [r[0] for r in rows] == [PAIRS, PAIRS], "the reference pass and then the policy alone, both shared"


def test_padding_free_packs_the_pairs_into_one_row(tiny):
    stock = build(trl.DPOTrainer, tiny)
    packed = build(FusedDPOTrainer, tiny, share_prompt=True, padding_free=True)
    rows = backbone_rows(packed)
    batch = next(iter(stock.get_train_dataloader()))
    assert_same_trl_step(trl_loss_and_grads(packed, batch), trl_loss_and_grads(stock, batch), "packed")
    real = int(batch["attention_mask"].sum())
    assert len(rows) == 2 and all(r[0] == 1 and r[1] < real for r in rows), rows


def test_patched_trainer_and_peft_reference_share_the_prompt(tiny):
    peft = pytest.importorskip("peft", reason="PEFT is optional (pip install peft)")
    # Random (not zero) LoRA B: the policy differs from its adapter-free reference from the first step.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    stock = build(trl.DPOTrainer, tiny, ref=False, peft_config=lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = patch_dpo_trainer(build(trl.DPOTrainer, tiny, ref=False, peft_config=lora), share_prompt=True)
    assert patched.ref_model is None and patched._dk_share_prompt
    rows = backbone_rows(patched)
    batch = next(iter(stock.get_train_dataloader()))
    assert_same_trl_step(trl_loss_and_grads(patched, batch), trl_loss_and_grads(stock, batch), "PEFT")
    assert [r[0] for r in rows] == [PAIRS, PAIRS], "the disabled adapter's pass and the policy's, both shared"


def test_an_architecture_outside_the_allow_list_warns_once_and_trains_unshared(tiny):
    from transformers import LlamaForCausalLM

    class CustomLlama(LlamaForCausalLM):
        pass

    policy = CustomLlama(tiny["policy"].config)
    policy.load_state_dict(tiny["policy"].state_dict())
    stock = build(trl.DPOTrainer, tiny)
    with pytest.warns(UserWarning) as caught:
        fused = build(FusedDPOTrainer, tiny, policy=policy, share_prompt=True, quiet=False)
    ours = [str(w.message) for w in caught if "dpo_kernels" in str(w.message)]
    assert len(ours) == 1 and "CustomLlama" in ours[0] and "unshared rows" in ours[0], ours
    assert not fused._dk_share_prompt and not fused._dk_unsupported
    rows = backbone_rows(fused)
    batch = next(iter(stock.get_train_dataloader()))
    assert_same_trl_step(trl_loss_and_grads(fused, batch), trl_loss_and_grads(stock, batch), "unshared fallback")
    assert [r[0] for r in rows] == [2 * PAIRS, 2 * PAIRS]


def test_an_option_the_fused_engine_lacks_warns_once_and_runs_trl(tiny):
    stock = build(trl.DPOTrainer, tiny, ld_alpha=0.5)
    with pytest.warns(UserWarning) as caught:
        fused = build(FusedDPOTrainer, tiny, share_prompt=True, quiet=False, ld_alpha=0.5)
    ours = [str(w.message) for w in caught if "dpo_kernels" in str(w.message)]
    assert len(ours) == 1 and "ld_alpha" in ours[0] and "share_prompt is off" in ours[0], ours
    batch = next(iter(stock.get_train_dataloader()))
    assert_same_trl_step(trl_loss_and_grads(fused, batch), trl_loss_and_grads(stock, batch), "TRL's computation")


def test_keep_end_rows_cut_apart_run_unshared_with_one_warning(tiny):
    # keep_end at 8 tokens cuts each row's start by its own length, so a pair's two rows keep different prompt
    # tokens: those batches cannot share; keep_start keeps one prompt for both and shares (at 16 tokens the
    # responses are cut but still differ; shorter, they would be identical and their gradients cancel to noise).
    for mode, max_length, shared_rows in (("keep_end", 8, 2 * PAIRS), ("keep_start", 16, PAIRS)):
        config = {"max_length": max_length, "truncation_mode": mode}
        stock = build(trl.DPOTrainer, tiny, **config)
        fused = build(FusedDPOTrainer, tiny, share_prompt=True, **config)
        rows = backbone_rows(fused)
        batch = next(iter(stock.get_train_dataloader()))
        assert batch["input_ids"].shape[1] == max_length, "the batch should be truncated"
        want = trl_loss_and_grads(stock, batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [trl_loss_and_grads(fused, batch) for _ in range(2)]
        ours = [str(w.message) for w in caught if "share_prompt" in str(w.message)]
        assert len(ours) == (1 if mode == "keep_end" else 0), ours
        assert_same_trl_step(got[0], want, mode)
        assert_close(f"{mode} second loss", got[1][0], want[0])
        assert {r[0] for r in rows} == {shared_rows}


def test_strict_mode_refuses_unshared_rows_naming_the_model_or_the_batch(tiny, force_backend):
    from transformers import LlamaForCausalLM

    class CustomLlama(LlamaForCausalLM):
        pass

    policy = CustomLlama(tiny["policy"].config)
    with pytest.raises(paths.StrictModeError, match=r"caused by the policy \(CustomLlama\)"):
        build(FusedDPOTrainer, tiny, policy=policy, share_prompt=True, strict=True)
    force_backend("torch")
    fused = build(FusedDPOTrainer, tiny, share_prompt=True, strict=True, max_length=8, truncation_mode="keep_end")
    batch = next(iter(fused.get_train_dataloader()))
    with pytest.raises(paths.StrictModeError, match="shared prompt -> unshared rows caused by .*prompt"):
        fused.compute_loss(fused.model, batch)
