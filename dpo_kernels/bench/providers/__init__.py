"""The providers of each benchmarked op, in the order tables list them."""

from dpo_kernels.bench.providers import linear, logits, loss
from dpo_kernels.bench.providers.common import BETA, Provider, unavailable_reason

OPS = {"logits": logits.PROVIDERS, "linear": linear.PROVIDERS, "loss": loss.PROVIDERS}
OP_TITLES = {
    "logits": "Sequence log-probs from logits + DPO loss, fwd+bwd",
    "linear": "Fused linear DPO (hidden states -> loss), fwd+bwd",
    "loss": "DPO loss alone, fwd+bwd",
}

def providers_for(op: str, names=None) -> tuple:
    """The providers of `op`, all or those named (in `names`' order); unknown names raise ValueError."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {sorted(OPS)}")
    by_name = {p.name: p for p in OPS[op]}
    if names is None:
        return OPS[op]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown} for op {op!r}; choose from {list(by_name)}")
    return tuple(by_name[n] for n in names)

__all__ = ["BETA", "OPS", "OP_TITLES", "Provider", "providers_for", "unavailable_reason"]
