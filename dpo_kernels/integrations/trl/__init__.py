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
with one warning naming the option; with `strict=True` (or `DPO_KERNELS_STRICT=1`) every such fallback is an error
instead. The first step prints which paths it took (`dpo_kernels.paths`).

`share_prompt=True` runs each pair's prompt through the policy and the reference once (`dpo_kernels.shared_prompt`):
the pairs are read back from TRL's collated rows, so they hold exactly the tokens TRL's `max_length` /
`truncation_mode` keep, and laid out as one `[prompt | chosen | rejected]` row per pair (with `padding_free`, packed
pairs in one row), scored through the batch's attribution by the same fused engine. A model the layout cannot run
(outside `shared_prompt.SUPPORTED_MODELS`, flash-attention 2) trains on unshared rows with one warning; so does a
batch whose pair kept different prompt tokens in its two rows (`keep_end` truncation cuts rows of different lengths
at different places).

Modules: `trainer` (the two ways in), `mixin` (the overrides of TRL's step and reference pass), `layout` (a collated
batch as the engine sees it: padded, packed or shared-prompt), `loss` (TRL's loss settings), `metrics` (TRL's logged
metrics), `support` (what falls back to TRL). Each reads TRL's internals for one job, so a TRL release changes the
module of the job it touches.
"""
from __future__ import annotations

import warnings

try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL: pip install 'dpo_kernels[trl]' (trl>=1.16,<1.17)"
    ) from exc

from dpo_kernels.integrations.trl.mixin import FusedDPOMixin
from dpo_kernels.integrations.trl.trainer import FusedDPOTrainer, patch_dpo_trainer

__all__ = ["TESTED_TRL_VERSIONS", "FusedDPOMixin", "FusedDPOTrainer", "patch_dpo_trainer"]

TESTED_TRL_VERSIONS = ("1.16.0",)

if trl.__version__ not in TESTED_TRL_VERSIONS:
    warnings.warn(
        f"dpo_kernels.integrations.trl was tested with TRL {', '.join(TESTED_TRL_VERSIONS)}; found {trl.__version__}",
        stacklevel=2,
    )
