"""The run manifest: every finished artifact of a run with its size and checksum.

``RUN/manifest.json`` is updated (atomically) by the process that finished a step: the generalist
trainer, the clustering, the launcher after each job, the evaluation. Every load checks the files
it reads against it, so a truncated or altered file is one clear error naming the file. Worker
processes never write it (the launcher registers their artifacts), so there is no race.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SpecialistsError
from .io import file_sha256, load_json, save_json

__all__ = ["MANIFEST_VERSION", "register", "verify"]

MANIFEST_VERSION = 1
_HINT = "if a step was interrupted while writing it, rerun that step"


def _path(root: Path) -> Path:
    return root / "manifest.json"


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
    data = _read(root)
    for p in paths:
        p = Path(p)
        rel = p.resolve().relative_to(root.resolve()).as_posix()
        data["files"][rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    save_json(_path(root), data)


def verify(root: str | os.PathLike, *paths: str | os.PathLike) -> None:
    """Check ``paths`` against the manifest; files it does not list pass (not registered yet)."""
    root = Path(root)
    files = _read(root)["files"]
    for p in paths:
        p = Path(p)
        entry = files.get(p.resolve().relative_to(root.resolve()).as_posix())
        if entry is None:
            continue
        if not p.is_file():
            raise SpecialistsError(f"{p}: missing (the run's manifest lists it)")
        if p.stat().st_size != entry["size"]:
            raise SpecialistsError(
                f"{p}: {p.stat().st_size} bytes, the run's manifest says {entry['size']} (truncated or changed)"
            )
        if file_sha256(p) != entry["sha256"]:
            raise SpecialistsError(
                f"{p}: checksum does not match the run's manifest (file changed)"
            )
