"""Turning k-means centroids into groups: size limits for disjoint groups, S-nearest for overlap."""

from __future__ import annotations

import logging

import numpy as np

from ._kmeans import sq_distances

logger = logging.getLogger(__name__)


def capacity_assign(d2: np.ndarray, max_size: int | None) -> np.ndarray:
    """Nearest centroid for each class, at most ``max_size`` classes per centroid.

    Greedy over (class, centroid) pairs in order of distance: each class takes the closest
    centroid that still has room. Equals the plain argmin when no centroid overflows.
    """
    k, g = d2.shape
    labels = d2.argmin(1)
    if max_size is None or np.bincount(labels, minlength=g).max() <= max_size:
        return labels
    labels = np.full(k, -1)
    counts = np.zeros(g, dtype=np.int64)
    left = k
    for flat in np.argsort(d2, axis=None, kind="stable"):
        i, c = divmod(int(flat), g)
        if labels[i] < 0 and counts[c] < max_size:
            labels[i] = c
            counts[c] += 1
            left -= 1
            if not left:
                break
    return labels


def sized_groups(
    points: np.ndarray,
    centroids: np.ndarray,
    min_size: int,
    max_size: int | None,
    n_iter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint labels (K,) and centroids (G', d) with min_size <= |group| <= max_size.

    Undersized groups are dissolved one at a time (smallest first, never below two groups when
    two fit) and their classes go to the nearest centroid with room; then a few
    capacity-constrained Lloyd steps re-centre the survivors. If the limits still cannot all hold,
    the nearest classes are pulled from groups that can spare them.
    """
    k = len(points)
    cap = k if max_size is None else max_size
    d2 = sq_distances(points, centroids)
    active = list(range(len(centroids)))
    # Never dissolve down to one group of everything (no specialist at all) while two groups of
    # min_size fit: the last undersized group is filled with its nearest classes instead.
    floor = 2 if len(centroids) >= 2 and k >= 2 * min_size else 1
    while True:
        labels = capacity_assign(d2[:, active], max_size)
        sizes = np.bincount(labels, minlength=len(active))
        if sizes.min() >= min_size or len(active) == floor or (len(active) - 1) * cap < k:
            break
        active.pop(int(sizes.argmin()))
    cents = centroids[active]
    changed = not np.array_equal(labels, d2.argmin(1)) or len(active) < len(centroids)
    for _ in range(n_iter if changed and sizes.min() >= max(min_size, 1) else 0):
        cents = _means(points, labels, cents)
        new = capacity_assign(sq_distances(points, cents), max_size)
        sizes = np.bincount(new, minlength=len(active))
        if np.array_equal(new, labels) or sizes.min() < max(min_size, 1):
            break
        labels = new
    labels = _fill_small(labels, sq_distances(points, cents), min_size)
    return labels, _means(points, labels, cents)


def _means(points: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Centroid of each group's members (G, d); an empty group keeps its old centroid."""
    out = old.copy()
    for g in range(len(old)):
        mask = labels == g
        if mask.any():
            out[g] = points[mask].mean(0)
    return out


def _fill_small(labels: np.ndarray, d2: np.ndarray, min_size: int) -> np.ndarray:
    """Pull the nearest spare classes into groups below ``min_size`` (last resort)."""
    labels = labels.copy()
    sizes = np.bincount(labels, minlength=d2.shape[1])
    for g in np.flatnonzero(sizes < min_size):
        for i in np.argsort(d2[:, g], kind="stable"):
            if sizes[g] >= min_size:
                break
            if labels[i] != g and sizes[labels[i]] > min_size:
                sizes[labels[i]] -= 1
                labels[i] = g
                sizes[g] += 1
        if sizes[g] < min_size:
            logger.warning("group %d keeps %d classes, below min_size=%d", g, sizes[g], min_size)
    return labels


def nearest_groups(d2: np.ndarray, size: int) -> list[np.ndarray]:
    """Overlapping groups: for each centroid, the ``size`` classes nearest to it (sorted)."""
    return [np.sort(np.argsort(d2[:, g], kind="stable")[:size]) for g in range(d2.shape[1])]
