"""The whole pipeline on a real dataset, for several seeds, with the metrics table at the end.

    python benchmarks/real_data.py configs/fashion-mnist.yaml --seeds 0 1 2
    python benchmarks/real_data.py configs/omniglot.yaml --seeds 0 1 2 --controls
    python benchmarks/real_data.py configs/omniglot.yaml --seeds 0 1 2 --distill

The config names the data source and the settings of each stage (``generalist``, ``cluster``,
``specialists``, ``distill``); every stage left out uses the framework's defaults. ``--distill``
adds the ensemble's student and the self-distilled generalist, and a second table. Each seed gets its own run
directory under ``--out`` (default ``runs/<config name>``); a stage whose output is already
complete is skipped, so an interrupted benchmark resumes where it stopped. The config is an
experiment file, as ``specialists run`` reads (its data paths relative to the repository root,
where this runs); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specialists.artifacts import generalist_record  # noqa: E402
from specialists.config import SECTIONS, load_config_file  # noqa: E402
from specialists.errors import SpecialistsError  # noqa: E402
from specialists.evaluate import evaluate_run  # noqa: E402
from specialists.grouping import ClusterConfig, cluster_run  # noqa: E402
from specialists.run import RunDir  # noqa: E402
from specialists.storage import load_json  # noqa: E402
from specialists.train.distill import DistillConfig, run_distill  # noqa: E402
from specialists.train.generalist import GeneralistConfig, train_generalist  # noqa: E402
from specialists.train.pipeline import train_specialists  # noqa: E402
from specialists.train.specialist import SpecialistConfig  # noqa: E402

log = logging.getLogger("benchmarks.real_data")


def load_experiment(path: Path) -> dict:
    """The sections of an experiment file (the format of ``specialists run``), as mappings."""
    cfg = {s: load_config_file(path, s) for s in SECTIONS}
    if "data" not in cfg["generalist"]:
        raise SpecialistsError(f"{path}: no data source (a top-level `data:` key)")
    return cfg


def run_seed(cfg: dict, seed: int, out: Path, workers: int | None) -> dict:
    """generalist -> clusters -> specialists (+ calibration) -> test metrics, for one seed."""
    run = RunDir.of(out)
    stages = {}
    t = time.perf_counter()
    if not run.generalist_record.is_file():
        gcfg = GeneralistConfig(
            **{
                **cfg.get("generalist", {}),
                "seed": seed,
            }
        )
        train_generalist(gcfg, run.root, progress=False)
    stages["generalist_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if not run.clusters.is_file():
        cluster_run(run.root, ClusterConfig(**{**cfg.get("cluster", {}), "seed": seed}))
    stages["cluster_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    scfg = SpecialistConfig(**{**cfg.get("specialists", {}), "seed": seed})
    results = train_specialists(run.root, scfg, workers=workers, progress=False)
    failed = [r for r in results if not r.ok]
    if failed:
        raise SpecialistsError(f"{out}: specialist {failed[0].job.id} failed: {failed[0].error}")
    stages["specialists_s"] = round(time.perf_counter() - t, 1)
    m = evaluate_run(run.root)
    grec = generalist_record(run)
    specs = [load_json(p) for p in sorted(run.specialists_dir.glob("[0-9][0-9][0-9].json"))]
    m["seed"] = seed
    m["stages"] = stages
    m["generalist_best_epoch"] = grec.metrics["best_epoch"]
    m["generalist_epochs_run"] = grec.metrics["epochs_run"]
    m["generalist_train_seconds"] = grec.metrics["train_seconds"]
    m["specialist_train_seconds"] = round(sum(s["metrics"]["seconds"] for s in specs), 1)
    m["group_sizes"] = [len(s["classes"]) for s in specs]
    return m


def distill_seed(cfg: dict, seed: int, out: Path, workers: int | None) -> dict:
    """The ensemble's student and the self-distilled control, then the evaluation with their rows."""
    t = time.perf_counter()
    dcfg = DistillConfig(**{**cfg.get("distill", {}), "seed": seed})
    results = run_distill(out, dcfg, controls=True, workers=workers, progress=False)
    failed = [r for r in results if not r.ok]
    if failed:
        raise SpecialistsError(f"{out}: student {failed[0].job.out} failed: {failed[0].error}")
    m = evaluate_run(out)
    m["distill_s"] = round(time.perf_counter() - t, 1)
    m["student_train_seconds"] = {r.job.out: r.record.metrics["seconds"] for r in results}
    return m


def student_table(rows: list[dict]) -> str:
    """Generalist, ensemble, its student and the self-distilled control, per seed."""
    head = (
        f"{'seed':>6s} {'generalist':>11s} {'ensemble':>9s} {'red.':>7s} {'student':>9s} "
        f"{'red.':>7s} {'kept':>6s} {'self-dist.':>11s} {'red.':>7s} {'speed':>6s} {'distill time':>13s}"
    )
    lines = [head, "-" * len(head)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    for m in rows:
        by = {s["name"]: s for s in m.get("students", [])}
        st = by.get("student (distilled ensemble)", {})
        sd = by.get("self-distilled generalist", {})
        red, s_red = m["relative_error_reduction"], st.get("relative_error_reduction")
        kept = f"{s_red / red:.0%}" if red and s_red is not None else "-"
        lines.append(
            f"{m['seed']:>6d} {pct(m['generalist_accuracy']):>11s} {pct(m['ensemble_accuracy']):>9s} "
            f"{pct(red):>7s} {pct(st.get('accuracy')):>9s} {pct(s_red):>7s} {kept:>6s} "
            f"{pct(sd.get('accuracy')):>11s} {pct(sd.get('relative_error_reduction')):>7s} "
            f"{st.get('throughput_ratio', 0):>5.2f}x {m.get('distill_s', 0):>12.0f}s"
        )
    if len(rows) > 1:

        def mean(name: str, key: str) -> float | None:
            values = [s[key] for m in rows for s in m.get("students", []) if s["name"] == name]
            return float(np.mean(values)) if len(values) == len(rows) else None

        red = float(np.mean([m["relative_error_reduction"] for m in rows]))
        s_red = mean("student (distilled ensemble)", "relative_error_reduction")
        kept = f"{s_red / red:.0%}" if red and s_red is not None else "-"
        lines.append("-" * len(head))
        lines.append(
            f"{'mean':>6s} {pct(np.mean([m['generalist_accuracy'] for m in rows])):>11s} "
            f"{pct(np.mean([m['ensemble_accuracy'] for m in rows])):>9s} {pct(red):>7s} "
            f"{pct(mean('student (distilled ensemble)', 'accuracy')):>9s} {pct(s_red):>7s} "
            f"{kept:>6s} {pct(mean('self-distilled generalist', 'accuracy')):>11s} "
            f"{pct(mean('self-distilled generalist', 'relative_error_reduction')):>7s}"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        f"{'seed':>6s} {'generalist':>11s} {'ensemble':>9s} {'rel. err. red.':>15s} "
        f"{'cond. gen.':>11s} {'cond. ens.':>11s} {'groups':>7s} {'combination':>28s} "
        f"{'gen. time':>10s} {'spec. time':>11s}"
    )
    lines = [head, "-" * len(head)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    for m in rows:
        c = m.get("combination", {})
        comb = f"top-{m['top_n']} w={c.get('spec_weight', 1):g} {c.get('correction') or 'trained'}"
        if c.get("keep") == []:
            p = (c.get("validation_gain") or {}).get("p_value")
            comb = "generalist alone" + (f" (p={p:.2g})" if p is not None else "")
        kept = len(c["keep"]) if c.get("keep") is not None else m["n_specialists"]
        groups = f"{kept}/{len(m['group_sizes'])}"
        lines.append(
            f"{m['seed']:>6d} {pct(m['generalist_accuracy']):>11s} {pct(m['ensemble_accuracy']):>9s} "
            f"{pct(m['relative_error_reduction']):>15s} "
            f"{pct(m['generalist_conditional_accuracy']):>11s} {pct(m['ensemble_conditional_accuracy']):>11s} "
            f"{groups:>7s} {comb:>28s} "
            f"{m['generalist_train_seconds']:>9.0f}s {m['specialist_train_seconds']:>10.0f}s"
        )
    if len(rows) > 1:
        g = np.mean([m["generalist_accuracy"] for m in rows])
        e = np.mean([m["ensemble_accuracy"] for m in rows])
        r = np.mean([m["relative_error_reduction"] for m in rows])
        lines.append("-" * len(head))
        lines.append(f"{'mean':>6s} {pct(g):>11s} {pct(e):>9s} {pct(r):>15s}")
        worse = [m["seed"] for m in rows if m["ensemble_accuracy"] < m["generalist_accuracy"]]
        lines.append(f"seeds where the ensemble is worse than its generalist: {worse or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, help="default runs/<config name>")
    p.add_argument("--workers", type=int, help="parallel specialist workers (default: automatic)")
    p.add_argument("--controls", action="store_true", help="also train and score the controls")
    p.add_argument(
        "--distill",
        action="store_true",
        help="also distil the ensemble and the generalist alone (the control) into students",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        cfg = load_experiment(args.config)
        out = args.out or ROOT / "runs" / args.config.stem
        rows = []
        for seed in args.seeds:
            log.info("=== %s, seed %d ===", args.config.stem, seed)
            m = run_seed(cfg, seed, out / f"seed{seed}", args.workers)
            if args.controls:
                from specialists.train.controls import evaluate_controls, run_controls

                run_controls(out / f"seed{seed}", workers=args.workers, seed=seed, progress=False)
                m.update(evaluate_controls(out / f"seed{seed}"))
            if args.distill:
                distilled = distill_seed(cfg, seed, out / f"seed{seed}", args.workers)
                m.update(
                    {k: distilled[k] for k in ("students", "distill_s", "student_train_seconds")}
                )
            rows.append(m)
            log.info("\n%s", table(rows))
            if args.distill:
                log.info("\n%s", student_table(rows))
        summary = out / "summary.json"
        summary.write_text(json.dumps(rows, indent=1, default=str))
        print(f"\n{args.config.stem}: {len(rows)} seed(s); runs in {out}\n")
        print(table(rows))
        if args.distill:
            print()
            print(student_table(rows))
    except SpecialistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
