"""Streaming statistics of a generalist's softmax predictions: covariance and confusion matrix.

The covariance C = E[p p^T] - E[p] E[p]^T is the label-free matrix of the paper (section 5): classes
the generalist predicts together have similar columns. It is accumulated batch by batch with Chan's
pairwise update in float64 (batch-centred scatter plus a rank-one correction for the shift of the
mean), so sorted data (all of one class first) loses no precision. BLAS ``syrk`` writes one
triangle only (half the flops of a full product); it is mirrored when the matrix is read.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from scipy.linalg import blas

from ._validate import check_labels, check_probs

logger = logging.getLogger(__name__)

__all__ = ["PredictionStats", "prediction_stats"]

_READ_ROWS = 512  # rows per chunk when mirroring the triangle, to keep temporaries small


class PredictionStats:
    """Accumulate covariance (and, given labels, confusion counts) of predictions over batches.

    Memory is two K x K arrays at most (float64 scatter, int64 confusion), whatever the number of
    predictions: at K = 15,000 that is 1.8 GB each.
    """

    def __init__(self, n_classes: int) -> None:
        if int(n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.n_classes = int(n_classes)
        self._n = 0
        self._mean = np.zeros(self.n_classes)  # (K,)
        self._scatter = np.zeros((self.n_classes, self.n_classes))  # (K, K), lower triangle valid
        self._confusion: np.ndarray | None = None  # (K, K) int64, rows = true class
        self._warned_sum = False

    @property
    def n_seen(self) -> int:
        """Number of predictions accumulated so far."""
        return self._n

    @property
    def n_labelled(self) -> int:
        """Number of predictions that came with labels (counted in the confusion matrix)."""
        return 0 if self._confusion is None else int(self._confusion.sum())

    def update(self, probs: np.ndarray, labels: np.ndarray | None = None) -> PredictionStats:
        """Add a batch of softmax predictions (N, K), with optional true labels (N,)."""
        x = check_probs(probs, self.n_classes)
        y = None if labels is None else check_labels(labels, x.shape[0], self.n_classes)
        n_b = x.shape[0]
        if n_b == 0:
            return self
        n_a, n = self._n, self._n + n_b
        buf = np.empty((n_b + 1, self.n_classes))  # the batch, centred, plus one merge row
        xb = buf[:n_b]
        xb[:] = x
        if not self._warned_sum and not np.allclose(xb.sum(axis=1), 1.0, atol=1e-3):
            logger.warning(
                "prediction rows do not sum to 1: pass softmax probabilities, not logits"
            )
            self._warned_sum = True
        mean_b = xb.mean(axis=0)
        xb -= mean_b
        if n_a:
            delta = mean_b - self._mean
            buf[n_b] = math.sqrt(n_a * n_b / n) * delta  # Chan's merge term for the mean shift
            xb = buf
            self._mean += delta * (n_b / n)
        else:
            self._mean = mean_b
        # scatter += xb^T xb; BLAS sees the C-ordered arrays as their transposes (no copies).
        blas.dsyrk(1.0, xb.T, beta=1.0, c=self._scatter.T, trans=0, lower=0, overwrite_c=1)
        self._n = n
        if y is not None:
            self._add_confusion(y, np.argmax(x, axis=1))
        return self

    def _add_confusion(self, y: np.ndarray, pred: np.ndarray) -> None:
        if self._confusion is None:
            self._confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        cells, counts = np.unique(y * self.n_classes + pred, return_counts=True)
        self._confusion.flat[cells] += counts  # cells are unique, so fancy += is safe

    def mean(self) -> np.ndarray:
        """Mean prediction E[p], shape (K,)."""
        self._require_data()
        return self._mean.copy()

    def covariance(self, dtype: type = np.float64) -> np.ndarray:
        """Population covariance of the predictions (K, K), equal to ``np.cov(P.T, bias=True)``.

        ``dtype=np.float32`` halves the memory of the result for very large K (built by chunks).
        """
        self._require_data()
        k, s = self.n_classes, self._scatter
        out = np.empty((k, k), dtype=dtype)
        for r0 in range(0, k, _READ_ROWS):
            r1 = min(r0 + _READ_ROWS, k)
            out[r0:r1, :r0] = s[r0:r1, :r0]  # below the diagonal block: written by syrk
            out[r0:r1, r1:] = s[r1:, r0:r1].T  # above it: mirror of the lower part
            d = s[r0:r1, r0:r1]
            out[r0:r1, r0:r1] = np.tril(d) + np.tril(d, -1).T
            out[r0:r1] /= self._n
        return out

    def confusion(self, normalize: Literal["true"] | None = None) -> np.ndarray:
        """Confusion matrix (K, K): rows = true class, columns = predicted argmax.

        ``normalize="true"`` divides each row by its count (rows of unseen classes stay zero).
        """
        if self._confusion is None:
            raise ValueError("no labels were given to update(); the confusion matrix needs labels")
        if normalize is None:
            return self._confusion.copy()
        if normalize != "true":
            raise ValueError(f"normalize must be None or 'true', got {normalize!r}")
        rows = self._confusion.sum(axis=1, keepdims=True)
        return self._confusion / np.maximum(rows, 1)

    def _require_data(self) -> None:
        if self._n == 0:
            raise ValueError("no predictions accumulated yet: call update() first")


def prediction_stats(
    probs: np.ndarray, labels: np.ndarray | None = None, batch_size: int = 4096
) -> PredictionStats:
    """Statistics of an in-memory prediction matrix (N, K), accumulated in batches."""
    arr = np.asarray(probs)
    if arr.ndim != 2:
        raise ValueError(f"predictions must have shape (N, K), got {arr.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if labels is not None and np.shape(labels) != (arr.shape[0],):
        raise ValueError(f"labels must have shape ({arr.shape[0]},), got {np.shape(labels)}")
    stats = PredictionStats(arr.shape[1])
    for r0 in range(0, arr.shape[0], batch_size):
        y = None if labels is None else np.asarray(labels)[r0 : r0 + batch_size]
        stats.update(arr[r0 : r0 + batch_size], y)
    return stats
