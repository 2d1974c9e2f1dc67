"""How much of the ensemble's gain the choice of combination leaves on the table, per run.

    python benchmarks/combination_study.py runs/fashion-mnist/seed0 runs/fashion-mnist/seed1
    python benchmarks/combination_study.py runs/omniglot/seed0 --temperature

For each run (trained specialists; the run's own generalist and splits), every combination of
the calibration grid (gating width, specialist weight, dustbin correction) is scored on the
validation split and on the test split. Printed per run, as relative test-error reductions
against the generalist:

- ``accuracy rule``: the point the framework chooses (best validation accuracy, then NLL, then
  the simplest), i.e. what ``specialists calibrate`` writes;
- ``NLL rule``: the point with the lowest validation NLL instead;
- ``oracle``: the best point on the *test* split itself, a ceiling for any selection rule over
  this grid with these specialists (not a method: it looks at the test labels).

With ``--temperature`` the same three are repeated with each specialist's distribution (after the
gated dustbin correction) sharpened or flattened by a temperature fitted on validation (lowest
NLL of its own labels on the examples the widest gate sends it), to see whether specialists
that are over- or under-confident distort the combination. Slow on many classes: every grid
point runs the EM combiner over both splits (Omniglot: minutes per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specialists.calibrate import (  # noqa: E402
    Collected,
    best_point,
    collect,
    kept_specialists,
    score_grid,
)
from specialists.combination import Combination, specialist_offsets  # noqa: E402
from specialists.data import DataSource  # noqa: E402
from specialists.ensemble import Ensemble  # noqa: E402
from specialists.sources import load_data  # noqa: E402

TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 141))


def specialist_targets(col: Collected, m: int) -> torch.Tensor:
    """Specialist m's own labels (its group's classes in ascending order, then the dustbin) for
    the examples it was run on."""
    rec = col.records[m]
    lut = np.full(col.n_classes, len(rec.classes), dtype=np.int64)
    lut[sorted(rec.classes)] = np.arange(len(rec.classes))
    return torch.from_numpy(lut[col.labels[col.rows[m].numpy()]])


def gated_offset(col: Collected, m: int) -> torch.Tensor:
    return torch.from_numpy(specialist_offsets(col.records[m], "gated"))


def fit_temperature(col: Collected, m: int) -> float:
    """The temperature T (on a log grid from 0.25 to 8) of softmax((logits + gated offset) / T)
    with the lowest validation NLL."""
    if len(col.rows[m]) == 0:
        return 1.0
    corrected, y = col.logits[m] + gated_offset(col, m), specialist_targets(col, m)
    nll = [torch.nn.functional.cross_entropy(corrected / t, y).item() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def scaled(col: Collected, temperatures: list[float]) -> Collected:
    """``col`` with logits that give softmax((logits + gated offset) / T) under the gated
    correction (and the same distribution moved to another prior under the others)."""
    out = copy.copy(col)
    out.logits = [
        (lg + gated_offset(col, m)) / t - gated_offset(col, m)
        for m, (lg, t) in enumerate(zip(col.logits, temperatures, strict=True))
    ]
    return out


def relative(acc: float, generalist: float) -> float:
    return 100.0 * (acc - generalist) / max(1.0 - generalist, 1e-12)


def study(val: Collected, test: Collected) -> dict:
    keep = kept_specialists(val.records)
    keep = None if len(keep) == len(val.records) else keep
    g_val, g_test = score_grid(val, keep), score_grid(test, keep)
    gen = float((test.p_g.argmax(1).numpy() == test.labels).mean())

    def test_of(point: dict) -> tuple[float, str]:
        what = (
            f"top-{point['top_n']} gating, specialist weight {point['spec_weight']:g}, "
            f"dustbin correction {point['correction']}"
        )
        return relative(g_test[g_val.index(point)]["accuracy"], gen), what

    oracle = max(g_test, key=lambda g: g["accuracy"])
    oracle_point = g_val[g_test.index(oracle)]
    return {
        "accuracy rule": test_of(best_point(g_val)),
        "NLL rule": test_of(min(g_val, key=lambda g: g["nll"])),
        "oracle": test_of(oracle_point),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--temperature", action="store_true", help="also temperature-scaled")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.getLogger("specialists.combiner").setLevel(logging.ERROR)

    rows: dict[str, list[float]] = {}
    for run in args.runs:
        ens = Ensemble.load(run, args.device, combination=Combination())
        bundle = load_data(DataSource.from_dict(ens.record.data))
        val, test = (bundle.split(s) for s in ("val", "test"))
        cols = {s: collect(ens, d.images, d.labels) for s, d in (("val", val), ("test", test))}
        variants = {"": (cols["val"], cols["test"])}
        if args.temperature:
            temps = [fit_temperature(cols["val"], m) for m in range(len(cols["val"].records))]
            print(f"{run}: fitted temperatures {', '.join(f'{t:.2f}' for t in temps)}")
            variants["temperature-scaled, "] = tuple(scaled(c, temps) for c in cols.values())
        for prefix, (v, t) in variants.items():
            for rule, (gain, what) in study(v, t).items():
                name = prefix + rule
                rows.setdefault(name, []).append(gain)
                print(f"{run}: {name:40s} {gain:6.2f}%  ({what})", flush=True)
    print("\nrelative test-error reduction, mean over runs:")
    for name, gains in rows.items():
        per_run = " / ".join(f"{g:.2f}" for g in gains)
        print(f"  {name:40s} {np.mean(gains):6.2f}%   ({per_run})")


if __name__ == "__main__":
    main()
