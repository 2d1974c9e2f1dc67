"""Run many specialist jobs in parallel: local processes, or tasks on a Ray cluster.

Each job is independent: it reads the run directory and writes its own artifact. A job that
crashes or is killed affects no other job; it is reported at the end with its error. Running the
same command again trains only what is missing or whose group changed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specialists import manifest
from specialists.errors import SpecialistsError
from specialists.io import file_sha256, load_json, save_json
from specialists.models import available_cores
from specialists.run import RunDir
from specialists.specialist import SpecialistRecord, group_hash

from .specialist import SpecialistConfig, train_specialist

__all__ = ["Job", "JobResult", "pending_jobs", "run_jobs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One unit of work. ``kind="specialist"`` trains the specialist of ``classes``;
    ``kind="finetune"`` fine-tunes a copy of the generalist over all classes for ``examples``
    examples (the controls). Artifacts go to ``RUN/<out>/NNN.*``."""

    spec_id: int
    classes: tuple[int, ...]
    out: str = "specialists"
    kind: str = "specialist"
    examples: int = 0
    seed: int = 0


@dataclass
class JobResult:
    job: Job
    ok: bool
    record: SpecialistRecord | None = None  # or a FinetuneRecord for finetune jobs
    error: str | None = None
    skipped: bool = False


def _paths(run: RunDir, job: Job) -> tuple[Path, Path, Path]:
    d = run.root / job.out
    return (
        d / f"{job.spec_id:03d}.json",
        d / f"{job.spec_id:03d}.safetensors",
        d / f"{job.spec_id:03d}.error.json",
    )


def _record_type(job: Job):
    if job.kind == "finetune":
        from .controls import FinetuneRecord

        return FinetuneRecord
    return SpecialistRecord


def finished_record(
    run: RunDir, job: Job, generalist_sha: str, cfg: SpecialistConfig
) -> SpecialistRecord | None:
    """The job's record if it is complete, intact, and for this group, generalist and config."""
    rec_path, weights, _ = _paths(run, job)
    if not rec_path.is_file() or not weights.is_file():
        return None
    try:
        manifest.verify(run.root, rec_path, weights)
        rec = _record_type(job).from_dict(load_json(rec_path), rec_path)
    except SpecialistsError as e:
        log.warning("%s; it will be trained again", e)
        return None
    if rec.config != asdict(cfg) or rec.generalist_sha256 != generalist_sha:
        return None
    if job.kind == "specialist" and rec.group_hash != group_hash(list(job.classes), generalist_sha):
        return None
    if job.kind == "finetune" and (rec.examples, rec.seed) != (job.examples, job.seed):
        return None
    if file_sha256(weights) != rec.weights_sha256:
        return None
    return rec


def pending_jobs(
    run: RunDir, jobs: list[Job], generalist_sha: str, cfg: SpecialistConfig
) -> tuple[list[Job], list[JobResult]]:
    """Split ``jobs`` into those to train and those already done (returned as skipped results)."""
    todo, done = [], []
    for job in jobs:
        rec = finished_record(run, job, generalist_sha, cfg)
        if rec is None:
            todo.append(job)
        else:
            done.append(JobResult(job, True, rec, skipped=True))
    return todo, done


def _train_and_report(run_root: str, job: Job, cfg: dict, device: str, threads: int | None) -> bool:
    """Train one job inside a worker; on failure write its error file. True on success."""
    _, _, err_path = _paths(RunDir.of(run_root), job)
    try:
        _run_job(run_root, job, cfg, device, threads)
        return True
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, SpecialistsError):
            message = f"{type(e).__name__}: {message}"
        save_json(err_path, {"error": message, "traceback": traceback.format_exc()})
        return False


def _run_job(run_root: str, job: Job, cfg: dict, device: str, threads: int | None):
    if job.kind == "finetune":
        from .controls import fine_tune

        return fine_tune(run_root, job, SpecialistConfig(**cfg), device, threads)
    out_dir = Path(run_root) / job.out
    return train_specialist(
        run_root,
        job.spec_id,
        list(job.classes),
        SpecialistConfig(**cfg),
        device,
        threads,
        out_dir=out_dir,
    )


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
    conn, run_root: str, cfg: dict, device: str, threads: int | None, parent_pid: int | None = None
) -> None:
    """A long-lived local worker: trains the jobs it is sent, one at a time, until sent None.
    Reusing the process saves the interpreter start and imports for every job; a worker that
    dies takes only its current job with it (the launcher starts a fresh one), and a worker
    whose launcher dies stops within a second."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops its workers
    if parent_pid is not None:
        _exit_with(parent_pid)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_train_and_report(run_root, job, cfg, device, threads))


def _slots(workers: int, device: str) -> list[tuple[str, int | None]]:
    """(device, threads) of each worker slot: one GPU per worker on CUDA; cores shared on CPU."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        n_gpu = torch.cuda.device_count()
        return [(f"cuda:{i % n_gpu}", 1) for i in range(workers)]
    if device.startswith("cuda"):
        return [(device, 1)] * workers
    return [("cpu", max(1, available_cores() // workers))] * workers


def default_workers(device: str) -> int:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return available_cores()


def _describe(rec) -> str:
    m = rec.metrics
    if not isinstance(rec, SpecialistRecord):
        return f"{rec.describe()}, {m['seconds']:.0f} s"
    return (
        f"specialist {rec.id:3d}: {len(rec.classes)} classes, in-group accuracy {m['in_group_acc']:.3f} "
        f"(generalist {m['generalist_in_group_acc']:.3f}), {m['epochs_run']} epochs, {m['seconds']:.0f} s"
    )


class _Slot:
    """One local worker process bound to a device and a thread count."""

    def __init__(
        self, ctx, run: RunDir, cfg: SpecialistConfig, device: str, threads: int | None
    ) -> None:
        self.args = (str(run.root), asdict(cfg), device, threads)
        self.ctx, self.proc, self.conn, self.job = ctx, None, None, None

    def start_job(self, job: Job) -> None:
        if self.proc is None or not self.proc.is_alive():
            self.conn, child = self.ctx.Pipe()
            self.proc = self.ctx.Process(
                target=_worker_main, args=(child, *self.args, os.getpid()), daemon=True
            )
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
    run: RunDir, jobs: list[Job], cfg: SpecialistConfig, workers: int, device: str, progress: bool
) -> list[JobResult]:
    ctx = mp.get_context("spawn")
    slots = [_Slot(ctx, run, cfg, dev, threads) for dev, threads in _slots(workers, device)]
    queue = list(jobs)
    results: list[JobResult] = []
    bar = tqdm(total=len(jobs), desc="specialists", unit="job", disable=not progress)
    try:
        while queue or any(s.job for s in slots):
            for slot in slots:
                if slot.job is None and queue:
                    job = queue.pop(0)
                    _paths(run, job)[2].unlink(missing_ok=True)
                    slot.start_job(job)
            busy = {s.conn: s for s in slots if s.job is not None}
            busy.update({s.proc.sentinel: s for s in slots if s.job is not None})
            for ready in wait(list(busy)):
                slot = busy[ready]
                if slot.job is None:
                    continue  # both its pipe and its sentinel fired
                job, code = slot.finish()
                results.append(_collect(run, job, code))
                if results[-1].ok:
                    manifest.register(run.root, *_paths(run, job)[:2])
                bar.update(1)
                r = results[-1]
                bar.write(
                    _describe(r.record)
                    if r.ok
                    else f"specialist {job.spec_id:3d}: FAILED: {r.error}"
                )
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
    rec_path, _, err_path = _paths(run, job)
    if exitcode == 0 and rec_path.is_file():
        return JobResult(job, True, _record_type(job).from_dict(load_json(rec_path), rec_path))
    if err_path.is_file():
        return JobResult(job, False, error=load_json(err_path).get("error", "failed"))
    if exitcode is not None and exitcode < 0:
        return JobResult(
            job, False, error=f"worker killed by signal {signal.Signals(-exitcode).name}"
        )
    return JobResult(job, False, error=f"worker exited with status {exitcode}")


def _ray_job(run_root: str, job: Job, cfg: dict, device: str, threads: int | None) -> dict:
    return _run_job(run_root, job, cfg, device, threads).to_dict()


def run_ray(
    run: RunDir,
    jobs: list[Job],
    cfg: SpecialistConfig,
    address: str | None,
    cpus_per_job: int,
    gpus_per_job: float,
    progress: bool,
    max_retries: int = 2,
) -> list[JobResult]:
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
        ray.init(
            ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING, **kwargs
        )
    device = "cuda" if gpus_per_job > 0 else "cpu"
    remote = ray.remote(
        num_cpus=cpus_per_job,
        num_gpus=gpus_per_job,
        max_retries=max_retries,
        retry_exceptions=False,
    )(_ray_job)
    refs = {
        remote.remote(str(run.root.resolve()), job, asdict(cfg), device, cpus_per_job): job
        for job in jobs
    }
    results: list[JobResult] = []
    bar = tqdm(total=len(jobs), desc="specialists (ray)", unit="job", disable=not progress)
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(done[0])
        try:
            rec = _record_type(job).from_dict(ray.get(done[0]))
            results.append(JobResult(job, True, rec))
            manifest.register(run.root, *_paths(run, job)[:2])
            bar.write(_describe(rec))
        except Exception as e:  # RayTaskError wraps the job's own exception
            cause = getattr(e, "cause", None) or e
            message = (
                str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            )
            results.append(JobResult(job, False, error=message))
            bar.write(f"specialist {job.spec_id:3d}: FAILED: {message}")
        bar.update(1)
    bar.close()
    return results


def run_jobs(
    run: RunDir,
    jobs: list[Job],
    cfg: SpecialistConfig,
    generalist_sha: str,
    backend: str = "local",
    workers: int | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    progress: bool = True,
) -> list[JobResult]:
    """Train what is missing among ``jobs``; return one result per job (skipped ones included)."""
    todo, done = pending_jobs(run, jobs, generalist_sha, cfg)
    for r in done:
        log.info("specialist %3d: up to date, skipped", r.job.spec_id)
    if not todo:
        return done
    start = time.perf_counter()
    if backend == "local":
        n = workers or default_workers(device)
        log.info("training %d specialist(s) with %d local worker(s)", len(todo), n)
        results = run_local(run, todo, cfg, min(n, len(todo)), device, progress)
    elif backend == "ray":
        cpus = 1 if workers is None else max(1, available_cores() // workers)
        gpus = 1.0 if (device in ("auto", "cuda") and torch.cuda.is_available()) else 0.0
        results = run_ray(run, todo, cfg, ray_address, cpus, gpus, progress)
    else:
        raise SpecialistsError(f"unknown backend {backend!r}; expected local or ray")
    log.info(
        "trained %d specialist(s) in %.0f s",
        sum(r.ok for r in results),
        time.perf_counter() - start,
    )
    return sorted(done + results, key=lambda r: r.job.spec_id)
