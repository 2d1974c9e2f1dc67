"""Default grouping: pick the number (and, when overlapping, the size) of groups from the data.

Score of a candidate number of groups G: the confusion captured by the disjoint k-means groups
minus what random groups of the same sizes would capture (a modularity with a uniform null
model). Very few big groups capture everything but so does chance; many tiny groups capture
little. The scan is a coarse-to-fine search over G in [2, K / min_size]; among near-ties the
fewest groups win, since fewer, larger groups made better specialists in published comparisons.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ._ops import matrix_ops
from ._validate import check_matrix
from .estimator import ConfusionClustering
from .metrics import confusion_captured, expected_random_captured

logger = logging.getLogger(__name__)

__all__ = ["GroupingChoice", "choose_grouping"]

_GRID = 9  # candidates per level of the coarse-to-fine scan


@dataclass(frozen=True)
class GroupingChoice:
    """The chosen grouping, its fitted estimator, and why it was chosen."""

    model: ConfusionClustering
    n_groups: int
    mode: str
    group_size: int | None
    captured: float
    baseline: float
    reason: str
    scan: tuple[tuple[int, int, float, float], ...] = field(default=())  # (G, groups, cap, rand)

    def to_dict(self) -> dict:
        """Plain-typed summary (the fitted model itself is left out)."""
        return {
            "n_groups": self.n_groups,
            "mode": self.mode,
            "group_size": self.group_size,
            "captured": self.captured,
            "baseline": self.baseline,
            "reason": self.reason,
            "scan": [
                {"n_groups": g, "n_formed": n, "captured": c, "random": r}
                for g, n, c, r in self.scan
            ],
        }


def choose_grouping(
    matrix: np.ndarray,
    n_classes: int | None = None,
    *,
    mode: Literal["disjoint", "overlapping"] = "disjoint",
    method: Literal["kmeans", "spectral"] = "kmeans",
    min_size: int = 3,
    max_groups: int | None = None,
    overlap: float = 1.5,
    n_init: int = 3,
    tol: float = 1e-4,
    random_state: int = 0,
    **estimator_params,
) -> GroupingChoice:
    """Choose and fit a grouping with no user options; see the module docstring for the rule.

    ``min_size`` (default 3) keeps every specialist a real classification problem; ``max_groups``
    caps the scan (default min(K // min_size, 512)). In overlapping mode the chosen G groups are
    widened to ``ceil(overlap * K / G)`` classes each, so boundary classes get several
    specialists (the paper: 61 groups of 300 over 15,000 classes, i.e. overlap 1.2).
    """
    m = check_matrix(matrix)
    k = m.shape[0]
    if n_classes is not None and n_classes != k:
        raise ValueError(f"n_classes={n_classes} but the matrix is {k} x {k}")
    top_m = estimator_params.pop("top_m", None)  # applied to the chosen grouping only
    max_size = estimator_params.get("max_size")
    lo = max(2, math.ceil(k / max_size)) if max_size else 2  # the scan is of disjoint groups
    hi = min(k // min_size, max_groups or 512)
    lo_scan, hi_scan = lo, hi
    if hi < lo:
        raise ValueError(
            f"{k} classes cannot form at least 2 groups of {min_size} to {max_size or k} classes"
        )
    if mode not in ("disjoint", "overlapping"):
        raise ValueError(f"mode must be 'disjoint' or 'overlapping', got {mode!r}")
    if matrix_ops(m).total_mass(m) <= 0:
        raise ValueError("the matrix has no positive off-diagonal mass: no confusion to group")

    params = dict(method=method, n_init=n_init, random_state=random_state, **estimator_params)
    results: dict[int, tuple[ConfusionClustering, float, float]] = {}

    def evaluate(g: int) -> float:
        if g not in results:
            model = ConfusionClustering(g, min_size=min_size, **params).fit(m)
            sizes = [len(s) for s in model.groups_]
            results[g] = (model, float(model.group_mass_.sum()), expected_random_captured(sizes, k))
            logger.debug("G=%d: %d groups, captured %.3f", g, len(sizes), results[g][1])
        return results[g][1] - results[g][2]

    while True:
        grid = sorted({int(round(x)) for x in np.geomspace(lo, hi, _GRID)})
        if hi - lo + 1 <= _GRID:
            grid = list(range(lo, hi + 1))
        scores = [evaluate(g) for g in grid]
        if len(grid) == hi - lo + 1:
            break
        b = int(np.argmax(scores))
        lo, hi = grid[max(b - 1, 0)], grid[min(b + 1, len(grid) - 1)]

    best = max(r[1] - r[2] for r in results.values())
    near = [g for g, r in results.items() if r[1] - r[2] >= best - tol]
    g_req = min(near, key=lambda g: (len(results[g][0].groups_), g))
    model, captured, baseline = results[g_req]
    scan = tuple(
        (g, len(r[0].groups_), r[1], r[2]) for g, r in sorted(results.items(), key=lambda x: x[0])
    )
    sizes = sorted(len(s) for s in model.groups_)
    n_groups = len(sizes)
    reason = (
        f"{n_groups} groups of {sizes[0]}-{sizes[-1]} classes (median {int(np.median(sizes))}) "
        f"hold {captured:.1%} of the off-diagonal confusion vs {baseline:.1%} for random groups "
        f"of the same sizes: the best margin over chance among {len(results)} group counts "
        f"scanned in [{lo_scan}, {hi_scan}] (fewest groups within {tol} of the best); every "
        f"group has at least {min_size} classes"
    )
    group_size = None
    if mode == "overlapping":
        group_size = min(k, max(min_size, math.ceil(overlap * k / n_groups)))
        model = ConfusionClustering(
            n_groups, mode="overlapping", group_size=group_size, top_m=top_m, **params
        ).fit(m)
        disjoint_captured = captured
        captured = confusion_captured(m, model.groups_)
        baseline = expected_random_captured([group_size] * len(model.groups_), k, disjoint=False)
        reason += (
            f"; then each group widened to the {group_size} classes nearest its centroid "
            f"(overlap {overlap} x K/G) so boundary classes get several specialists: "
            f"{captured:.1%} captured (disjoint {disjoint_captured:.1%}) vs {baseline:.1%} random"
        )
    elif top_m is not None:
        model = ConfusionClustering(g_req, min_size=min_size, top_m=top_m, **params).fit(m)
    if top_m is not None:
        reason += f"; kept the {len(model.groups_)} groups holding the most confusion (top_m)"
    logger.debug("chose %s", reason)
    return GroupingChoice(model, n_groups, mode, group_size, captured, baseline, reason, scan)
