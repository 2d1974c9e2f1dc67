"""How the ensemble combines, chosen on validation data instead of assumed.

Four choices decide whether specialists help or hurt, and none has a value that is right for
every dataset (docs/design.md, "Calibration"):

- ``top_n``: how many of the generalist's top classes activate specialists (the paper: 1);
- ``spec_weight``: the weight w of every specialist's KL term against the generalist's 1, so a
  strong specialist can dominate inside its group (the weighted form of eq. 5);
- ``correction``: the dustbin prior each specialist is moved to (``gated``: the share of its group
  among the inputs that activate it; ``natural``: the share in the data; ``none``);
- ``keep``: the specialists kept: a specialist clearly less accurate inside its group than the
  generalist on validation (beyond the noise of the measurement) is dropped; one within noise is
  kept, since a second opinion helps even when it is not better alone.

Last, the chosen combination must beat the generalist on validation beyond noise: McNemar's
paired test over the examples that one gets right and the other wrong, z = (wins - losses) /
sqrt(wins + losses) >= ``MIN_GAIN_Z``. Otherwise the ensemble keeps no specialist and answers
with the generalist alone, since a gain within noise on validation may as well be a loss on test.

``calibrate_run`` runs the generalist and every specialist once over the validation split (each
specialist only on the inputs that the widest gate would send it), scores the whole grid offline
with the EM combiner, and writes the winner to ``ensemble.json``, which ``Ensemble.load`` then
uses. The same machinery (``collect`` and ``score``) serves the ablation benchmarks.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import manifest
from .combination import CORRECTIONS, Combination, specialist_offsets
from .combiner import combine
from .data import DataSource
from .ensemble import Ensemble
from .errors import SpecialistsError
from .gating import GroupIndex, gate
from .records import SpecialistRecord
from .run import RunDir
from .sources import load_data
from .storage import save_json

__all__ = [
    "MIN_GAIN_Z",
    "Collected",
    "best_point",
    "calibrate_run",
    "choose",
    "collect",
    "kept_specialists",
    "paired_gain",
    "score",
    "score_grid",
]

log = logging.getLogger(__name__)

GRID_TOP_N = (1, 2, 3)
GRID_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0)
MIN_GAIN_Z = 2.0  # the ensemble must beat the generalist on validation by 2 standard errors
SCORE_TOL = 1e-7  # EM tolerance when scoring (argmax and NLL are settled long before 1e-9)
# Each example stops on its own, so a high cap costs only the rare slow rows that need it (high
# specialist weights can need hundreds of accelerated steps).
SCORE_MAX_ITER = 1000


# --------------------------------------------------------------------------------------------
# Offline scoring: every model runs once, every combination is scored from the stored outputs


@dataclass
class Collected:
    """Outputs of a generalist and its specialists on one labelled split.

    ``rows[m]`` are the examples that the widest gate (``top_n_max``) sends to specialist m
    (ascending) and ``logits[m]`` its raw logits on them (no dustbin correction)."""

    p_g: torch.Tensor  # (N, K) float64
    labels: np.ndarray  # (N,)
    records: list[SpecialistRecord]
    n_classes: int
    top_n_max: int
    rows: list[torch.Tensor]
    logits: list[torch.Tensor]


@torch.no_grad()
def collect(
    ensemble: Ensemble, images: np.ndarray, labels: np.ndarray, top_n_max: int = 3
) -> Collected:
    """Run ``ensemble``'s generalist and every specialist over ``images`` once."""
    top_n_max = min(top_n_max, ensemble.record.n_classes)
    records = ensemble.all_specialists
    groups = GroupIndex.from_lists([s.classes for s in records], ensemble.record.n_classes)
    x_all = ensemble.check_images(images)
    p_g = torch.from_numpy(ensemble.generalist_proba(x_all)).double()
    pairs = gate(p_g, groups, top_n_max)
    rows = pairs.per_specialist(len(records))
    logits = []
    for m, r in enumerate(rows):
        model = ensemble.load_specialist(records[m])
        out = []
        for start in range(0, len(r), ensemble.batch_size):
            idx = r[start : start + ensemble.batch_size]
            x = ensemble.transform_for(records[m])(x_all[idx].to(ensemble.device))
            out.append(model(x).double().cpu())
        width = len(records[m].classes) + 1
        logits.append(torch.cat(out) if out else torch.zeros(0, width, dtype=torch.float64))
    return Collected(
        p_g, np.asarray(labels), records, ensemble.record.n_classes, top_n_max, rows, logits
    )


def score(col: Collected, comb: Combination) -> dict:
    """Accuracy and mean negative log-likelihood of the ensemble combined as ``comb``."""
    if comb.top_n > col.top_n_max:
        raise ValueError(f"top_n {comb.top_n} > the collected top_n_max {col.top_n_max}")
    keep = (
        list(range(len(col.records)))
        if comb.keep is None
        else [i for i, r in enumerate(col.records) if r.id in set(comb.keep)]
    )
    labels = torch.from_numpy(col.labels)
    if keep:
        groups = GroupIndex.from_lists([col.records[i].classes for i in keep], col.n_classes)
        pairs = gate(col.p_g, groups, comb.top_n)
        blocks = []
        for j, r in enumerate(pairs.per_specialist(len(keep))):
            if len(r) == 0:
                continue
            m = keep[j]
            pos = torch.searchsorted(col.rows[m], r)
            off = torch.from_numpy(specialist_offsets(col.records[m], comb.correction))
            blocks.append(torch.softmax(col.logits[m][pos] + off, 1))
        q = (
            combine(
                col.p_g,
                blocks,
                pairs,
                groups,
                spec_weights=[comb.spec_weight] * len(keep),
                tol=SCORE_TOL,
                max_iter=SCORE_MAX_ITER,
            )
            if blocks
            else col.p_g
        )
        n_active = pairs.n_pairs
    else:
        q, n_active = col.p_g, 0
    correct = q.argmax(1) == labels
    nll = -torch.log(q[torch.arange(len(labels)), labels].clamp_min(1e-12)).mean()
    return {
        "accuracy": float(correct.double().mean()),
        "nll": float(nll),
        "mean_consulted": n_active / max(len(labels), 1),
        "q": q,
    }


def kept_specialists(records: list[SpecialistRecord], z: float = 2.0) -> list[int]:
    """Ids of the specialists kept: all but those clearly less accurate inside their group than
    the generalist on the group's validation examples, i.e. by more than ``z`` binomial standard
    errors (a specialist within noise of the generalist still helps as a second opinion).
    Records without the measurement are kept."""
    keep = []
    for r in records:
        mine, theirs = r.metrics.get("in_group_acc"), r.metrics.get("generalist_in_group_acc")
        n = r.metrics.get("n_group_val") or 0
        if mine is None or theirs is None or n == 0:
            keep.append(r.id)
            continue
        se = math.sqrt(max(theirs * (1 - theirs), 1.0 / n) / n)
        if mine >= theirs - z * se:
            keep.append(r.id)
    return keep


def score_grid(col: Collected, keep: list[int] | None, *, progress: bool = False) -> list[dict]:
    """Accuracy and NLL of every combination of the grid (gating widths up to the collected
    ``top_n_max``, weights, corrections) with the specialists ``keep`` (None: all)."""
    from tqdm.auto import tqdm

    points = list(
        itertools.product([n for n in GRID_TOP_N if n <= col.top_n_max], GRID_WEIGHTS, CORRECTIONS)
    )
    grid = []
    for top_n, w, corr in tqdm(points, desc="calibrating", unit="setting", disable=not progress):
        s = score(col, Combination(top_n=top_n, spec_weight=w, correction=corr, keep=keep))
        grid.append(
            {
                "top_n": top_n,
                "spec_weight": w,
                "correction": corr,
                "keep": keep,
                "accuracy": round(s["accuracy"], 6),
                "nll": round(s["nll"], 6),
            }
        )
    return grid


def best_point(grid: list[dict]) -> dict:
    """The selection rule: the best accuracy, then the lowest NLL (to 3 decimals), then the
    simplest point (fewer consulted specialists, weight nearest 1, correction in CORRECTIONS'
    order)."""
    return min(
        grid,
        key=lambda g: (
            -g["accuracy"],
            round(g["nll"], 3),
            g["top_n"],
            abs(np.log(g["spec_weight"])),
            CORRECTIONS.index(g["correction"]),
        ),
    )


def choose(
    col: Collected, keep: list[int] | None = None, *, progress: bool = False
) -> tuple[Combination, list[dict]]:
    """The combination ``best_point`` picks from the grid of gating widths, weights and
    corrections scored on ``col``, with the specialists ``keep`` (None: all); every scored point
    is returned too."""
    em_log = logging.getLogger("specialists.combiner")
    level = em_log.level
    em_log.setLevel(logging.ERROR)  # a few slow EM rows at extreme weights are not news here
    try:
        grid = score_grid(col, keep, progress=progress)
    finally:
        em_log.setLevel(level)
    best = best_point(grid)
    comb = Combination(
        top_n=best["top_n"],
        spec_weight=best["spec_weight"],
        correction=best["correction"],
        keep=best["keep"],
        chosen_on={"accuracy": best["accuracy"], "grid": grid},
    )
    return comb, grid


def paired_gain(col: Collected, q: torch.Tensor) -> dict:
    """McNemar's comparison of the combined ``q`` with the generalist on ``col``'s examples:
    ``wins`` (only the ensemble right), ``losses`` (only the generalist right) and
    z = (wins - losses) / sqrt(wins + losses) (0 when they never disagree)."""
    truth = torch.from_numpy(col.labels)
    ens_ok, gen_ok = q.argmax(1) == truth, col.p_g.argmax(1) == truth
    wins, losses = int((ens_ok & ~gen_ok).sum()), int((gen_ok & ~ens_ok).sum())
    z = (wins - losses) / math.sqrt(wins + losses) if wins + losses else 0.0
    return {"wins": wins, "losses": losses, "z": round(z, 4)}


def calibrate_run(
    run_dir: str | Path,
    device: str = "auto",
    *,
    variant: str | None = None,
    say=log.info,
    progress: bool = False,
    min_gain_z: float = MIN_GAIN_Z,
) -> Combination:
    """Choose the run's combination on its validation split and write ``ensemble.json``
    (``progress``: a bar over the grid's settings). A combination that does not beat the
    generalist by ``min_gain_z`` (McNemar's z, see ``paired_gain``) keeps no specialist."""
    run = RunDir.of(run_dir)
    ens = Ensemble.load(run.root, device, variant=variant, combination=Combination())
    bundle = load_data(DataSource.from_dict(ens.record.data), min_size=ens.input_size)
    val = bundle.split("val")
    if len(val) == 0:
        raise SpecialistsError(f"{run.root}: no validation examples to calibrate on")
    col = collect(ens, val.images, val.labels)
    keep = kept_specialists(col.records)
    comb, grid = choose(col, None if len(keep) == len(col.records) else keep, progress=progress)
    generalist_acc = float((col.p_g.argmax(1).numpy() == col.labels).mean())
    plain = score(col, Combination(correction=None))
    gain = paired_gain(col, score(col, comb)["q"]) if comb.keep != [] else None
    comb.chosen_on = {
        "split": "val",
        "n_examples": int(len(val)),
        "generalist_accuracy": round(generalist_acc, 6),
        "default_accuracy": round(plain["accuracy"], 6),  # top-1, weight 1, all specialists
        "dropped": [r.id for r in col.records if comb.keep is not None and r.id not in comb.keep],
        "gain": gain,
        "min_gain_z": min_gain_z if math.isfinite(min_gain_z) else str(min_gain_z),  # JSON
        **comb.chosen_on,  # the chosen point's accuracy and the whole grid
    }
    if gain is not None and gain["z"] < min_gain_z:
        comb.chosen_on["best_accuracy"] = comb.chosen_on["accuracy"]
        comb.chosen_on["accuracy"] = round(generalist_acc, 6)
        comb.chosen_on["dropped"] = [r.id for r in col.records]
        say(
            f"the best combination ({comb.describe()}, validation accuracy "
            f"{100 * comb.chosen_on['best_accuracy']:.2f}%) beats the generalist on "
            f"{gain['wins']} validation images and loses on {gain['losses']}: z = {gain['z']:.2f} "
            f"< {min_gain_z:g}, within noise; the ensemble answers with the generalist alone"
        )
        comb.keep = []
    path = run.ensemble(variant).combination
    save_json(path, comb.to_dict())
    manifest.register(run.root, path)
    say(
        f"combination chosen on {len(val)} validation images: {comb.describe()} "
        f"(validation accuracy {100 * comb.chosen_on['accuracy']:.2f}%, generalist "
        f"{100 * generalist_acc:.2f}%, top-1 unweighted {100 * plain['accuracy']:.2f}%)"
    )
    return comb
