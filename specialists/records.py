"""Small frozen records that cross package boundaries, stored as JSON."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SpecialistsError

__all__ = ["SCHEMA_VERSION", "GeneralistRecord", "record_from_dict"]

SCHEMA_VERSION = 1


def record_from_dict(cls, d: Any, source: str | Path = "record"):
    """Build a dataclass from JSON, with one clear line on unknown or missing keys."""
    if not isinstance(d, dict):
        raise SpecialistsError(f"{source}: expected a JSON object")
    version = d.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SpecialistsError(
            f"{source}: schema version {version} is newer than this program's ({SCHEMA_VERSION}); upgrade specialists"
        )
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise SpecialistsError(f"{source}: unknown key {unknown[0]!r}")
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    missing = sorted(required - set(d))
    if missing:
        raise SpecialistsError(f"{source}: missing key {missing[0]!r}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise SpecialistsError(f"{source}: {e}") from e


@dataclass(frozen=True)
class GeneralistRecord:
    """What a run needs to rebuild and judge its generalist."""

    architecture: str
    n_classes: int
    class_names: list[str]
    in_chans: int
    input_size: int
    mean: list[float]
    std: list[float]
    data: dict  # DataSpec.to_dict()
    hflip: bool
    metrics: dict
    weights_sha256: str
    eval_batch_size: int = 512
    coarse: list[int] | None = None
    coarse_names: list[str] | None = None
    versions: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | Path = "generalist record") -> GeneralistRecord:
        rec = record_from_dict(cls, d, source)
        if rec.n_classes != len(rec.class_names):
            raise SpecialistsError(
                f"{source}: n_classes={rec.n_classes} but {len(rec.class_names)} class names"
            )
        return rec
