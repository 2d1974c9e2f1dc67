"""The steps after the generalist, as functions the command line and Python users share."""

from __future__ import annotations

import logging
from pathlib import Path

from specialists.config import write_config
from specialists.errors import SpecialistsError
from specialists.io import load_json
from specialists.records import GeneralistRecord
from specialists.run import RunDir

from .data import DataSpec, load_data
from .launch import Job, JobResult, run_jobs
from .specialist import SpecialistConfig, cache_data

__all__ = ["load_groups", "train_specialists"]

log = logging.getLogger(__name__)


def load_groups(run: RunDir, n_classes: int) -> list[list[int]]:
    """The groups of ``RUN/clusters.json``, validated against the generalist's class count."""
    if not run.clusters.is_file():
        raise SpecialistsError(
            f"{run.clusters}: no clusters in this run (run `specialists cluster {run.root}` first)"
        )
    data = load_json(run.clusters)
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        raise SpecialistsError(f"{run.clusters}: no groups")
    out = []
    for i, g in enumerate(groups):
        classes = g.get("classes") if isinstance(g, dict) else g
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, int) and 0 <= c < n_classes for c in classes)
        ):
            raise SpecialistsError(
                f"{run.clusters}: group {i} is not a list of class indices below {n_classes}"
            )
        out.append(sorted(classes))
    return out


def train_specialists(
    run_dir: str | Path,
    cfg: SpecialistConfig | None = None,
    workers: int | None = None,
    backend: str = "local",
    only: list[int] | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    progress: bool = True,
) -> list[JobResult]:
    """Train one specialist per group of ``RUN/clusters.json`` (only the missing or changed ones)."""
    cfg = cfg or SpecialistConfig()
    run = RunDir.of(run_dir)
    run.require_generalist()
    grec = GeneralistRecord.from_dict(load_json(run.generalist_record), run.generalist_record)
    groups = load_groups(run, grec.n_classes)
    ids = range(len(groups)) if only is None else only
    bad = [i for i in ids if not 0 <= i < len(groups)]
    if bad:
        raise SpecialistsError(
            f"--only {bad[0]}: no such group (the run has groups 0..{len(groups) - 1})"
        )
    jobs = [Job(i, tuple(groups[i])) for i in ids]
    if not (run.root / "cache" / "val_labels.npy").is_file():
        log.info("caching the data arrays for the workers")
        cache_data(run, load_data(DataSpec.from_dict(grec.data)))
    write_config(run.root / "specialists.yaml", cfg)
    return run_jobs(
        run, jobs, cfg, grec.weights_sha256, backend, workers, device, ray_address, progress
    )
