"""TRL drop-in: `FusedDPOTrainer` (a `trl.DPOTrainer`) and `patch_dpo_trainer(trainer)` for a built one.

The only change for a TRL user is the class name:

    from dpo_kernels.integrations.trl import FusedDPOTrainer as DPOTrainer

Everything else (DPOConfig, datasets, PEFT, callbacks, logging) is TRL's. What changes is how one step gets the
per-sequence log-probs and the loss: the backbone's last hidden states and the lm_head weight go to the fused linear
engine (no `[2B, T, V]` logits), the reference's log-probs come from the same engine under no_grad (or the
precomputed column), and the loss and rewards from `dpo_kernels.dpo_loss`. The logged metrics have TRL's names and
values (`logits/*` from one GEMV, without logits; `entropy` and `mean_token_accuracy` from the engine's own pass over
the logits it already computes, so a step stays 6·N·H·V; `token_metrics=False` does not log those two).

Honoured `DPOConfig` options: `loss_type` (one or a list, with `loss_weights`), `beta`, `label_smoothing` (where TRL
reads it: exo_pair, robust, aot, aot_unpaired), `discopop_tau`, `precompute_ref_log_probs`, a `ref_model`, a PEFT
policy whose disabled (or "ref") adapter is the reference, `max_length` / `truncation_mode` (TRL's collator),
gradient accumulation, `sync_ref_model`, gradient checkpointing, and `padding_free=True`, which TRL 1.16 turns off
and this trainer implements: rows are packed into one sequence with restarting `position_ids` and `cu_seqlens`.
Options it does not implement (`ld_alpha`, `f_divergence_type` other than reverse_kl, `use_weighting`, an MoE
router auxiliary loss, vision datasets, prompt-learning PEFT, soft-capped logits) make it use TRL's own computation,
with one warning naming the option.

`share_prompt=True` runs each pair's prompt through the policy and the reference once (`dpo_kernels.shared_prompt`):
the pairs are read back from TRL's collated rows, so they hold exactly the tokens TRL's `max_length` /
`truncation_mode` keep, and laid out as one `[prompt | chosen | rejected]` row per pair (with `padding_free`, packed
pairs in one row), scored through the batch's attribution by the same fused engine. A model the layout cannot run
(outside `shared_prompt.SUPPORTED_MODELS`, flash-attention 2) trains on unshared rows with one warning; so does a
batch whose pair kept different prompt tokens in its two rows (`keep_end` truncation cuts rows of different lengths
at different places).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

try:
    import trl
    from accelerate.utils import is_peft_model
    from datasets import Dataset, IterableDataset, concatenate_datasets
    from torch.utils.data import DataLoader
    from trl import DPOTrainer
    from trl.models import prepare_deepspeed
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL: pip install 'dpo_kernels[trl]' (trl>=1.16,<1.17)"
    ) from exc

import dpo_kernels
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import head_operands
from dpo_kernels.fused_linear.plan import parse_memory_budget
from dpo_kernels.integrations import hf
from dpo_kernels.integrations.head_forward import install_head_forward
from dpo_kernels.integrations.packing import next_token_labels, pack_rows
from dpo_kernels.integrations.token_metrics import token_sums, with_engine_stats
from dpo_kernels.loss_op.loss_types import LOSSES
from dpo_kernels.loss_op.spec import check_loss_settings
from dpo_kernels.shared_prompt import (
    SharedPromptBatch,
    SharedPromptUnsupported,
    build_shared_batch,
    check_shared_prompt_support,
    shared_attention_mask,
)

__all__ = ["TESTED_TRL_VERSIONS", "FusedDPOMixin", "FusedDPOTrainer", "patch_dpo_trainer"]

TESTED_TRL_VERSIONS = ("1.16.0",)

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


class _Layout:
    """One batch as the engine sees it: padded `[R, T]`, packed into `[1, N]` for padding-free training, or the
    shared-prompt rows (one `[prompt | chosen | rejected]` per pair, or packed pairs) scored through their
    attribution."""

    def __init__(self, model_kwargs: dict, labels: torch.Tensor, packed: bool,
                 shared: SharedPromptBatch | None = None):
        self.rows = labels.shape[0]
        self.shared = shared
        if shared is not None:
            model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("input_ids", "attention_mask")}
            model_kwargs.update(input_ids=shared.input_ids, position_ids=shared.position_ids)
            self.labels, self.cu_seqlens = shared.attribution, None
        elif packed:
            batch = pack_rows(model_kwargs["input_ids"], model_kwargs["attention_mask"], labels)
            model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("attention_mask", "position_ids")}
            model_kwargs.update(input_ids=batch.input_ids, position_ids=batch.position_ids)
            self.labels, self.cu_seqlens = batch.labels, batch.cu_seqlens
        else:
            self.labels, self.cu_seqlens = labels, None
        self.model_kwargs = model_kwargs

    def model_inputs(self, model) -> dict:
        """The keyword arguments of `model`'s forward; the shared-prompt mask depends on the model's attention
        implementation and sliding window, so the policy and the reference model each get their own."""
        if self.shared is None:
            return self.model_kwargs
        return {**self.model_kwargs, "attention_mask": shared_attention_mask(model, self.shared)}

    def flat_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1]) if self.cu_seqlens is not None else hidden

    def scored(self, hidden: torch.Tensor):
        """`(hidden [N, H], next_labels [N], row [N])` for `token_sums`; rows below `self.rows // 2` are chosen.

        The shared layout's last prompt position predicts the first token of both responses, so it is gathered
        once per scored label, as the unshared rows hold it twice."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.shared is None:
            next_labels, row = next_token_labels(self.labels, self.cu_seqlens)
            return flat, next_labels, row
        shared = self.shared
        return flat.detach().index_select(0, shared.token_rows), shared.token_targets, shared.token_seqs


def _shared_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """The `(prompt, chosen, rejected)` ids of TRL's collated rows, or a string saying why they cannot share.

    TRL's collator puts B chosen rows then B rejected rows, right-padded, each its prompt then its completion, cut
    by `max_length` / `truncation_mode` row by row. Reading the pairs back from those rows gives exactly the tokens
    TRL keeps. A pair shares its prompt only when both rows kept the same prompt tokens: `keep_end` cuts rows of
    different lengths at different places, and their responses then see different contexts.
    """
    ids, keep, completion = (t.tolist() for t in (input_ids, attention_mask, completion_mask))
    num_pairs = len(ids) // 2

    def split(r):
        n = sum(keep[r])
        mask = completion[r][:n]
        start = mask.index(1) if 1 in mask else n
        if keep[r][:n] != [1] * n or mask[start:] != [1] * (n - start):
            return None
        return ids[r][:start], ids[r][start:n]

    pairs = []
    for i in range(num_pairs):
        chosen, rejected = split(i), split(num_pairs + i)
        if chosen is None or rejected is None:
            return "a row is not one prompt then one completion, right-padded"
        if chosen[0] != rejected[0]:
            return ("the chosen and rejected rows of a pair keep different prompt tokens (truncation_mode="
                    "'keep_end' cuts rows of different lengths at different places)")
        pairs.append((chosen[0], chosen[1], rejected[1]))
    return pairs


@contextlib.contextmanager
def _fp32_sums(hidden: torch.Tensor):
    # token_sums' GEMV and entropy sums accumulate in fp32 on the head's operands; autocast would round them to bf16.
    with torch.autocast(hidden.device.type, enabled=False):
        yield


class FusedDPOMixin:
    """The overrides that make a `trl.DPOTrainer` (or a subclass of it) use dpo_kernels' fused engine.

    Model calls run under `accelerator.autocast()`: accelerate puts mixed precision into a wrapper around
    `model.forward`, and a model prepared before the fused forward was installed (TRL prepares the reference model
    in its __init__) would otherwise run the fused mode outside that wrapper.
    """

    def _dpo_kernels_setup(self) -> None:
        if getattr(self, "_dk_ready", False):
            return
        options = getattr(self, "_dk_options", {})
        self._dk_token_metrics = options.get("token_metrics", True)
        self._dk_memory_budget = parse_memory_budget(options.get("memory_budget"))
        self._dk_unsupported = self._dk_unsupported_options()
        share_prompt = options.get("share_prompt", False)
        self._dk_share_prompt = False
        self._dk_unshared_reasons = set()
        if self._dk_unsupported:
            names = "; ".join(self._dk_unsupported)
            padding_free = options.get("padding_free", self.args.padding_free)
            suffix = " (and TRL 1.16 pads the batches: padding_free is off)" if padding_free else ""
            shared = ", on unshared rows (share_prompt is off)" if share_prompt else ""
            warnings.warn(
                f"dpo_kernels: {names} is not supported by the fused engine; this trainer uses TRL's own "
                f"computation{shared} for every step{suffix}.",
                stacklevel=3,
            )
        else:
            install_head_forward(hf.unwrap_model(self.model))
            if self.ref_model is not None:
                install_head_forward(hf.unwrap_model(self.ref_model))
            self.padding_free = bool(self.args.padding_free)
            if share_prompt:
                problem = self._dk_shared_prompt_problem()
                if problem is not None:
                    warnings.warn(f"dpo_kernels: share_prompt=True cannot run here ({problem}); this trainer runs "
                                  "every step on unshared rows.", stacklevel=3)
                self._dk_share_prompt = problem is None
        self._dk_ready = True

    @property
    def _dk_padding_free(self) -> bool:
        return bool(self.args.padding_free)

    def _dk_unsupported_options(self) -> list[str]:
        args = self.args
        found = []
        if args.ld_alpha is not None:
            found.append(f"ld_alpha={args.ld_alpha}")
        if args.f_divergence_type != "reverse_kl":
            found.append(f"f_divergence_type={args.f_divergence_type!r}")
        if args.use_weighting:
            found.append("use_weighting=True")
        if getattr(self, "aux_loss_enabled", False):
            found.append("the MoE router auxiliary loss (router_aux_loss_coef)")
        if getattr(self, "_is_vision_dataset", False):
            found.append("a vision dataset")
        unknown = [name for name in self.loss_types if name not in dpo_kernels.LOSS_TYPES]
        if unknown:
            found.append(f"loss_type={unknown}")
        else:
            try:
                check_loss_settings(self.loss_types, beta=self.beta, label_smoothing=self._dk_label_smoothing(),
                                    loss_params=self._dk_params())
            except ValueError as exc:
                found.append(f"these loss settings ({exc})")
        model = self.model
        if is_peft_model(model):
            config = model.peft_config.get(model.active_adapter) if hasattr(model, "peft_config") else None
            if getattr(config, "is_prompt_learning", False):
                found.append("prompt-learning PEFT (virtual tokens)")
        for name, candidate in (("the policy", model), ("the reference model", self.ref_model)):
            if candidate is None:
                continue
            try:
                hf.output_head(candidate)
                self._dk_probe_head(candidate)
            except ValueError as exc:
                found.append(f"{name}'s output head ({exc})")
        return found

    def _dk_probe_head(self, model) -> None:
        """One 8-token forward both ways: an architecture whose logits are not `h @ W^T + b` falls back to TRL."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled() or getattr(self, "is_fsdp_enabled", False):
            return  # sharded parameters cannot run a forward outside the engine here
        weight, _ = hf.output_head(model)
        ids = (torch.arange(8, device=weight.device) * 7919 % weight.shape[0]).unsqueeze(0)
        with self.accelerator.autocast():
            hf.check_output_head(model, ids)

    def _dk_shared_prompt_problem(self) -> str | None:
        """Why no step of this trainer can share prompts (the model's class or attention), or None."""
        for name, model in (("the policy", self.model), ("the reference model", self.ref_model)):
            if model is None:
                continue
            try:
                check_shared_prompt_support(model)
            except SharedPromptUnsupported as exc:
                return f"{name}: {exc}"
        return None

    def _dk_shared_batch(self, inputs) -> SharedPromptBatch | None:
        """The shared-prompt layout of one collated batch, or None for unshared rows (share_prompt off, or a batch
        that cannot share: warned once per reason)."""
        if not self._dk_share_prompt:
            return None
        extra = sorted(set(inputs) - _NON_MODEL_KEYS - {"input_ids", "attention_mask"})
        if extra:
            reason = f"the batch carries {extra}, which have no place in the shared-prompt rows"
        else:
            pairs = _shared_pairs(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            if not isinstance(pairs, str):
                return build_shared_batch(pairs, pad_id=self._dk_pad_id(), pack=self._dk_padding_free,
                                          device=inputs["input_ids"].device)
            reason = pairs
        if reason not in self._dk_unshared_reasons:
            self._dk_unshared_reasons.add(reason)
            warnings.warn(f"dpo_kernels: share_prompt: {reason}; such batches run on unshared rows (warned once).",
                          stacklevel=4)
        return None

    def _dk_pad_id(self) -> int:
        # Padding is never attended to by real tokens nor scored; TRL's pad token keeps the ids in the vocabulary.
        pad = getattr(getattr(self, "_tokenizer", None), "pad_token_id", None)
        return 0 if pad is None else pad

    def _dk_label_smoothing(self) -> list[float]:
        return [self.label_smoothing if LOSSES[name].trl_smoothed else 0.0 for name in self.loss_types]

    def _dk_params(self) -> dict:
        return {"loss_weights": list(self.loss_weights), "tau": self.args.discopop_tau}

    # -- reference log-probs -------------------------------------------------------------------------------------

    def _dk_logps(self, model, layout: _Layout) -> torch.Tensor:
        def head_fn(hidden, weight, bias):
            return dpo_kernels.linear_sequence_logprobs(layout.flat_hidden(hidden), weight, layout.labels, bias=bias,
                                                        cu_seqlens=layout.cu_seqlens,
                                                        memory_budget=self._dk_memory_budget)

        with self.accelerator.autocast():
            return model(**layout.model_inputs(model), dpo_kernels_head_fn=head_fn)

    def _dk_reference_logps(self, layout: _Layout):
        ref_kwargs = {k: v for k, v in layout.model_kwargs.items() if k != "output_router_logits"}
        layout.model_kwargs = ref_kwargs
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter):
                    logps = self._dk_logps(self.model, layout)
            else:
                logps = self._dk_logps(self.ref_model, layout)
        return logps.chunk(2, dim=0)

    def compute_ref_log_probs(self, model, inputs):
        """TRL's precompute hook, through the fused engine (same values, no logits)."""
        self._dpo_kernels_setup()
        if self._dk_unsupported:
            return super().compute_ref_log_probs(model, inputs)
        model_kwargs, labels = self._dk_model_inputs(inputs)
        layout = _Layout(model_kwargs, labels, self._dk_padding_free, self._dk_shared_batch(inputs))
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = "ref" if "ref" in unwrapped.peft_config else None
            adapter_context = use_adapter(unwrapped, adapter_name=adapter)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            logps = self._dk_logps(model, layout)
        return logps.chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """TRL's precompute, across processes: each process scores its share of the batches (accelerate's sharded
        loader), one gather per batch gives every process all the log-probs in the dataset's order, and each process
        adds them to `dataset` as two float32 columns in memory.

        TRL 1.16 has the main process write them to a cache file that every process then reads; for a dataset held
        in memory, `datasets` names that file in a temporary directory private to each process, so the others fail
        to open it. One process keeps TRL's path, and its cache file.
        """
        if self.accelerator.num_processes == 1 or isinstance(dataset, IterableDataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        ))
        if self.ref_model is None and self.is_deepspeed_enabled:
            # The model is not prepared yet: ZeRO keeps its parameters on the CPU or sharded (as in TRL).
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in loader:
            # gather_for_metrics drops the rows that even_batches repeats to fill the last processes' batches.
            logps = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(logps[0].float().cpu())
            rejected.append(logps[1].float().cpu())
        columns = Dataset.from_dict({"ref_chosen_logps": torch.cat(chosen).numpy(),
                                     "ref_rejected_logps": torch.cat(rejected).numpy()})
        return concatenate_datasets([dataset, columns], axis=1)

    # -- the loss ------------------------------------------------------------------------------------------------

    @staticmethod
    def _dk_model_inputs(inputs):
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        return model_kwargs, labels

    def _dk_lengths(self, completion_mask: torch.Tensor):
        # TRL divides ipo / sigmoid_norm by completion_mask.sum() (unshifted) but averages sft over the shifted
        # mask; the two differ only when a completion starts at position 0. One dpo_loss call takes one length, so
        # such batches compute each loss type with its own length.
        unshifted = completion_mask.sum(dim=1).float()
        shifted = completion_mask[:, 1:].sum(dim=1).float()
        names = set(self.loss_types)
        unshifted_loss = any(LOSSES[n].trl_unshifted_lengths for n in names)
        if "sft" in names and unshifted_loss and not torch.equal(unshifted, shifted):
            return None
        return shifted if "sft" in names else unshifted

    def _dk_fused_loss(self, completion_mask: torch.Tensor):
        """The fast path (gradients formed in the forward, 6NHV) when its lengths are TRL's, else None.

        `FusedLinearDPOLoss` hands length-normalized losses the number of scored tokens, which is TRL's
        `completion_mask.sum()` unless a completion starts at position 0 (its first token is never scored).
        """
        if any(LOSSES[n].trl_unshifted_lengths for n in self.loss_types) and completion_mask[:, 0].any():
            return None
        return dpo_kernels.FusedLinearDPOLoss(
            beta=self.beta, loss_type=list(self.loss_types), label_smoothing=self._dk_label_smoothing(),
            memory_budget=self._dk_memory_budget, token_stats=self._dk_token_metrics, **self._dk_params(),
        )

    def _dk_loss(self, policy_logps, ref_chosen, ref_rejected, completion_mask):
        chosen, rejected = policy_logps.chunk(2, dim=0)
        lengths = self._dk_lengths(completion_mask)
        params = self._dk_params()
        smoothing = self._dk_label_smoothing()
        if lengths is not None:
            lc, lr = lengths.chunk(2, dim=0)
            return dpo_kernels.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                        loss_type=list(self.loss_types), label_smoothing=smoothing,
                                        chosen_lengths=lc, rejected_lengths=lr, **params)
        total = None
        unshifted, shifted = completion_mask.sum(dim=1).float(), completion_mask[:, 1:].sum(dim=1).float()
        for name, weight, eps in zip(self.loss_types, self.loss_weights, smoothing, strict=True):
            lc, lr = (shifted if name == "sft" else unshifted).chunk(2, dim=0)
            out = dpo_kernels.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=name,
                                       label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
                                       tau=params["tau"])
            total = out._replace(loss=out.loss * weight) if total is None else total._replace(
                loss=total.loss + out.loss * weight)
        return total

    def _compute_loss(self, model, inputs, return_outputs):
        self._dpo_kernels_setup()
        if self._dk_unsupported:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_kwargs, labels = self._dk_model_inputs(inputs)
        rows = labels.shape[0]
        shared = self._dk_shared_batch(inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._dk_reference_logps(_Layout(dict(model_kwargs), labels,
                                                                        self._dk_padding_free, shared))
        layout = _Layout(model_kwargs, labels, self._dk_padding_free, shared)

        fused = self._dk_fused_loss(completion_mask)

        def head_fn(hidden, weight, bias):
            # Cast once to the dtype the engine computes in (the autocast dtype inside autocast): the token metrics
            # below read the same operands, and the engine takes them as they are.
            flat, weight, bias = head_operands(layout.flat_hidden(hidden), weight, bias)
            if fused is not None:
                result = fused(flat, weight, layout.labels, bias=bias, cu_seqlens=layout.cu_seqlens,
                               ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
            else:
                result = dpo_kernels.linear_sequence_logprobs(flat, weight, layout.labels, bias=bias,
                                                              cu_seqlens=layout.cu_seqlens,
                                                              memory_budget=self._dk_memory_budget)
            # The fused engine already returned entropy and top-1 sums; only the other path needs the extra pass.
            scored, next_labels, row = layout.scored(flat)
            with _fp32_sums(flat):
                sums = token_sums(scored, weight, bias, next_labels, row, rows // 2,
                                  full=self._dk_token_metrics and fused is None)
            if fused is not None and self._dk_token_metrics:
                sums = with_engine_stats(sums, result)
            return result, sums

        with self.accelerator.autocast():
            result, sums = model(**layout.model_inputs(model), dpo_kernels_head_fn=head_fn)
        if fused is not None:
            out, policy_logps = result, torch.cat([result.chosen_logps, result.rejected_logps])
        else:
            policy_logps = result
            out = self._dk_loss(policy_logps, ref_chosen, ref_rejected, completion_mask)
        self._dk_log_metrics(mode, inputs, policy_logps, out, sums)
        loss = out.loss
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (as TRL does).",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _dk_log_metrics(self, mode, inputs, policy_logps, out, sums) -> None:
        gather_sum = lambda x: self.accelerator.gather_for_metrics(x).sum()  # noqa: E731
        metrics = self._metrics[mode]
        if sums.entropy_sum is not None:
            total = gather_sum(sums.chosen_tokens + sums.rejected_tokens)
            entropy = gather_sum(sums.entropy_sum)
            metrics["entropy"].append((entropy / total).item() if total > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_tokens, rejected_tokens = gather_sum(sums.chosen_tokens).item(), gather_sum(sums.rejected_tokens).item()
        chosen_logits, rejected_logits = gather_sum(sums.chosen_logit_sum).item(), gather_sum(
            sums.rejected_logit_sum).item()
        metrics["logits/chosen"].append(chosen_logits / chosen_tokens if chosen_tokens > 0 else 0.0)
        metrics["logits/rejected"].append(rejected_logits / rejected_tokens if rejected_tokens > 0 else 0.0)
        if sums.chosen_top1 is not None:
            correct = gather_sum(sums.chosen_top1)
            metrics["mean_token_accuracy"].append((correct / chosen_tokens).item() if chosen_tokens > 0 else 0.0)
        chosen_rewards = self.accelerator.gather(out.chosen_rewards)
        rejected_rewards = self.accelerator.gather(out.rejected_rewards)
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        chosen_logps, rejected_logps = policy_logps.detach().chunk(2, dim=0)
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps).mean().item())


class FusedDPOTrainer(FusedDPOMixin, DPOTrainer):
    """`trl.DPOTrainer` with the fused linear log-prob engine and the fused DPO loss; same arguments, plus:

    Args:
        token_metrics: log `entropy` and `mean_token_accuracy` as TRL does, from the fused engine's pass over
            the logits (no extra GEMM; the rare steps that cannot use the fused loss, an ipo/sigmoid_norm batch
            whose completion starts at position 0, take one extra no-grad pass); False does not log them.
        memory_budget: the fused engine's `[C, V]` logits buffer in bytes, or "low" for the recompute path
            (`dpo_kernels.FusedLinearDPOLoss`); None is its default (2 GiB, C <= 8192 tokens).
        share_prompt: run each pair's prompt through the policy and the reference once, in one
            `[prompt | chosen | rejected]` row (`dpo_kernels.shared_prompt`; with `padding_free`, several pairs per
            row), for the same numbers. A model outside `shared_prompt.SUPPORTED_MODELS` or not on eager, SDPA or
            FlexAttention runs unshared rows, with one warning; so does a batch whose pairs kept different prompt
            tokens in their two rows (`truncation_mode="keep_end"`).
    """

    def __init__(self, *args, token_metrics: bool = True, memory_budget: int | str | None = None,
                 share_prompt: bool = False, **kwargs):
        parse_memory_budget(memory_budget)  # a bad value fails here, before TRL's setup
        _check_share_prompt(share_prompt)
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        # TRL 1.16 switches padding_free off with a warning during its __init__; this trainer implements it, so keep
        # the flag out of TRL's sight and restore it once TRL is set up.
        padding_free = bool(getattr(config, "padding_free", False))
        self._dk_options = {"token_metrics": token_metrics, "memory_budget": memory_budget,
                            "padding_free": padding_free, "share_prompt": share_prompt}
        if padding_free:
            config.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if padding_free:
                config.padding_free = True
        self._dpo_kernels_setup()
        self.padding_free = padding_free and not self._dk_unsupported


def _check_share_prompt(share_prompt) -> None:
    if not isinstance(share_prompt, bool):
        raise ValueError(f"share_prompt must be True or False, got {share_prompt!r}")


def patch_dpo_trainer(trainer: DPOTrainer, *, token_metrics: bool = True,
                      memory_budget: int | str | None = None, share_prompt: bool = False) -> DPOTrainer:
    """Turns an already-built `trl.DPOTrainer` (or subclass) into a fused one, in place; returns it. The options
    are `FusedDPOTrainer`'s.

    Reference log-probs that TRL already precomputed are kept (they are the same numbers).
    """
    if not isinstance(trainer, DPOTrainer):
        raise ValueError(f"patch_dpo_trainer expects a trl.DPOTrainer, got {type(trainer).__name__}")
    parse_memory_budget(memory_budget)
    _check_share_prompt(share_prompt)
    if not isinstance(trainer, FusedDPOMixin):
        cls = type(trainer)
        trainer.__class__ = type(f"Fused{cls.__name__}", (FusedDPOMixin, cls), {})
    trainer._dk_options = {"token_metrics": token_metrics, "memory_budget": memory_budget,
                           "share_prompt": share_prompt}
    trainer._dk_ready = False
    trainer._dpo_kernels_setup()
    return trainer


if trl.__version__ not in TESTED_TRL_VERSIONS:
    warnings.warn(
        f"dpo_kernels.integrations.trl was tested with TRL {', '.join(TESTED_TRL_VERSIONS)}; found {trl.__version__}",
        stacklevel=2,
    )
