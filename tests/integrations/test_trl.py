"""FusedDPOTrainer is a drop-in for TRL 1.16's DPOTrainer: same loss, metrics and weights on a tiny Llama (CPU, fp32).

Stock TRL is the oracle: both trainers start from the same weights and seed and see the same batches. Loss, weights
and gradients must agree to rtol 1e-4; logged metrics too, with a 1e-6 absolute floor for values that are means of
cancelling terms (`logits/*` of a freshly initialised head are ~1e-4).
"""
import copy
import warnings

import pytest
import torch

from tests.helpers import (
    assert_close,
    assert_same_trl_logs,
    assert_same_trl_step,
    device_for,
    trl_loss_and_grads,
    trl_train_logs,
)
from tests.integrations.requires_trl import FusedDPOTrainer, datasets, patch_dpo_trainer, trl
from tests.tiny_models import build_llama, build_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("single_thread")

# Every paired loss TRL 1.16 offers, with a label_smoothing that each one either reads or (sigmoid, ...) must ignore.
TRL_LOSSES = [
    (["sigmoid"], 0.1), (["hinge"], 0.0), (["ipo"], 0.0), (["exo_pair"], 1e-3), (["nca_pair"], 0.0),
    (["robust"], 0.1), (["bco_pair"], 0.0), (["sppo_hard"], 0.0), (["aot"], 0.1), (["aot_unpaired"], 0.1),
    (["apo_zero"], 0.0), (["apo_down"], 0.0), (["discopop"], 0.0), (["sigmoid_norm"], 0.0), (["sft"], 0.0),
    (["sigmoid", "sft"], 0.0), (["ipo", "sft", "hinge"], 0.0),
]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    return {
        "tok": tok,
        "data": datasets.Dataset.from_list(preference_rows(8)),
        "policy": build_llama(tok, seed=0),
        # A different reference, so that rewards, margins and accuracies are not all zero at the first step.
        "ref": build_llama(tok, seed=1),
    }


def make_trainer(cls, tiny, *, ref=True, quiet=True, **config):
    config = {"per_device_train_batch_size": 4, "max_steps": 1, "learning_rate": 0.5, "optim": "sgd",
              "logging_steps": 1, "use_cpu": True, **config}
    args = trl.DPOConfig(output_dir="/tmp/dpo_kernels_trl_test", report_to=[], save_strategy="no",
                         bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0, **config)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return cls(model=copy.deepcopy(tiny["policy"]), ref_model=copy.deepcopy(tiny["ref"]) if ref else None,
                   args=args, train_dataset=tiny["data"], processing_class=tiny["tok"])



def assert_same_weights(got: torch.nn.Module, want: torch.nn.Module, start: torch.nn.Module):
    # The update (new - old) is compared, not the weights, so that rtol applies to what the step changed.
    before = dict(start.named_parameters())
    for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert_close(f"update of {name}", p.detach() - before[name].detach(), q.detach() - before[name].detach())





def test_one_step_matches_stock_trainer(tiny):
    stock = make_trainer(trl.DPOTrainer, tiny)
    fused = make_trainer(FusedDPOTrainer, tiny)
    assert_same_trl_logs(trl_train_logs(fused)[0], trl_train_logs(stock)[0])
    assert_same_weights(fused.model, stock.model, tiny["policy"])


def test_every_loss_type_matches_stock(tiny):
    stock = make_trainer(trl.DPOTrainer, tiny)
    fused = make_trainer(FusedDPOTrainer, tiny)
    batch = next(iter(stock.get_train_dataloader()))
    for loss_types, smoothing in TRL_LOSSES:
        weights = [1.0, 0.5, 0.25][: len(loss_types)]
        for trainer in (stock, fused):
            trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = loss_types, weights, smoothing
            trainer.args.label_smoothing = smoothing
        fused._dk_ready = False
        fused._dpo_kernels_setup()
        assert not fused._dk_unsupported, fused._dk_unsupported
        assert_same_trl_step(trl_loss_and_grads(fused, batch), trl_loss_and_grads(stock, batch), f"{loss_types}")


def test_precomputed_reference_matches_stock(tiny):
    stock = make_trainer(trl.DPOTrainer, tiny, precompute_ref_log_probs=True)
    fused = make_trainer(FusedDPOTrainer, tiny, precompute_ref_log_probs=True)
    assert_close("precomputed ref_chosen_logps", fused.train_dataset["ref_chosen_logps"],
                 stock.train_dataset["ref_chosen_logps"])
    assert_same_trl_logs(trl_train_logs(fused)[0], trl_train_logs(stock)[0])
    assert_same_weights(fused.model, stock.model, tiny["policy"])


def test_twenty_steps_follow_the_same_loss_curve(tiny):
    config = {"max_steps": 20, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "optim": "adamw_torch"}
    stock = trl_train_logs(make_trainer(trl.DPOTrainer, tiny, **config))
    fused = trl_train_logs(make_trainer(FusedDPOTrainer, tiny, **config))
    want = [log["loss"] for log in stock if "loss" in log]
    got = [log["loss"] for log in fused if "loss" in log]
    assert len(want) == 20 and want[-1] < want[0], "the reference run should train"
    assert_close("loss curve", got, want)


def test_gradient_accumulation_matches_stock(tiny):
    config = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    stock = make_trainer(trl.DPOTrainer, tiny, **config)
    fused = make_trainer(FusedDPOTrainer, tiny, **config)
    assert_same_trl_logs(trl_train_logs(fused)[0], trl_train_logs(stock)[0])
    assert_same_weights(fused.model, stock.model, tiny["policy"])


def test_padding_free_gives_the_padded_numbers(tiny, monkeypatch):
    from dpo_kernels.integrations.trl import layout

    packed_calls = []
    pack_rows = layout.pack_rows
    monkeypatch.setattr(layout, "pack_rows", lambda *a: packed_calls.append(1) or pack_rows(*a))
    padded = make_trainer(FusedDPOTrainer, tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = make_trainer(FusedDPOTrainer, tiny, quiet=False, padding_free=True)
    assert packed.padding_free and packed.args.padding_free
    assert not any("padding_free" in str(w.message) for w in caught)
    batch = next(iter(padded.get_train_dataloader()))
    want = trl_loss_and_grads(padded, batch)
    got = trl_loss_and_grads(packed, batch)
    assert packed_calls, "padding_free=True did not pack the batch"
    assert_same_trl_step(got, want, "packed")


def test_patch_dpo_trainer(tiny):
    stock = make_trainer(trl.DPOTrainer, tiny)
    patched = patch_dpo_trainer(make_trainer(trl.DPOTrainer, tiny))
    assert isinstance(patched, trl.DPOTrainer) and type(patched).__name__ == "FusedDPOTrainer"
    assert_same_trl_logs(trl_train_logs(patched)[0], trl_train_logs(stock)[0])
    assert_same_weights(patched.model, stock.model, tiny["policy"])


def test_token_metrics_off_skips_entropy_and_token_accuracy(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = patch_dpo_trainer(make_trainer(trl.DPOTrainer, tiny), token_metrics=False)
    logs = trl_train_logs(trainer)[0]
    assert "entropy" not in logs and "mean_token_accuracy" not in logs
    assert {"loss", "rewards/margins", "logits/chosen", "logps/rejected"} <= set(logs)


def test_token_metrics_cost_no_extra_projection(tiny, monkeypatch):
    # Entropy and top-1 come out of the engine's pass over logits it computes anyway: with the metrics on, the
    # engine projects exactly the rows it projects with them off, and the lm_head weight meets no other GEMM.
    from dpo_kernels.fused_linear import engine
    from dpo_kernels.integrations import token_metrics as _token_metrics

    with_metrics = make_trainer(FusedDPOTrainer, tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = patch_dpo_trainer(make_trainer(trl.DPOTrainer, tiny), token_metrics=False)
    batch = next(iter(with_metrics.get_train_dataloader()))
    head = {with_metrics.model.lm_head.weight.data_ptr(), without.model.lm_head.weight.data_ptr()}
    projected, head_gemms = [], []
    project, linear = engine._project, torch.nn.functional.linear

    def counting_project(loop, h):
        projected.append(h.shape[0])
        return project(loop, h)

    def counting_linear(x, weight, bias=None):
        head_gemms.extend([1] if weight.data_ptr() in head else [])
        return linear(x, weight, bias)

    monkeypatch.setattr(engine, "_project", counting_project)
    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    _, _, logs = trl_loss_and_grads(with_metrics, batch)
    rows_with, projected[:] = sum(projected), []
    _, _, logs_without = trl_loss_and_grads(without, batch)
    assert {"entropy", "mean_token_accuracy"} <= set(logs) and "entropy" not in logs_without
    assert rows_with == sum(projected) > 0, "token metrics made the engine project more rows"
    assert not head_gemms, "token metrics ran a separate projection through the lm_head"
    # The spy sees the old separate pass, so the assertion above can fail.
    hidden = torch.randn(5, with_metrics.model.config.hidden_size)
    _token_metrics.token_sums(hidden, with_metrics.model.lm_head.weight, None, torch.zeros(5, dtype=torch.long),
                              torch.zeros(5, dtype=torch.long), 1, full=True)
    assert head_gemms


def test_token_metrics_match_stock_when_pairs_stream(tiny):
    # 4-token chunks: every pair streams (once into the empty accumulator, then twice), metrics from each pass.
    stock = make_trainer(trl.DPOTrainer, tiny)
    vocab = tiny["policy"].config.vocab_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = patch_dpo_trainer(make_trainer(trl.DPOTrainer, tiny), memory_budget=4 * vocab * 4)
    batch = next(iter(stock.get_train_dataloader()))
    got = trl_loss_and_grads(fused, batch)
    assert {"entropy", "mean_token_accuracy"} <= set(got[2])
    assert_same_trl_step(got, trl_loss_and_grads(stock, batch), "streamed")


@pytest.mark.parametrize("option", [{"ld_alpha": 0.5}, {"use_weighting": True},
                                    {"f_divergence_type": "js_divergence", "padding_free": True}])
def test_unsupported_option_falls_back_to_trl_with_one_warning(tiny, option):
    stock = make_trainer(trl.DPOTrainer, tiny, **option)
    with pytest.warns(UserWarning, match=next(iter(option))) as caught:
        fused = make_trainer(FusedDPOTrainer, tiny, quiet=False, **option)
    ours = [str(w.message) for w in caught if "dpo_kernels" in str(w.message)]
    assert len(ours) == 1
    if option.get("padding_free"):
        assert "padding_free is off" in ours[0] and not fused.padding_free
    assert_same_trl_logs(trl_train_logs(fused)[0], trl_train_logs(stock)[0])


def test_peft_policy_with_disabled_adapter_as_reference(tiny):
    peft = pytest.importorskip("peft", reason="PEFT is optional (pip install peft)")
    # Random (not zero) LoRA B, so that the policy differs from its adapter-free reference from the first step.
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    def build(cls):
        args = trl.DPOConfig(output_dir="/tmp/dpo_kernels_trl_test", report_to=[], save_strategy="no", use_cpu=True,
                             bf16=False, seed=0, disable_tqdm=True, per_device_train_batch_size=4, max_steps=1,
                             learning_rate=0.5, optim="sgd", logging_steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(model=copy.deepcopy(tiny["policy"]), args=args, train_dataset=tiny["data"],
                       processing_class=tiny["tok"], peft_config=peft.LoraConfig(**lora))

    stock, fused = build(trl.DPOTrainer), build(FusedDPOTrainer)
    assert fused.ref_model is None and not fused._dk_unsupported
    start = {n: p.detach().clone() for n, p in stock.model.named_parameters() if p.requires_grad}
    assert_same_trl_logs(trl_train_logs(fused)[0], trl_train_logs(stock)[0])
    got, want = dict(fused.model.named_parameters()), dict(stock.model.named_parameters())
    for name, before in start.items():
        assert_close(f"update of {name}", got[name].detach() - before, want[name].detach() - before)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_matches_stock(tiny, mode):
    # keep_end at max_length 8 cuts the prompt away, so completions start at position 0: TRL's ipo then divides by
    # one more token than is scored while its sft does not, which the drop-in reproduces.
    config = {"max_length": 8 if mode == "keep_end" else 12, "truncation_mode": mode, "loss_type": ["ipo", "sft"]}
    stock = make_trainer(trl.DPOTrainer, tiny, **config)
    fused = make_trainer(FusedDPOTrainer, tiny, **config)
    batch = next(iter(stock.get_train_dataloader()))
    assert batch["input_ids"].shape[1] <= config["max_length"]
    if mode == "keep_end":
        assert batch["completion_mask"][:, 0].any()
    assert_same_trl_step(trl_loss_and_grads(fused, batch), trl_loss_and_grads(stock, batch), "truncated")


def test_evaluate_matches_stock(tiny):
    stock = make_trainer(trl.DPOTrainer, tiny)
    fused = make_trainer(FusedDPOTrainer, tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = stock.evaluate(tiny["data"])
        got = fused.evaluate(tiny["data"])
    assert_same_trl_logs({k: v for k, v in got.items() if "runtime" not in k and "per_second" not in k},
                     {k: v for k, v in want.items() if "runtime" not in k and "per_second" not in k})


def test_triton_kernels_in_the_trainer_match_stock(tiny, force_backend):
    # The engine's Triton pass inside the trainer, padded and packed. Forced Triton needs CUDA tensors where there is
    # a GPU (the interpreter is on only without one), so there both trainers run on it: the tiny model costs seconds,
    # and it is the one test of the kernels inside a real trainer step on the device they are built for.
    force_backend("triton")
    on_cpu = {"use_cpu": device_for("triton").type == "cpu"}
    stock = make_trainer(trl.DPOTrainer, tiny, **on_cpu)
    batch = next(iter(stock.get_train_dataloader()))
    want = trl_loss_and_grads(stock, batch)
    for config in ({}, {"padding_free": True}):
        fused = make_trainer(FusedDPOTrainer, tiny, **on_cpu, **config)
        assert_same_trl_step(trl_loss_and_grads(fused, batch), want, f"triton {config}")


def test_unknown_logit_transform_falls_back_to_trl(tiny):
    from transformers import LlamaForCausalLM

    class ScaledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    policy = tiny["policy"]
    tiny = dict(tiny, policy=ScaledLogits(policy.config))
    tiny["policy"].load_state_dict(policy.state_dict())
    with pytest.warns(UserWarning, match="output head") as caught:
        fused = make_trainer(FusedDPOTrainer, tiny, quiet=False)
    assert fused._dk_unsupported and sum("dpo_kernels" in str(w.message) for w in caught) == 1
