"""Controls: what does specialisation itself buy, beyond ensembling and extra training?

With the same settings, compute and number of models as the run's own specialists:

- **random groups**: specialists on groups of the same sizes drawn at random (seeded);
- **extra-compute generalist**: the generalist fine-tuned for as many examples as all the
  specialists saw together;
- **plain ensemble**: as many fine-tuned copies of the generalist over all classes as there are
  specialists (sharing the same total compute), averaged with the generalist;
- **large generalist** (when the specialists have their own input size or architecture): a
  generalist of the specialists' architecture at their input size, trained for the same
  compute: the generalist's copy fine-tuned for all the specialists' examples when it is the
  same architecture, else a fresh model trained for the generalist's examples plus theirs. It is
  the answer "just run the big model on everything", with its images per second.

Every control is a job of the same launcher as the specialists (local or Ray), so it runs in
parallel and resumes like them. Artifacts live in ``RUN/controls/``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specialists.artifacts import generalist_record, load_checked, load_groups, load_weights
from specialists.calibrate import calibrate_run
from specialists.datasets import load_run_data
from specialists.ensemble import Ensemble
from specialists.evaluate import ensemble_metrics, evaluate_run, paired_speed
from specialists.lock import writes_run
from specialists.models import (
    create_model,
    model_from_checkpoint,
    predict_proba,
    resolve_device,
)
from specialists.records import FinetuneRecord, GeneralistRecord, SpecialistRecord
from specialists.run import RunDir
from specialists.storage import load_json, save_json
from specialists.transforms import BatchTransform

from ._job import cache_sizes, mapped_tensor, save_artifact, start_job
from .launch import Job, JobResult, run_jobs
from .loop import (
    build_optimizer,
    cosine_with_warmup,
    shuffled_batches,
    train_one_epoch,
)
from .specialist import SpecialistConfig, specialist_jobs

__all__ = ["evaluate_controls", "fine_tune", "finetune_job", "random_groups", "run_controls"]

log = logging.getLogger(__name__)


def finetune_job(
    index: int,
    out: str,
    *,
    examples: int,
    seed: int,
    member: tuple[str, int, str | None] | None = None,
) -> Job:
    """The launcher's job that fine-tunes copy ``index`` of the generalist into ``RUN/<out>/``
    (``member``: as a model of that architecture at that input size, from that checkpoint)."""
    inputs: dict = {"examples": examples, "seed": seed}
    if member is not None:
        inputs.update(architecture=member[0], input_size=member[1], checkpoint=member[2])
    return Job(index, out, fine_tune, FinetuneRecord, inputs=inputs, identity=inputs)


def fine_tune(
    run_root: str | Path,
    job: Job,
    cfg: SpecialistConfig,
    *,
    device: str = "auto",
    threads: int | None = None,
) -> FinetuneRecord:
    """Fine-tune the generalist over all classes for ``job.inputs["examples"]`` examples, with the
    specialists' optimiser settings; write its weights and record into ``RUN/<job.out>/``."""
    examples, seed = job.inputs["examples"], job.inputs["seed"]
    arch, size = job.inputs.get("architecture"), job.inputs.get("input_size")
    ckpt = job.inputs.get("checkpoint")
    ctx = start_job(run_root, device=device, threads=threads, input_size=size)
    model, grec, labels = ctx.generalist, ctx.record, ctx.train_labels
    train_tf, eval_tf = ctx.train_transform, ctx.eval_transform
    if size is not None:  # the large generalist: its own view of the images
        train_tf = BatchTransform(grec.mean, grec.std, size, augment=True, hflip=grec.hflip)
        eval_tf = BatchTransform(grec.mean, grec.std, size)
    if arch is not None and arch != grec.architecture:
        torch.manual_seed(seed)
        if ckpt is not None:  # as the specialists started
            path = str(Path(ckpt).expanduser())
            model = model_from_checkpoint(
                arch, grec.n_classes, grec.in_chans, size, path, reset_head=True
            )
        else:
            model = create_model(arch, grec.n_classes, grec.in_chans, size)
        model.to(ctx.device)
    images_t, labels_t = mapped_tensor(ctx.train_images), torch.from_numpy(labels)
    torch.manual_seed(seed)
    steps = max(1, math.ceil(examples / cfg.batch_size))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, min(steps // 10, 100), steps)
    rng = np.random.default_rng([seed, 31337])
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        batches.extend(shuffled_batches(len(labels), cfg.batch_size, rng))
    train_one_epoch(
        model,
        images_t,
        batches=batches[:steps],
        targets=lambda idx: labels_t[torch.from_numpy(idx)],
        transform=train_tf,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=lambda logits, y, _x: F.cross_entropy(logits, y),
        device=ctx.device,
        amp=cfg.amp,
        generator=torch.Generator().manual_seed(seed),
        desc=f"copy {job.id}",
        progress=False,
    )
    val_probs = predict_proba(
        model, mapped_tensor(ctx.val_images), transform=eval_tf, device=ctx.device
    )
    val_acc = float((val_probs.argmax(1) == ctx.val_labels).mean())
    return save_artifact(
        ctx.run.artifact(job.out, job.id),
        model,
        metadata={"architecture": arch or grec.architecture},
        make_record=lambda weights_sha256: FinetuneRecord(
            id=job.id,
            examples=examples,
            seed=seed,
            architecture=arch,
            input_size=size,
            generalist_sha256=grec.weights_sha256,
            config=asdict(cfg),
            metrics={"val_acc": val_acc, "seconds": ctx.seconds()},
            weights_sha256=weights_sha256,
        ),
    )


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
    records = []
    for i in range(n_groups):
        files = run.specialist(i)
        records.append(
            load_checked(
                run,
                files.record,
                files.weights,
                SpecialistRecord,
                missing=f"controls need the run's trained specialists (run `specialists train {run.root}` first)",
            )
        )
    return records


def control_jobs(run: RunDir, *, seed: int = 0) -> tuple[list[Job], SpecialistConfig]:
    """The controls' jobs with the run's own settings and compute, and that configuration; writes
    the random groups' ``clusters.json``."""
    grec = generalist_record(run)
    groups = load_groups(run.clusters, grec.n_classes)
    specialists = _specialist_records(run, len(groups))
    cfg = SpecialistConfig(**specialists[0].config)
    total = int(sum(s.metrics["examples_seen"] for s in specialists))
    disjoint = len({c for g in groups for c in g}) == sum(len(g) for g in groups)
    rand = random_groups([len(g) for g in groups], grec.n_classes, seed, disjoint)
    random_run = run.ensemble(RunDir.RANDOM_CONTROL)
    save_json(random_run.clusters, {"groups": [{"classes": g} for g in rand], "seed": seed})
    n = len(specialists)
    jobs = specialist_jobs(rand, grec, cfg, out=random_run.specialists_subdir)
    jobs.append(finetune_job(0, RunDir.EXTRA_CONTROL, examples=total, seed=seed))
    jobs += [
        finetune_job(i, RunDir.PLAIN_CONTROL, examples=max(1, total // n), seed=seed + 1 + i)
        for i in range(n)
    ]
    member = _specialists_member(specialists, grec)
    if member is not None:
        arch, size, _ = member
        large = total
        if arch != grec.architecture:  # a fresh model: the generalist's training compute too
            large += int(grec.metrics["n_train"] * grec.metrics["epochs_run"])
        jobs.append(finetune_job(0, RunDir.LARGE_CONTROL, examples=large, seed=seed, member=member))
    return jobs, cfg


def _specialists_member(
    specialists: list[SpecialistRecord], grec: GeneralistRecord
) -> tuple[str, int, str | None] | None:
    """(architecture, input size, checkpoint) most of the run's specialists have, when it is
    not the generalist's own; None otherwise."""
    from collections import Counter

    def member(s: SpecialistRecord) -> tuple[str, int, str | None]:
        ckpt = SpecialistConfig(**s.config).member(s.id, grec)[2]
        return s.architecture, s.size(grec), ckpt

    (arch, size, ckpt), _ = Counter(member(s) for s in specialists).most_common(1)[0]
    if (arch, size) == (grec.architecture, grec.input_size):
        return None
    return arch, size, ckpt


@writes_run("specialists controls")
def run_controls(
    run_dir: str | Path,
    *,
    workers: int | None = None,
    backend: str = "local",
    device: str = "auto",
    ray_address: str | None = None,
    gpus_per_job: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[JobResult]:
    """Train the three controls (only what is missing); returns the job results."""
    run = RunDir.of(run_dir)
    run.require_generalist()
    jobs, cfg = control_jobs(run, seed=seed)
    grec = generalist_record(run)
    cache_sizes(run, grec, [j.inputs.get("input_size") for j in jobs])
    results = run_jobs(
        run,
        jobs,
        cfg=cfg,
        generalist_sha=generalist_record(run).weights_sha256,
        backend=backend,
        workers=workers,
        device=device,
        ray_address=ray_address,
        gpus_per_job=gpus_per_job,
        progress=progress,
    )
    if all(r.ok for r in results):  # the random groups are combined as the run's own are
        calibrate_run(run.root, device, variant=RunDir.RANDOM_CONTROL)
    return results


def _finetuned_model(
    run: RunDir, grec: GeneralistRecord, out: str, index: int, device: torch.device
) -> tuple[torch.nn.Module, BatchTransform, FinetuneRecord]:
    """A fine-tuned control's model (in eval mode, on ``device``), its eval transform (at its own
    input size) and its record."""
    files = run.artifact(out, index)
    rec = load_checked(run, files.record, files.weights, FinetuneRecord, missing="missing")
    arch, size = rec.architecture or grec.architecture, rec.input_size or grec.input_size
    model = create_model(arch, grec.n_classes, grec.in_chans, size)
    load_weights(model, files.weights, arch)
    return model.to(device).eval(), BatchTransform(grec.mean, grec.std, size), rec


def _finetuned_proba(
    run: RunDir, grec: GeneralistRecord, out: str, n: int, images: np.ndarray, device: torch.device
) -> list[np.ndarray]:
    probs = []
    for i in range(n):
        model, tf, _ = _finetuned_model(run, grec, out, i, device)
        probs.append(predict_proba(model, images, transform=tf, device=device))
    return probs


def _train_seconds(run: RunDir, out: str, count: int) -> float:
    records = (load_json(run.artifact(out, i).record) for i in range(count))
    return round(sum(r["metrics"]["seconds"] for r in records), 1)


def control_rows(
    run_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    p_g: np.ndarray,
    *,
    top_n: int | None = None,
    device: str = "auto",
) -> list[dict]:
    """One metrics row per control, conditional accuracy on the run's own covered examples."""
    run = RunDir.of(run_dir)
    dev = resolve_device(device)
    grec = generalist_record(run)
    groups = load_groups(run.clusters, grec.n_classes)
    n = len(groups)
    random_run = run.ensemble(RunDir.RANDOM_CONTROL)
    rows = []
    rand = Ensemble.load(run.root, device, top_n=top_n, variant=RunDir.RANDOM_CONTROL)
    q_rand = rand.run_batch(images).q
    rows.append(("random groups", q_rand, _train_seconds(run, random_run.specialists_subdir, n)))
    q_extra = _finetuned_proba(run, grec, RunDir.EXTRA_CONTROL, 1, images, dev)[0]
    rows.append(("extra-compute generalist", q_extra, _train_seconds(run, RunDir.EXTRA_CONTROL, 1)))
    copies = _finetuned_proba(run, grec, RunDir.PLAIN_CONTROL, n, images, dev)
    plain = (p_g + sum(copies)) / (1 + n)
    rows.append(("plain ensemble", plain, _train_seconds(run, RunDir.PLAIN_CONTROL, n)))
    speeds = {}
    if run.artifact(RunDir.LARGE_CONTROL, 0).record.is_file():
        model, tf, rec = _finetuned_model(run, grec, RunDir.LARGE_CONTROL, 0, dev)

        def predict(x, model=model, tf=tf):
            return predict_proba(model, x, transform=tf, device=dev)

        name = "large generalist"
        rows.append((name, predict(images), _train_seconds(run, RunDir.LARGE_CONTROL, 1)))
        timed = images[: min(len(images), 2048)]
        g_ips, ips = paired_speed(rand.generalist_proba, predict, timed)
        speeds[name] = {
            "architecture": rec.architecture or grec.architecture,
            "input_size": rec.input_size or grec.input_size,
            "images_per_second": round(ips, 1),
            "throughput_ratio": round(ips / g_ips, 3),
        }
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
                **speeds.get(name, {}),
            }
        )
    return out


@writes_run("specialists controls")
def evaluate_controls(
    run_dir: str | Path, *, top_n: int | None = None, device: str = "auto"
) -> dict:
    """Add the control rows and a verdict to ``RUN/metrics.json`` (evaluating the run first if
    needed); returns the updated metrics."""
    run = RunDir.of(run_dir)
    m = load_json(run.metrics) if run.metrics.is_file() else {}
    if m.get("split") != "test" or (top_n is not None and m.get("top_n") != top_n):
        m = evaluate_run(run.root, top_n=top_n, device=device)
    ens = Ensemble.load(run.root, device, top_n=top_n)
    rand = Ensemble.load(run.root, device, top_n=top_n, variant=RunDir.RANDOM_CONTROL)
    # every model the controls run, kept by calibration or not, the large generalist included
    grec = ens.record
    sizes = [s.size(grec) for s in ens.all_specialists + rand.all_specialists]
    large = run.artifact(RunDir.LARGE_CONTROL, 0).record
    if large.is_file():
        sizes.append(load_json(large).get("input_size") or grec.input_size)
    size = max([grec.input_size, *sizes])
    part = load_run_data(
        RunDir.of(run.root), grec, min_size=size if size > grec.input_size else None
    ).test
    part.images = ens.fit_images(part.images)
    p_g = ens.generalist_proba(part.images)  # the controls only need the generalist's view
    m["controls"] = control_rows(
        run.root, part.images, part.labels, p_g, top_n=top_n, device=device
    )
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
