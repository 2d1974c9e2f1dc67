"""Input checks shared by the public functions: one clear line per problem, raised as ValueError."""

from __future__ import annotations

import numpy as np
from scipy import sparse

_CHECK_ROWS = 512  # rows per chunk when scanning a big matrix, so no K x K temporary is made


def check_probs(probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Return ``probs`` as a 2-D float array of shape (N, n_classes); reject NaN/inf."""
    arr = np.asarray(probs)
    if arr.ndim != 2 or arr.shape[1] != n_classes:
        raise ValueError(f"predictions must have shape (N, {n_classes}), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"predictions must be numeric, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"predictions contain {int(bad.sum())} NaN or inf values (first in row {row}); "
            "check the model's outputs"
        )
    return arr


def check_labels(labels: np.ndarray, n_rows: int, n_classes: int) -> np.ndarray:
    """Return integer labels of length ``n_rows``, each in [0, n_classes)."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"labels must be in [0, {n_classes}), got values in [{arr.min()}, {arr.max()}]"
        )
    return arr


def check_matrix(matrix: np.ndarray, name: str = "matrix") -> np.ndarray:
    """Return a square K x K float matrix (K >= 2) without copying float input; reject NaN/inf.

    A scipy.sparse matrix comes back as a canonical ``csr_array`` (see ``check_sparse_matrix``).
    """
    if sparse.issparse(matrix):
        return check_sparse_matrix(matrix, name)
    arr = np.asarray(matrix)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be square (K x K), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} must cover at least 2 classes, got {arr.shape[0]}")
    if not np.issubdtype(arr.dtype, np.floating):
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
        arr = arr.astype(np.float32)  # counts: float32 is exact to 2**24 and halves memory
    for r0 in range(0, arr.shape[0], _CHECK_ROWS):
        if not np.isfinite(arr[r0 : r0 + _CHECK_ROWS]).all():
            raise ValueError(f"{name} contains NaN or inf values")
    return arr


def check_sparse_matrix(matrix, name: str = "matrix") -> sparse.csr_array:
    """Return a square K x K (K >= 2) float scipy.sparse matrix as a ``csr_array`` with sorted
    indices and no duplicate entries (a copy only when the input is not already so); reject
    NaN/inf. Integer counts become float32, as dense ones do."""
    shape = matrix.shape
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name} must be square (K x K), got shape {shape}")
    if shape[0] < 2:
        raise ValueError(f"{name} must cover at least 2 classes, got {shape[0]}")
    dtype = matrix.dtype
    if not np.issubdtype(dtype, np.floating):
        if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"{name} must be real-valued, got dtype {dtype}")
        dtype = np.float32
    out = sparse.csr_array(matrix, dtype=dtype)
    if not out.has_canonical_format:
        out = out.copy()  # may share its arrays with the caller's matrix
        out.sum_duplicates()  # sorts the indices too
    if not np.isfinite(out.data).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return out


def check_groups(groups: list, n_classes: int) -> list[np.ndarray]:
    """Return groups as int arrays of unique class indices in [0, n_classes)."""
    out = []
    for i, g in enumerate(groups):
        arr = np.asarray(g, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"group {i} has class indices outside [0, {n_classes})")
        if np.unique(arr).size != arr.size:
            raise ValueError(f"group {i} lists a class twice")
        out.append(arr)
    return out


def as_seed(random_state: int | np.random.Generator | np.random.RandomState | None) -> int:
    """Turn a scikit-learn style ``random_state`` into a non-negative int seed."""
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}")
        return int(random_state)
    raise ValueError(
        f"random_state must be an int, a numpy generator or None, got {random_state!r}"
    )
