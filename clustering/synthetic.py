"""Synthetic inputs with planted groups, for tests, benchmarks and demos of the clustering."""

from __future__ import annotations

import numpy as np

from ._matrix import blocks

__all__ = ["planted_covariance", "planted_groups", "planted_predictions", "planted_topk"]


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


def planted_topk(
    coarse: np.ndarray,
    n_samples: int,
    *,
    k: int = 10,
    cross: float = 0.1,
    class_strength: float = 3.0,
    group_strength: float = 1.5,
    noise: float = 1.0,
    residual: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` of a generalist that confuses classes inside their coarse group, as sparse
    predictions: no dense (N, K) row is made, so K = 100,000 costs O(N k^2 + K), not O(N K).

    An example of class y lists y, plus k - 1 other classes: each from y's group, or with
    probability ``cross`` from anywhere (confusions across groups, which the clustering must
    see through). Logits are ``class_strength`` for y, ``group_strength`` for its group and 0
    elsewhere, plus ``noise * N(0, 1)``, so y is not always on top; the k probabilities are
    their softmax scaled to 1 - r, r ~ U(0, 2 * ``residual``) being the mass outside the top k.
    Returns (indices (N, k) int64, values (N, k) float32, labels (N,) int64); column 0 holds y,
    not always the largest value.
    """
    coarse = np.unique(coarse, return_inverse=True)[1]  # group ids 0 .. G-1
    n_classes = len(coarse)
    if not 2 <= k <= n_classes:
        raise ValueError(f"k must be in [2, n_classes={n_classes}], got {k}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    members = np.argsort(coarse, kind="stable")  # classes grouped: group g is one slice
    start = np.searchsorted(coarse[members], coarse)  # (K,) first slot of each class's group
    size = np.bincount(coarse)[coarse]  # (K,) size of each class's group
    outside = rng.random((n_samples, k - 1)) < cross  # slots drawn from all classes
    # A group of fewer than k classes cannot fill the row: its extra slots come from anywhere.
    outside |= np.arange(k - 1)[None, :] >= size[labels][:, None] - 1

    def draw(mask: np.ndarray) -> np.ndarray:
        """New classes for the slots in ``mask``: a random group-mate of y, or any class."""
        y = labels[np.nonzero(mask)[0]]
        mate = members[start[y] + (rng.random(len(y)) * size[y]).astype(np.int64)]
        return np.where(outside[mask], rng.integers(0, n_classes, len(y)), mate)

    earlier = np.tril(np.ones((k - 1, k - 1), dtype=bool), -1)  # [j, i]: slot i comes before j
    others = np.empty((n_samples, k - 1), dtype=np.int64)
    redo = np.ones_like(others, dtype=bool)
    while redo.any():  # a slot repeating y or an earlier slot is drawn again
        others[redo] = draw(redo)
        repeats = ((others[:, :, None] == others[:, None, :]) & earlier).any(2)
        redo = repeats | (others == labels[:, None])
    idx = np.concatenate([labels[:, None], others], axis=1)
    same = coarse[idx] == coarse[labels][:, None]
    z = noise * rng.standard_normal(idx.shape) + group_strength * same
    z[:, 0] += class_strength
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p *= (1 - rng.uniform(0, 2 * residual, (n_samples, 1))) / p.sum(1, keepdims=True)
    return idx, p.astype(np.float32), labels
