"""The full-step comparison of ranked groups against their expansion into pairs (`dpo-kernels bench --ops group`).

G prompts of P tokens, each with K ranked R-token responses (best first), at K = 4 and 8 and P:R = 1:1 and 4:1.
One step = the policy backbone (an HF Llama built from a config, random weights) + the head's loss + the backward,
with the reference log-probs precomputed (fixed numbers, one per response), as `--precompute-ref` trains. Layouts:

    a  pairs            the M = C(K, 2) pairs of each group as unshared rows, chosen rows then rejected rows:
                        [2GM, P + R], sigmoid DPO (what TRL users train on such lists today)
    b  shared pairs     the same pairs in the shared-prompt layout: [GM, P + 2R], sigmoid DPO
    c  group            one row per group: [G, P + KR], `fused_linear_group_dpo` all_pairs with sigmoid pairs
                        (the mean over a group's pairs, then over groups: at one K per batch, the same objective as
                        a and b), and plackett_luce on the same row
    d  group by prompt  the pairs of a regrouped by prompt, each distinct response once: the row of c, and sigmoid
                        DPO on the given pairs (`fused_linear_dpo_by_prompt`: the loss of a, exactly)

The ideal ratio of a layout is a's backbone positions over its own, 2M(P + R) / (P + KR) for c and d (attention
grows faster than linearly, so long rows can beat it; the head scores 2GMR tokens in a and b, GKR in c and d).
Reported per layout: median step time, backbone positions (padding included), real tokens, the activation bytes
autograd saves, the peak extra memory (CUDA only, as in the shared-prompt bench), the step's loss, and the measured
ratio beside the ideal one. CPU: a tiny model; CUDA: a Llama-3.2-1B-shaped config in bf16 autocast, with SDPA and
with FlexAttention.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from dpo_kernels.bench import report
from dpo_kernels.bench.shared_prompt import (
    ModelShape,
    StepSetting,
    config_line,
    mib,
    saved_activation_bytes,
    unshared_batch,
)
from dpo_kernels.bench.timing import release_memory, time_step
from dpo_kernels.fused_linear.by_prompt import fused_linear_dpo_by_prompt
from dpo_kernels.fused_linear.functional import fused_linear_dpo
from dpo_kernels.fused_linear.group import fused_linear_group_dpo
from dpo_kernels.hf import backbone_hidden_states, output_head, shared_backbone_hidden_states
from dpo_kernels.shared_prompt.batch import build_shared_batch
from dpo_kernels.shared_prompt.groups import GroupBatch, build_group_batch

GROUP_SIZES = (4, 8)
RATIOS = (1, 4)
LAYOUTS = ("a pairs", "b shared pairs", "c group all_pairs", "c group plackett_luce", "d group by prompt")
_GROUP_LOSSES = {"c group all_pairs": {"loss_type": "all_pairs"},
                 "c group plackett_luce": {"loss_type": "plackett_luce"}}


@dataclass(frozen=True)
class Pairs:
    """Preference pairs `(prompt, chosen, rejected)` and each side's response in the numbering of `groups`.

    Attributes:
        pairs: the pairs as token lists.
        groups: `(prompt, [response, ...])` with each distinct response of a prompt once, in first-seen order.
        chosen, rejected: `[B]` int64, each pair's responses as sequences of `build_group_batch(groups)`.
    """

    pairs: list
    groups: list
    chosen: torch.Tensor
    rejected: torch.Tensor


def make_groups(groups: int, size: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list:
    """`groups` random `(prompt_ids, [response_ids] * size)`, responses best first."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [(ids(prompt), [ids(response) for _ in range(size)]) for _ in range(groups)]


def all_pairs(groups: list) -> list:
    """Every ordered pair of each group (response i ranked above j), as `(prompt, chosen, rejected)`."""
    return [(p, responses[i], responses[j]) for p, responses in groups
            for i, j in combinations(range(len(responses)), 2)]


def group_by_prompt(pairs: list) -> Pairs:
    """The pairs regrouped: one group per distinct prompt holding each distinct response once, and where each
    pair's chosen and rejected response sit in that grouping."""
    prompts: dict = {}
    for prompt, chosen, rejected in pairs:
        responses = prompts.setdefault(tuple(prompt), {})
        for ids in (chosen, rejected):
            responses.setdefault(tuple(ids), len(responses))
    starts, total = {}, 0
    for prompt, responses in prompts.items():
        starts[prompt], total = total, total + len(responses)
    index = [(starts[tuple(p)] + prompts[tuple(p)][tuple(c)], starts[tuple(p)] + prompts[tuple(p)][tuple(r)])
             for p, c, r in pairs]
    groups = [(list(p), [list(ids) for ids in responses]) for p, responses in prompts.items()]
    chosen, rejected = (torch.tensor(side, dtype=torch.long) for side in zip(*index, strict=True))
    return Pairs(pairs=list(pairs), groups=groups, chosen=chosen, rejected=rejected)


def reference_logps(groups: list, seed: int = 1) -> torch.Tensor:
    """`[R]` fixed reference log-probs, one per response of `groups` (sequence order), about -2 per token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(r) for _, responses in groups for r in responses], dtype=torch.float32)
    return -2.0 * lengths + torch.randn(lengths.shape, generator=g)


def _group_head_loss(hidden, weight, bias, batch: GroupBatch, ref_logps, *, loss_type="all_pairs", pairs=None):
    """The head's loss on a group batch, on the fused engine: `fused_linear_group_dpo` (`loss_type`, sigmoid pairs),
    or with `pairs` (host `(chosen, rejected)` response indices) `fused_linear_dpo_by_prompt`, sigmoid DPO on those
    pairs of responses."""
    if pairs is not None:
        return fused_linear_dpo_by_prompt(hidden, weight, batch.attribution, batch.sizes, pairs, bias=bias,
                                          ref_logps=ref_logps).loss
    return fused_linear_group_dpo(hidden, weight, batch.attribution, batch.sizes, bias=bias, ref_logps=ref_logps,
                                  loss_type=loss_type, pair_loss="sigmoid").loss


@dataclass(frozen=True)
class Step:
    """One layout's training step (`step()`: loss, backward, zero the grads), its loss alone (`loss()`), the
    backbone positions (padding included) and the real tokens it runs."""

    step: object
    loss: object
    positions: int
    tokens: int


def step_of(model, layout: str, groups: list, device, autocast_dtype) -> Step:
    """The step of `layout` (one of LAYOUTS) on `groups`, with the reference log-probs of `reference_logps`."""
    pairs = group_by_prompt(all_pairs(groups))
    ref = reference_logps(pairs.groups).to(device)
    chosen, rejected = pairs.chosen.to(device), pairs.rejected.to(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    if layout in ("a pairs", "b shared pairs"):
        if layout == "a pairs":
            input_ids, labels = unshared_batch(pairs.pairs, device)
            positions = input_ids.numel()
            tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs.pairs)

            def forward():
                return backbone_hidden_states(model, input_ids), labels
        else:
            batch = build_shared_batch(pairs.pairs, device=device)
            positions, tokens = batch.num_positions, int((batch.document_ids >= 0).sum())

            def forward():
                return shared_backbone_hidden_states(model, batch), batch.attribution

        def head(hidden, weight, bias, scored):
            return fused_linear_dpo(hidden, weight, scored, bias=bias, ref_chosen_logps=ref[chosen],
                                    ref_rejected_logps=ref[rejected]).loss
    else:
        # c runs the groups as given; d the groups rebuilt from the pairs (the same ones unless a group repeats a
        # response, which d holds once).
        by_prompt = layout == "d group by prompt"
        rows = pairs.groups if by_prompt else groups
        batch = build_group_batch(rows, device=device)
        positions, tokens = batch.num_positions, int((batch.document_ids >= 0).sum())
        rows_ref = reference_logps(rows).to(device)
        host_pairs = list(zip(pairs.chosen.tolist(), pairs.rejected.tolist(), strict=True))
        settings = {"pairs": host_pairs} if by_prompt else _GROUP_LOSSES[layout]

        def forward():
            return shared_backbone_hidden_states(model, batch), batch

        def head(hidden, weight, bias, scored):
            return _group_head_loss(hidden, weight, bias, scored, rows_ref, **settings)

    def loss():
        with autocast:
            hidden, scored = forward()
            weight, bias = output_head(model)
            return head(hidden, weight, bias, scored)

    def step():
        loss().backward()
        model.zero_grad(set_to_none=True)

    return Step(step=step, loss=loss, positions=positions, tokens=tokens)


def _measure(model, layout, groups, device, autocast_dtype, iterations) -> dict:
    s = step_of(model, layout, groups, device, autocast_dtype)
    try:
        m = time_step(s.step, device, warmup=iterations[0], iters=iterations[1])
        saved = saved_activation_bytes(s.loss)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss = s.loss().item()
    except torch.cuda.OutOfMemoryError:
        m = saved = loss = None
    finally:
        model.zero_grad(set_to_none=True)
        release_memory(device)
    cuda = device.type == "cuda"
    return {"layout": layout, "positions": s.positions, "tokens": s.tokens, "ms": m and m.median_ms,
            "saved_bytes": saved, "peak_bytes": m.peak_extra_bytes if m and cuda else None, "loss": loss}


def run(out_dir: str, device: torch.device, *, shape: ModelShape | None = None, groups: int | None = None,
        response: int | None = None, sizes=GROUP_SIZES, ratios=RATIOS, attentions=None, layouts=LAYOUTS,
        dtype: torch.dtype | None = None, iterations=(2, 7)) -> dict:
    """Times every layout at each K and P:R; writes groups.json and groups.md into `out_dir`."""
    setting = StepSetting.on(device, shape, attentions, dtype)
    shape, dtype, autocast_dtype = setting.shape, setting.dtype, setting.autocast_dtype
    groups = groups or 1
    response = response or (128 if device.type == "cuda" else 16)
    rows = []
    for attention, model in setting.models(device, max(ratios) * response + 2 * response):
        for K in sizes:
            for ratio in ratios:
                prompt = ratio * response
                data = make_groups(groups, K, prompt, response, shape.vocab)
                measured = [_measure(model, layout, data, device, autocast_dtype, iterations) for layout in layouts]
                base = next(m for m in measured if m["layout"] == "a pairs")
                for m in measured:
                    rows.append({"attention": attention, "K": K, "ratio": f"{ratio}:1", "prompt": prompt,
                                 "response": response, "groups": groups, **m,
                                 "ideal_ratio": base["positions"] / m["positions"],
                                 "measured_ratio": (base["ms"] / m["ms"]) if base["ms"] and m["ms"] else None})
        del model  # freed before the next attention's model is built (`StepSetting.models`)
        # Written after each attention: a run cut short by a time limit (the GPU slot's) keeps what it measured.
        payload = {"stamp": report.stamp(device), "model": shape.__dict__, "dtype": dtype, "autocast": autocast_dtype,
                   "rows": rows}
        paths = report.write_report(out_dir, "groups", payload, markdown_lines(payload))
    return paths


def markdown_lines(payload: dict) -> list:
    lines = ["### Ranked groups vs their pairs (backbone + head loss + backward, reference precomputed)", "",
             config_line(payload), "",
             "a: C(K,2) pairs as unshared rows; b: the pairs in the shared-prompt layout; c: one row per group "
             "(fused_linear_group_dpo); d: the pairs grouped by prompt (one row per group, sigmoid DPO on the pairs, "
             "fused_linear_dpo_by_prompt). "
             "Ideal ratio: backbone tokens of a / of the layout; measured: step time of a / of the layout.", "",
             "| attention | K | P:R | P | R | G | layout | ms | backbone tokens | real tokens | saved MiB | peak MiB | "
             "loss | measured ratio | ideal ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        measured = "–" if r["measured_ratio"] is None else f"{r['measured_ratio']:.2f}"
        loss = "OOM" if r["loss"] is None else f"{r['loss']:.4f}"
        lines.append(f"| {r['attention']} | {r['K']} | {r['ratio']} | {r['prompt']} | {r['response']} | "
                     f"{r['groups']} | {r['layout']} | {report.fmt(r['ms'])} | {r['positions']} | {r['tokens']} | "
                     f"{mib(r['saved_bytes'])} | {mib(r['peak_bytes'])} | {loss} | {measured} | "
                     f"{r['ideal_ratio']:.2f} |")
    return lines
