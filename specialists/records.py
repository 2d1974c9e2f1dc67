"""The small frozen records that a run directory stores as JSON beside each set of weights.

Every record is a frozen dataclass with ``to_dict`` / ``from_dict`` (one clear line on unknown or
missing keys, or on a schema newer than this program's) and ``describe`` for progress messages.
A record that goes with weights carries their checksum (``weights_sha256``); see
:func:`specialists.artifacts.load_checked` for the one check that every loader makes.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import SpecialistsError

__all__ = [
    "SCHEMA_VERSION",
    "FinetuneRecord",
    "GeneralistRecord",
    "JobRecord",
    "Record",
    "SpecialistRecord",
    "StudentRecord",
    "record_from_dict",
]

SCHEMA_VERSION = 1

R = TypeVar("R", bound="Record")


def record_from_dict(cls: type[R], d: Any, source: str | Path = "record") -> R:
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


class Record:
    """What the record classes share: JSON in and out, a check after loading, a description."""

    kind: ClassVar[str] = "record"

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], d: dict, source: str | Path | None = None) -> R:
        rec = record_from_dict(cls, d, source or f"{cls.kind} record")
        rec.check(source or f"{cls.kind} record")
        return rec

    def check(self, source: str | Path) -> None:
        """Raise ``SpecialistsError`` naming ``source`` when the fields contradict each other."""

    def describe(self) -> str:
        return self.kind


@dataclass(frozen=True, kw_only=True)
class JobRecord(Record):
    """What the record of every job holds (a specialist, a fine-tuned copy, a student): which job,
    from which generalist, with which settings, how it went, and the checksum of its weights.
    The launcher decides from these fields whether a job is done."""

    id: int
    generalist_sha256: str
    config: dict
    metrics: dict
    weights_sha256: str
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)  # the software that made it (none before)


@dataclass(frozen=True)
class GeneralistRecord(Record):
    """What a run needs to rebuild and judge its generalist."""

    kind: ClassVar[str] = "generalist"

    architecture: str
    n_classes: int
    class_names: list[str]
    in_chans: int
    input_size: int
    mean: list[float]
    std: list[float]
    data: dict  # DataSource.to_dict()
    hflip: bool
    metrics: dict
    weights_sha256: str
    eval_batch_size: int = 512
    coarse: list[int] | None = None
    coarse_names: list[str] | None = None
    versions: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def check(self, source: str | Path) -> None:
        if self.n_classes != len(self.class_names):
            raise SpecialistsError(
                f"{source}: n_classes={self.n_classes} but {len(self.class_names)} class names"
            )


@dataclass(frozen=True, kw_only=True)
class SpecialistRecord(JobRecord):
    """Everything needed to rebuild, trust and apply one trained specialist."""

    kind: ClassVar[str] = "specialist"

    classes: list[int]
    class_names: list[str]
    group_hash: str
    architecture: str
    train_fraction: float  # share of each batch drawn from S
    natural_prior: float  # share of S in the training data
    gated_prior: float  # share of S among validation inputs whose generalist top-1 is in S
    correction: str  # natural | gated | none
    logit_offset: list[float]  # added to the specialist's logits at inference (|S| + 1)
    history: list[dict]
    input_size: int | None = None  # its own input size; None: the generalist's
    # The generalist's first stages, unchanged in this specialist (specialists.trunk): where its
    # own computation starts and the checksum of what it shares; None when nothing is shared.
    shared_trunk: dict | None = None

    def size(self, generalist: GeneralistRecord) -> int:
        """The input size this specialist's model takes."""
        return self.input_size or generalist.input_size

    def check(self, source: str | Path) -> None:
        if len(self.logit_offset) != len(self.classes) + 1:
            raise SpecialistsError(
                f"{source}: logit_offset has {len(self.logit_offset)} entries for {len(self.classes)} classes + dustbin"
            )

    def describe(self) -> str:
        m = self.metrics
        return (
            f"specialist {self.id:3d}: {len(self.classes)} classes, in-group accuracy {m['in_group_acc']:.3f} "
            f"(generalist {m['generalist_in_group_acc']:.3f}), {m['epochs_run']} epochs, {m['seconds']:.0f} s"
        )


@dataclass(frozen=True, kw_only=True)
class FinetuneRecord(JobRecord):
    """A copy of the generalist fine-tuned over all classes (a control)."""

    kind: ClassVar[str] = "fine-tune"

    examples: int
    seed: int
    architecture: str | None = None  # None: the generalist's
    input_size: int | None = None  # None: the generalist's

    def describe(self) -> str:
        what = "" if self.input_size is None else f" ({self.architecture} at {self.input_size} px)"
        return (
            f"fine-tuned copy {self.id}{what}: {self.examples} examples, val accuracy "
            f"{self.metrics['val_acc']:.3f}, {self.metrics['seconds']:.0f} s"
        )


@dataclass(frozen=True, kw_only=True)
class StudentRecord(JobRecord):
    """One model distilled from a teacher (the ensemble, or a control's teacher)."""

    kind: ClassVar[str] = "student"

    architecture: str
    n_classes: int
    teacher: str  # ensemble | generalist | random groups
    teacher_sha256: str  # identity of the teacher: its models and its combination
    history: list[dict]

    def describe(self) -> str:
        m = self.metrics
        return (
            f"student of the {self.teacher}: {self.architecture}, val accuracy {m['val_acc']:.4f} "
            f"(teacher {m['teacher_val_acc']:.4f}, generalist {m['generalist_val_acc']:.4f}), "
            f"{m['epochs_run']} epochs, {m['seconds']:.0f} s"
        )
