"""Thread control for small or latency-bound numerics (BLAS, LAPACK and faiss's OpenMP)."""

from __future__ import annotations

import contextlib
import functools

import faiss
from threadpoolctl import ThreadpoolController

# Below this many multiply-adds per Lloyd iteration one thread wins: thread start-up dominates,
# and on a busy host OpenMP/BLAS threads spinning for a core made small runs 10x slower.
SERIAL_WORK = 2e8


@functools.cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()  # scanning the loaded libraries is slow: do it once


@contextlib.contextmanager
def single_thread(active: bool = True):
    """Run BLAS and faiss (OpenMP) on one thread inside the block, then restore the settings."""
    if not active:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with _controller().limit(limits=1, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(before)
