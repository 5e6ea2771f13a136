"""One collated TRL batch as the fused engine sees it: padded `[R, T]` rows, the rows packed into `[1, N]` for
padding-free training, or the shared-prompt layout read back from TRL's rows."""
from __future__ import annotations

import torch

from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.hf import shared_attention_mask
from dpo_kernels.integrations.packing import next_token_labels, pack_rows
from dpo_kernels.shared_prompt.batch import SharedPromptBatch

__all__ = ["NON_MODEL_KEYS", "Layout", "shared_pairs", "split_inputs"]

# Keys of TRL's collated batch that the model's forward does not take.
NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


def split_inputs(inputs: dict) -> tuple[dict, torch.Tensor]:
    """`(model_kwargs, labels [R, T])` of TRL's collated batch: the labels are the completion tokens, IGNORE_INDEX
    on the prompt and padding."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    return model_kwargs, labels


class Layout:
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


def shared_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
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

