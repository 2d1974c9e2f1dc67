"""Groups and gating: which specialists an input activates.

``GroupIndex`` holds M class groups over K classes (possibly overlapping; a class may be in none);
``gate`` turns the generalist's probabilities into the active (example, specialist) pairs: those
whose group holds one of the generalist's top-n classes (the paper's gate is n = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ActivePairs", "GroupIndex", "gate"]


@dataclass(frozen=True, eq=False)
class GroupIndex:
    """M class groups over K classes, in two forms: concatenated sorted index lists (for the
    combiner) and a boolean membership matrix (for gating). Groups may overlap; a class may be
    in no group."""

    n_classes: int
    members: Tensor  # (G,) long: sorted classes of group 0, then group 1, ...
    offsets: Tensor  # (M + 1,) long: group m is members[offsets[m]:offsets[m + 1]]
    membership: Tensor  # (M, K) bool

    @classmethod
    def from_lists(
        cls,
        groups: Sequence[Sequence[int]],
        n_classes: int,
        device: torch.device | str | None = None,
    ) -> GroupIndex:
        """Build from one list of class indices per group. Each group is sorted: a specialist's
        outputs must list its classes in ascending order, then the dustbin."""
        if n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        lists = []
        for m, group in enumerate(groups):
            classes = sorted(int(c) for c in group)
            if not classes:
                raise ValueError(f"group {m} is empty")
            if classes[0] < 0 or classes[-1] >= n_classes:
                raise ValueError(f"group {m} has a class outside [0, {n_classes})")
            if len(set(classes)) != len(classes):
                raise ValueError(f"group {m} lists a class twice")
            lists.append(classes)
        sizes = torch.tensor([len(c) for c in lists], dtype=torch.long)
        offsets = torch.zeros(len(lists) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes, 0)
        members = torch.tensor([c for g in lists for c in g], dtype=torch.long)
        membership = torch.zeros(len(lists), n_classes, dtype=torch.bool)
        membership[torch.repeat_interleave(torch.arange(len(lists)), sizes), members] = True
        return cls(n_classes, members.to(device), offsets.to(device), membership.to(device))

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def n_groups(self) -> int:
        return len(self)

    @property
    def sizes(self) -> Tensor:
        """(M,) long: |S_m|."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def coverage(self) -> Tensor:
        """(K,) long: how many groups contain each class (0 = covered by no specialist)."""
        return self.membership.sum(0)

    @property
    def device(self) -> torch.device:
        return self.members.device

    def group(self, m: int) -> list[int]:
        """The sorted classes of group m."""
        return self.members[self.offsets[m] : self.offsets[m + 1]].tolist()

    def to_lists(self) -> list[list[int]]:
        return [self.group(m) for m in range(len(self))]

    def to(self, device: torch.device | str) -> GroupIndex:
        device = torch.device(device)
        if device == self.device:
            return self
        return GroupIndex(
            self.n_classes,
            self.members.to(device),
            self.offsets.to(device),
            self.membership.to(device),
        )


class ActivePairs(NamedTuple):
    """The active (example, specialist) pairs, ``rows[a]`` being the example and ``specs[a]``
    the specialist of pair a. ``gate`` returns them sorted by specialist, then row."""

    rows: Tensor  # (A,) long
    specs: Tensor  # (A,) long

    @property
    def n_pairs(self) -> int:
        return self.rows.numel()

    def per_specialist(self, n_groups: int) -> list[Tensor]:
        """Rows of each specialist, a list of M LongTensors (empty for an idle specialist).
        Running specialist m on ``x[rows_m]`` and concatenating the non-empty outputs in
        specialist order gives the rows of ``spec_probs`` in pair order."""
        if self.specs.numel() > 1 and bool((self.specs[1:] < self.specs[:-1]).any()):
            raise ValueError("pairs must be sorted by specialist (as gate() returns them)")
        counts = torch.bincount(self.specs, minlength=n_groups)
        if counts.numel() > n_groups:
            raise ValueError(f"a specialist index is >= n_groups={n_groups}")
        return list(torch.split(self.rows, counts.tolist()))


def gate(
    p_g: Tensor, groups: GroupIndex, top_n: int = 1, confidence: float | None = None
) -> ActivePairs:
    """Active pairs: specialist m is active for example b when one of the generalist's top-n
    classes for b is in S_m (the paper uses n = 1). Ties in p_g are broken by ``torch.topk``.
    ``confidence`` (the cascade): examples whose top generalist probability is at least this
    activate no specialist."""
    if p_g.dim() != 2 or p_g.shape[1] != groups.n_classes:
        raise ValueError(f"p_g must be (B, {groups.n_classes}), got {tuple(p_g.shape)}")
    if not 1 <= top_n <= groups.n_classes:
        raise ValueError(f"top_n must be in [1, {groups.n_classes}], got {top_n}")
    membership = groups.to(p_g.device).membership  # (M, K)
    top = p_g.topk(top_n, dim=1).indices  # (B, n)
    active = membership[:, top].any(dim=2)  # (M, B)
    if confidence is not None:
        active &= (p_g.max(dim=1).values < confidence)[None, :]
    specs, rows = active.nonzero(as_tuple=True)  # row-major: sorted by spec, then row
    return ActivePairs(rows, specs)
