"""Chunked operations on a K x K matrix that never materialise a second K x K array.

At K = 15,000 a float32 matrix is 0.9 GB; these helpers walk it in row blocks so that the working
memory on top of it stays at a few tens of MB. The one exception is ``symmetrized`` of an
asymmetric matrix (a confusion matrix), which returns a new matrix of the same dtype.
"""

from __future__ import annotations

import numpy as np

from ._threads import single_thread

ROWS = 256  # rows per block: 256 x 15,000 float64 = 31 MB


def blocks(k: int, rows: int = ROWS):
    """Yield (r0, r1) row ranges covering [0, k)."""
    for r0 in range(0, k, rows):
        yield r0, min(r0 + rows, k)


def column_norms(m: np.ndarray, diag: np.ndarray | None = None) -> np.ndarray:
    """L2 norm of every column, float64 (K,); with ``diag``, as if the diagonal were ``diag``."""
    sq = np.zeros(m.shape[1])
    for r0, r1 in blocks(m.shape[0]):
        b = m[r0:r1].astype(np.float64)
        sq += np.einsum("ij,ij->j", b, b)
    if diag is not None:
        sq += diag**2 - np.diagonal(m).astype(np.float64) ** 2
    return np.sqrt(np.clip(sq, 0, None))


def symmetrized(m: np.ndarray) -> np.ndarray:
    """(M + M^T) / 2, or ``m`` itself when it is already symmetric (checked by blocks)."""
    scale = max(float(np.abs(np.diagonal(m)).max()), 1e-30)
    if all(
        np.array_equal(a, b) or np.allclose(a, b, rtol=1e-5, atol=1e-7 * scale)
        for a, b in ((m[r0:r1], m[:, r0:r1].T) for r0, r1 in blocks(len(m)))
    ):
        return m
    out = np.empty_like(m)
    for r0, r1 in blocks(len(m)):
        out[r0:r1] = (m[r0:r1] + m[:, r0:r1].T) / 2
    return out


def max_offdiag(m: np.ndarray) -> np.ndarray:
    """Largest positive off-diagonal entry of every column, float64 (K,) (0 if none)."""
    out = np.zeros(m.shape[1])
    for r0, r1 in blocks(m.shape[0]):
        np.maximum(out, offdiag_positive(m[r0:r1], r0).max(0), out=out)
    return out


def offdiag_positive(block: np.ndarray, r0: int) -> np.ndarray:
    """Positive part of rows r0.. of the matrix with the diagonal entries zeroed (a copy)."""
    w = np.clip(block, 0, None)
    idx = np.arange(w.shape[0])
    w[idx, r0 + idx] = 0
    return w


def total_mass(m: np.ndarray) -> float:
    """Sum of the positive off-diagonal entries: the confusion mass a grouping can capture."""
    return float(
        sum(offdiag_positive(m[r0:r1], r0).sum(dtype=np.float64) for r0, r1 in blocks(len(m)))
    )


def group_mass(m: np.ndarray, members: np.ndarray) -> float:
    """Positive off-diagonal mass on ordered pairs of distinct classes inside one group."""
    sub = m[np.ix_(members, members)]
    return float(offdiag_positive(sub, 0).sum(dtype=np.float64))


def shared_mass(m: np.ndarray, groups: list[np.ndarray]) -> float:
    """Positive off-diagonal mass on pairs that share at least one group (overlaps counted once)."""
    k = len(m)
    member = np.zeros((k, max(len(groups), 1)), dtype=np.float32)  # (K, G) membership
    for g, idx in enumerate(groups):
        member[idx, g] = 1
    total = 0.0
    for r0, r1 in blocks(k):
        share = (member[r0:r1] @ member.T) > 0  # (rows, K): pair shares a group
        total += float(offdiag_positive(m[r0:r1], r0)[share].sum(dtype=np.float64))
    return total


def normalized_columns(
    m: np.ndarray, inv_norms: np.ndarray, diag: np.ndarray | None = None
) -> np.ndarray:
    """Columns of ``m`` as rows of a float32 (K, K) array (diagonal replaced by ``diag``), scaled."""
    pts = np.ascontiguousarray(m.T, dtype=np.float32)
    if diag is not None:
        np.fill_diagonal(pts, diag)
    pts *= inv_norms[:, None].astype(np.float32)
    return pts


def sketch_columns(
    m: np.ndarray,
    inv_norms: np.ndarray,
    dim: int,
    seed: int,
    diag: np.ndarray | None = None,
    n_power: int = 2,
) -> np.ndarray:
    """Project the (scaled) columns onto a d-dimensional basis of their dominant subspace.

    Randomised subspace iteration (Halko, Martinsson & Tropp 2011) on X = M' diag(inv_norms),
    M' being M with its diagonal replaced by ``diag``, applied implicitly (M' = M + diag(shift)):
    each pass is one product of M with a (K, d) block, float32 when M is. Distances between
    columns inside the subspace are kept exactly; what is dropped is the small-energy tail, which
    shifts all distances by about the same amount. Returns (K, d) float32.
    """
    rng = np.random.default_rng(seed)
    dt = np.float32 if m.dtype == np.float32 else np.float64
    s = inv_norms.astype(dt)[:, None]  # (K, 1)
    shift = np.zeros((m.shape[0], 1), dt)
    if diag is not None:
        shift[:, 0] = diag - (np.diagonal(m) if isinstance(m, np.ndarray) else m.diagonal())

    def prod(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # M' @ b with a = M or M.T
        return a @ b + shift * b

    def orth(a: np.ndarray) -> np.ndarray:
        with single_thread():  # threaded LAPACK QR of a thin matrix: 10x slower on a busy host
            return np.linalg.qr(a)[0]

    q = orth(prod(m, s * rng.standard_normal((m.shape[0], dim), dtype=dt)))  # (K, d)
    for _ in range(n_power):
        z = orth(s * prod(m.T, q))
        q = orth(prod(m, s * z))
    return np.ascontiguousarray(s * prod(m.T, q), dtype=np.float32)  # rows = sketched columns


def affinity(m: np.ndarray, n_neighbors: int | None = None):
    """Symmetrised non-negative affinity (M + M^T) / 2 with a zero diagonal, for spectral methods.

    Dense float64 by default; with ``n_neighbors`` a sparse graph keeping each class's strongest
    links (union of both directions), built by row blocks for very large K.
    """
    from scipy import sparse

    k = len(m)
    if n_neighbors is None:
        a = (m.astype(np.float64) + m.T) / 2
        np.clip(a, 0, None, out=a)
        np.fill_diagonal(a, 0)
        return a
    rows, cols, vals = [], [], []
    n_keep = min(n_neighbors, k - 1)
    for r0, r1 in blocks(k):
        b = offdiag_positive((m[r0:r1] + m[:, r0:r1].T) / 2, r0)  # (rows, K)
        top = np.argpartition(-b, n_keep - 1, axis=1)[:, :n_keep]
        v = np.take_along_axis(b, top, axis=1)
        keep = v > 0
        rows.append(np.repeat(np.arange(r0, r1), n_keep)[keep.ravel()])
        cols.append(top[keep])
        vals.append(v[keep])
    a = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(k, k)
    )
    return a.maximum(a.T).astype(np.float64)
