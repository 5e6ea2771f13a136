"""The full-step comparison of the shared-prompt layout against unshared rows (`dpo-kernels bench --ops
shared-prompt`).

One step = the policy backbone (an HF Llama built from a config, random weights) + the fused linear DPO head +
the backward, with the reference log-probs precomputed (fixed numbers), as a training step with
`--precompute-ref` runs it. B pairs of a P-token prompt and two R-token responses, at P:R = 1:1, 4:1 and 16:1.
Unshared: `[2B, P + R]` rows; shared: `[B, P + 2R]`. The ideal ratio of the two is the ratio of backbone positions,
2(P + R) / (P + 2R) (attention grows faster than linearly, so long prompts can beat it; the head's work, the scored
tokens, is the same in both). Reported per ratio and layout: median step time, backbone positions, the
activation bytes autograd saves, the peak extra memory (CUDA only: the CPU's resident-set peak is not comparable
between two layouts measured in one process), and the measured ratio beside the ideal one. CPU: a tiny model;
CUDA: a Llama-3.2-1B-shaped config in bf16 autocast, with SDPA and with FlexAttention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_kernels.bench import report
from dpo_kernels.bench.timing import release_memory, time_step
from dpo_kernels.constants import IGNORE_INDEX
from dpo_kernels.fused_linear.functional import fused_linear_dpo
from dpo_kernels.hf import backbone_hidden_states, output_head, shared_backbone_hidden_states
from dpo_kernels.shared_prompt.batch import build_shared_batch

RATIOS = (1, 4, 16)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


CPU_SHAPE = ModelShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1000)
LLAMA_1B_SHAPE = ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)


def build_model(shape: ModelShape, attention: str, dtype: torch.dtype, device: torch.device, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=False)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def make_pairs(pairs: int, prompt: int, response: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [(ids(prompt), ids(response), ids(response)) for _ in range(pairs)]


def unshared_batch(pairs, device):
    """`[2B, P + R]` rows (chosen first) and their labels (IGNORE_INDEX on the prompt)."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    prompts = [len(p) for p, _, _ in pairs] * 2
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, p: len(row)] = torch.tensor(row[p:])
    return input_ids.to(device), labels.to(device)


def step_fn(model, pairs, shared: bool, device, autocast_dtype):
    """The closure of one training step on `pairs` in one layout, and its backbone positions."""
    B = len(pairs)
    ref = torch.full((B,), -50.0, device=device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                              enabled=autocast_dtype is not None)
    if shared:
        batch = build_shared_batch(pairs, device=device)
        positions = batch.num_positions

        def forward():
            hidden = shared_backbone_hidden_states(model, batch)
            return hidden, batch.attribution
    else:
        input_ids, labels = unshared_batch(pairs, device)
        positions = input_ids.numel()

        def forward():
            return backbone_hidden_states(model, input_ids), labels

    def loss():
        with autocast:
            hidden, scored = forward()
            weight, bias = output_head(model)
            return fused_linear_dpo(hidden, weight, scored, bias=bias, ref_chosen_logps=ref,
                                    ref_rejected_logps=ref).loss

    def step():
        loss().backward()
        model.zero_grad(set_to_none=True)

    return step, loss, positions


def saved_activation_bytes(loss_fn) -> int:
    """Bytes of the tensors autograd saves for the backward of one forward (parameters excluded, each storage once):
    the activation memory of the step, the same count on every device (the CPU's resident-set peak hides a second
    layout's allocations inside memory the first one left cached)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        if not (t.is_leaf and t.requires_grad):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss_fn()
    out.backward()
    return total


@dataclass(frozen=True)
class StepSetting:
    """What a full-step bench runs on: the model's shape, the attentions, the weights' dtype and the autocast dtype
    (CUDA: a Llama-3.2-1B shape in bf16 autocast, SDPA and FlexAttention; CPU: a tiny model in fp32, SDPA)."""

    shape: ModelShape
    attentions: tuple
    dtype: torch.dtype
    autocast_dtype: torch.dtype | None

    @staticmethod
    def on(device: torch.device, shape=None, attentions=None, dtype=None) -> StepSetting:
        """The setting on `device`, with any of `shape`, `attentions`, `dtype` given instead of the default."""
        cuda = device.type == "cuda"
        return StepSetting(shape or (LLAMA_1B_SHAPE if cuda else CPU_SHAPE),
                           tuple(attentions or (("sdpa", "flex_attention") if cuda else ("sdpa",))),
                           dtype or torch.float32, torch.bfloat16 if cuda else None)

    def models(self, device: torch.device, max_positions: int):
        """`(attention, model)` for each attention, each model freed before the next one is built."""
        for attention in self.attentions:
            model = build_model(self.shape, attention, self.dtype, device, max_positions=max_positions)
            yield attention, model
            del model
            release_memory(device)


def run(out_dir: str, device: torch.device, *, shape: ModelShape | None = None, pairs: int | None = None,
        response: int | None = None, ratios=RATIOS, attentions=None, dtype: torch.dtype | None = None,
        iterations=(2, 7)) -> dict:
    """Times both layouts at each P:R ratio; writes shared_prompt.json and shared_prompt.md into `out_dir`."""
    cuda = device.type == "cuda"
    setting = StepSetting.on(device, shape, attentions, dtype)
    shape, dtype, autocast_dtype = setting.shape, setting.dtype, setting.autocast_dtype
    pairs = pairs or 4
    response = response or (256 if cuda else 32)
    rows = []
    for attention, model in setting.models(device, max(ratios) * response + 2 * response):
        for ratio in ratios:
            prompt = ratio * response
            data = make_pairs(pairs, prompt, response, shape.vocab)
            measured = {}
            for shared in (False, True):
                step, loss_fn, positions = step_fn(model, data, shared, device, autocast_dtype)
                m = time_step(step, device, warmup=iterations[0], iters=iterations[1])
                measured[shared] = (m, positions, saved_activation_bytes(loss_fn))
                model.zero_grad(set_to_none=True)
                release_memory(device)
            (base, base_pos, base_saved), (ours, our_pos, our_saved) = measured[False], measured[True]
            rows.append({"attention": attention, "ratio": f"{ratio}:1", "prompt": prompt, "response": response,
                         "pairs": pairs, "unshared_ms": base.median_ms, "shared_ms": ours.median_ms,
                         "unshared_tokens": base_pos, "shared_tokens": our_pos,
                         "unshared_saved_bytes": base_saved, "shared_saved_bytes": our_saved,
                         "unshared_peak_bytes": base.peak_extra_bytes if cuda else None,
                         "shared_peak_bytes": ours.peak_extra_bytes if cuda else None,
                         "measured_ratio": base.median_ms / ours.median_ms,
                         "ideal_ratio": 2 * (prompt + response) / (prompt + 2 * response)})
        del model  # freed before the next attention's model is built (`StepSetting.models`)
    stamp = report.stamp(device)
    payload = {"stamp": stamp, "model": shape.__dict__, "dtype": dtype, "autocast": autocast_dtype, "rows": rows}
    return report.write_report(out_dir, "shared_prompt", payload, markdown_lines(payload))


def mib(value) -> str:
    """Bytes as MiB for a table cell ("–" when not measured)."""
    return "–" if value is None else f"{value / 2**20:.1f}"


def config_line(payload: dict) -> str:
    """The table's second line: the model's shape and the report's stamp."""
    s = payload["model"]
    return (f"Llama config H={s['hidden']} L={s['layers']} heads={s['heads']}/{s['kv_heads']} V={s['vocab']}; "
            f"{report.stamp_line(payload['stamp'])}")


def markdown_lines(payload: dict) -> list:
    lines = ["### Shared-prompt step vs unshared rows (backbone + fused head + backward, reference precomputed)", "",
             config_line(payload), "",
             "| attention | P:R | P | R | B | unshared ms | shared ms | unshared tokens | shared tokens | "
             "unshared saved MiB | shared saved MiB | unshared peak MiB | shared peak MiB | measured ratio | "
             "ideal 2(P+R)/(P+2R) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['attention']} | {r['ratio']} | {r['prompt']} | {r['response']} | {r['pairs']} | "
                     f"{report.fmt(r['unshared_ms'])} | {report.fmt(r['shared_ms'])} | {r['unshared_tokens']} | "
                     f"{r['shared_tokens']} | {mib(r['unshared_saved_bytes'])} | {mib(r['shared_saved_bytes'])} | "
                     f"{mib(r['unshared_peak_bytes'])} | {mib(r['shared_peak_bytes'])} | "
                     f"{r['measured_ratio']:.2f} | {r['ideal_ratio']:.2f} |")
    return lines
