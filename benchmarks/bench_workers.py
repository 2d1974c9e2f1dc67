"""Wall time of training 4 specialists with 1 worker vs 2 workers, same total threads.

    python benchmarks/bench_workers.py [--cores 2] [--model test_efficientnet]

One worker gets every core; N workers get cores // N threads each. Prints both times and the
speed-up measured in this one run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from specialists.run import RunDir
from specialists.storage import save_json
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig

DATA = "embedded:n_classes=40,n_groups=8,train_per_class=150,val_per_class=30,test_per_class=30"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="test_efficientnet")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        train_generalist(
            GeneralistConfig(model=args.model, data=DATA, epochs=2), base, progress=False
        )
        groups = [list(range(5 * g, 5 * g + 5)) for g in range(4)]
        save_json(RunDir.of(base).clusters, {"groups": [{"classes": g} for g in groups]})
        cfg = SpecialistConfig(epochs=args.epochs, patience=args.epochs)
        times = {}
        for workers in (1, args.workers):
            run = Path(tmp) / f"w{workers}"
            shutil.copytree(base, run)
            start = time.perf_counter()
            results = train_specialists(run, cfg, workers=workers, progress=False)
            times[workers] = time.perf_counter() - start
            assert all(r.ok for r in results), [r.error for r in results]
            print(f"{len(results)} specialists, {workers} worker(s): {times[workers]:.1f} s")
        print(f"speed-up of {args.workers} workers over 1: {times[1] / times[args.workers]:.2f}x")


if __name__ == "__main__":
    main()
