"""Seeded, deterministic k-means: greedy k-means++ seeding, then Lloyd iterations in faiss.

faiss's own initialisation samples centroids uniformly, which with many small clusters often puts
two seeds in one true group and none in another; greedy k-means++ (Arthur & Vassilvitskii 2007,
with scikit-learn's local trials) avoids most of that. It is written here in float32 because
scikit-learn's ``kmeans_plusplus`` upcasts to float64 by chunks and was 100x slower at K = 1,000.
Each restart draws its own seed from one SeedSequence and the lowest objective wins, so a given
seed always gives the same answer.
"""

from __future__ import annotations

import faiss
import numpy as np

from ._threads import SERIAL_WORK, single_thread


def sq_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (K, G) between points (K, d) and centroids (G, d)."""
    d2 = (points * points).sum(1)[:, None] - 2 * (points @ centroids.T)
    d2 += (centroids * centroids).sum(1)[None, :]
    return np.clip(d2, 0, None, out=d2)


def kmeans_plusplus(points: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (G, d): each step keeps the best of 2 + log(G) D^2-sampled tries."""
    n = len(points)
    trials = 2 + int(np.log(n_clusters))
    sq_norms = (points * points).sum(1)
    centers = [int(rng.integers(n))]
    closest = sq_distances(points, points[centers]).ravel().astype(np.float64)  # (n,)
    for _ in range(1, n_clusters):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: take any unused point
            centers.append(int(np.setdiff1d(np.arange(n), centers)[0]))
            continue
        cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
        cand = np.minimum(cand, n - 1)
        d2 = sq_norms[None, :] - 2 * (points[cand] @ points.T) + sq_norms[cand, None]
        pot = np.minimum(closest[None, :], np.clip(d2, 0, None))  # (trials, n)
        best = int(pot.sum(1).argmin())
        centers.append(int(cand[best]))
        closest = pot[best].astype(np.float64)
    return points[centers]


def kmeans(
    points: np.ndarray, n_clusters: int, *, n_init: int, n_iter: int, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Best of ``n_init`` seeded runs: centroids (G, d), labels (K,), inertia."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    n, d = points.shape
    if n_clusters == 1:
        c = points.mean(0, keepdims=True)
        return c, np.zeros(n, dtype=np.int64), float(sq_distances(points, c).sum())
    with single_thread(n * n_clusters * d < SERIAL_WORK):
        return _kmeans(points, n_clusters, n_init=n_init, n_iter=n_iter, seed=seed)


def _kmeans(points: np.ndarray, n_clusters: int, *, n_init: int, n_iter: int, seed: int):
    n, d = points.shape
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for run_seed in np.random.SeedSequence(seed).generate_state(n_init) % (2**31 - 1):
        # Thin (trials x d) products: one BLAS thread is faster, and much faster on a busy host.
        with single_thread():
            init = kmeans_plusplus(points, n_clusters, np.random.default_rng(int(run_seed)))
        km = faiss.Kmeans(
            d,
            n_clusters,
            niter=n_iter,
            seed=int(run_seed),
            min_points_per_centroid=1,  # small K is expected: no warning, no subsampling
            max_points_per_centroid=max(n, 1) + 1,
        )
        km.train(points, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        d2 = sq_distances(points, km.centroids)
        labels = d2.argmin(1)
        inertia = float(d2[np.arange(n), labels].sum(dtype=np.float64))
        if best is None or inertia < best[2]:
            best = (km.centroids.copy(), labels, inertia)
    assert best is not None
    return best
