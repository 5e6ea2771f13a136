"""The consistency check of the ranks of a parallel group, once per call, before any other collective
(docs/design.md, "The fused linear engine", "Across processes").

Each rank encodes what it was given as one fixed-size int64 summary (`Summary.tensor`: shapes, dtypes, its head
shard's rows, a fingerprint of the call's settings and integer checksums of the scored positions and, where they
must agree, of the hidden states), and one all-gather hands every rank every summary. A fixed size matters: an
all-gather of tensors whose shapes differ across ranks aborts one rank inside gloo and hangs NCCL. Every rank then
compares the same gathered values, so every rank raises the same ValueError, naming the field and the ranks that
differ. Cost: `SUMMARY_BYTES` per rank gathered in one round trip, one host read of the result (which also yields
the vocabulary shard sizes), and integer passes over the scored positions (and the hidden states under vocabulary
parallelism) that read each element once.
"""
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

FIELDS = ("inputs refused", "hidden dimensions", "hidden rows", "hidden positions", "hidden size", "hidden dtype",
          "sequences", "head rows", "head columns", "head dtype", "vocabulary", "bias", "settings",
          "reference hidden states", "scored positions", "hidden states", "reference hidden states' values")
SUMMARY_BYTES = 8 * len(FIELDS)
_INDEX = {name: i for i, name in enumerate(FIELDS)}
# Fields whose values are checksums or fingerprints: the message names the ranks, not the numbers.
_OPAQUE = {"settings", "scored positions", "hidden states", "reference hidden states' values"}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The fields every rank of the group must agree on. Vocabulary parallel: everything but the shard's rows (shards
# may differ in size; the vocabulary is their sum). Sequence parallel: everything that is not the rank's own slice
# of the positions.
VOCAB_FIELDS = tuple(f for f in FIELDS if f not in ("head rows", "vocabulary"))
SEQUENCE_FIELDS = ("inputs refused", "hidden dimensions", "hidden size", "hidden dtype", "sequences", "head rows",
                   "head columns", "head dtype", "vocabulary", "bias", "settings", "reference hidden states")

# Each value enters as its 16-bit limbs, the k-th times 2k + 1 (below 2**20 for four limbs), times a position
# weight in [1, _MODULUS]: every product is below 2**36 and a block of _BLOCK values sums below 2**56, exact int64
# arithmetic whatever the order of the sum. A 16-bit dtype has one limb: about ten elementwise operations a value.
_MODULUS = 65521
_BLOCK = 1 << 20
_PRIME = (1 << 61) - 1
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(t: torch.Tensor) -> torch.Tensor:
    """0-dim int64 on t's device: a position-weighted sum of the bits of t's values, modulo a prime. Integer
    arithmetic makes it the same bits for the same values on any device and in any reduction order; a value
    changed (by one ulp), or values moved to other positions, change it (up to a chance collision). No host read."""
    t = t.detach()
    limbs = max(1, t.element_size() // 2)
    if t.is_floating_point():
        t = t.view(_INT_VIEW[t.element_size()])
    flat = t.reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), _BLOCK):
        block = flat[start : start + _BLOCK].long()
        weight = torch.arange(start, start + block.numel(), dtype=torch.int64, device=t.device) % _MODULUS + 1
        mixed = block & 0xFFFF
        for limb in range(1, limbs):
            mixed += ((block >> (16 * limb)) & 0xFFFF) * (2 * limb + 1)
        total = (total + (mixed * weight).sum()) % _PRIME
    return total


def settings_fingerprint(settings) -> int:
    """An int from the `repr` of the call's settings (loss, budget, flags): equal settings give equal ints on every
    rank and in every process (no per-process hash seed)."""
    return zlib.crc32(repr(settings).encode())


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


@dataclass
class Summary:
    """What one rank passes to one call, as the fields of `FIELDS`. `positions`: the call's
    `plan.ScoredPositions`."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    positions: object
    settings: int
    ref_hidden: torch.Tensor | None = None

    def tensor(self, vocab: int, replicated: bool) -> torch.Tensor:
        """`[len(FIELDS)]` int64 on the hidden states' device. `replicated` (vocabulary parallel: every rank holds
        the same batch): fill the checksums of the scored positions and the hidden states."""
        shape = tuple(self.hidden.shape)
        rows, positions = (shape[0], shape[1]) if len(shape) == 3 else (shape[0], -1)
        host = [0, len(shape), rows, positions, shape[-1], _dtype_code(self.hidden.dtype),
                self.positions.num_seqs, self.weight.shape[0], self.weight.shape[1], _dtype_code(self.weight.dtype),
                vocab, int(self.bias is not None), self.settings, int(self.ref_hidden is not None)]
        device = self.hidden.device
        zero = torch.zeros((), dtype=torch.int64, device=device)
        p = self.positions
        sums = [checksum(torch.stack([p.rows, p.targets, p.seqs])) if replicated else zero,
                checksum(self.hidden) if replicated else zero,
                checksum(self.ref_hidden) if replicated and self.ref_hidden is not None else zero]
        return torch.cat([torch.tensor(host, dtype=torch.int64, device=device), torch.stack(sums)])


def refused(device) -> torch.Tensor:
    """The summary of a rank whose inputs failed its own checks: the others learn it from the all-gather and
    raise too, instead of waiting in a collective that rank never joins."""
    out = torch.full((len(FIELDS),), -1, dtype=torch.int64, device=device)
    out[0] = 1
    return out


def gather(summary: torch.Tensor, group) -> list:
    """Every rank's summary, in group order, as lists of ints: one all-gather and one host read."""
    gathered = [torch.empty_like(summary) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, summary, group=group)
    return torch.stack(gathered).tolist()


def compare(summaries: list, fields, group_name: str) -> None:
    """ValueError naming the first field of `fields` on which the ranks' summaries differ, and which ranks hold
    which value; every rank raises the same one, since every rank compares the same gathered values."""
    for field in fields:
        values = [s[_INDEX[field]] for s in summaries]
        if len(set(values)) == 1:
            continue
        holders = {}
        for rank, value in enumerate(values):
            holders.setdefault(value, []).append(rank)
        parts = [f"ranks {ranks} {_describe(field, value)}" for value, ranks in holders.items()]
        raise ValueError(f"the ranks of {group_name} disagree on {field}: " + "; ".join(parts) + " (ranks of the "
                         f"group; every rank must pass {_what_agrees(group_name)}). Under a parallel group a "
                         f"mismatch would give every rank the same wrong loss, or abort or hang a collective")


def _describe(field, value):
    if field == "inputs refused":
        return ("refused their inputs, or a rank of their vocabulary group did (its own error names why)"
                if value == 1 else "accepted theirs")
    if field in _OPAQUE:
        return "hold one value" if field != "settings" else "use one set of settings"
    if field.endswith("dtype"):
        return f"have {str(_DTYPES[value]).replace('torch.', '') if 0 <= value < len(_DTYPES) else 'another'}"
    if field in ("bias", "reference hidden states"):
        return "pass one" if value else "pass none"
    return f"have {value}" if value >= 0 else "have none"


def _what_agrees(group_name):
    if group_name == "vocab_parallel_group":
        return "the same hidden states, labels, settings and head columns; only the head's rows may differ"
    return "the same number of sequences, settings and head (its own positions of each sequence may differ)"
