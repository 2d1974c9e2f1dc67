"""The matrix operations that fit the input: ``_matrix`` for an array, ``_sparse`` for scipy.sparse.

Both modules define the same functions (``symmetrized``, ``max_offdiag``, ``column_norms``,
``total_mass``, ``group_mass``, ``shared_mass``, ``normalized_columns``) with the same meaning.
"""

from __future__ import annotations

from types import ModuleType

from scipy import sparse

from . import _matrix, _sparse


def matrix_ops(m) -> ModuleType:
    """``_sparse`` for a scipy.sparse matrix, ``_matrix`` for a dense array."""
    return _sparse if sparse.issparse(m) else _matrix
