"""Specialists that see more pixels than their generalist: the cascade against the big model.

    python benchmarks/resolution.py --seeds 0 1 2                      # the embedded family
    python benchmarks/resolution.py --data omniglot:../shared/data/omniglot,size=56 \\
        --input-size 28 --specialist-input-size 56 --epochs 20 --seeds 0 1 2 \\
        --out runs/resolution-omniglot

For each seed, all on the same data (stored at the specialists' size, every model resizing from
it as it does at inference):

- **generalist, low resolution**: the run's generalist at ``--input-size``;
- **generalist, high resolution**: the same architecture and schedule at the specialists' size,
  trained from scratch (what a user would otherwise deploy);
- **same-size ensemble**: the confusion groups' specialists at the generalist's size;
- **cascade**: the confusion groups' specialists at ``--specialist-input-size``, combined with a
  confidence threshold chosen on validation so that the ensemble runs at ``--speedup`` (1.5) times
  the high-resolution generalist's images/s or more;
- **random-groups cascade**: the same, on random groups of the same sizes.

Every row: test accuracy, relative error reduction against the low-resolution generalist, and
images/s measured in this run (best of three passes over the same test images, back to back).
Each seed's run directories live under ``--out`` (default ``runs/resolution``); a finished stage
is skipped, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specialists import manifest  # noqa: E402
from specialists.artifacts import generalist_record, load_generalist, load_groups  # noqa: E402
from specialists.calibrate import calibrate_run  # noqa: E402
from specialists.data import DataSource  # noqa: E402
from specialists.ensemble import Ensemble  # noqa: E402
from specialists.evaluate import evaluate_run, images_per_second  # noqa: E402
from specialists.grouping import cluster_run  # noqa: E402
from specialists.models import predict_proba  # noqa: E402
from specialists.run import RunDir  # noqa: E402
from specialists.sources import load_data  # noqa: E402
from specialists.storage import load_json, save_json  # noqa: E402
from specialists.train.controls import random_groups  # noqa: E402
from specialists.train.generalist import GeneralistConfig, train_generalist  # noqa: E402
from specialists.train.pipeline import train_specialists  # noqa: E402
from specialists.train.specialist import SpecialistConfig  # noqa: E402
from specialists.transforms import make_transforms  # noqa: E402

log = logging.getLogger("benchmarks.resolution")

FAMILY = "embedded:n_classes=40,n_groups=8,fine_groups=4,image_size=32"


def _copy_generalist(src: Path, dst: Path, clusters: dict | None = None) -> None:
    """A new run holding ``src``'s generalist and clusters (or ``clusters``)."""
    if (dst / "generalist" / "record.json").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("generalist", "config.yaml", "manifest.json", "clusters.json", "clusters.png"):
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dst / name, dirs_exist_ok=True)
        elif p.is_file():
            shutil.copy2(p, dst / name)
    if clusters is not None:
        save_json(dst / "clusters.json", clusters)
        manifest.register(dst, dst / "clusters.json")


def _speed(run: Path, images: np.ndarray) -> float:
    """Images/s of a run's generalist alone on ``images`` (best of three)."""
    model, rec = load_generalist(run)
    tf = make_transforms(rec)[1]

    def predict(x):
        return predict_proba(model, x, transform=tf, device=torch.device("cpu"))

    return max(images_per_second(predict, images) for _ in range(3))


def _ensemble_row(run: Path, images: np.ndarray) -> tuple[dict, float]:
    m = load_json(RunDir.of(run).metrics)
    ens = Ensemble.load(run)
    speed = ens.best_throughput(images, tries=3)[1]
    return m, speed


def run_seed(args, seed: int) -> dict:
    out = Path(args.out) / f"seed{seed}"
    low, high = out / "low", out / "high"
    same, cascade, rand = out / "same-size", out / "cascade", out / "random-cascade"
    gcfg = dict(
        model=args.model, data=args.data, epochs=args.epochs, patience=args.patience, seed=seed
    )
    if not (low / "generalist" / "record.json").is_file():
        train_generalist(GeneralistConfig(**gcfg, input_size=args.input_size), low, progress=False)
    if not RunDir.of(low).clusters.is_file():
        cluster_run(low)
    if not (high / "generalist" / "record.json").is_file():
        size = args.specialist_input_size
        train_generalist(GeneralistConfig(**gcfg, input_size=size), high, progress=False)

    grec = generalist_record(RunDir.of(low))
    test = load_data(DataSource.from_dict(grec.data), min_size=args.specialist_input_size).test
    timed = test.images[: min(len(test.images), 2048)]
    low_ips, high_ips = _speed(low, timed), _speed(high, timed)
    # the cascade must run at args.speedup x the big generalist: a share of the small one's speed
    ratio = min(1.0, args.speedup * high_ips / low_ips)
    log.info("seed %d: cascades must reach %.2fx the low-resolution generalist", seed, ratio)

    spec = SpecialistConfig(seed=seed, epochs=args.specialist_epochs)
    big = SpecialistConfig(
        seed=seed, epochs=args.specialist_epochs, input_size=args.specialist_input_size
    )
    _copy_generalist(low, same)
    train_specialists(same, spec, workers=args.workers, progress=False)
    _copy_generalist(low, cascade)
    groups = load_groups(RunDir.of(low).clusters, grec.n_classes)
    rgroups = random_groups([len(g) for g in groups], grec.n_classes, seed)
    _copy_generalist(low, rand, clusters={"groups": [{"classes": g} for g in rgroups]})
    rows = {}
    full = {}  # the high-resolution ensembles without the cascade, for the same-size comparison
    for run in (cascade, rand):
        train_specialists(run, big, workers=args.workers, progress=False, calibrate=False)
        if not (run / "metrics-no-cascade.json").is_file():
            calibrate_run(run)
            full[run] = evaluate_run(run)
            full[run]["images_per_second"] = _ensemble_row(run, timed)[1]
            save_json(run / "metrics-no-cascade.json", full[run])
            (run / "metrics.json").unlink()
        full[run] = load_json(run / "metrics-no-cascade.json")
        if not (run / "metrics.json").is_file():
            calibrate_run(run, min_throughput_ratio=round(ratio, 4))
    for run in (same, cascade, rand):
        if not (run / "metrics.json").is_file():
            evaluate_run(run)

    def gen_row(run: Path, ips: float) -> dict:
        m = generalist_record(RunDir.of(run)).metrics
        return {"accuracy": m["test_accuracy"], "images_per_second": ips}

    rows["generalist, low resolution"] = gen_row(low, low_ips)
    rows["generalist, high resolution"] = gen_row(high, high_ips)
    for name, run in (
        ("same-size ensemble", same),
        ("cascade", cascade),
        ("random-groups cascade", rand),
    ):
        m, ips = _ensemble_row(run, timed)
        rows[name] = {
            "accuracy": m["ensemble_accuracy"],
            "images_per_second": ips,
            "combination": m.get("combination", {}),
        }
    for name, run in (
        ("high-resolution specialists, no cascade", cascade),
        ("random groups, high resolution, no cascade", rand),
    ):
        rows[name] = {
            "accuracy": full[run]["ensemble_accuracy"],
            "images_per_second": full[run]["images_per_second"],
            "combination": full[run].get("combination", {}),
        }
    base = 1 - rows["generalist, low resolution"]["accuracy"]
    for r in rows.values():
        if r["accuracy"] is not None:
            r["relative_error_reduction"] = (base - (1 - r["accuracy"])) / base
    result = {"seed": seed, "required_ratio": ratio, "rows": rows}
    save_json(out / "result.json", result)
    return result


def table(results: list[dict]) -> str:
    names = list(results[0]["rows"])
    lines = []
    for res in results:
        hi = res["rows"]["generalist, high resolution"]
        lines += [
            f"\nseed {res['seed']} (cascades calibrated for >= {res['required_ratio']:.2f}x the "
            "low-resolution generalist's images/s)",
            "| | test accuracy | relative error reduction | images/s | vs high-resolution generalist |",
            "|---|---|---|---|---|",
        ]
        for name in names:
            r = res["rows"][name]
            if r["accuracy"] is None:
                continue
            lines.append(
                f"| {name} | {100 * r['accuracy']:.2f}% | {100 * r['relative_error_reduction']:.2f}% "
                f"| {r['images_per_second']:.0f} | {r['images_per_second'] / hi['images_per_second']:.2f}x |"
            )
    if len(results) > 1:
        lines += [
            f"\nmean of {len(results)} seeds",
            "| | test accuracy | relative error reduction | vs high-resolution generalist |",
            "|---|---|---|---|",
        ]
        for name in names:
            rs = [res["rows"][name] for res in results if res["rows"][name]["accuracy"] is not None]
            if not rs:
                continue
            acc = np.mean([r["accuracy"] for r in rs])
            rer = np.mean([r["relative_error_reduction"] for r in rs])
            speed = np.mean(
                [
                    res["rows"][name]["images_per_second"]
                    / res["rows"]["generalist, high resolution"]["images_per_second"]
                    for res in results
                ]
            )
            lines.append(f"| {name} | {100 * acc:.2f}% | {100 * rer:.2f}% | {speed:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=FAMILY)
    p.add_argument("--model", default="test_efficientnet")
    p.add_argument("--input-size", type=int, default=16, help="the generalist's (default 16)")
    p.add_argument("--specialist-input-size", type=int, default=32, help="default 32")
    p.add_argument("--epochs", type=int, default=30, help="generalist epochs (default 30)")
    p.add_argument(
        "--patience",
        type=int,
        default=30,
        help="generalists: early stopping (30: off at 30 epochs)",
    )
    p.add_argument("--specialist-epochs", type=int, default=12)
    p.add_argument("--speedup", type=float, default=1.5, help="over the big generalist (1.5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int)
    p.add_argument("--out", default="runs/resolution")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = [run_seed(args, s) for s in args.seeds]
    print(table(results))
    save_json(Path(args.out) / "results.json", results)


if __name__ == "__main__":
    main()
