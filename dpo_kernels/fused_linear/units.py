"""The fused linear engine's units of completion: the sets of sequences whose loss coefficients are known once all
of their tokens are scored (docs/design.md, "The fused linear engine").

- `PairUnits`: DPO pairs, unit i being sequences i (chosen) and B + i (rejected); the engine orders the tokens pair
  by pair (`ScoredPositions.layout(paired=True)`).
- `GroupUnits`: groups of K responses, unit g being its K consecutive sequences (sequences are numbered group by
  group); in the natural layout (`paired=False`) a group's tokens are contiguous.

Both give a unit range's sequences as a device tensor built from host integers (no synchronization) and the scored
tokens per unit the plan groups by. Only pairs can be tied (`plan.StepPlan.tied`): `lead` and `negated` describe a
tied pair's coefficients, the rejected one being the negative of the chosen one.
"""
import itertools
from typing import NamedTuple

import torch


class PairUnits(NamedTuple):
    """B pairs: unit i is sequences i and B + i."""

    num_pairs: int

    paired = True  # the engine's token order: pair by pair

    @property
    def num_seqs(self) -> int:
        return 2 * self.num_pairs

    def sequences(self, units: range, device) -> torch.Tensor:
        """`[2 len(units)]` int64: the units' chosen sequences, then their rejected ones."""
        chosen = torch.arange(units.start, units.stop, device=device)
        return torch.cat([chosen, chosen + self.num_pairs])

    def token_counts(self, counts_host) -> list:
        """Scored tokens per unit (chosen plus rejected), from the per-sequence counts `[2B]`."""
        B = self.num_pairs
        return [counts_host[i] + counts_host[B + i] for i in range(B)]

    def lead(self, unit: int) -> int:
        """The sequence whose coefficient a tied pair's other coefficient negates: its chosen one."""
        return unit

    def negated(self, seq: torch.Tensor) -> torch.Tensor:
        """`[n]` bool: which of the sequences `seq [n]` have the negated coefficient of a tied pair (the rejected)."""
        return seq >= self.num_pairs


class GroupUnits(NamedTuple):
    """G groups: unit g is sequences `offsets[g]:offsets[g + 1]`."""

    offsets: tuple  # G + 1 ints, from 0 to R

    paired = False  # the engine's token order: sequence by sequence, so a group's tokens are contiguous

    @staticmethod
    def of_sizes(group_sizes) -> "GroupUnits":
        return GroupUnits(tuple(itertools.accumulate(group_sizes, initial=0)))

    @property
    def num_seqs(self) -> int:
        return self.offsets[-1]

    def sequences(self, units: range, device) -> torch.Tensor:
        """`[n]` int64: the sequences of the consecutive groups `units`, in order."""
        return torch.arange(self.offsets[units.start], self.offsets[units.stop], device=device)

    def token_counts(self, counts_host) -> list:
        """Scored tokens per group, from the per-sequence counts `[R]`."""
        return [sum(counts_host[a:b]) for a, b in itertools.pairwise(self.offsets)]
