"""The layout of a run directory: the one place that names its files.

RUN/
  config.yaml                 the generalist's resolved configuration
  generalist/model.safetensors, record.json, history.csv, curve.png
  generalist/val_probs.npy, val_labels.npy   softmax predictions on the validation split
  generalist/resume/          last-epoch state while training (removed when done)
  clusters.json, clusters.png the groups
  cache/{train,val}_{images,labels}.npy      data arrays the specialist workers memory-map
  cache/<S>px/                the same at S pixels, for specialists with their own input size
  specialists.yaml            the specialists' resolved configuration
  specialists/NNN.safetensors, NNN.json (NNN.error.json while a failed job's error stands)
  ensemble.json               the combination chosen on validation
  metrics.json, coverage.png  the evaluation (cascade.png: accuracy against images/s as the
                              cascade's confidence threshold varies)
  manifest.json               every finished artifact with its size and checksum
  .lock, .lock.json           the run lock (specialists.lock), and who holds it
  controls/random/            clusters.json, specialists/, ensemble.json of the random groups
  controls/extra/, controls/plain/   the fine-tuned copies (NNN.safetensors, NNN.json)
  controls/large/             the generalist at the specialists' own input size / architecture
  student/                    the distilled student: 000.safetensors, 000.json, history.csv,
                              curve.png (resume/ while training)
  cache/transfer_*.npy        images without labels a student learns from (--transfer)
  controls/student-self/, controls/student-random/   the distillation controls' students
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import SpecialistsError

__all__ = ["ArtifactPaths", "EnsemblePaths", "RunDir", "StudentPaths"]


class ArtifactPaths(NamedTuple):
    """The files of one job's artifact: its record (written last), weights and error report."""

    record: Path
    weights: Path
    error: Path


def _artifact(directory: Path, index: int) -> ArtifactPaths:
    stem = f"{index:03d}"
    return ArtifactPaths(
        directory / f"{stem}.json",
        directory / f"{stem}.safetensors",
        directory / f"{stem}.error.json",
    )


@dataclass(frozen=True)
class EnsemblePaths:
    """One set of groups with its specialists and combination: the run's own or a control's."""

    run_root: Path
    base: Path

    @property
    def clusters(self) -> Path:
        return self.base / "clusters.json"

    @property
    def clusters_png(self) -> Path:
        return self.base / "clusters.png"

    @property
    def specialists_dir(self) -> Path:
        return self.base / RunDir.SPECIALISTS

    @property
    def specialists_subdir(self) -> str:
        """The specialists' folder relative to the run (what a job names as its output)."""
        return self.specialists_dir.relative_to(self.run_root).as_posix()

    @property
    def combination(self) -> Path:
        return self.base / "ensemble.json"

    def specialist(self, index: int) -> ArtifactPaths:
        return _artifact(self.specialists_dir, index)


@dataclass(frozen=True)
class StudentPaths:
    """Where one distilled student lives: the run's own or a control's."""

    run_root: Path
    base: Path

    @property
    def files(self) -> ArtifactPaths:
        return _artifact(self.base, 0)

    @property
    def history(self) -> Path:
        return self.base / "history.csv"

    @property
    def curve(self) -> Path:
        return self.base / "curve.png"

    @property
    def resume_dir(self) -> Path:
        return self.base / "resume"


@dataclass(frozen=True)
class RunDir:
    """Paths inside a run directory (the layout in this module's docstring)."""

    root: Path

    SPECIALISTS = "specialists"  # the run's own specialists, relative to the run
    RANDOM_CONTROL = "controls/random"  # specialists on random groups of the same sizes
    EXTRA_CONTROL = "controls/extra"  # the generalist fine-tuned for the specialists' examples
    PLAIN_CONTROL = "controls/plain"  # fine-tuned copies of the generalist, averaged
    # the generalist at the specialists' input size and architecture, for the same compute
    LARGE_CONTROL = "controls/large"
    STUDENT = "student"  # the ensemble distilled into one model
    SELF_STUDENT_CONTROL = "controls/student-self"  # distilled from the generalist alone
    RANDOM_STUDENT_CONTROL = "controls/student-random"  # distilled from the random groups

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

    def cache_dir(self, size: int | None = None) -> Path:
        """The data arrays at the data's own size, or (``size``) made at ``size`` pixels from the
        originals for specialists that see more than the generalist."""
        return self.root / "cache" if size is None else self.root / "cache" / f"{size}px"

    def cache_images(self, split: str, size: int | None = None) -> Path:
        return self.cache_dir(size) / f"{split}_images.npy"

    def cache_labels(self, split: str, size: int | None = None) -> Path:
        """Written after the split's images: its presence marks the split complete."""
        return self.cache_dir(size) / f"{split}_labels.npy"

    def transfer_cache(self, source: str, size: int | None = None) -> Path:
        """Images without labels read from ``source`` (a distillation's transfer data), at the
        data's own size or at ``size``."""
        key = hashlib.sha256(source.encode()).hexdigest()[:12]
        return self.cache_dir(size) / f"transfer_{key}.npy"

    @property
    def specialists_config(self) -> Path:
        return self.root / "specialists.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def coverage_png(self) -> Path:
        return self.root / "coverage.png"

    @property
    def cascade_png(self) -> Path:
        return self.root / "cascade.png"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def ensemble(self, variant: str | None = None) -> EnsemblePaths:
        """The run's own groups, specialists and combination, or a control's (``variant``, e.g.
        ``RunDir.RANDOM_CONTROL``)."""
        return EnsemblePaths(self.root, self.root / variant if variant else self.root)

    @property
    def clusters(self) -> Path:
        return self.ensemble().clusters

    @property
    def clusters_png(self) -> Path:
        return self.ensemble().clusters_png

    @property
    def specialists_dir(self) -> Path:
        return self.ensemble().specialists_dir

    @property
    def combination(self) -> Path:
        return self.ensemble().combination

    def specialist(self, index: int) -> ArtifactPaths:
        return self.ensemble().specialist(index)

    def student(self, subdir: str = STUDENT) -> StudentPaths:
        """The distilled student (``subdir``: a control's, e.g. ``RunDir.SELF_STUDENT_CONTROL``)."""
        return StudentPaths(self.root, self.root / subdir)

    def artifact(self, subdir: str, index: int) -> ArtifactPaths:
        """The files of job ``index`` whose output folder is ``RUN/<subdir>``."""
        return _artifact(self.root / subdir, index)

    def require_generalist(self) -> None:
        if not self.root.is_dir():
            raise SpecialistsError(f"{self.root}: run directory not found")
        if not self.generalist_record.is_file():
            raise SpecialistsError(
                f"{self.generalist_record}: no trained generalist in this run (run `specialists generalist --out {self.root}` first)"
            )
