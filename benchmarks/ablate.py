"""Ablations of the specialist recipe on one run's generalist: what makes the ensemble win.

    python benchmarks/ablate.py runs/fashion-mnist/seed0
    python benchmarks/ablate.py runs/omniglot/seed0 --only defaults soft-0.5-T3 head-only

Each training variant copies the run's generalist into ``RUN/../ablations/<variant>/`` and runs
the standard clustering and specialist training with one setting changed (so it resumes and can be
inspected like any run); every variant is combined as calibrated on validation. Combination
variants (gating width, weights, dustbin correction) reuse the default variant's specialists and
are scored offline on the test split. Prints one row per variant: generalist vs ensemble test
accuracy, relative error reduction, conditional accuracies, and the specialists' training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specialists.artifacts import generalist_record  # noqa: E402
from specialists.calibrate import collect, score  # noqa: E402
from specialists.combination import Combination  # noqa: E402
from specialists.data import DataSource  # noqa: E402
from specialists.ensemble import Ensemble  # noqa: E402
from specialists.evaluate import ensemble_metrics  # noqa: E402
from specialists.grouping import ClusterConfig, cluster_run  # noqa: E402
from specialists.run import RunDir  # noqa: E402
from specialists.sources import load_data  # noqa: E402
from specialists.storage import load_json  # noqa: E402
from specialists.train.pipeline import train_specialists  # noqa: E402
from specialists.train.specialist import SpecialistConfig  # noqa: E402

log = logging.getLogger("benchmarks.ablate")

# name -> (cluster overrides, specialist overrides); "G" in n_groups means the default's count.
TRAINING = {
    "defaults": ({}, {}),
    "soft-0.5-T3": ({}, {"soft_weight": 0.5, "temperature": 3.0}),
    "soft-0.2-T1.5": ({}, {"soft_weight": 0.2, "temperature": 1.5}),
    "enrich-0.25": ({}, {"enrich_fraction": 0.25}),
    "enrich-0.75": ({}, {"enrich_fraction": 0.75}),
    "head-only": ({}, {"trainable": "head"}),
    "last-stage": ({}, {"trainable": "last"}),
    "copied-head": ({}, {"head_init": "copy"}),
    "epochs-4": ({}, {"epochs": 4}),
    "epochs-8-early-stop": ({}, {"epochs": 8, "patience": 3}),
    "epochs-16-no-early-stop": ({}, {"epochs": 16, "patience": 16}),
    "groups-half": ({"n_groups": "G/2"}, {}),
    "groups-double": ({"n_groups": "2G"}, {}),
    "overlapping": ({"mode": "overlapping"}, {}),
    "overlapping-epochs-8-early-stop": ({"mode": "overlapping"}, {"epochs": 8, "patience": 3}),
    "confusion-matrix": ({"matrix": "confusion"}, {}),
}
# name -> combination of the default variant's specialists (scored without calibration)
COMBINATION = {
    "paper: top-1, w=1, natural prior": Combination(1, 1.0, "natural"),
    "top-1, w=1, gated prior": Combination(1, 1.0, "gated"),
    "top-1, w=1, no correction": Combination(1, 1.0, "none"),
    "top-2, w=1, gated prior": Combination(2, 1.0, "gated"),
    "top-3, w=1, gated prior": Combination(3, 1.0, "gated"),
}


def make_variant(run: RunDir, root: Path, name: str) -> RunDir:
    """A run directory holding a copy of ``run``'s generalist (and its data cache); the
    ``defaults`` variant also takes the run's own clusters and specialists when they are there
    (training then skips them)."""
    dst = root / name
    items = ["generalist", "cache", "config.yaml", "manifest.json"]
    if name == "defaults":
        items += [
            "clusters.json",
            "clusters.png",
            "specialists",
            "specialists.yaml",
            "ensemble.json",
        ]
    if not RunDir.of(dst).generalist_record.is_file():
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in items:
            src = run.root / item
            if src.is_dir():
                shutil.copytree(src, tmp / item, ignore=shutil.ignore_patterns("resume"))
            elif src.is_file():
                shutil.copy2(src, tmp / item)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return RunDir.of(dst)


def row(name: str, p_g: np.ndarray, q: np.ndarray, labels, groups, seconds, extra="") -> dict:
    m = ensemble_metrics(p_g, q, labels, groups)
    return {
        "variant": name,
        "generalist": m["generalist_accuracy"],
        "ensemble": m["ensemble_accuracy"],
        "rer": m["relative_error_reduction"],
        "cond_generalist": m["generalist_conditional_accuracy"],
        "cond_ensemble": m["ensemble_conditional_accuracy"],
        "groups": len(groups),
        "seconds": seconds,
        "note": extra,
    }


def fmt(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    head = (
        f"{'variant':36s} {'generalist':>10s} {'ensemble':>9s} {'rel.err.red.':>12s} "
        f"{'cond.gen.':>9s} {'cond.ens.':>9s} {'groups':>6s} {'spec. time':>10s}  combination"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['variant']:36s} {pct(r['generalist']):>10s} {pct(r['ensemble']):>9s} "
            f"{pct(r['rer']):>12s} {pct(r['cond_generalist']):>9s} {pct(r['cond_ensemble']):>9s} "
            f"{r['groups']:>6d} {r['seconds']:>9.0f}s  {r['note']}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="a run with a trained generalist")
    p.add_argument("--only", nargs="+", help=f"training variants to run (of {', '.join(TRAINING)})")
    p.add_argument("--workers", type=int)
    p.add_argument("--out", type=Path, help="default RUN/../ablations")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    run = RunDir.of(args.run)
    run.require_generalist()
    root = args.out or run.root.parent / "ablations"
    grec = generalist_record(run)
    bundle = load_data(DataSource.from_dict(grec.data))
    test = bundle.test
    names = args.only or list(TRAINING)
    base_groups = None
    rows = []
    for name in names:
        if name not in TRAINING:
            p.error(f"unknown variant {name!r}")
        ccfg, scfg = TRAINING[name]
        var = make_variant(run, root, name)
        t = time.perf_counter()
        if not var.clusters.is_file():
            if "n_groups" in ccfg:
                if base_groups is None:
                    base_groups = len(
                        load_json(make_variant(run, root, "defaults").clusters)["groups"]
                    )
                g = base_groups
                ccfg = {**ccfg, "n_groups": max(2, g // 2 if ccfg["n_groups"] == "G/2" else 2 * g)}
            cluster_run(var.root, ClusterConfig(**ccfg, seed=grec.data["seed"]))
        train_specialists(
            var.root,
            SpecialistConfig(**scfg, seed=grec.data["seed"]),
            workers=args.workers,
            progress=False,
        )
        ens = Ensemble.load(var.root)
        col = collect(ens, test.images, test.labels)
        specs = [load_json(f) for f in sorted(var.specialists_dir.glob("[0-9][0-9][0-9].json"))]
        seconds = sum(s["metrics"]["seconds"] for s in specs)
        groups = [s.classes for s in ens.all_specialists]
        p_g = col.p_g.numpy()
        q = score(col, ens.combination)["q"].numpy()
        rows.append(row(name, p_g, q, test.labels, groups, seconds, ens.combination.describe()))
        log.info("%s done in %.0f s", name, time.perf_counter() - t)
        if name == "defaults":
            for label, comb in COMBINATION.items():
                q = score(col, comb)["q"].numpy()
                rows.append(
                    row(f"  {label}", p_g, q, test.labels, groups, seconds, "all specialists")
                )
            nodrop = Combination(**{**ens.combination.to_dict(), "keep": None})
            q = score(col, nodrop)["q"].numpy()
            rows.append(
                row(
                    "  calibrated, none dropped",
                    p_g,
                    q,
                    test.labels,
                    groups,
                    seconds,
                    nodrop.describe(),
                )
            )
        print(fmt(rows), flush=True)
        (root / "ablation.json").write_text(json.dumps(rows, indent=1))  # after every variant
    print(f"\n{run.root}: {grec.data.get('kind')} ablations (test split)\n")
    print(fmt(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
