"""The run manifest: every finished artifact of a run with its size and checksum.

``RUN/manifest.json`` is updated (atomically) by the process that finished a step: the generalist
trainer, the clustering, the launcher after each job, the evaluation. Every load checks the files
it reads against it, so a truncated or altered file is one clear error naming the file. Its
read-modify-write holds the run's lock (:mod:`specialists.lock`), so two processes registering at
once lose no entry; worker processes never write it (the launcher registers their artifacts).
Its ``generation`` counts the updates; ``metrics.json`` records the one it scored.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SpecialistsError
from .lock import run_lock
from .run import RunDir
from .storage import file_sha256, load_json, save_json

__all__ = ["MANIFEST_VERSION", "checked_sha256", "generation", "register", "verify"]

MANIFEST_VERSION = 1


def _path(root: Path) -> Path:
    return RunDir(root).manifest


def _read(root: Path) -> dict:
    path = _path(root)
    if not path.is_file():
        return {"schema_version": MANIFEST_VERSION, "files": {}}
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise SpecialistsError(f"{path}: not a run manifest")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise SpecialistsError(
            f"{path}: schema version {version} is newer than this program's ({MANIFEST_VERSION}); upgrade specialists"
        )
    return data


def register(root: str | os.PathLike, *paths: str | os.PathLike) -> None:
    """Record the current size and checksum of ``paths`` (files inside the run ``root``)."""
    root = Path(root)
    entries = {}
    for p in paths:  # checksums first, outside the lock
        p = Path(p)
        rel = p.resolve().relative_to(root.resolve()).as_posix()
        entries[rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    with run_lock(root, "a manifest update"):
        data = _read(root)
        data["files"].update(entries)
        data["generation"] = int(data.get("generation", 0)) + 1
        save_json(_path(root), data)


def generation(root: str | os.PathLike) -> int:
    """How many updates the run's manifest has had (0: none yet)."""
    return int(_read(Path(root)).get("generation", 0))


def _entry(files: dict, root: Path, path: Path) -> dict | None:
    return files.get(path.resolve().relative_to(root.resolve()).as_posix())


def _check(path: Path, entry: dict) -> str:
    """``path``'s checksum, computed once, after checking it against its manifest ``entry``."""
    if not path.is_file():
        raise SpecialistsError(f"{path}: missing (the run's manifest lists it)")
    if path.stat().st_size != entry["size"]:
        raise SpecialistsError(
            f"{path}: {path.stat().st_size} bytes, the run's manifest says {entry['size']} (truncated or changed)"
        )
    sha = file_sha256(path)
    if sha != entry["sha256"]:
        raise SpecialistsError(f"{path}: checksum does not match the run's manifest (file changed)")
    return sha


def verify(root: str | os.PathLike, *paths: str | os.PathLike) -> None:
    """Check ``paths`` against the manifest; files it does not list pass (not registered yet)."""
    root = Path(root)
    files = _read(root)["files"]
    for p in paths:
        entry = _entry(files, root, Path(p))
        if entry is not None:
            _check(Path(p), entry)


def checked_sha256(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """The SHA-256 of ``path``, reading it once, checked against the manifest when it lists it."""
    root, path = Path(root), Path(path)
    entry = _entry(_read(root)["files"], root, path)
    return file_sha256(path) if entry is None else _check(path, entry)
