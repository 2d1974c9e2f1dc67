"""Run many jobs in parallel: local processes, or tasks on a Ray cluster.

A job is one independent unit of work that reads the run directory and writes its own artifact
(weights, then the record that marks it complete). The launcher does not know what a job does:
the job carries its task (a module-level function) and the type of the record it writes, so
specialists, the controls' fine-tuned copies and any future kind of job run the same way. A job
that crashes or is killed affects no other job; it is reported at the end with its error. Running
the same jobs again trains only what is missing, or whose inputs changed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from multiprocessing.connection import wait
from typing import Any

import torch
from tqdm.auto import tqdm

from specialists import manifest
from specialists.artifacts import load_checked
from specialists.errors import SpecialistsError
from specialists.lock import mark_worker, run_lock
from specialists.models import available_cores
from specialists.records import Record
from specialists.run import RunDir
from specialists.storage import load_json, save_json

__all__ = ["Job", "JobResult", "default_workers", "pending_jobs", "run_jobs"]

log = logging.getLogger(__name__)

# task(run_root, job, cfg, *, device, threads) -> the record it wrote
Task = Callable[..., Record]


@dataclass(frozen=True, eq=False)
class Job:
    """One unit of work: ``task(run_root, job, cfg, device=..., threads=...)`` writes a
    ``record_type`` record and its weights as ``RUN/<out>/NNN.*`` (``RunDir.artifact``).
    ``inputs`` are the task's own (a group's classes, a number of examples, a seed);
    ``identity`` lists the record fields that must match for an artifact already there to count
    as this job done (besides the configuration and the generalist, which always must)."""

    id: int
    out: str
    task: Task
    record_type: type[Record]
    inputs: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """For progress lines: ``specialist   3`` for the run's own specialists, else the kind
        and the output folder (``fine-tune controls/plain/000``)."""
        if self.out == RunDir.SPECIALISTS:
            return f"{self.record_type.kind} {self.id:3d}"
        return f"{self.record_type.kind} {self.out}/{self.id:03d}"


@dataclass
class JobResult:
    job: Job
    ok: bool
    record: Record | None = None
    error: str | None = None
    skipped: bool = False


def same_config(recorded: dict, cfg: Any) -> bool:
    """Whether a record's configuration is ``cfg``'s; a setting the record predates counts as
    its default (so adding a setting does not make every finished job stale)."""
    current = asdict(cfg)
    defaults = {}
    for f in fields(cfg):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    filled = {**{k: defaults.get(k) for k in current if k not in recorded}, **recorded}
    return filled == current


def finished_record(run: RunDir, job: Job, generalist_sha: str, cfg: Any) -> Record | None:
    """The job's record if it is complete, intact, and for these inputs, generalist and config."""
    files = run.artifact(job.out, job.id)
    if not files.record.is_file() or not files.weights.is_file():
        return None
    try:
        rec = load_checked(run, files.record, files.weights, job.record_type, missing="missing")
    except SpecialistsError as e:
        log.warning("%s; it will be trained again", e)
        return None
    if not same_config(rec.config, cfg) or rec.generalist_sha256 != generalist_sha:
        return None
    if any(getattr(rec, k) != v for k, v in job.identity.items()):
        return None
    return rec


def pending_jobs(
    run: RunDir, jobs: list[Job], generalist_sha: str, cfg: Any
) -> tuple[list[Job], list[JobResult]]:
    """Split ``jobs`` into those to run and those already done (returned as skipped results)."""
    todo, done = [], []
    for job in jobs:
        rec = finished_record(run, job, generalist_sha, cfg)
        if rec is None:
            todo.append(job)
        else:
            done.append(JobResult(job, True, rec, skipped=True))
    return todo, done


def _run_and_report(run_root: str, job: Job, cfg: Any, device: str, threads: int | None) -> bool:
    """Run one job inside a worker; on failure write its error file. True on success."""
    try:
        job.task(run_root, job, cfg, device=device, threads=threads)
        return True
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, SpecialistsError):
            message = f"{type(e).__name__}: {message}"
        error = RunDir.of(run_root).artifact(job.out, job.id).error
        save_json(error, {"error": message, "traceback": traceback.format_exc()})
        return False


def _exit_with(parent_pid: int, every: float = 1.0) -> None:
    """End this process soon after ``parent_pid`` is gone (killed launchers leave no orphans
    training on; what a worker writes is atomic, so stopping it anywhere is safe)."""

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_main(
    conn, run_root: str, cfg: Any, device: str, threads: int | None, parent_pid: int | None = None
) -> None:
    """A long-lived local worker: runs the jobs it is sent, one at a time, until sent None.
    Reusing the process saves the interpreter start and imports for every job; a worker that
    dies takes only its current job with it (the launcher starts a fresh one), and a worker
    whose launcher dies stops within a second."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops its workers
    mark_worker()  # the launcher holds the run's lock for its workers
    if parent_pid is not None:
        _exit_with(parent_pid)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_run_and_report(run_root, job, cfg, device, threads))


def _slots(workers: int, device: str) -> list[tuple[str, int | None]]:
    """(device, threads) of each worker slot: on CUDA the workers go round the GPUs (more
    workers than GPUs share them); on CPU the cores are shared out."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        n_gpu = torch.cuda.device_count()
        return [(f"cuda:{i % n_gpu}", 1) for i in range(workers)]
    if device.startswith("cuda"):
        return [(device, 1)] * workers
    return [("cpu", max(1, available_cores() // workers))] * workers


def default_workers(device: str, gpus_per_job: float | None = None) -> int:
    """One worker per GPU (``1 / gpus_per_job`` per GPU when jobs share one), else per core."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count() * max(1, math.floor(1 / (gpus_per_job or 1.0) + 1e-9))
    return available_cores()


def check_gpus_per_job(gpus_per_job: float | None) -> None:
    """A job uses one device: a share of one GPU (0.25: four jobs on each GPU) or all of it."""
    if gpus_per_job is not None and not 0 < gpus_per_job <= 1:
        raise SpecialistsError(
            f"--gpus-per-job {gpus_per_job:g}: must be in (0, 1] (a job uses one GPU or a share "
            "of one, e.g. 0.25: four jobs per GPU)"
        )


@contextlib.contextmanager
def _callers_script_not_rerun() -> Iterator[None]:
    """While a worker is spawned, hide the caller's ``__main__`` from multiprocessing, which would
    otherwise run the caller's script again in the worker: a script that calls
    ``train_specialists`` without an ``if __name__ == "__main__":`` guard would start its own
    training there. A worker needs nothing from that script: it runs tasks of this package."""
    main = sys.modules.get("__main__")
    namespace = vars(main) if main is not None else {}
    saved = {k: namespace[k] for k in ("__file__", "__spec__") if k in namespace}
    namespace.pop("__file__", None)
    if "__spec__" in namespace:
        namespace["__spec__"] = None
    try:
        yield
    finally:
        namespace.update(saved)


class _Slot:
    """One local worker process bound to a device and a thread count."""

    def __init__(self, ctx, run: RunDir, cfg: Any, device: str, threads: int | None) -> None:
        self.args = (str(run.root), cfg, device, threads)
        self.ctx, self.proc, self.conn, self.job = ctx, None, None, None

    def start_job(self, job: Job) -> None:
        if self.proc is None or not self.proc.is_alive():
            self.conn, child = self.ctx.Pipe()
            self.proc = self.ctx.Process(
                target=_worker_main, args=(child, *self.args, os.getpid()), daemon=True
            )
            with _callers_script_not_rerun():
                self.proc.start()
            child.close()
        self.job = job
        self.conn.send(job)

    def finish(self) -> tuple[Job, int | None]:
        """The job just ended: 0 if it succeeded, 1 if it raised, else the dead worker's exit code."""
        job, self.job = self.job, None
        try:
            return job, (0 if self.conn.recv() else 1)
        except (EOFError, OSError):
            self.proc.join()
            return job, self.proc.exitcode

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.is_alive():
            if kill:
                self.proc.terminate()
            else:
                self.conn.send(None)
            self.proc.join(timeout=10)


def run_local(
    run: RunDir, jobs: list[Job], *, cfg: Any, workers: int, device: str, progress: bool
) -> list[JobResult]:
    ctx = mp.get_context("spawn")
    slots = [_Slot(ctx, run, cfg, dev, threads) for dev, threads in _slots(workers, device)]
    queue = list(jobs)
    results: list[JobResult] = []
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=None if progress else True)
    try:
        while queue or any(s.job for s in slots):
            for slot in slots:
                if slot.job is None and queue:
                    job = queue.pop(0)
                    run.artifact(job.out, job.id).error.unlink(missing_ok=True)
                    slot.start_job(job)
            busy = {s.conn: s for s in slots if s.job is not None}
            busy.update({s.proc.sentinel: s for s in slots if s.job is not None})
            for ready in wait(list(busy)):
                slot = busy[ready]
                if slot.job is None:
                    continue  # both its pipe and its sentinel fired
                job, code = slot.finish()
                results.append(_collect(run, job, code))
                r = results[-1]
                if r.ok:
                    manifest.register(run.root, *run.artifact(job.out, job.id)[:2])
                bar.update(1)
                if progress:  # tqdm.write prints even when the bar is disabled
                    bar.write(r.record.describe() if r.ok else f"{job.name}: FAILED: {r.error}")
    except KeyboardInterrupt:
        for slot in slots:
            slot.stop(kill=True)
        raise
    finally:
        bar.close()
    for slot in slots:
        slot.stop()
    return results


def _collect(run: RunDir, job: Job, exitcode: int | None) -> JobResult:
    rec_path, _, err_path = run.artifact(job.out, job.id)
    if exitcode == 0 and rec_path.is_file():
        return JobResult(job, True, job.record_type.from_dict(load_json(rec_path), rec_path))
    if err_path.is_file():
        return JobResult(job, False, error=load_json(err_path).get("error", "failed"))
    if exitcode is not None and exitcode < 0:
        return JobResult(
            job, False, error=f"worker killed by signal {signal.Signals(-exitcode).name}"
        )
    return JobResult(job, False, error=f"worker exited with status {exitcode}")


def _ray_job(
    run_root: str, job: Job, cfg: Any, device: str, threads: int | None, level: int = logging.INFO
) -> dict:
    """One job as a Ray task. What it logs at the driver's ``level`` or above reaches the driver
    (Ray prefixes each line with the worker's pid and node address); the driver holds the run's
    lock for it."""
    import ray

    mark_worker()
    worker_log = logging.getLogger("specialists")
    if not worker_log.handlers:  # a fresh worker process: show the package's lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        worker_log.addHandler(handler)
    worker_log.setLevel(level)
    node = ray.get_runtime_context().get_node_id()[:8]
    gpus = ray.get_gpu_ids()
    where = f"node {node}" + (f", GPU {','.join(map(str, gpus))}" if gpus else "")
    start = time.perf_counter()
    worker_log.info("%s: started on %s (%s)", job.name, where, device)
    rec = job.task(run_root, job, cfg, device=device, threads=threads)
    worker_log.info("%s: finished on %s in %.0f s", job.name, where, time.perf_counter() - start)
    return rec.to_dict()


def _connect_ray(address: str | None):
    # every job's lines as they are, not merged into "[repeated 2x across cluster]" (read when
    # Ray is imported: a program that imported it already keeps its own setting)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError as e:
        raise SpecialistsError('the Ray backend needs Ray: pip install -e ".[ray]"') from e
    if not ray.is_initialized():
        kwargs = (
            {"address": address}
            if address
            else {"num_cpus": available_cores(), "include_dashboard": False}
        )
        try:
            # log_to_driver: what the workers log shows here, prefixed with their pid and node
            ray.init(
                ignore_reinit_error=True,
                log_to_driver=True,
                logging_level=logging.WARNING,
                **kwargs,
            )
        except ConnectionError as e:
            where = f"--ray-address {address}" if address else "a local Ray instance"
            raise SpecialistsError(f"{where}: {e}") from e
    return ray


def run_ray(
    run: RunDir,
    jobs: list[Job],
    *,
    cfg: Any,
    address: str | None,
    cpus_per_job: int,
    gpus_per_job: float,
    progress: bool,
    max_retries: int = 3,
) -> list[JobResult]:
    """Run ``jobs`` as Ray tasks spread over the cluster's nodes. A task whose worker or node
    dies is retried on another (``max_retries`` times); a job that raises is reported, not
    retried. The run directory must be on storage every node sees (one machine, or NFS)."""
    ray = _connect_ray(address)
    if gpus_per_job > 0 and ray.cluster_resources().get("GPU", 0) < gpus_per_job:
        raise SpecialistsError(
            f"--gpus-per-job {gpus_per_job:g}: the Ray cluster has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPU(s)"
        )
    device = "cuda" if gpus_per_job > 0 else "cpu"
    remote = ray.remote(
        num_cpus=cpus_per_job,
        num_gpus=gpus_per_job,
        max_retries=max_retries,
        retry_exceptions=False,
        scheduling_strategy="SPREAD",  # over the nodes, not packed onto the first
    )(_ray_job)
    level = logging.getLogger("specialists").getEffectiveLevel()  # --quiet reaches the workers
    root = str(run.root.resolve())
    refs = {remote.remote(root, job, cfg, device, cpus_per_job, level): job for job in jobs}
    results: list[JobResult] = []
    bar = tqdm(total=len(jobs), desc="jobs (ray)", unit="job", disable=None if progress else True)
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(done[0])
        try:
            rec = job.record_type.from_dict(ray.get(done[0]))
            results.append(JobResult(job, True, rec))
            manifest.register(run.root, *run.artifact(job.out, job.id)[:2])
            if progress:
                bar.write(rec.describe())
        except Exception as e:  # RayTaskError wraps the job's own exception
            cause = getattr(e, "cause", None) or e
            message = (
                str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            )
            results.append(JobResult(job, False, error=message))
            if progress:
                bar.write(f"{job.name}: FAILED: {message}")
        bar.update(1)
    bar.close()
    return results


def run_jobs(
    run: RunDir,
    jobs: list[Job],
    *,
    cfg: Any,
    generalist_sha: str,
    backend: str = "local",
    workers: int | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    progress: bool = True,
    gpus_per_job: float | None = None,
) -> list[JobResult]:
    """Run what is missing among ``jobs`` with the shared configuration ``cfg``; return one
    result per job (skipped ones included), in the order of ``jobs``. ``gpus_per_job`` < 1
    lets small jobs share a GPU (0.25: four per GPU; default: a GPU each where there are GPUs).
    """
    check_gpus_per_job(gpus_per_job)
    with run_lock(run.root, "running jobs"):  # re-entrant: the step calling this holds it already
        todo, done = pending_jobs(run, jobs, generalist_sha, cfg)
        for r in done:
            log.info("%s: up to date, skipped", r.job.name)
        if not todo:
            return done
        start = time.perf_counter()
        if backend == "local":
            if gpus_per_job is not None and not (device != "cpu" and torch.cuda.is_available()):
                log.warning("--gpus-per-job %g: no GPU here, the jobs run on the CPU", gpus_per_job)
            n = workers or default_workers(device, gpus_per_job)
            log.info("running %d job(s) with %d local worker(s)", len(todo), n)
            results = run_local(
                run, todo, cfg=cfg, workers=min(n, len(todo)), device=device, progress=progress
            )
        elif backend == "ray":
            cpus = 1 if workers is None else max(1, available_cores() // workers)
            if gpus_per_job is not None:
                gpus = gpus_per_job if device != "cpu" else 0.0
            else:  # the driver's view: a GPU each if this machine has GPUs
                gpus = 1.0 if (device in ("auto", "cuda") and torch.cuda.is_available()) else 0.0
            results = run_ray(
                run,
                todo,
                cfg=cfg,
                address=ray_address,
                cpus_per_job=cpus,
                gpus_per_job=gpus,
                progress=progress,
            )
        else:
            raise SpecialistsError(f"unknown backend {backend!r}; expected local or ray")
        log.info(
            "finished %d job(s) in %.0f s",
            sum(r.ok for r in results),
            time.perf_counter() - start,
        )
        order = {id(job): i for i, job in enumerate(jobs)}
        return sorted(done + results, key=lambda r: order[id(r.job)])
