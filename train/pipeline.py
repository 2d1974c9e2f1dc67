"""The steps after the generalist, as functions the command line and Python users share."""

from __future__ import annotations

import logging
from pathlib import Path

from specialists import manifest
from specialists.artifacts import generalist_record, load_groups
from specialists.calibrate import calibrate_run
from specialists.config import write_config
from specialists.errors import SpecialistsError
from specialists.evaluate import evaluate_run
from specialists.grouping import cluster_run, summarize_clusters
from specialists.lock import writes_run
from specialists.run import RunDir
from specialists.storage import load_json

from ._job import cache_sizes
from .distill import DistillConfig, run_distill
from .generalist import GeneralistConfig, train_generalist
from .launch import JobResult, run_jobs
from .specialist import SpecialistConfig, specialist_jobs

__all__ = ["DEMO_DISTILL", "DEMO_GENERALIST", "DEMO_SPECIALISTS", "run_demo", "train_specialists"]

log = logging.getLogger(__name__)


@writes_run("specialists train")
def train_specialists(
    run_dir: str | Path,
    cfg: SpecialistConfig | None = None,
    *,
    workers: int | None = None,
    backend: str = "local",
    only: list[int] | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    gpus_per_job: float | None = None,
    progress: bool = True,
    calibrate: bool = True,
) -> list[JobResult]:
    """Train one specialist per group of ``RUN/clusters.json`` (only the missing or changed ones),
    then, once every group has its specialist, choose the combination on validation
    (``RUN/ensemble.json``, see :mod:`specialists.calibrate`) unless nothing was trained and it
    is already there (``specialists calibrate RUN`` redoes it)."""
    cfg = cfg or SpecialistConfig()
    run = RunDir.of(run_dir)
    run.require_generalist()
    grec = generalist_record(run)
    manifest.verify(run.root, run.clusters)
    groups = load_groups(run.clusters, grec.n_classes)
    ids = range(len(groups)) if only is None else only
    bad = [i for i in ids if not 0 <= i < len(groups)]
    if bad:
        raise SpecialistsError(
            f"--only {bad[0]}: no such group (the run has groups 0..{len(groups) - 1})"
        )
    jobs = specialist_jobs(groups, grec, cfg, ids=ids)
    cache_sizes(run, grec, [j.inputs["input_size"] for j in jobs])
    write_config(run.specialists_config, cfg)
    results = run_jobs(
        run,
        jobs,
        cfg=cfg,
        generalist_sha=grec.weights_sha256,
        backend=backend,
        workers=workers,
        device=device,
        ray_address=ray_address,
        gpus_per_job=gpus_per_job,
        progress=progress,
    )
    complete = all(run.specialist(i).record.is_file() for i in range(len(groups)))
    trained = any(not r.skipped for r in results)
    stale = trained or not run.combination.is_file()
    if calibrate and complete and stale and all(r.ok for r in results):
        calibrate_run(run.root, device, progress=progress)
    return results


# The demo: the whole pipeline on the embedded data, sized for a laptop's CPU (a few minutes).
DEMO_GENERALIST = GeneralistConfig(data="embedded:n_classes=40,n_groups=8", epochs=30, patience=4)
DEMO_SPECIALISTS = SpecialistConfig()
DEMO_DISTILL = DistillConfig()


@writes_run("specialists demo", "out", create=True)
def run_demo(
    out: str | Path, *, workers: int | None = None, progress: bool = True, say=print
) -> dict:
    """generalist -> clusters -> specialists (in parallel) -> student -> evaluation, each step
    skipped when its output is already complete (so an interrupted demo resumes)."""
    run = RunDir.of(out)
    say(f"[1/5] generalist ({DEMO_GENERALIST.model} on {DEMO_GENERALIST.data})")
    if run.generalist_record.is_file():
        grec = generalist_record(run)
        say("      already trained")
    else:
        grec = train_generalist(DEMO_GENERALIST, run.root, progress=progress)
    m = grec.metrics
    say(
        f"      test accuracy {100 * m['test_accuracy']:.2f}% (best epoch {m['best_epoch']} of {m['epochs_run']}, {m['train_seconds']:.0f} s)"
    )
    say("[2/5] confusion clusters")
    report = load_json(run.clusters) if run.clusters.is_file() else cluster_run(run.root)
    say("      " + summarize_clusters(report).replace("\n", "\n      "))
    say("[3/5] specialists, in parallel")
    results = train_specialists(run.root, DEMO_SPECIALISTS, workers=workers, progress=progress)
    failed = [r for r in results if not r.ok]
    if failed:
        raise SpecialistsError(
            f"specialist {failed[0].job.id} failed: {failed[0].error} (rerun the demo to retry)"
        )
    say("[4/5] the ensemble distilled into one student")
    results = run_distill(run.root, DEMO_DISTILL, workers=workers, progress=progress)
    if not results[0].ok:
        raise SpecialistsError(
            f"distillation failed: {results[0].error} (rerun the demo to resume)"
        )
    say("[5/5] evaluation on the test split")
    return evaluate_run(run.root)
