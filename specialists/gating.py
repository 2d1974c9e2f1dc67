"""Groups and gating: which specialists an input activates.

``GroupIndex`` holds M class groups over K classes (possibly overlapping; a class may be in none);
``gate`` turns the generalist's probabilities into the active (example, specialist) pairs: those
whose group holds one of the generalist's top-n classes (the paper's gate is n = 1).

Membership is held sparsely, both ways round: the classes of each group, and the groups of each
class (compressed rows), so memory is O(K + sum of group sizes), not O(M K): at 100,000 classes
in 300 groups that is a few MB, and gating a batch costs O(B n c) for c groups per class.
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
    """M class groups over K classes, in two sparse forms: the classes of each group (for the
    combiner) and the groups of each class (for gating). Groups may overlap; a class may be in
    no group."""

    n_classes: int
    members: Tensor  # (G,) long: sorted classes of group 0, then group 1, ...
    offsets: Tensor  # (M + 1,) long: group m is members[offsets[m]:offsets[m + 1]]
    class_groups: Tensor  # (G,) long: groups of class 0 (ascending), then of class 1, ...
    class_offsets: Tensor  # (K + 1,) long: class c is in class_groups[class_offsets[c]:...[c + 1]]

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
        group_of = torch.repeat_interleave(torch.arange(len(lists)), sizes)  # (G,)
        order = torch.argsort(members * max(len(lists), 1) + group_of)  # by class, then group
        class_offsets = torch.zeros(n_classes + 1, dtype=torch.long)
        class_offsets[1:] = torch.cumsum(torch.bincount(members, minlength=n_classes), 0)
        return cls(
            n_classes,
            members.to(device),
            offsets.to(device),
            group_of[order].to(device),
            class_offsets.to(device),
        )

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
        return self.class_offsets[1:] - self.class_offsets[:-1]

    @property
    def membership(self) -> Tensor:
        """(M, K) bool, made on request: for inspection of small problems (it is O(M K))."""
        dense = torch.zeros(len(self), self.n_classes, dtype=torch.bool, device=self.device)
        dense[
            torch.repeat_interleave(torch.arange(len(self), device=self.device), self.sizes),
            self.members,
        ] = True
        return dense

    def groups_of(self, classes: Tensor) -> tuple[Tensor, Tensor]:
        """The groups of each of ``classes`` (N,): (index into ``classes`` (P,), group (P,)),
        P being the total coverage of the N classes, in order of ``classes``, then group."""
        start = self.class_offsets[classes]
        counts = self.class_offsets[classes + 1] - start
        which = torch.repeat_interleave(
            torch.arange(classes.numel(), device=classes.device), counts
        )
        first = torch.cumsum(counts, 0) - counts  # where each class's run starts in the output
        within = torch.arange(which.numel(), device=classes.device) - first[which]
        return which, self.class_groups[start[which] + within]

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
            self.class_groups.to(device),
            self.class_offsets.to(device),
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
    classes for b is in S_m (the paper uses n = 1). Ties in p_g are broken by ``torch.max``
    (n = 1) or ``torch.topk``.
    ``confidence`` (the cascade): examples whose top generalist probability is at least this
    activate no specialist."""
    if p_g.dim() != 2 or p_g.shape[1] != groups.n_classes:
        raise ValueError(f"p_g must be (B, {groups.n_classes}), got {tuple(p_g.shape)}")
    if not 1 <= top_n <= groups.n_classes:
        raise ValueError(f"top_n must be in [1, {groups.n_classes}], got {top_n}")
    groups = groups.to(p_g.device)
    # (B, n) each; for n = 1, max: about twice as fast as topk
    values, indices = p_g.max(1, keepdim=True) if top_n == 1 else p_g.topk(top_n, dim=1)
    classes = indices.reshape(-1)  # (B n,): example b's top classes at b n ... b n + n - 1
    if confidence is not None:  # the cascade: sure examples gate nothing
        classes = classes[(values[:, 0] < confidence).repeat_interleave(top_n)]
        rows_of = torch.nonzero(values[:, 0] < confidence).squeeze(1).repeat_interleave(top_n)
    else:
        rows_of = torch.arange(p_g.shape[0], device=p_g.device).repeat_interleave(top_n)
    which, specs = groups.groups_of(classes)
    # one pair per (specialist, example) even when several top classes share a group; the key's
    # sort is by specialist, then row
    key = torch.unique(specs * p_g.shape[0] + rows_of[which])
    return ActivePairs(key % p_g.shape[0], key // p_g.shape[0])
