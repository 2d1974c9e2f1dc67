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

**Choose on one half, confirm on the other.** The validation split is cut in two halves
(stratified by class, seeded). The grid is scored on the *selection* half only and its best
point chosen there; the choice is then tested once on the *confirmation* half, which the choice
never looked at: over the confirmation images that exactly one of the ensemble and the
generalist gets right, the ensemble must win more often than a fair coin would, by an exact
one-sided binomial test (scipy's ``binomtest``) at level ``alpha`` (default 0.05). Otherwise
the ensemble keeps no specialist and answers with the generalist alone.

What the rule guarantees: when the combination is no better than the generalist on images
like the validation images (it wins at most half of their disagreements), the probability of
keeping it is at most ``alpha``; choosing the best of the grid cannot inflate that, because the
choice and the test use disjoint images. Choosing and testing on the same images (as a single
McNemar test after a best-of-45 search does) overstates the gain. What it does not cover: the
specialists' own best epoch and the in-group rule above use all of validation, and validation
images that are near-copies of training images (see :mod:`specialists.data`) make any test on
them optimistic.

``calibrate_run`` runs the generalist and every specialist once over the validation split (each
specialist only on the inputs that the widest gate would send it), scores the whole grid offline
with the EM combiner, and writes the winner to ``ensemble.json``, which ``Ensemble.load`` then
uses. The same machinery (``collect`` and ``score``) serves the ablation benchmarks.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import manifest
from .combination import CORRECTIONS, Combination, specialist_offsets
from .combiner import combine
from .data import ArraySplit, DataSource
from .datasets import load_run_data
from .ensemble import Ensemble
from .errors import SpecialistsError
from .gating import GroupIndex, gate
from .lock import writes_run
from .records import SpecialistRecord
from .run import RunDir
from .storage import save_json

__all__ = [
    "ALPHA",
    "Collected",
    "best_point",
    "calibrate_run",
    "cascade_scan",
    "cascade_thresholds",
    "choose",
    "collect",
    "kept_specialists",
    "paired_gain",
    "pick_cascade",
    "score",
    "score_grid",
    "select_and_confirm",
    "split_halves",
    "subset",
]

log = logging.getLogger(__name__)

GRID_TOP_N = (1, 2, 3)
GRID_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0)
ALPHA = 0.05  # level of the confirmation test: the ensemble beats the generalist on held-out halves
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
            with ensemble._autocast():  # as inference runs it (bf16 on CUDA by default)
                out.append(model(x).double().cpu())
        width = len(records[m].classes) + 1
        logits.append(torch.cat(out) if out else torch.zeros(0, width, dtype=torch.float64))
    return Collected(
        p_g, np.asarray(labels), records, ensemble.record.n_classes, top_n_max, rows, logits
    )


def subset(col: Collected, index: np.ndarray) -> Collected:
    """``col`` restricted to the examples ``index`` (ascending), renumbered from 0."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    rows, logits = [], []
    for r, lg in zip(col.rows, col.logits):
        if len(index) == 0:
            rows.append(r[:0])
            logits.append(lg[:0])
            continue
        pos = torch.searchsorted(index, r)
        hit = (pos < len(index)) & (index[pos.clamp_max(len(index) - 1)] == r)
        rows.append(pos[hit])
        logits.append(lg[hit])
    return Collected(
        col.p_g[index],
        col.labels[index.numpy()],
        col.records,
        col.n_classes,
        col.top_n_max,
        rows,
        logits,
    )


def split_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, confirmation) indices: every class cut in two, seeded (an odd example goes to
    either half by a coin flip); the classes with a single example are pooled and the pool cut
    in two, so no half is empty when there are two examples or more."""
    rng = np.random.default_rng([seed, 5150])
    select, confirm, singles = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 1:
            singles.append(idx)
            continue
        idx = idx[rng.permutation(len(idx))]
        half = (len(idx) + rng.integers(0, 2)) // 2
        select.append(idx[:half])
        confirm.append(idx[half:])
    if singles:
        pool = np.concatenate(singles)
        pool = pool[rng.permutation(len(pool))]
        half = (len(pool) + rng.integers(0, 2)) // 2
        select.append(pool[:half])
        confirm.append(pool[half:])
    empty = np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(select or [empty])), np.sort(np.concatenate(confirm or [empty]))


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
        pairs = gate(col.p_g, groups, comb.top_n, comb.confidence)
        blocks = []
        per_rows = pairs.per_specialist(len(keep))
        counts = {col.records[keep[j]].id: len(r) for j, r in enumerate(per_rows)}
        for j, r in enumerate(per_rows):
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
        q, n_active, counts = col.p_g, 0, {}
    correct = q.argmax(1) == labels
    nll = -torch.log(q[torch.arange(len(labels)), labels].clamp_min(1e-12)).mean()
    return {
        "accuracy": float(correct.double().mean()),
        "nll": float(nll),
        "mean_consulted": n_active / max(len(labels), 1),
        "consulted": counts,  # examples each kept specialist ran on, by id
        "q": q,
    }


# --------------------------------------------------------------------------------------------
# The cascade: confident inputs skip the specialists

CASCADE_SHARES = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def cascade_thresholds(p_g: torch.Tensor) -> list[float | None]:
    """None (no cascade), the generalist confidences below which the ``CASCADE_SHARES`` of the
    examples fall (highest first), and 0 (the generalist alone)."""
    top = p_g.max(1).values.float()
    levels = torch.quantile(top, torch.tensor(CASCADE_SHARES)).tolist() if len(top) else []
    return [None, *sorted({round(v, 6) for v in levels}, reverse=True), 0.0]


def cascade_scan(
    col: Collected,
    comb: Combination,
    speed: Callable[[Combination], float],
    thresholds: list[float | None] | None = None,
) -> list[dict]:
    """``comb`` at each confidence threshold: accuracy on ``col``, specialists consulted per
    example, and ``speed(combination)``, its measured throughput over the generalist's. Default
    thresholds: ``cascade_thresholds`` of ``col``."""
    if thresholds is None:
        thresholds = cascade_thresholds(col.p_g)
    rows = []
    for t in thresholds:
        c = replace(comb, confidence=t)
        s = score(col, c)
        rows.append(
            {
                "threshold": t,
                "accuracy": round(s["accuracy"], 6),
                "mean_consulted": round(s["mean_consulted"], 6),  # specialists per example
                "throughput_ratio": round(float(speed(c)), 4),
            }
        )
    return rows


def pick_cascade(scan: list[dict], min_ratio: float) -> dict:
    """The row of ``scan`` with the best accuracy among those at ``min_ratio`` of the
    generalist's throughput or more (ties: the faster); the last row (the generalist alone, in
    ``cascade_scan``'s order) when none is fast enough."""
    ok = [r for r in scan if r["throughput_ratio"] >= min_ratio] or [scan[-1]]
    return max(ok, key=lambda r: (r["accuracy"], r["throughput_ratio"]))


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
    for top_n, w, corr in tqdm(
        points, desc="calibrating", unit="setting", disable=None if progress else True
    ):
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
    """The combined ``q`` against the generalist on ``col``'s examples: ``wins`` (only the
    ensemble right), ``losses`` (only the generalist right), McNemar's
    z = (wins - losses) / sqrt(wins + losses) (0 when they never disagree), and ``p_value``,
    the exact one-sided binomial test of "the ensemble wins at most half of the disagreements"
    (1 when they never disagree)."""
    from scipy.stats import binomtest

    truth = torch.from_numpy(col.labels)
    ens_ok, gen_ok = q.argmax(1) == truth, col.p_g.argmax(1) == truth
    wins, losses = int((ens_ok & ~gen_ok).sum()), int((gen_ok & ~ens_ok).sum())
    z = (wins - losses) / math.sqrt(wins + losses) if wins + losses else 0.0
    p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "z": round(z, 4), "p_value": float(f"{p:.4g}")}


@writes_run("specialists calibrate")
def calibrate_run(
    run_dir: str | Path,
    device: str = "auto",
    *,
    variant: str | None = None,
    say=log.info,
    progress: bool = False,
    alpha: float = ALPHA,
    min_throughput_ratio: float | None = None,
) -> Combination:
    """Choose the run's combination on one half of its validation split, confirm it on the other
    and write ``ensemble.json`` (``progress``: a bar over the grid's settings). A combination
    that does not beat the generalist on the confirmation half at level ``alpha`` (the exact
    binomial test of ``paired_gain``; 1: always keep it, 0: never) keeps no specialist.
    ``min_throughput_ratio``: a cascade whose inputs skip the specialists when the generalist is
    sure enough, the threshold chosen for the best accuracy at that share of the generalist's
    throughput or more (measured on validation images, see ``cascade_scan``)."""
    if not 0 <= alpha <= 1:
        raise SpecialistsError(f"--alpha {alpha}: must be between 0 and 1")
    if min_throughput_ratio is not None and not 0 < min_throughput_ratio <= 1:
        raise SpecialistsError(
            f"--min-throughput-ratio {min_throughput_ratio}: must be in (0, 1] (the ensemble's "
            "images per second over the generalist's)"
        )
    run = RunDir.of(run_dir)
    ens = Ensemble.load(run.root, device, variant=variant, combination=Combination())
    source = DataSource.from_dict(ens.record.data)
    val = load_run_data(run, ens.record, min_size=ens.data_size).split("val")
    val = ArraySplit(ens.fit_images(val.images), val.labels)
    if len(val) < 2:
        raise SpecialistsError(f"{run.root}: too few validation examples to calibrate on")
    col = collect(ens, val.images, val.labels)
    comb = select_and_confirm(
        col,
        source.seed,
        progress=progress,
        speed=_speed_meter(run.root, device, variant, val.images[:2048]),
        min_ratio=min_throughput_ratio,
    )
    gain = comb.chosen_on["gain"]
    comb.chosen_on["split"] = "val"
    comb.chosen_on["alpha"] = alpha
    # what it was chosen for: loading it with other specialists is refused (a mixed state)
    comb.chosen_on["specialists_sha256"] = {
        str(r.id): r.weights_sha256 for r in ens.all_specialists
    }
    if gain is None or gain["p_value"] > alpha:
        comb.chosen_on["best_accuracy"] = comb.chosen_on["accuracy"]
        comb.chosen_on["accuracy"] = comb.chosen_on["generalist_accuracy"]
        comb.chosen_on["dropped"] = [r.id for r in col.records]
        if gain is not None:
            say(
                f"the best combination on the selection half ({comb.describe()}) beats the "
                f"generalist on {gain['wins']} confirmation images and loses on "
                f"{gain['losses']}: p = {gain['p_value']:.3g} > {alpha:g}, not confirmed; the "
                "ensemble answers with the generalist alone"
            )
        comb.keep = []
    path = run.ensemble(variant).combination
    save_json(path, comb.to_dict())
    manifest.register(run.root, path)
    c = comb.chosen_on
    confirmation = (
        f"; on the {c['n_confirmation']} confirmation images {100 * c['confirmation_accuracy']:.2f}%"
        f" against {100 * c['generalist_confirmation_accuracy']:.2f}%"
        if comb.keep != [] and c["confirmation_accuracy"] is not None
        else ""
    )
    say(
        f"combination chosen on {c['n_selection']} of {len(val)} validation images: "
        f"{comb.describe()} (accuracy {100 * c['accuracy']:.2f}%, generalist "
        f"{100 * c['generalist_accuracy']:.2f}%, top-1 unweighted "
        f"{100 * c['default_accuracy']:.2f}%){confirmation}"
    )
    return comb


def _speed_meter(
    run_root: Path, device: str, variant: str | None, images: np.ndarray
) -> Callable[[Combination], float]:
    """combination -> its ensemble's images/s over the generalist's on ``images``, each the
    best of two back-to-back timings (one ensemble loaded per set of kept specialists)."""
    loaded: dict[tuple, Ensemble] = {}

    def speed(comb: Combination) -> float:
        key = (comb.top_n, comb.spec_weight, comb.correction, str(comb.keep))
        if key not in loaded:
            loaded[key] = Ensemble.load(
                run_root, device, variant=variant, combination=replace(comb, confidence=None)
            )
        ens = loaded[key]
        ens.combination = comb  # the threshold is read at every batch
        g, e = ens.best_throughput(images)
        return e / g

    return speed


def select_and_confirm(
    col: Collected,
    seed: int,
    *,
    halves: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
    speed: Callable[[Combination], float] | None = None,
    min_ratio: float | None = None,
) -> Combination:
    """The combination chosen on the selection half of ``col`` (``halves``, by default
    ``split_halves(col.labels, seed)``), with its record of the choice (``chosen_on``) and
    ``gain``, its comparison with the generalist on the confirmation half (None when nothing is
    left to compare). The choice reads the selection half only; the confirmation half is scored
    once, after it. With ``min_ratio``, the cascade's confidence threshold is chosen on the
    selection half too: the best accuracy at ``min_ratio`` of the generalist's throughput or
    more, as ``speed`` (a combination -> its measured throughput over the generalist's) says."""
    select_idx, confirm_idx = halves or split_halves(col.labels, seed)
    sel, conf = subset(col, select_idx), subset(col, confirm_idx)
    keep = kept_specialists(col.records)
    comb, _ = choose(sel, None if len(keep) == len(col.records) else keep, progress=progress)
    cascade = None
    if min_ratio is not None and comb.keep != []:
        if speed is None:
            raise ValueError("min_ratio needs speed, the measured throughput of a combination")
        scan = cascade_scan(sel, comb, speed)
        pick = pick_cascade(scan, min_ratio)
        comb.confidence = pick["threshold"]
        comb.chosen_on["accuracy"] = pick["accuracy"]  # the cascade's, on the selection half
        if pick["threshold"] == 0.0:  # no specialist may run: the generalist alone
            comb.keep = []
        cascade = {"min_throughput_ratio": min_ratio, "chosen": pick, "scan": scan}

    def generalist_acc(c: Collected) -> float:
        return float((c.p_g.argmax(1).numpy() == c.labels).mean())

    n_conf = len(confirm_idx)
    confirmed = score(conf, comb) if n_conf else None
    gain = paired_gain(conf, confirmed["q"]) if comb.keep != [] and n_conf else None
    comb.chosen_on = {
        "n_examples": int(len(col.labels)),
        "n_selection": int(len(select_idx)),
        "n_confirmation": int(len(confirm_idx)),
        "generalist_accuracy": round(generalist_acc(sel), 6),  # on the selection half
        "default_accuracy": round(score(sel, Combination(correction=None))["accuracy"], 6),
        "generalist_confirmation_accuracy": round(generalist_acc(conf), 6) if n_conf else None,
        "confirmation_accuracy": None if confirmed is None else round(confirmed["accuracy"], 6),
        "dropped": [r.id for r in col.records if comb.keep is not None and r.id not in comb.keep],
        "gain": gain,  # on the confirmation half
        "cascade": cascade,  # the threshold's scan on the selection half
        **comb.chosen_on,  # the chosen point's accuracy on the selection half, and the grid
    }
    return comb
