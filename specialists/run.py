"""The layout of a run directory: one place that names every artifact."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SpecialistsError

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """Paths inside a run directory.

    RUN/
      config.yaml                 resolved generalist configuration
      generalist/model.safetensors, record.json, history.csv, curve.png
      generalist/val_probs.npy, val_labels.npy   softmax predictions on the validation split
      generalist/resume/          last-epoch state while training (removed when done)
      clusters.json, clusters.png
      specialists/NNN.safetensors, NNN.json
      metrics.json, coverage.png
    """

    root: Path

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunDir:
        return cls(Path(path).expanduser())

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def generalist_dir(self) -> Path:
        return self.root / "generalist"

    @property
    def generalist_weights(self) -> Path:
        return self.generalist_dir / "model.safetensors"

    @property
    def generalist_record(self) -> Path:
        return self.generalist_dir / "record.json"

    @property
    def history(self) -> Path:
        return self.generalist_dir / "history.csv"

    @property
    def curve(self) -> Path:
        return self.generalist_dir / "curve.png"

    @property
    def val_probs(self) -> Path:
        return self.generalist_dir / "val_probs.npy"

    @property
    def val_labels(self) -> Path:
        return self.generalist_dir / "val_labels.npy"

    @property
    def resume_dir(self) -> Path:
        return self.generalist_dir / "resume"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters.json"

    @property
    def clusters_png(self) -> Path:
        return self.root / "clusters.png"

    @property
    def specialists_dir(self) -> Path:
        return self.root / "specialists"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def generalist(self):
        """The generalist's record, checked against the run's manifest."""
        from . import manifest
        from .io import load_json
        from .records import GeneralistRecord

        self.require_generalist()
        manifest.verify(self.root, self.generalist_record)
        return GeneralistRecord.from_dict(load_json(self.generalist_record), self.generalist_record)

    def require_generalist(self) -> None:
        if not self.root.is_dir():
            raise SpecialistsError(f"{self.root}: run directory not found")
        if not self.generalist_record.is_file():
            raise SpecialistsError(
                f"{self.generalist_record}: no trained generalist in this run (run `specialists generalist --out {self.root}` first)"
            )
