"""The operations of ``_matrix`` for a scipy.sparse K x K matrix, without densifying it.

Same names and meanings as in ``_matrix``, so the estimator and the metrics pick the module that
matches their input (``_ops.matrix_ops``). Work and memory are O(nnz + K): at K = 100,000
classes with 43 million stored entries the largest temporary is one array of nnz entries. The
one dense result, ``normalized_columns``, is K x K: the estimator asks for it only up to
``max_dense_classes`` classes and sketches the columns above.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

_CHUNK = 1 << 22  # stored entries per chunk in ``shared_mass``


def diagonal(m: sparse.csr_array) -> np.ndarray:
    """The diagonal as float64 (K,)."""
    return m.diagonal().astype(np.float64)


def row_ids(m: sparse.csr_array) -> np.ndarray:
    """The row of every stored entry (nnz,), int32 (K < 2**31)."""
    return np.repeat(np.arange(m.shape[0], dtype=np.int32), np.diff(m.indptr))


def symmetrized(m: sparse.csr_array) -> sparse.csr_array:
    """(M + M^T) / 2, or ``m`` itself when it is exactly symmetric (``TopKStats`` output is)."""
    mt = m.T.tocsr()
    if (m != mt).nnz == 0:
        return m
    out = sparse.csr_array((m + mt) / 2)
    out.sort_indices()
    return out


def max_offdiag(m: sparse.csr_array) -> np.ndarray:
    """Largest positive off-diagonal entry of every column, float64 (K,) (0 if none)."""
    out = np.zeros(m.shape[1])
    keep = (m.data > 0) & (m.indices != row_ids(m))
    np.maximum.at(out, m.indices[keep], m.data[keep])
    return out


def column_norms(m: sparse.csr_array, diag: np.ndarray | None = None) -> np.ndarray:
    """L2 norm of every column, float64 (K,); with ``diag``, as if the diagonal were ``diag``."""
    data = m.data.astype(np.float64)
    sq = np.bincount(m.indices, weights=data * data, minlength=m.shape[1])
    if diag is not None:
        sq += diag**2 - diagonal(m) ** 2
    return np.sqrt(np.clip(sq, 0, None))


def with_diagonal(m: sparse.csr_array, diag: np.ndarray) -> sparse.csr_array:
    """A copy of ``m`` whose diagonal is ``diag``."""
    out = m + sparse.diags_array(diag - diagonal(m)).tocsr()
    out.sort_indices()
    return sparse.csr_array(out)


def offdiag_positive(m: sparse.csr_array) -> sparse.csr_array:
    """Positive part of ``m`` with the diagonal removed (a copy)."""
    drop = (m.data <= 0) | (m.indices == row_ids(m))
    out = m.copy()
    out.data[drop] = 0
    out.eliminate_zeros()
    return out


def total_mass(m: sparse.csr_array) -> float:
    """Sum of the positive off-diagonal entries: the confusion mass a grouping can capture."""
    positive = float(np.clip(m.data, 0, None).sum(dtype=np.float64))
    return positive - float(np.clip(diagonal(m), 0, None).sum())


def group_mass(m: sparse.csr_array, members: np.ndarray) -> float:
    """Positive off-diagonal mass on ordered pairs of distinct classes inside one group."""
    return total_mass(m[members][:, members])


def shared_mass(m: sparse.csr_array, groups: list[np.ndarray]) -> float:
    """Positive off-diagonal mass on pairs that share at least one group (overlaps counted once).

    Each class's groups are one row of a padded (K, c) table (c = the most groups any class is
    in, -1 for none); a stored entry (i, j) is shared when rows i and j have a group in common.
    """
    k = m.shape[0]
    coverage = np.zeros(k, dtype=np.int64)
    for g in groups:
        coverage[g] += 1
    width = max(int(coverage.max()), 1)
    table = np.full((k, width), -1, dtype=np.int32)
    slot = np.zeros(k, dtype=np.int64)
    for gid, g in enumerate(groups):
        table[g, slot[g]] = gid
        slot[g] += 1
    rows = row_ids(m)
    total = 0.0
    step = max(1, _CHUNK // (width * width))
    for e0 in range(0, m.nnz, step):
        i, j, v = rows[e0 : e0 + step], m.indices[e0 : e0 + step], m.data[e0 : e0 + step]
        keep = (v > 0) & (i != j)
        a, b = table[i[keep]], table[j[keep]]  # (n, c) group ids of both ends
        shared = ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any((1, 2))
        total += float(v[keep][shared].sum(dtype=np.float64))
    return total


def affinity(m: sparse.csr_array) -> sparse.csr_array:
    """Symmetrised non-negative affinity (M + M^T) / 2 with a zero diagonal, float64, sparse."""
    return offdiag_positive(symmetrized(sparse.csr_array(m, dtype=np.float64)))


def normalized_columns(
    m: sparse.csr_array, inv_norms: np.ndarray, diag: np.ndarray | None = None
) -> np.ndarray:
    """Columns of ``m`` as rows of a dense float32 (K, K) array, as ``_matrix`` gives them.

    Only for K up to the estimator's ``max_dense_classes`` (4,096: 64 MiB); above it the
    columns are sketched.
    """
    m = m if diag is None else with_diagonal(m, diag)
    pts = m.T.astype(np.float32).toarray()
    pts *= inv_norms[:, None].astype(np.float32)
    return pts
