"""Confusion clusters of a run: read the generalist's validation predictions, cluster, report.

The numerics live in :mod:`specialists.clustering`; this module connects them to a run directory
and writes what they return.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import manifest
from .artifacts import generalist_record
from .clustering import (
    ConfusionClustering,
    PredictionStats,
    TopKStats,
    build_report,
    choose_grouping,
    confusion_mass,
    dense_fits,
    grouped_matrix_figure,
)
from .errors import SpecialistsError
from .lock import writes_run
from .run import RunDir
from .storage import load_npy, save_figure, save_json

__all__ = ["ClusterConfig", "cluster_run", "summarize_clusters"]

log = logging.getLogger(__name__)

# Above this many classes the number of groups must be given with sparse statistics: choosing it
# fits the grouping at each candidate count, about 5 minutes each at 100,000 classes
CHOOSER_MAX_CLASSES = 20_000


@dataclass
class ClusterConfig:
    """How the classes are grouped. Every field None means: chosen from the data."""

    matrix: str = "covariance"  # covariance (label-free, as in the paper) | confusion
    method: str = "kmeans"  # kmeans | spectral
    mode: str = "disjoint"  # disjoint | overlapping
    n_groups: int | None = None
    group_size: int | None = None  # overlapping mode: classes per group
    min_size: int | None = None  # default: enough classes for min_group_images
    # training images a specialist needs (tiny groups overfit: docs/design.md, "Findings that set
    # the defaults")
    min_group_images: int = 1000
    max_size: int | None = None
    top_m: int | None = None  # keep the M groups holding the most confusion
    n_init: int = 5
    seed: int = 0
    # auto: dense K x K statistics where they fit in memory, else sparse top-k ones (printed with
    # the reason) | dense | sparse
    statistics: str = "auto"
    # sparse statistics: classes kept per prediction (the rest's mass is one number)
    top_k: int = 10

    def __post_init__(self) -> None:
        if self.matrix not in ("covariance", "confusion"):
            raise ValueError(f"matrix must be covariance or confusion, got {self.matrix!r}")
        if self.method not in ("kmeans", "spectral"):
            raise ValueError(f"method must be kmeans or spectral, got {self.method!r}")
        if self.mode not in ("disjoint", "overlapping"):
            raise ValueError(f"mode must be disjoint or overlapping, got {self.mode!r}")
        if self.statistics not in ("auto", "dense", "sparse"):
            raise ValueError(f"statistics must be auto, dense or sparse, got {self.statistics!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def _use_sparse(cfg: ClusterConfig, k: int) -> tuple[bool, str]:
    """Whether to gather sparse top-k statistics, and the sentence that says why."""
    if cfg.statistics == "dense":
        return False, f"dense statistics of {k:,} classes (asked for)"
    if cfg.statistics == "sparse":
        return True, f"sparse top-{cfg.top_k} statistics of {k:,} classes (asked for)"
    # against the machine's memory, not what is free this minute: the same run on the same
    # machine always gets the same statistics (and so the same groups)
    fits, reason = dense_fits(k, _physical_memory(), top_k=cfg.top_k)
    return not fits, reason.replace("dense covariance", f"dense statistics ({cfg.matrix})")


def _physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _dense_matrix(stats: PredictionStats, cfg: ClusterConfig, confusion: np.ndarray, run: RunDir):
    """The K x K matrix the dense path clusters, and its kind."""
    matrix = stats.covariance() if cfg.matrix == "covariance" else confusion.astype(np.float64)
    matrix_kind = cfg.matrix
    if cfg.matrix == "covariance" and confusion_mass(matrix) <= 0:
        # A confident generalist over few classes: its outputs share a simplex, so every pair of
        # classes co-varies less than independent outputs would (cov_ij = E[p_i p_j] - mu_i mu_j
        # < 0) even where it confuses them. Measure co-prediction against a perfect classifier
        # with the same class frequencies instead: cov + mu mu^T = E[p p^T], whose off-diagonal
        # is the soft confusion mass E[p_i p_j].
        mean = stats.mean()
        matrix += np.outer(mean, mean)  # in place: the covariance is ours, and K x K
        matrix_kind = "second moment"
        log.warning(
            "%s: the covariance of the predictions has no positive off-diagonal entry (a confident "
            "generalist over %d classes); grouping on the second moment E[p p^T] instead",
            run.val_probs,
            stats.n_classes,
        )
    return matrix, matrix_kind


def _load_predictions(run: RunDir, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not run.val_probs.is_file():
        raise SpecialistsError(
            f"{run.val_probs}: the generalist's validation predictions are missing (retrain with `specialists generalist --force`)"
        )
    probs = load_npy(run.val_probs, mmap=True)  # read batch by batch, never all in memory
    labels = load_npy(run.val_labels)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise SpecialistsError(
            f"{run.val_probs}: expected predictions of shape (N, {n_classes}), got {probs.shape}"
        )
    if len(labels) != len(probs):
        raise SpecialistsError(
            f"{run.val_labels}: {len(labels)} labels for {len(probs)} predictions"
        )
    return probs, labels


@writes_run("specialists cluster")
def cluster_run(
    run_dir: str | Path, cfg: ClusterConfig | None = None, *, batch_size: int = 4096
) -> dict:
    """Cluster a run's classes; write ``clusters.json`` and ``clusters.png``; return the report."""
    cfg = cfg or ClusterConfig()
    run = RunDir.of(run_dir)
    run.require_generalist()
    grec = generalist_record(run)
    k = grec.n_classes
    if cfg.n_groups is not None and not 1 <= cfg.n_groups <= k:
        raise SpecialistsError(
            f"--n-groups {cfg.n_groups}: must be between 1 and the number of classes ({k})"
        )
    if cfg.group_size is not None and not 2 <= cfg.group_size <= k:
        raise SpecialistsError(
            f"--group-size {cfg.group_size}: must be between 2 and the number of classes ({k})"
        )
    manifest.verify(run.root, run.val_probs, run.val_labels)
    sparse_stats, why = _use_sparse(cfg, k)
    if sparse_stats and cfg.n_groups is None and k > CHOOSER_MAX_CLASSES:
        # the chooser fits the grouping at many candidate counts: minutes each at this size
        raise SpecialistsError(
            f"--n-groups: {k:,} classes are too many to choose the number of groups by trying "
            f"counts; give it (the paper: groups of about 300 classes, here --n-groups "
            f"{max(2, round(k / 300))})"
        )
    log.log(logging.INFO if sparse_stats else logging.DEBUG, "%s", why)
    probs, labels = _load_predictions(run, k)
    stats = TopKStats(k, min(cfg.top_k, k)) if sparse_stats else PredictionStats(k)
    try:
        for start in range(0, len(probs), batch_size):  # streaming: the accumulator never holds P
            stats.update(
                np.asarray(probs[start : start + batch_size]), labels[start : start + batch_size]
            )
    except ValueError as e:
        raise SpecialistsError(f"{run.val_probs}: {e}") from e
    confusion = stats.confusion()
    statistics = {"kind": "dense", "reason": why}
    if sparse_stats:
        # the second moment of the top-k predictions (its mean outer product, dense, is left out:
        # ~1/K^2 per pair, see specialists.clustering.sparse)
        matrix, matrix_kind = stats.second_moment(), "second moment"
        statistics = {
            "kind": f"sparse top-{stats.k}",
            "reason": why,
            "captured_mass": round(stats.captured_mass(), 6),
            "nonzeros": int(matrix.nnz),
        }
        if cfg.matrix == "confusion":
            matrix, matrix_kind = confusion.astype(np.float64), "confusion"
    else:
        matrix, matrix_kind = _dense_matrix(stats, cfg, confusion, run)
    min_size = cfg.min_size
    if min_size is None:
        per_class = grec.metrics.get("n_train", 0) / k
        min_size = max(3, math.ceil(cfg.min_group_images / per_class)) if per_class else 3
        if min_size > k // 2:
            min_size = max(1, k // 2)
        log.info(
            "smallest group: %d classes (%.0f training images per class, %d needed per specialist)",
            min_size,
            per_class,
            cfg.min_group_images,
        )
    params = dict(method=cfg.method, n_init=cfg.n_init, random_state=cfg.seed)
    choice = None
    try:
        if cfg.n_groups is None:
            extra = {
                k_: v
                for k_, v in (("max_size", cfg.max_size), ("top_m", cfg.top_m))
                if v is not None
            }
            choice = choose_grouping(matrix, k, mode=cfg.mode, min_size=min_size, **params, **extra)
            model = choice.model
            if cfg.mode == "overlapping" and cfg.group_size is not None:
                model = ConfusionClustering(
                    choice.n_groups,
                    mode="overlapping",
                    group_size=cfg.group_size,
                    top_m=cfg.top_m,
                    **params,
                ).fit(matrix)
        else:
            model = ConfusionClustering(
                cfg.n_groups,
                mode=cfg.mode,
                group_size=cfg.group_size,
                min_size=cfg.min_size or 1,
                max_size=cfg.max_size,
                top_m=cfg.top_m,
                **params,
            ).fit(matrix)
    except ValueError as e:
        raise SpecialistsError(f"clustering {run.val_probs}: {e}") from e

    coarse = np.asarray(grec.coarse) if grec.coarse is not None else None
    report = build_report(
        matrix,
        model,
        matrix_kind=matrix_kind,
        class_names=grec.class_names,
        coarse=coarse,
        confusion=confusion,
        choice=choice,
        random_state=cfg.seed,
    )
    report["config"] = asdict(cfg)
    report["statistics"] = statistics
    report["generalist_sha256"] = grec.weights_sha256
    save_json(run.clusters, report)
    figure = grouped_matrix_figure(
        matrix,
        model.groups_,
        class_names=grec.class_names,
        title=f"{matrix_kind} of the generalist's predictions, by group",
    )
    save_figure(figure, run.clusters_png)
    manifest.register(run.root, run.clusters, run.clusters_png)
    return report


def summarize_clusters(report: dict) -> str:
    """A few lines for the terminal: groups, sizes, confusion captured, agreement with known groups."""
    groups = report["groups"]
    sizes = sorted(len(g["classes"]) for g in groups)
    q = report["quality"]
    lines = []
    if report.get("choice"):
        c = report["choice"]
        lines.append(
            f"chosen from the data: {len(groups)} groups, the count whose groups hold the most confusion "
            f"above what random groups of the same sizes would hold (the fewest groups on ties; "
            f"{len(c['scan'])} counts scanned, details in clusters.json)"
        )
    size_text = (
        f"{sizes[0]}"
        if sizes[0] == sizes[-1]
        else f"{sizes[0]}-{sizes[-1]} (median {sizes[len(sizes) // 2]})"
    )
    lines.append(
        f"{len(groups)} groups of {size_text} classes over {report['n_classes']} classes; "
        f"{report['coverage']['covered']} covered, {report['coverage']['uncovered']} in no group"
    )
    lines.append(
        f"confusion captured inside groups: {100 * q['confusion_captured']:.1f}% "
        f"(random groups of the same sizes: {100 * q['random_baseline']:.1f}%)"
    )
    if "ari" in q:
        lines.append(
            f"agreement with the known coarse groups: ARI {q['ari']:.3f}, NMI {q['nmi']:.3f}"
        )
    for g in groups[:5]:
        names = ", ".join(g["names"][:4]) + (", ..." if len(g["names"]) > 4 else "")
        acc = g.get("accuracy")
        acc_text = f", generalist accuracy {100 * acc:.1f}%" if acc is not None else ""
        lines.append(
            f"  group {g['rank']}: {len(g['classes'])} classes, {100 * g['mass_share']:.1f}% of the confusion{acc_text}: {names}"
        )
    if len(groups) > 5:
        lines.append(f"  ... and {len(groups) - 5} more")
    return "\n".join(lines)
