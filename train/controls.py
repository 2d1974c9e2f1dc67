"""Controls: what does specialisation itself buy, beyond ensembling and extra training?

With the same settings, compute and number of models as the run's own specialists:

- **random groups**: specialists on groups of the same sizes drawn at random (seeded);
- **extra-compute generalist**: the generalist fine-tuned for as many examples as all the
  specialists saw together;
- **plain ensemble**: as many fine-tuned copies of the generalist over all classes as there are
  specialists (sharing the same total compute), averaged with the generalist.

Every control is a job of the same launcher as the specialists (local or Ray), so it runs in
parallel and resumes like them. Artifacts live in ``RUN/controls/``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specialists.errors import SpecialistsError
from specialists.io import file_sha256, load_json, load_tensors, save_json, save_tensors
from specialists.models import create_model, resolve_device, set_cpu_threads
from specialists.records import SCHEMA_VERSION, GeneralistRecord, record_from_dict
from specialists.run import RunDir
from specialists.specialist import SpecialistRecord

from .generalist import load_generalist, make_transforms
from .launch import Job, JobResult, run_jobs
from .loop import (
    build_optimizer,
    cosine_with_warmup,
    predict_proba,
    shuffled_batches,
    train_one_epoch,
)
from .specialist import SpecialistConfig, _load_cached

__all__ = ["FinetuneRecord", "fine_tune", "random_groups", "run_controls"]

log = logging.getLogger(__name__)

RANDOM_DIR = "controls/random"
EXTRA_DIR = "controls/extra"
PLAIN_DIR = "controls/plain"


@dataclass(frozen=True)
class FinetuneRecord:
    """A copy of the generalist fine-tuned over all classes (a control)."""

    id: int
    examples: int
    seed: int
    generalist_sha256: str
    config: dict
    metrics: dict
    weights_sha256: str
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | Path = "fine-tune record") -> FinetuneRecord:
        return record_from_dict(cls, d, source)

    def describe(self) -> str:
        return f"fine-tuned copy {self.id}: {self.examples} examples, val accuracy {self.metrics['val_acc']:.3f}"


def fine_tune(
    run_root: str | Path,
    job: Job,
    cfg: SpecialistConfig,
    device: str = "auto",
    threads: int | None = None,
) -> FinetuneRecord:
    """Fine-tune the generalist over all classes for ``job.examples`` examples, with the
    specialists' optimiser settings; write ``RUN/<job.out>/NNN.{safetensors,json}``."""
    t0 = time.perf_counter()
    run = RunDir.of(run_root)
    dev = resolve_device(device)
    if dev.type == "cpu":
        set_cpu_threads(threads)
    model, grec = load_generalist(run.root, dev)
    images, labels = _load_cached(run, "train")
    val_images, val_labels = _load_cached(run, "val")
    images_t, labels_t = torch.from_numpy(np.array(images)), torch.from_numpy(labels)
    train_tf, eval_tf = make_transforms(grec)
    torch.manual_seed(job.seed)
    steps = max(1, math.ceil(job.examples / cfg.batch_size))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, min(steps // 10, 100), steps)
    rng = np.random.default_rng([job.seed, 31337])
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        batches.extend(shuffled_batches(len(labels), cfg.batch_size, rng))
    train_one_epoch(
        model,
        images_t,
        batches[:steps],
        lambda idx: labels_t[torch.from_numpy(idx)],
        train_tf,
        optimizer,
        scheduler,
        lambda logits, y, _x: F.cross_entropy(logits, y),
        dev,
        cfg.amp,
        torch.Generator().manual_seed(job.seed),
        desc=f"copy {job.spec_id}",
        progress=False,
    )
    val_acc = float(
        (predict_proba(model, np.array(val_images), eval_tf, dev).argmax(1) == val_labels).mean()
    )
    out = run.root / job.out
    weights = out / f"{job.spec_id:03d}.safetensors"
    save_tensors(weights, model.state_dict(), {"architecture": grec.architecture})
    rec = FinetuneRecord(
        id=job.spec_id,
        examples=job.examples,
        seed=job.seed,
        generalist_sha256=grec.weights_sha256,
        config=asdict(cfg),
        metrics={"val_acc": val_acc, "seconds": round(time.perf_counter() - t0, 2)},
        weights_sha256=file_sha256(weights),
    )
    save_json(out / f"{job.spec_id:03d}.json", rec.to_dict())
    return rec


def random_groups(
    sizes: list[int], n_classes: int, seed: int = 0, disjoint: bool = True
) -> list[list[int]]:
    """Groups of the given sizes drawn at random: a partition when the sizes allow it and
    ``disjoint``, else each group drawn independently."""
    rng = np.random.default_rng([seed, 2718])
    if disjoint and sum(sizes) <= n_classes:
        perm = rng.permutation(n_classes)
        cuts = np.cumsum([0, *sizes])
        return [sorted(perm[a:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]
    return [sorted(rng.choice(n_classes, size=s, replace=False).tolist()) for s in sizes]


def _specialist_records(run: RunDir, n_groups: int) -> list[SpecialistRecord]:
    recs = []
    for i in range(n_groups):
        path = run.specialists_dir / f"{i:03d}.json"
        if not path.is_file():
            raise SpecialistsError(
                f"{path}: controls need the run's trained specialists (run `specialists train {run.root}` first)"
            )
        recs.append(SpecialistRecord.from_dict(load_json(path), path))
    return recs


def run_controls(
    run_dir: str | Path,
    workers: int | None = None,
    backend: str = "local",
    device: str = "auto",
    ray_address: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[JobResult]:
    """Train the three controls (only what is missing); returns the job results."""
    from .pipeline import load_groups

    run = RunDir.of(run_dir)
    run.require_generalist()
    grec = run.generalist()
    groups = load_groups(run.clusters, grec.n_classes)
    specs = _specialist_records(run, len(groups))
    cfg = SpecialistConfig(**specs[0].config)
    total = int(sum(s.metrics["examples_seen"] for s in specs))
    disjoint = len({c for g in groups for c in g}) == sum(len(g) for g in groups)
    rand = random_groups([len(g) for g in groups], grec.n_classes, seed, disjoint)
    save_json(
        run.root / RANDOM_DIR / "clusters.json",
        {"groups": [{"classes": g} for g in rand], "seed": seed},
    )
    n = len(specs)
    jobs = [Job(i, tuple(g), out=f"{RANDOM_DIR}/specialists") for i, g in enumerate(rand)]
    jobs.append(Job(0, (), out=EXTRA_DIR, kind="finetune", examples=total, seed=seed))
    jobs += [
        Job(i, (), out=PLAIN_DIR, kind="finetune", examples=max(1, total // n), seed=seed + 1 + i)
        for i in range(n)
    ]
    results = run_jobs(
        run, jobs, cfg, grec.weights_sha256, backend, workers, device, ray_address, progress
    )
    if all(r.ok for r in results):  # the random groups are combined as the run's own are
        from specialists.calibrate import calibrate_run

        calibrate_run(run.root, device, variant=RANDOM_DIR)
    return results


def _finetuned_proba(
    run: RunDir, grec: GeneralistRecord, out: str, n: int, images: np.ndarray, device: torch.device
) -> list[np.ndarray]:
    _, eval_tf = make_transforms(grec)
    probs = []
    for i in range(n):
        rec_path, weights = (
            run.root / out / f"{i:03d}.json",
            run.root / out / f"{i:03d}.safetensors",
        )
        rec = FinetuneRecord.from_dict(load_json(rec_path), rec_path)
        if file_sha256(weights) != rec.weights_sha256:
            raise SpecialistsError(f"{weights}: checksum does not match {rec_path}")
        model = create_model(grec.architecture, grec.n_classes, grec.in_chans, grec.input_size)
        model.load_state_dict(load_tensors(weights))
        probs.append(predict_proba(model.to(device), images, eval_tf, device))
    return probs


def control_rows(
    run_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    p_g: np.ndarray,
    top_n: int | None = None,
    device: str = "auto",
) -> list[dict]:
    """One metrics row per control, conditional accuracy on the run's own covered examples."""
    from specialists.ensemble import Ensemble
    from specialists.evaluate import ensemble_metrics

    from .pipeline import load_groups

    run = RunDir.of(run_dir)
    dev = resolve_device(device)
    grec = run.generalist()
    groups = load_groups(run.clusters, grec.n_classes)
    n = len(groups)

    def seconds(out: str, count: int) -> float:
        return round(
            sum(
                load_json(run.root / out / f"{i:03d}.json")["metrics"]["seconds"]
                for i in range(count)
            ),
            1,
        )

    rows = []
    rand = Ensemble.load(run.root, device, top_n, variant=RANDOM_DIR)
    q_rand = rand.run_batch(images).q
    rows.append(("random groups", q_rand, seconds(f"{RANDOM_DIR}/specialists", n)))
    q_extra = _finetuned_proba(run, grec, EXTRA_DIR, 1, images, dev)[0]
    rows.append(("extra-compute generalist", q_extra, seconds(EXTRA_DIR, 1)))
    copies = _finetuned_proba(run, grec, PLAIN_DIR, n, images, dev)
    rows.append(("plain ensemble", (p_g + sum(copies)) / (1 + n), seconds(PLAIN_DIR, n)))
    out = []
    for name, q, secs in rows:
        m = ensemble_metrics(p_g, q, labels, groups)
        out.append(
            {
                "name": name,
                "accuracy": m["ensemble_accuracy"],
                "relative_error_reduction": m["relative_error_reduction"],
                "conditional_accuracy": m["ensemble_conditional_accuracy"],
                "train_seconds": secs,
            }
        )
    return out


def evaluate_controls(run_dir: str | Path, top_n: int | None = None, device: str = "auto") -> dict:
    """Add the control rows and a verdict to ``RUN/metrics.json`` (evaluating the run first if
    needed); returns the updated metrics."""
    from specialists.ensemble import Ensemble
    from specialists.evaluate import evaluate_run

    from .data import DataSpec, load_data

    run = RunDir.of(run_dir)
    m = load_json(run.metrics) if run.metrics.is_file() else {}
    if m.get("split") != "test" or (top_n is not None and m.get("top_n") != top_n):
        m = evaluate_run(run.root, top_n=top_n, device=device)
    ens = Ensemble.load(run.root, device, top_n)
    part = load_data(DataSpec.from_dict(ens.record.data)).test
    p_g = ens.generalist_proba(part.images)  # the controls only need the generalist's view
    m["controls"] = control_rows(run.root, part.images, part.labels, p_g, top_n, device)
    gain = m["ensemble_accuracy"] - m["generalist_accuracy"]
    rand = next(r for r in m["controls"] if r["name"] == "random groups")
    if gain > 0:
        share = (m["ensemble_accuracy"] - rand["accuracy"]) / gain
        m["specialisation_share"] = round(share, 4)
        m["verdict"] = (
            f"specialisation accounts for {100 * share:.0f}% of the ensemble's gain of "
            f"{100 * gain:.2f} points; random groups of the same sizes recover the other "
            f"{100 * (1 - share):.0f}%"
        )
        best = max(m["controls"], key=lambda r: r["accuracy"])
        if best["accuracy"] >= m["ensemble_accuracy"]:
            m["verdict"] += (
                f"; but the {best['name']} control reaches {100 * best['accuracy']:.2f}% "
                f"(ensemble {100 * m['ensemble_accuracy']:.2f}%): here the same compute "
                "spent otherwise does as well"
            )
    else:
        m["specialisation_share"] = None
        m["verdict"] = (
            f"the ensemble does not beat its generalist here ({100 * gain:+.2f} points): specialists do not pay on this data"
        )
    save_json(run.metrics, m)
    return m
