"""How closely a run's students fit their teacher: on the run's cached training and validation
images, each model's accuracy, its mean probability of the true class, its agreement with the
teacher's top class and its KL divergence from the teacher's q (T = 1). The teacher is the
ensemble gated as the student's record says (``teacher_top_n``); the calibrated ensemble gets its
own row when its gating differs.

    python benchmarks/distill_fit.py runs/omniglot/seed0

A student that fits the teacher on the training images but not on validation learned the
teacher's answers there and little of how it generalises; a student that fits neither is short of
capacity or of training. The teacher's own row says how much a student can learn from its q
beyond the labels (a q as sure as the labels teaches nothing more).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specialists.artifacts import load_student  # noqa: E402
from specialists.ensemble import Ensemble  # noqa: E402
from specialists.models import predict_proba, resolve_device  # noqa: E402
from specialists.run import RunDir  # noqa: E402


def fit_rows(q: np.ndarray, labels: np.ndarray, models: dict[str, np.ndarray]) -> list[str]:
    rows = []
    for name, p in models.items():
        n = np.arange(len(labels))
        kl = (q * (np.log(np.maximum(q, 1e-12)) - np.log(np.maximum(p, 1e-12)))).sum(1).mean()
        rows.append(
            f"  {name:34s} {100 * (p.argmax(1) == labels).mean():8.2f}% {p[n, labels].mean():9.3f} "
            f"{100 * (p.argmax(1) == q.argmax(1)).mean():10.2f}% {kl:9.3f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    run = RunDir.of(args.run)
    dev = resolve_device(args.device)
    students = {}
    top_n = None
    for subdir, name in (
        (RunDir.STUDENT, "student"),
        (RunDir.SELF_STUDENT_CONTROL, "self-distilled"),
    ):
        if run.student(subdir).files.record.is_file():
            model, record, tf = load_student(run, dev, subdir=subdir)
            students[name] = (model, tf)
            if subdir == RunDir.STUDENT:
                top_n = record.config.get("teacher_top_n") or None
    teacher = Ensemble.load(run.root, str(dev), top_n=top_n)
    students = {"generalist": (teacher.generalist, teacher.transform), **students}
    teachers = {f"teacher: ensemble, top-{teacher.top_n}": teacher}
    calibrated = Ensemble.load(run.root, str(dev)) if top_n is not None else teacher
    if calibrated.top_n != teacher.top_n:
        teachers[f"calibrated ensemble, top-{calibrated.top_n}"] = calibrated
    print(f"{'':36s} {'accuracy':>9s} {'p(true)':>9s} {'agrees':>11s} {'KL(q||p)':>9s}")
    for split in ("train", "val"):
        images = np.load(run.cache_images(split))
        labels = np.load(run.cache_labels(split)).astype(np.int64)
        probs = {
            name: np.concatenate(
                [e.predict_proba(images[i : i + 512]) for i in range(0, len(images), 512)]
            )
            for name, e in teachers.items()
        }
        for name, (model, tf) in students.items():
            probs[name] = predict_proba(model, images, transform=tf, device=dev)
        print(f"{split} ({len(labels)} images; agreement and KL against the teacher's q)")
        print("\n".join(fit_rows(next(iter(probs.values())), labels, probs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
