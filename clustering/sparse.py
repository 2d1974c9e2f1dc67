"""Statistics of a generalist's top-k predictions for very many classes, as sparse matrices.

At K = 100,000 classes a dense K x K float64 matrix is 75 GiB: ``PredictionStats`` cannot hold
it. ``TopKStats`` keeps, per example, only the k most probable classes t_n (the truncated
prediction: p on its top k, 0 elsewhere) and the mass 1 - sum(t_n) left outside as one number,
and accumulates

    S = sum_n t_n t_n^T        (K x K, sparse: at most k^2 entries per example)

with the mean E[t] (K floats), the captured mass and, given labels, a sparse confusion matrix.

Why the second moment S / N and not the covariance S / N - mu mu^T: the outer product mu mu^T is
dense (K^2 entries), so subtracting it would undo the sparsity. With many classes it is also
small: the mean prediction is about 1 / K per class, so mu_i mu_j ~ 1 / K^2 ~ 1e-10 at
K = 100,000, while classes confused with each other have E[t_i t_j] ~ 1 / (K x group size). On
the benchmark's planted stream (groups of 300) within-group entries average 1.6e-8, 180 times
mu_i mu_j; the stored entries across groups (noise) average 1.2e-9, about 13 times. What is
lost is the covariance's negative sign for pairs never predicted together, which the clustering
does not use (it groups by positive co-occurrence). For few, confidently predicted classes the
two matrices differ more, and the dense covariance stays the default wherever it fits in
memory: :func:`dense_fits` decides.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
from scipy import sparse

from ._validate import check_labels, check_probs

logger = logging.getLogger(__name__)

__all__ = ["TopKStats", "dense_fits"]

# Bytes per K x K cell of the dense path, as the cluster step holds them at once: the float64
# scatter and int64 confusion counts of PredictionStats, the copy of the counts confusion()
# returns, and the float64 covariance. The estimator adds nothing of that size above
# max_dense_classes (it works by row blocks and a thin sketch).
DENSE_BYTES_PER_CELL = 32

_FLUSH_PAIRS = 1 << 23  # buffered (row, col, value) triplets per merge into the CSR: 128 MiB


def dense_fits(
    n_classes: int,
    memory_bytes: int | None = None,
    *,
    safety: float = 0.5,
    top_k: int = 10,
) -> tuple[bool, str]:
    """Whether dense statistics of ``n_classes`` fit in memory, and why, in one sentence.

    The dense path (``PredictionStats``, its confusion counts and the covariance read from it)
    needs ``DENSE_BYTES_PER_CELL`` (32) bytes per K x K cell. It fits when that is at most
    ``safety`` times ``memory_bytes`` (default: the memory available now, from /proc/meminfo
    ``MemAvailable``, else the physical memory). Otherwise the reason says to use sparse top-k
    statistics (:class:`TopKStats` with ``k=top_k``). Returns (fits, reason).
    """
    k = int(n_classes)
    if k < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    available = _available_memory() if memory_bytes is None else int(memory_bytes)
    need = DENSE_BYTES_PER_CELL * k * k
    budget = safety * available
    sizes = (
        f"dense statistics of {k:,} classes need {_size(need)} ({DENSE_BYTES_PER_CELL} bytes "
        f"for each of the {k:,} x {k:,} pairs: scatter, covariance and confusion counts); "
        f"{_size(available)} available, {safety:.0%} of it usable"
    )
    if need <= budget:
        return True, f"{sizes}: dense covariance"
    return False, f"{sizes}: sparse top-{top_k} statistics"


def _available_memory() -> int:
    """Bytes of memory available to a new allocation: MemAvailable, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: float) -> str:
    """Bytes for a reader: 31 MiB, 6.7 GiB, 298 GiB."""
    if n < 2**30:
        return f"{n / 2**20:,.0f} MiB"
    return f"{n / 2**30:,.1f} GiB" if n < 10 * 2**30 else f"{n / 2**30:,.0f} GiB"


class _SparseSum:
    """A K x K sum of (row, col, value) triplets as a CSR matrix.

    Triplets are buffered and merged ``flush_at`` at a time: scipy sums a COO batch's duplicates
    while converting it to CSR, and adding two canonical CSR matrices is one linear merge, so the
    accumulator is never re-sorted for a small batch.
    """

    def __init__(self, n: int, dtype: type, flush_at: int) -> None:
        self.shape = (n, n)
        self.flush_at = flush_at
        self._total = sparse.csr_array(self.shape, dtype=dtype)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        self._pending.append((rows, cols, vals))
        self._n_pending += len(rows)
        if self._n_pending >= self.flush_at:
            self._flush()

    def total(self) -> sparse.csr_array:
        self._flush()
        return self._total

    @property
    def nbytes(self) -> int:
        held = self._total.data.nbytes + self._total.indices.nbytes + self._total.indptr.nbytes
        return held + sum(a.nbytes + b.nbytes + c.nbytes for a, b, c in self._pending)

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, cols, vals = (np.concatenate(parts) for parts in zip(*self._pending))
        self._pending, self._n_pending = [], 0
        batch = sparse.coo_array((vals, (rows, cols)), shape=self.shape).tocsr()  # sums dups
        self._total = self._total + batch
        self._total.sort_indices()


class TopKStats:
    """Accumulate sparse second moments of top-k predictions over batches (see module doc).

    Memory is the sparse matrices plus at most ``flush_pairs`` buffered pairs (2**23 by default:
    128 MiB, about three times that while they are merged), whatever K. S holds one entry per
    pair of classes ever predicted together, in its upper triangle (mirrored when read): at
    K = 100,000, 1,000,000 examples and top-10, 22 million entries (12 bytes each).
    """

    def __init__(self, n_classes: int, k: int = 10, *, flush_pairs: int = _FLUSH_PAIRS) -> None:
        if int(n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if not 1 <= int(k) <= int(n_classes):
            raise ValueError(f"k must be in [1, n_classes={n_classes}], got {k}")
        if int(flush_pairs) < 1:
            raise ValueError(f"flush_pairs must be >= 1, got {flush_pairs}")
        self.n_classes = int(n_classes)
        self.k = int(k)
        self._n = 0
        self._n_labelled = 0
        self._sum = np.zeros(self.n_classes)  # (K,) sum of the truncated predictions
        self._residual = 0.0  # sum over examples of the mass outside the top k
        # Index pairs (i <= j) of the sorted top k: the upper triangle of t t^T, diagonal included.
        self._pairs = np.triu_indices(self.k)
        self._upper = _SparseSum(self.n_classes, np.float64, int(flush_pairs))
        self._confusion = _SparseSum(self.n_classes, np.int64, int(flush_pairs))
        self._warned_sum = False

    @property
    def n_seen(self) -> int:
        """Number of predictions accumulated so far."""
        return self._n

    @property
    def n_labelled(self) -> int:
        """Number of predictions that came with labels (counted in the confusion matrix)."""
        return self._n_labelled

    @property
    def nbytes(self) -> int:
        """Bytes held: the sparse accumulators, their buffers and the per-class sums."""
        return self._upper.nbytes + self._confusion.nbytes + self._sum.nbytes

    def update(
        self,
        probs: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        *,
        indices: np.ndarray | None = None,
        values: np.ndarray | None = None,
    ) -> TopKStats:
        """Add a batch: softmax rows ``probs`` (N, K), or their top k as ``indices`` (N, k) and
        ``values`` (N, k) (no dense row needed); with optional true labels (N,).

        The k values of a row may come in any order; a class may not repeat within a row.
        """
        idx, val = self._topk(probs, indices, values)
        n_b = len(idx)
        y = None if labels is None else check_labels(labels, n_b, self.n_classes)
        if n_b == 0:
            return self
        mass = val.sum(1, dtype=np.float64)
        self._check_mass(mass)
        self._n += n_b
        self._residual += float(np.clip(1 - mass, 0, None).sum())
        self._sum += np.bincount(idx.ravel(), weights=val.ravel(), minlength=self.n_classes)
        if y is not None:
            pred = np.take_along_axis(idx, val.argmax(1)[:, None], axis=1)[:, 0]
            self._confusion.add(y, pred, np.ones(n_b, dtype=np.int64))
            self._n_labelled += n_b
        self._add_pairs(idx, val)
        return self

    def _topk(self, probs, indices, values) -> tuple[np.ndarray, np.ndarray]:
        """Validated (indices, values) of shape (N, k), each row sorted by class index."""
        if (probs is None) == (indices is None and values is None):
            raise ValueError("pass either probs (N, K) or indices and values (N, k), not both")
        if probs is not None:
            x = check_probs(probs, self.n_classes)
            idx = np.argpartition(x, self.n_classes - self.k, axis=1)[:, self.n_classes - self.k :]
            return _sorted_rows(idx, np.take_along_axis(x, idx, axis=1))
        if indices is None or values is None:
            raise ValueError("indices and values come together: pass both, each (N, k)")
        idx, val = np.asarray(indices), np.asarray(values)
        if idx.ndim != 2 or idx.shape[1] != self.k or val.shape != idx.shape:
            raise ValueError(
                f"indices and values must both have shape (N, {self.k}), got {idx.shape} and "
                f"{val.shape}"
            )
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integer class indices, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_classes):
            raise ValueError(
                f"indices must be in [0, {self.n_classes}), got values in "
                f"[{idx.min()}, {idx.max()}]"
            )
        val = check_probs(val, self.k)
        if val.size and val.min() < 0:
            raise ValueError("values must be probabilities (>= 0), got a negative value")
        idx, val = _sorted_rows(idx, val)
        repeat = (idx[:, 1:] == idx[:, :-1]).any(1)
        if repeat.any():
            raise ValueError(
                f"indices repeat a class within a row (first in row {repeat.argmax()})"
            )
        return idx, val

    def _check_mass(self, mass: np.ndarray) -> None:
        if not self._warned_sum and (mass > 1 + 1e-3).any():
            logger.warning(
                "top-k values sum to more than 1: pass softmax probabilities, not logits"
            )
            self._warned_sum = True

    def _add_pairs(self, idx: np.ndarray, val: np.ndarray) -> None:
        """Buffer t_i t_j for the pairs i <= j of every row (rows are sorted, so i <= j holds)."""
        a, b = self._pairs
        v = val.astype(np.float64)
        self._upper.add(idx[:, a].ravel(), idx[:, b].ravel(), (v[:, a] * v[:, b]).ravel())

    def second_moment(self, dtype: type = np.float32) -> sparse.csr_array:
        """E[t t^T] = S / N as a symmetric sparse matrix (K x K, CSR), t = truncated prediction.

        float32 by default: every entry is a sum of non-negative products, accumulated in float64
        and rounded once, so nothing cancels (unlike a covariance); it halves the values' memory
        and the clustering's sparse products run in float32 (1.7x faster at K = 100,000).
        """
        self._require_data()
        upper = self._upper.total()
        full = sparse.csr_array(upper + upper.T - sparse.diags_array(upper.diagonal()))
        full.data /= self._n  # in place: no second copy of the nnz values
        full.sort_indices()
        return full.astype(dtype, copy=False)

    def mean(self) -> np.ndarray:
        """Mean truncated prediction E[t], shape (K,)."""
        self._require_data()
        return self._sum / self._n

    def captured_mass(self) -> float:
        """Mean share of the probability mass inside the top k (1 - the mean residual)."""
        self._require_data()
        return 1.0 - self._residual / self._n

    def confusion(self, normalize: Literal["true"] | None = None) -> sparse.csr_array:
        """Sparse confusion matrix (K x K, CSR): rows = true class, columns = predicted argmax.

        ``normalize="true"`` divides each row by its count (float64; unseen classes stay zero).
        """
        if self._n_labelled == 0:
            raise ValueError("no labels were given to update(); the confusion matrix needs labels")
        counts = self._confusion.total()
        if normalize is None:
            return counts.copy()
        if normalize != "true":
            raise ValueError(f"normalize must be None or 'true', got {normalize!r}")
        rows = np.maximum(counts.sum(axis=1), 1)
        return sparse.csr_array(sparse.diags_array(1.0 / rows) @ counts)

    def _require_data(self) -> None:
        if self._n == 0:
            raise ValueError("no predictions accumulated yet: call update() first")


def _sorted_rows(idx: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's entries ordered by class index; indices as int32 (K < 2**31), values as given."""
    order = np.argsort(idx, axis=1)
    return (
        np.take_along_axis(idx, order, axis=1).astype(np.int32),
        np.take_along_axis(val, order, axis=1),
    )
