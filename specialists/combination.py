"""The combination record: how a run's ensemble combines its generalist and specialists.

``RUN/ensemble.json`` holds the combination chosen on validation (see
:mod:`specialists.calibrate`); ``Ensemble.load`` applies it. Four choices make it up: the gating
width ``top_n``, the specialists' weight ``spec_weight`` in the weighted KL objective, the dustbin
``correction`` each specialist is moved to, and the specialists kept (``keep``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .dustbin import prior_offsets
from .errors import SpecialistsError
from .records import SpecialistRecord
from .storage import load_json

__all__ = ["CORRECTIONS", "Combination", "load_combination", "specialist_offsets"]

CORRECTIONS = ("gated", "natural", "none")


@dataclass
class Combination:
    """How a run's ensemble combines; ``correction=None`` keeps each specialist's own, and
    ``keep=None`` keeps every specialist (ids)."""

    top_n: int = 1
    spec_weight: float = 1.0
    correction: str | None = None
    keep: list[int] | None = None
    chosen_on: dict = field(default_factory=dict)  # what the choice was based on (for the record)
    # the cascade: inputs whose generalist top-1 probability is at least this consult no
    # specialist (None: every input is gated by its top classes alone)
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")
        if not self.spec_weight > 0:
            raise ValueError(f"spec_weight must be > 0, got {self.spec_weight}")
        if self.correction is not None and self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.confidence is not None and not 0 <= self.confidence <= 1:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | Path = "ensemble.json") -> Combination:
        try:
            return cls(
                top_n=int(d["top_n"]),
                spec_weight=float(d["spec_weight"]),
                correction=d.get("correction"),
                keep=None if d.get("keep") is None else [int(i) for i in d["keep"]],
                chosen_on=dict(d.get("chosen_on") or {}),
                confidence=None if d.get("confidence") is None else float(d["confidence"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecialistsError(f"{source}: not a valid combination ({e})") from e

    def describe(self) -> str:
        corr = self.correction or "as trained"
        kept = "all" if self.keep is None else str(len(self.keep)) if self.keep else "none"
        cascade = (
            ""
            if self.confidence is None
            else f", specialists skipped when the generalist is {100 * self.confidence:.1f}% sure"
        )
        return (
            f"top-{self.top_n} gating, specialist weight {self.spec_weight:g}, "
            f"dustbin correction {corr}, specialists kept: {kept}{cascade}"
        )


def load_combination(path: str | Path) -> Combination | None:
    """The calibrated combination stored at ``path`` (a run's ``ensemble.json``), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    return Combination.from_dict(load_json(path), path)


def specialist_offsets(rec: SpecialistRecord, correction: str | None) -> np.ndarray:
    """The logit offsets of ``rec`` for a dustbin correction (None: the one it was trained with)."""
    if correction is None:
        return np.asarray(rec.logit_offset, dtype=np.float64)
    target = {
        "natural": rec.natural_prior,
        "gated": rec.gated_prior,
        "none": rec.train_fraction,
    }[correction]
    return prior_offsets(target, rec.train_fraction, len(rec.classes))
