"""Image files decoded in parallel straight into an on-disk array, never all in memory.

``decode_to_npy(paths, size, channels, dest)`` makes ``dest``, a ``.npy`` file of uint8
``(N, size, size, channels)``: it is created empty under a temporary name, worker processes
each decode a run of files and write them into their rows of the memory map, and the file is
renamed into place when every row is written (a killed decode leaves no half array). The caller
then memory-maps it read-only: training reads batches from it, and many processes share its
pages instead of each holding a copy.

Decoded image folders are cached under ``SPECIALISTS_CACHE`` (default ``~/.cache/specialists``),
one folder per (file list, sizes and dates of the files, image size, channels, resize mode), so
a second run on the same folder decodes nothing. ``SPECIALISTS_DECODE_WORKERS`` sets the
number of decoding processes (default: the CPU cores, at most 8).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import SpecialistsError
from .image_files import read_image

__all__ = ["cache_root", "decode_to_npy", "decode_workers", "folder_cache_dir"]

CHUNK = 64  # files per task: large enough to amortise a task, small enough to balance


def cache_root() -> Path:
    return Path(os.environ.get("SPECIALISTS_CACHE", "~/.cache/specialists")).expanduser()


def decode_workers() -> int:
    value = os.environ.get("SPECIALISTS_DECODE_WORKERS")
    if value is None:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SpecialistsError(f"SPECIALISTS_DECODE_WORKERS={value}: must be an integer >= 1")
    return n


def folder_cache_dir(identity: dict, files: Sequence[Path]) -> Path:
    """The cache folder of a decoded image folder: named by ``identity`` (root, size, channels,
    resize) and the name, size and modification time of every file, so that any change to the
    files makes another one."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_root() / "folders" / h.hexdigest()[:24]


def _decode_rows(
    npy: str, start: int, paths: list[str], size: int, channels: int, resize: str
) -> int:
    """Decode ``paths`` into rows ``start...`` of the memory-mapped ``npy`` (a worker's task)."""
    out = np.load(npy, mmap_mode="r+")
    for i, p in enumerate(paths):
        out[start + i] = read_image(p, size, channels, resize=resize)
    out.flush()
    del out
    return len(paths)


def decode_to_npy(
    paths: Sequence[str | os.PathLike],
    size: int,
    channels: int,
    dest: str | os.PathLike,
    *,
    resize: str = "crop",
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decoding",
) -> np.ndarray:
    """Decode ``paths`` into the ``.npy`` file ``dest`` with ``workers`` processes (default
    :func:`decode_workers`) and return it memory-mapped read-only. An unreadable file is one
    clear error naming it, and leaves no ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    n = len(paths)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, channels))
    del arr  # the header and the file's length are on disk; the workers write the rows
    tasks = [
        (str(tmp), start, [str(p) for p in paths[start : start + CHUNK]], size, channels, resize)
        for start in range(0, n, CHUNK)
    ]
    workers = decode_workers() if workers is None else workers
    bar = tqdm(total=n, desc=desc, unit="image", disable=None if progress else True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                bar.update(_decode_rows(*task))
        else:
            ctx = multiprocessing.get_context("spawn")  # no copy of the caller's memory
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                pending = {pool.submit(_decode_rows, *t) for t in tasks[: 4 * workers]}
                queued = 4 * workers
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        bar.update(fut.result())  # re-raises a worker's error here
                        if queued < len(tasks):
                            pending.add(pool.submit(_decode_rows, *tasks[queued]))
                            queued += 1
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return np.load(dest, mmap_mode="r", allow_pickle=False)
