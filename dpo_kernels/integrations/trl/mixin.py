"""`FusedDPOMixin`: the overrides that route a `trl.DPOTrainer` step through the fused engine.

The step reads TRL's collated batch (`layout`), TRL's loss settings (`loss`) and writes TRL's metrics (`metrics`);
what it cannot run goes to TRL's own computation (`support`).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch.utils.data import DataLoader
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

import dpo_kernels
from dpo_kernels import hf, paths
from dpo_kernels.fused_linear.functional import head_operands, lora_operands
from dpo_kernels.fused_linear.plan import parse_memory_budget
from dpo_kernels.hf.head_forward import install_head_forward
from dpo_kernels.integrations.token_metrics import token_sums, with_engine_stats
from dpo_kernels.integrations.trl.layout import NON_MODEL_KEYS, Layout, shared_pairs, split_inputs
from dpo_kernels.integrations.trl.loss import TrlLossSettings
from dpo_kernels.integrations.trl.metrics import fp32_sums, log_metrics
from dpo_kernels.integrations.trl.support import shared_prompt_problem, unsupported_options
from dpo_kernels.shared_prompt.batch import SharedPromptBatch, build_shared_batch

__all__ = ["FusedDPOMixin"]


def _has_lora_head(model) -> bool:
    """Whether a PEFT adapter layer wraps the lm_head (what TRL 1.16's own `__init__` refuses)."""
    inner = hf.unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return hasattr(head, "base_layer")


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
        self._dk_strict = options.get("strict", False)
        self._dk_paths_logged = False
        self.dpo_kernels_paths = []  # the first step's `PathRecord`s, kept when it has run
        self._dk_fallbacks = []
        share_prompt = options.get("share_prompt", False)
        self._dk_share_prompt = False
        self._dk_unshared_reasons = set()
        with paths.strict_mode(self._dk_strict):
            self._dk_unsupported = unsupported_options(self)
            if self._dk_unsupported and _has_lora_head(self.model):
                raise ValueError(f"dpo_kernels: the policy's lm_head carries a LoRA adapter, which TRL's own "
                                 f"computation ignores, and this trainer cannot run {'; '.join(self._dk_unsupported)} "
                                 "fused; remove 'lm_head' from target_modules or those settings")
            if self._dk_unsupported:
                names = "; ".join(self._dk_unsupported)
                padding_free = options.get("padding_free", self.args.padding_free)
                suffix = " (and TRL 1.16 pads the batches: padding_free is off)" if padding_free else ""
                shared = ", on unshared rows (share_prompt is off)" if share_prompt else ""
                message = (f"dpo_kernels: {names} is not supported by the fused engine; this trainer uses TRL's own "
                           f"computation{shared} for every step{suffix}.")
                self._dk_fallbacks.append(paths.fallback(paths.FUSED_TO_TRL, names, message, warn=message,
                                                         stacklevel=3))
            else:
                install_head_forward(hf.unwrap_model(self.model))
                if self.ref_model is not None:
                    install_head_forward(hf.unwrap_model(self.ref_model))
                self.padding_free = bool(self.args.padding_free)
                problem = shared_prompt_problem(self) if share_prompt else None
                if problem is not None:
                    who, exc = problem
                    cause = f"{who} ({exc.model})" if exc.model else who
                    message = (f"dpo_kernels: share_prompt=True cannot run here ({who}: {exc}); this trainer runs "
                               "every step on unshared rows.")
                    self._dk_fallbacks.append(paths.fallback(paths.SHARED_TO_UNSHARED, cause, message, warn=message,
                                                             stacklevel=3))
                self._dk_share_prompt = share_prompt and problem is None
        self._dk_ready = True

    @property
    def _dk_padding_free(self) -> bool:
        return bool(self.args.padding_free)

    def _dk_shared_batch(self, inputs) -> tuple[SharedPromptBatch | None, tuple]:
        """The shared-prompt layout of one collated batch, or None for unshared rows (share_prompt off, or a batch
        that cannot share: a fallback, warned once per reason); and the batch's fallbacks."""
        if not self._dk_share_prompt:
            return None, ()
        extra = sorted(set(inputs) - NON_MODEL_KEYS - {"input_ids", "attention_mask"})
        if extra:
            reason = f"the batch carries {extra}, which have no place in the shared-prompt rows"
        else:
            pairs = shared_pairs(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            if not isinstance(pairs, str):
                return build_shared_batch(pairs, pad_id=self._dk_pad_id(), pack=self._dk_padding_free,
                                          device=inputs["input_ids"].device), ()
            reason = pairs
        message = f"dpo_kernels: share_prompt: {reason}; such batches run on unshared rows (warned once)."
        warn = None if reason in self._dk_unshared_reasons else message
        self._dk_unshared_reasons.add(reason)
        return None, (paths.fallback(paths.SHARED_TO_UNSHARED, reason, message, warn=warn, stacklevel=5),)

    def _dk_record(self, shared: SharedPromptBatch | None, batch_fallbacks: tuple = ()) -> None:
        """The drop-in's own `PathRecord` of a step or a reference pass: shared prompt or not, every fallback."""
        paths.record(paths.PathRecord("trl", shared_prompt=shared is not None,
                                      fallbacks=(*self._dk_fallbacks, *batch_fallbacks)))

    def _dk_pad_id(self) -> int:
        # Padding is never attended to by real tokens nor scored; TRL's pad token keeps the ids in the vocabulary.
        pad = getattr(getattr(self, "_tokenizer", None), "pad_token_id", None)
        return 0 if pad is None else pad

    # -- reference log-probs -------------------------------------------------------------------------------------

    def _dk_logps(self, model, layout: Layout) -> torch.Tensor:
        def head_fn(hidden, weight, bias, lora):
            return dpo_kernels.linear_sequence_logprobs(layout.flat_hidden(hidden), weight, layout.labels, bias=bias,
                                                        cu_seqlens=layout.cu_seqlens,
                                                        memory_budget=self._dk_memory_budget, lora=lora)

        with self.accelerator.autocast():
            return model(**layout.model_inputs(model), dpo_kernels_head_fn=head_fn)

    def _dk_reference_logps(self, layout: Layout):
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
        with paths.strict_mode(self._dk_strict):
            if self._dk_unsupported:
                self._dk_record(None)
                return super().compute_ref_log_probs(model, inputs)
            return self._dk_reference_pass(model, inputs)

    def _dk_reference_pass(self, model, inputs):
        model_kwargs, labels = split_inputs(inputs)
        shared, batch_fallbacks = self._dk_shared_batch(inputs)
        self._dk_record(shared, batch_fallbacks)
        layout = Layout(model_kwargs, labels, self._dk_padding_free, shared)
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

    # -- the step ------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        """One step, in strict mode if asked; the first one prints which paths it took (`dpo_kernels.paths`) and
        keeps their records as `dpo_kernels_paths`."""
        self._dpo_kernels_setup()
        with paths.strict_mode(self._dk_strict), paths.collect() as records:
            if self._dk_unsupported:
                self._dk_record(None)
                result = super()._compute_loss(model, inputs, return_outputs)
            else:
                result = self._dk_step(model, inputs, return_outputs)
        if not self._dk_paths_logged:
            self._dk_paths_logged = True
            self.dpo_kernels_paths = records
            for line in paths.summary_lines(records):
                self.accelerator.print(f"dpo_kernels path: {line}")
        return result

    def _dk_step(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_kwargs, labels = split_inputs(inputs)
        rows = labels.shape[0]
        shared, batch_fallbacks = self._dk_shared_batch(inputs)
        self._dk_record(shared, batch_fallbacks)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._dk_reference_logps(Layout(dict(model_kwargs), labels,
                                                                       self._dk_padding_free, shared))
        layout = Layout(model_kwargs, labels, self._dk_padding_free, shared)

        settings = TrlLossSettings.of(self)
        fused = settings.fused_loss(completion_mask, memory_budget=self._dk_memory_budget,
                                    token_stats=self._dk_token_metrics)

        def head_fn(hidden, weight, bias, lora):
            # Cast once to the dtype the engine computes in (the autocast dtype inside autocast): the token metrics
            # below read the same operands, and the engine takes them as they are.
            flat, weight, bias = head_operands(layout.flat_hidden(hidden), weight, bias)
            lora = lora_operands(lora)
            if fused is not None:
                result = fused(flat, weight, layout.labels, bias=bias, cu_seqlens=layout.cu_seqlens,
                               ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, lora=lora)
            else:
                result = dpo_kernels.linear_sequence_logprobs(flat, weight, layout.labels, bias=bias,
                                                              cu_seqlens=layout.cu_seqlens,
                                                              memory_budget=self._dk_memory_budget, lora=lora)
            # The fused engine already returned entropy and top-1 sums; only the other path needs the extra pass.
            scored, next_labels, row = layout.scored(flat)
            with fp32_sums(flat):
                sums = token_sums(scored, weight, bias, next_labels, row, rows // 2,
                                  full=self._dk_token_metrics and fused is None, lora=lora)
            if fused is not None and self._dk_token_metrics:
                sums = with_engine_stats(sums, result)
            return result, sums

        with self.accelerator.autocast():
            result, sums = model(**layout.model_inputs(model), dpo_kernels_head_fn=head_fn)
        if fused is not None:
            out, policy_logps = result, torch.cat([result.chosen_logps, result.rejected_logps])
        else:
            policy_logps = result
            out = settings.loss(policy_logps, ref_chosen, ref_rejected, completion_mask)
        log_metrics(self, mode, inputs, policy_logps, out, sums)
        loss = out.loss
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (as TRL does).",
                FutureWarning,
                stacklevel=3,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss
