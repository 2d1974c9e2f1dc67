"""How good is a grouping: confusion captured (vs. a random split), agreement with known coarse
groups, and per-group statistics.

"Confusion mass" is the positive off-diagonal part of the matrix: counts of mistakes for a
confusion matrix, positive covariances (classes predicted together) for a covariance. A pair of
classes is captured when some group holds both; overlapping groups count each pair once.
Every function takes a dense array or a scipy.sparse matrix (worked on without densifying).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ._ops import matrix_ops
from ._validate import as_seed, check_groups, check_matrix

__all__ = [
    "coarse_agreement",
    "confusion_captured",
    "confusion_mass",
    "expected_random_captured",
    "group_labels",
    "group_stats",
    "random_split_baseline",
]

Groups = list[list[int]] | list[np.ndarray]
Matrix = np.ndarray | sparse.sparray | sparse.spmatrix


def confusion_mass(matrix: Matrix) -> float:
    """Sum of the positive off-diagonal entries: the confusion mass a grouping can capture."""
    m = check_matrix(matrix)
    return matrix_ops(m).total_mass(m)


def confusion_captured(matrix: Matrix, groups: Groups) -> float:
    """Share of the positive off-diagonal mass on pairs of classes that share a group, in [0, 1]."""
    m = check_matrix(matrix)
    ops = matrix_ops(m)
    total = ops.total_mass(m)
    if total <= 0:
        return 0.0
    return min(1.0, ops.shared_mass(m, check_groups(groups, m.shape[0])) / total)


def _disjoint(groups: list[np.ndarray]) -> bool:
    sizes = sum(len(g) for g in groups)
    return sizes == 0 or np.unique(np.concatenate(groups)).size == sizes


def random_split_baseline(
    matrix: Matrix, groups: Groups, *, n_repeats: int = 5, random_state: int = 0
) -> tuple[float, float]:
    """Confusion captured by random groups of the same sizes: (mean, std) over seeded repeats.

    Disjoint groups are replaced by a random partition (same sizes, classes drawn without
    replacement); overlapping groups by independent random subsets of the same sizes.
    """
    m = check_matrix(matrix)
    ops = matrix_ops(m)
    k = m.shape[0]
    groups = check_groups(groups, k)
    sizes = [len(g) for g in groups]
    rng = np.random.default_rng(as_seed(random_state))
    total = ops.total_mass(m)
    scores = []
    for _ in range(n_repeats):
        if _disjoint(groups):
            perm = rng.permutation(k)
            cuts = np.cumsum([0, *sizes])
            fake = [perm[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        else:
            fake = [rng.choice(k, size=s, replace=False) for s in sizes]
        scores.append(min(1.0, ops.shared_mass(m, fake) / total) if total > 0 else 0.0)
    return float(np.mean(scores)), float(np.std(scores))


def expected_random_captured(sizes: list[int], n_classes: int, disjoint: bool = True) -> float:
    """Exact expectation of :func:`random_split_baseline` for these group sizes.

    A given pair lands in a random group of size s with probability s(s-1) / (K(K-1)); disjoint
    groups add up, independent overlapping ones combine as 1 - prod(1 - p).
    """
    k = n_classes
    p = np.array([s * (s - 1) for s in sizes], dtype=np.float64) / (k * (k - 1))
    return float(p.sum() if disjoint else 1 - np.prod(1 - p))


def group_labels(groups: Groups, n_classes: int) -> np.ndarray:
    """One label per class (K,), for ARI/NMI: the rank of the best-ranked group holding it.

    Groups are taken in the given order (``groups_`` is ranked by confusion mass, so a class in
    several overlapping groups gets the most confused one). A class in no group gets a singleton
    label of its own (G + class index): it is not claimed to be like any other class.
    """
    labels = np.full(n_classes, -1, dtype=np.int64)
    for rank, g in reversed(list(enumerate(check_groups(groups, n_classes)))):
        labels[g] = rank
    lonely = labels < 0
    labels[lonely] = len(groups) + np.flatnonzero(lonely)
    return labels


def coarse_agreement(groups: Groups, coarse: np.ndarray) -> dict[str, float]:
    """ARI and NMI between the grouping (via :func:`group_labels`) and known coarse groups."""
    coarse = np.asarray(coarse)
    if coarse.ndim != 1:
        raise ValueError(f"coarse labels must be one id per class, got shape {coarse.shape}")
    pred = group_labels(groups, len(coarse))
    return {
        "ari": float(adjusted_rand_score(coarse, pred)),
        "nmi": float(normalized_mutual_info_score(coarse, pred)),
    }


def group_stats(matrix: Matrix, groups: Groups, confusion: Matrix | None = None) -> list[dict]:
    """Per group: size, confusion mass held (absolute and share of the total) and, given the
    generalist's confusion counts (rows = true class, e.g. ``PredictionStats.confusion()``), the
    number of examples whose true class is in the group and the generalist's accuracy on them.
    """
    m = check_matrix(matrix)
    ops = matrix_ops(m)
    k = m.shape[0]
    groups = check_groups(groups, k)
    total = ops.total_mass(m)
    if confusion is not None:
        confusion = check_matrix(confusion, "confusion")
        if confusion.shape != m.shape:
            raise ValueError(f"confusion must be {m.shape}, got {confusion.shape}")
        rows = np.asarray(confusion.sum(1, dtype=np.float64)).ravel()
        diag = (
            confusion.diagonal() if sparse.issparse(confusion) else np.diagonal(confusion)
        ).astype(np.float64)
    out = []
    for g in groups:
        mass = ops.group_mass(m, g)
        row: dict = {
            "size": len(g),
            "mass": mass,
            "mass_share": mass / total if total > 0 else 0.0,
        }
        if confusion is not None:
            n = float(rows[g].sum())
            row["n_examples"] = int(round(n))
            row["accuracy"] = float(diag[g].sum() / n) if n > 0 else None
        out.append(row)
    return out
