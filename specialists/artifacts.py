"""Reading a run's artifacts back, each checked before it is trusted.

``load_checked`` is the one check every loader of a finished artifact makes: the record and its
weights exist, both match the run's manifest, and the weights match the checksum in the record;
each file is hashed once. (The launcher reads the record a worker has just written without it.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from . import manifest
from .dustbin import group_hash
from .errors import SpecialistsError
from .models import create_model
from .records import GeneralistRecord, Record, SpecialistRecord, StudentRecord
from .run import RunDir
from .storage import load_json, load_tensors
from .transforms import BatchTransform, make_transforms

__all__ = [
    "generalist_record",
    "load_checked",
    "load_generalist",
    "load_groups",
    "load_specialists",
    "load_student",
    "load_weights",
]

R = TypeVar("R", bound=Record)


def load_checked(
    run: RunDir,
    record: Path,
    weights: Path,
    record_type: type[R],
    *,
    missing: str,
    generalist_sha256: str | None = None,
    rerun: str = "",
) -> R:
    """The record at ``record`` after checking it and ``weights`` against the run's manifest and
    the weights against the record's checksum; ``missing`` completes the error for an absent
    file. With ``generalist_sha256``, the record must come from that generalist. ``rerun`` says
    which command makes it again; a damaged file's error ends with it."""
    for path in (record, weights):
        if not path.is_file():
            raise SpecialistsError(f"{path}: {missing}")
    try:
        manifest.verify(run.root, record)
        rec = record_type.from_dict(load_json(record), record)
        if manifest.checked_sha256(run.root, weights) != rec.weights_sha256:
            raise SpecialistsError(
                f"{weights}: checksum does not match {record} (file changed or truncated)"
            )
    except SpecialistsError as e:
        if rerun:
            raise SpecialistsError(f"{e}; to make it again, {rerun}") from e
        raise
    if generalist_sha256 is not None and rec.generalist_sha256 != generalist_sha256:
        raise SpecialistsError(f"{record}: trained from another generalist ({rerun})")
    return rec


def load_weights(
    model: nn.Module, weights: Path, what: str, *, sha256: str | None = None
) -> nn.Module:
    """Load safetensors ``weights`` into ``model``; a mismatch is one line saying ``what`` the
    file should have held. With ``sha256``, the file read must have that checksum."""
    try:
        model.load_state_dict(load_tensors(weights, sha256=sha256))
    except RuntimeError as e:
        raise SpecialistsError(
            f"{weights}: does not match {what} ({str(e).splitlines()[0]})"
        ) from e
    return model


def generalist_record(run: RunDir) -> GeneralistRecord:
    """The run's generalist record, checked against the manifest (the weights are not read)."""
    run.require_generalist()
    manifest.verify(run.root, run.generalist_record)
    return GeneralistRecord.from_dict(load_json(run.generalist_record), run.generalist_record)


def load_generalist(
    run_dir: str | os.PathLike | RunDir, device: str | torch.device = "cpu"
) -> tuple[nn.Module, GeneralistRecord]:
    """Rebuild a run's generalist from its record and safetensors weights (nothing unpickled)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.of(run_dir)
    run.require_generalist()
    record = load_checked(
        run,
        run.generalist_record,
        run.generalist_weights,
        GeneralistRecord,
        missing="missing (retrain with `specialists generalist --force`)",
        rerun="run `specialists generalist --force`, then cluster and train again",
    )
    model = create_model(record.architecture, record.n_classes, record.in_chans, record.input_size)
    load_weights(model, run.generalist_weights, record.architecture)
    return model.to(device).eval(), record


def load_student(
    run_dir: str | os.PathLike | RunDir,
    device: str | torch.device = "cpu",
    *,
    subdir: str = RunDir.STUDENT,
) -> tuple[nn.Module, StudentRecord, BatchTransform]:
    """A run's distilled student as a plain ``nn.Module`` (in eval mode), its record, and the
    transform its inputs need (uint8 (B, H, W, C) -> normalised float, the generalist's)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.of(run_dir)
    grec = generalist_record(run)
    files = run.student(subdir).files
    record = load_checked(
        run,
        files.record,
        files.weights,
        StudentRecord,
        missing=f"no distilled student here (run `specialists distill {run.root}`)",
        generalist_sha256=grec.weights_sha256,
        rerun=f"rerun `specialists distill {run.root}`",
    )
    model = create_model(record.architecture, record.n_classes, grec.in_chans, grec.input_size)
    load_weights(model, files.weights, record.architecture)
    return model.to(device).eval(), record, make_transforms(grec)[1]


def load_specialists(
    run: RunDir, generalist: GeneralistRecord, *, variant: str | None = None
) -> list[SpecialistRecord]:
    """The records of the specialists of the run's groups (or a control's, ``variant``), each
    checked: against its weights and the manifest, for this generalist, for its group."""
    paths = run.ensemble(variant)
    manifest.verify(run.root, paths.clusters)
    groups = load_groups(paths.clusters, generalist.n_classes)
    rerun = f"rerun `specialists train {run.root}`"
    records = []
    for i, classes in enumerate(groups):
        files = paths.specialist(i)
        rec = load_checked(
            run,
            files.record,
            files.weights,
            SpecialistRecord,
            missing=f"specialist {i} is missing (run `specialists train {run.root}`)",
            generalist_sha256=generalist.weights_sha256,
            rerun=rerun,
        )
        if rec.classes != classes or rec.group_hash != group_hash(
            classes, generalist.weights_sha256
        ):
            raise SpecialistsError(
                f"{files.record}: its classes do not match group {i} of {paths.clusters} ({rerun})"
            )
        records.append(rec)
    return records


def load_groups(clusters: Path, n_classes: int) -> list[list[int]]:
    """The groups of a ``clusters.json``, validated against the generalist's class count."""
    clusters = Path(clusters)
    if not clusters.is_file():
        raise SpecialistsError(
            f"{clusters}: no clusters in this run (run `specialists cluster {clusters.parent}` first)"
        )
    data = load_json(clusters)
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        raise SpecialistsError(f"{clusters}: no groups")
    out = []
    for i, g in enumerate(groups):
        classes = g.get("classes") if isinstance(g, dict) else g
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, int) and 0 <= c < n_classes for c in classes)
        ):
            raise SpecialistsError(
                f"{clusters}: group {i} is not a list of class indices below {n_classes}"
            )
        out.append(sorted(classes))
    return out
