"""Atomic, pickle-free reading and writing of run artifacts: the project's one file writer.

Every write goes to a temporary file in the destination's directory, is flushed to disk, then
renamed over the destination, so a killed process leaves either the old file or the new one.
Weights are safetensors, metadata JSON, arrays ``.npy`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from .errors import SpecialistsError

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "check_writable",
    "file_sha256",
    "load_json",
    "load_npy",
    "load_tensors",
    "save_json",
    "save_figure",
    "save_npy",
    "save_tensors",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The writer writes the temporary file however it likes (numpy, safetensors, matplotlib...).
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SpecialistsError(f"{path.parent}: cannot write here ({_reason(e)})") from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise SpecialistsError(f"{path}: write failed ({_reason(e)})") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return e.strerror or str(e)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(figure: Any, path: str | os.PathLike, dpi: int | None = None) -> None:
    """Save a matplotlib figure as PNG."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SpecialistsError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecialistsError(f"{path}: not valid JSON ({e})") from e


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Save a flat dict of tensors as safetensors (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load safetensors weights; never unpickles. A broken file is one clear error. With
    ``sha256`` the bytes read must have that checksum (read once: checked, then parsed)."""
    path = Path(path)
    if not path.is_file():
        raise SpecialistsError(f"{path}: file not found")
    try:
        if sha256 is None:
            return load_file(str(path), device=str(device))
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SpecialistsError(
                f"{path}: changed since its ensemble was loaded (the run was written meanwhile); "
                "load the ensemble again"
            )
        return {k: v.to(device) for k, v in load_bytes(data).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SpecialistsError(f"{path}: not a readable safetensors file ({e})") from e


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array (``mmap``: memory-mapped read-only, read as it is used)."""
    path = Path(path)
    if not path.is_file():
        raise SpecialistsError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise SpecialistsError(f"{path}: not a readable .npy array ({e})") from e


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(directory: str | os.PathLike) -> None:
    """Fail early, before hours of training, when ``directory`` cannot be created or written.

    Probes by creating the directory and a temporary file in it (then removes both if they
    were not there before), which is the only test that is right for every file system.
    """
    directory = Path(directory)
    existed = directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise SpecialistsError(f"{directory}: cannot write here ({_reason(e)})") from e
    if not existed:
        with contextlib.suppress(OSError):
            directory.rmdir()
