"""Image files decoded in parallel straight into an on-disk array, never all in memory.

``decode_to_npy(paths, size, channels, dest)`` makes ``dest``, a ``.npy`` file of uint8
``(N, size, size, channels)``: it is created (space reserved) under a temporary name, a pool of
threads decodes runs of files into their rows of the memory map (Pillow's decoders and resizing
release the interpreter lock, so threads decode in parallel, and nothing is re-imported or
copied between processes), and the file is flushed and renamed into place when every row is
written: a killed decode leaves no half array. The caller then memory-maps it read-only:
training reads batches from it, and every worker shares its pages instead of holding a copy.

Decoded image folders are cached under ``SPECIALISTS_CACHE`` (default ``~/.cache/specialists``),
one folder per (file list of each split, sizes and dates of the files, image size, channels,
resize mode, decoder version), so a second run on the same folder decodes nothing. Delete the
folder to reclaim the space. ``SPECIALISTS_DECODE_WORKERS`` sets the number of decoding threads
(default: the CPU cores, at most 8).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import SpecialistsError
from .image_files import read_image

__all__ = [
    "DECODER_VERSION",
    "cache_root",
    "decode_to_npy",
    "decode_workers",
    "folder_cache_dir",
    "load_decoded",
]

CHUNK = 64  # files per task: large enough to amortise a task, small enough to balance
DECODER_VERSION = 1  # part of every cache key: a change to the decoding makes new caches


def cache_root() -> Path:
    return Path(os.environ.get("SPECIALISTS_CACHE", "~/.cache/specialists")).expanduser()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode_workers() -> int:
    value = os.environ.get("SPECIALISTS_DECODE_WORKERS")
    if value is None:
        return max(1, min(8, _cores()))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SpecialistsError(f"SPECIALISTS_DECODE_WORKERS={value}: must be an integer >= 1")
    return n


def folder_cache_dir(identity: dict, splits: dict[str, Sequence[Path]]) -> Path:
    """The cache folder of a decoded image folder: named by ``identity`` (root, size, channels,
    resize), the decoder's version, and, split by split, the count, names, sizes and
    modification times of the files: any change to them makes another folder."""
    h = hashlib.sha256(
        json.dumps({**identity, "decoder": DECODER_VERSION}, sort_keys=True).encode()
    )
    for split, files in sorted(splits.items()):
        h.update(f"[{split}:{len(files)}]\n".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_root() / "folders" / h.hexdigest()[:24]


def load_decoded(path: Path, n: int, size: int, channels: int) -> np.ndarray | None:
    """The cached array at ``path`` memory-mapped read-only, or None when it is absent or not
    the expected (n, size, size, channels) uint8 array (then it is decoded again)."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (n, size, size, channels):
        return None
    return arr


def _decode_rows(
    out: np.ndarray, start: int, paths: list[str], size: int, channels: int, resize: str
) -> int:
    """Decode ``paths`` into rows ``start...`` of the memory map ``out`` (one thread's task)."""
    for i, p in enumerate(paths):
        out[start + i] = read_image(p, size, channels, resize=resize)
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
    """Decode ``paths`` into the ``.npy`` file ``dest`` with ``workers`` threads (default
    :func:`decode_workers`) and return it memory-mapped read-only. An unreadable file is one
    clear error naming it, and so is a full disk; either leaves no ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    n = len(paths)
    workers = decode_workers() if workers is None else workers
    bar = tqdm(total=n, desc=desc, unit="image", disable=None if progress else True)
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, channels)
        )
        with open(tmp, "r+b") as f:  # reserve the space: a full disk fails here, not in a write
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            except AttributeError:  # not on every platform
                pass
            except OSError as e:
                raise SpecialistsError(
                    f"{dest.parent}: no room for {os.path.getsize(tmp) / 2**30:.1f} GB of decoded "
                    f"images ({e.strerror}); free space or set SPECIALISTS_CACHE elsewhere"
                ) from e
        tasks = [
            (out, start, [str(p) for p in paths[start : start + CHUNK]], size, channels, resize)
            for start in range(0, n, CHUNK)
        ]
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                bar.update(_decode_rows(*task))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(_decode_rows, *t) for t in tasks[: 2 * workers]}
                queued = len(pending)
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            bar.update(fut.result())  # re-raises a task's error here
                            if queued < len(tasks):
                                pending.add(pool.submit(_decode_rows, *tasks[queued]))
                                queued += 1
                finally:
                    for fut in pending:
                        fut.cancel()
        out.flush()
        del out, tasks
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return np.load(dest, mmap_mode="r", allow_pickle=False)
