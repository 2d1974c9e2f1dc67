"""Throughput of the ensemble, and of the distilled student where the run has one, relative to
the generalist (top-n gating), measured in one run; then where the ensemble's time goes, stage
by stage, on one batch (``Ensemble.profile``).

    python benchmarks/bench_ensemble.py [RUN] [--top-n 1] [--images 4096]

Without RUN, builds a quick run on the embedded data (100 classes, 20 planted groups as the
clusters, short training: the speed does not depend on how well the models are trained).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from specialists.artifacts import load_student
from specialists.data import DataSource
from specialists.ensemble import Ensemble
from specialists.evaluate import images_per_second
from specialists.models import predict_proba
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import save_json
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig


def quick_run(root: Path, model: str) -> Path:
    run = root / "run"
    train_generalist(GeneralistConfig(model=model, epochs=1), run, progress=False)
    groups = [list(range(5 * g, 5 * g + 5)) for g in range(20)]
    save_json(RunDir.of(run).clusters, {"groups": [{"classes": g} for g in groups]})
    train_specialists(run, SpecialistConfig(epochs=1, examples_per_epoch=128), progress=False)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", nargs="?", help="an existing run directory")
    ap.add_argument("--model", default="test_efficientnet")
    ap.add_argument("--top-n", type=int, default=1)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else quick_run(Path(tmp), args.model)
        ens = Ensemble.load(run, top_n=args.top_n)
        images = load_data(DataSource.from_dict(ens.record.data)).test.images[: args.images]
        out = ens.run_batch(images)
        consulted = np.mean([len(c) for c in out.consulted])
        g, e = ens.throughput(images, repeats=args.repeats)
        print(
            f"{ens.record.architecture}, {ens.record.n_classes} classes, {len(ens.specialists)} specialists, "
            f"top-{args.top_n} gating: {consulted:.2f} specialists consulted per image"
        )
        print(
            f"generalist: {g:.0f} images/s; ensemble: {e:.0f} images/s; ensemble / generalist = {e / g:.2f}"
        )
        batch = images[: ens.batch_size]
        stages = ens.profile(batch, repeats=args.repeats)
        total = stages.pop("total")
        print(f"one batch of {len(batch)} images, {1e3 * total:.1f} ms (median of {args.repeats}):")
        specialists = {k: v for k, v in stages.items() if k.startswith("specialist")}
        for name, seconds in stages.items():
            if name not in specialists:
                print(f"  {name:28s} {1e3 * seconds:8.2f} ms  {100 * seconds / total:5.1f}%")
        spec = sum(v for k, v in specialists.items() if not k.endswith("input"))
        views = sum(v for k, v in specialists.items() if k.endswith("input"))
        n = sum(1 for k in specialists if not k.endswith("input"))
        print(
            f"  {f'{n} specialists, forward':28s} {1e3 * spec:8.2f} ms  {100 * spec / total:5.1f}%"
        )
        print(
            f"  {'their inputs (row gathers)':28s} {1e3 * views:8.2f} ms  {100 * views / total:5.1f}%"
        )
        rest = total - sum(stages.values())
        print(
            f"  {'other (Python, bookkeeping)':28s} {1e3 * rest:8.2f} ms  {100 * rest / total:5.1f}%"
        )
        if RunDir.of(run).student().files.record.is_file():
            model, record, transform = load_student(run, ens.device)

            def student(x: np.ndarray) -> np.ndarray:
                return predict_proba(model, x, transform=transform, device=ens.device)

            g2 = images_per_second(ens.generalist_proba, images, args.repeats)
            s = images_per_second(student, images, args.repeats)
            print(
                f"student ({record.architecture}): {s:.0f} images/s; generalist (measured again "
                f"just before): {g2:.0f} images/s; student / generalist = {s / g2:.2f}"
            )


if __name__ == "__main__":
    main()
