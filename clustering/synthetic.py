"""Synthetic inputs with planted groups, for tests, benchmarks and demos of the clustering."""

from __future__ import annotations

import numpy as np

from ._matrix import blocks

__all__ = ["planted_covariance", "planted_groups", "planted_predictions"]


def planted_groups(n_classes: int, n_groups: int, seed: int = 0) -> np.ndarray:
    """Coarse group id of every class (K,): sizes as even as possible, class order shuffled."""
    if not 1 <= n_groups <= n_classes:
        raise ValueError(f"n_groups must be in [1, n_classes={n_classes}], got {n_groups}")
    coarse = (np.arange(n_classes) * n_groups) // n_classes
    return np.random.default_rng(seed).permutation(coarse)


def planted_predictions(
    coarse: np.ndarray,
    n_samples: int,
    *,
    class_strength: float = 2.0,
    group_strength: float = 4.0,
    noise: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of a generalist that confuses classes inside their coarse group.

    Logit of class j for an example of class y: ``class_strength * [j == y] + group_strength *
    [group(j) == group(y)] + noise * N(0, 1)``. Returns (probs (N, K) float32, labels (N,)).
    """
    coarse = np.asarray(coarse)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(coarse), n_samples)
    z = noise * rng.standard_normal((n_samples, len(coarse)), dtype=np.float32)
    z += group_strength * (coarse[None, :] == coarse[labels][:, None])
    z[np.arange(n_samples), labels] += class_strength
    z -= z.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z, labels


def planted_covariance(
    coarse: np.ndarray,
    *,
    noise: float = 0.2,
    diagonal: float = 5.0,
    cross: float = 0.01,
    seed: int = 0,
    dtype: type = np.float32,
) -> np.ndarray:
    """A symmetric K x K covariance-like matrix with planted blocks, built without temporaries.

    Inside a group C_ij = u_i u_j (u ~ U(0.5, 1.5): some classes are more confusable), across
    groups -``cross``, plus symmetric N(0, noise^2) noise; the diagonal is ``diagonal * u_i^2``
    so that it dominates the raw columns, as it does in a real covariance.
    """
    coarse = np.asarray(coarse)
    k = len(coarse)
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.5, 1.5, k).astype(dtype)
    c = np.empty((k, k), dtype=dtype)
    for r0, r1 in blocks(k):
        gen = rng.standard_normal((r1 - r0, k - r0), dtype=dtype)
        gen *= noise
        gen -= cross
        d = gen[:, : r1 - r0]
        d[:] = np.triu(d) + np.triu(d, 1).T
        c[r0:r1, r0:] = gen
        c[r1:, r0:r1] = gen[:, r1 - r0 :].T
    for g in np.unique(coarse):
        idx = np.flatnonzero(coarse == g)
        c[np.ix_(idx, idx)] += np.outer(u[idx], u[idx]) + cross
    np.fill_diagonal(c, diagonal * u * u)
    return c
