"""The paper's metrics: accuracy, conditional accuracy, and the breakdown by coverage (Table 4)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from . import manifest
from .artifacts import load_student
from .data import DataSource
from .datasets import load_run_data
from .ensemble import Ensemble
from .errors import SpecialistsError
from .lock import writes_run
from .models import predict_proba
from .run import RunDir
from .sources import load_data, parse_source
from .storage import file_sha256, save_figure, save_json
from .trunk import traced

__all__ = [
    "ensemble_metrics",
    "evaluate_run",
    "format_metrics",
    "images_per_second",
    "paired_speed",
    "paired_tries",
    "plot_coverage",
    "student_rows",
]

# The students a run may hold: (folder, the row's name).
STUDENTS = (
    (RunDir.STUDENT, "student (distilled ensemble)"),
    (RunDir.SELF_STUDENT_CONTROL, "self-distilled generalist"),
    (RunDir.RANDOM_STUDENT_CONTROL, "student of random groups"),
)

log = logging.getLogger(__name__)


def ensemble_metrics(
    p_g: np.ndarray, q: np.ndarray, labels: np.ndarray, groups: list[list[int]]
) -> dict:
    """Metrics of the generalist (``p_g``) and the ensemble (``q``) on labelled examples.

    Conditional accuracy (the paper's): only the examples whose true class is covered by some
    specialist, the prediction restricted to the classes of the specialists covering it.
    """
    n, k = p_g.shape
    member = np.zeros((len(groups), k), dtype=bool)
    for m, g in enumerate(groups):
        member[m, g] = True
    cover = member[:, labels].T  # (N, M): specialist m covers example i's true class
    n_cover = cover.sum(1)
    correct_g = p_g.argmax(1) == labels
    correct_e = q.argmax(1) == labels
    covered = n_cover > 0
    allowed = (
        cover.astype(np.float32) @ member.astype(np.float32)
    ) > 0  # (N, K) union of covering groups
    cond_g = np.where(allowed, p_g, -1).argmax(1) == labels
    cond_e = np.where(allowed, q, -1).argmax(1) == labels
    err_g, err_e = 1 - correct_g.mean(), 1 - correct_e.mean()
    rows = []
    for c in range(int(n_cover.max()) + 1 if n else 1):
        sel = n_cover == c
        if not sel.any():
            continue
        base = int(correct_g[sel].sum())
        delta = int(correct_e[sel].sum()) - base
        rows.append(
            {
                "n_specialists": c,
                "n_examples": int(sel.sum()),
                "generalist_correct": base,
                "delta_correct": delta,
                "relative_change": round(delta / base, 5) if base else None,
            }
        )
    return {
        "n_test": int(n),
        "n_specialists": len(groups),
        "generalist_accuracy": round(float(correct_g.mean()), 5),
        "ensemble_accuracy": round(float(correct_e.mean()), 5),
        "relative_error_reduction": round(float((err_g - err_e) / err_g), 5) if err_g > 0 else None,
        "n_covered": int(covered.sum()),
        "generalist_conditional_accuracy": round(float(cond_g[covered].mean()), 5)
        if covered.any()
        else None,
        "ensemble_conditional_accuracy": round(float(cond_e[covered].mean()), 5)
        if covered.any()
        else None,
        "coverage_breakdown": rows,
    }


def format_metrics(m: dict) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"{'':28s}{'generalist':>12s}{'ensemble':>12s}",
        f"{'test accuracy':28s}{pct(m['generalist_accuracy']):>12s}{pct(m['ensemble_accuracy']):>12s}",
        f"{'conditional accuracy':28s}{pct(m['generalist_conditional_accuracy']):>12s}{pct(m['ensemble_conditional_accuracy']):>12s}",
    ]
    if "generalist_images_per_second" in m:
        lines.append(
            f"{'images / second':28s}{m['generalist_images_per_second']:>12.0f}{m['ensemble_images_per_second']:>12.0f}"
        )
    rer = m.get("relative_error_reduction")
    lines.append(
        f"relative error reduction: {pct(rer)}  ({m['n_test']} test examples, {m['n_specialists']} specialists, top-{m.get('top_n', 1)} gating)"
    )
    c = m.get("combination")
    if c and c.get("keep") == [] and c.get("validation_gain"):
        g = c["validation_gain"]
        if "p_value" in g:
            lines.append(
                "combination (chosen on validation): the generalist alone; the best combination "
                f"of the specialists beat it on {g['wins']} confirmation images and lost on "
                f"{g['losses']}, p = {g['p_value']:.3g} > {c.get('alpha', 0.05):g}: not confirmed"
            )
        else:  # a combination chosen before the confirmation half existed
            lines.append(
                "combination (chosen on validation): the generalist alone; the best combination "
                f"of the specialists beat it on {g['wins']} validation images and lost on "
                f"{g['losses']}, z = {g['z']:.2f}: within noise"
            )
    elif c:
        lines.append(
            f"combination ({'chosen on validation' if c.get('calibrated') else 'fixed'}): "
            f"specialist weight {c['spec_weight']:g}, "
            f"dustbin correction {c['correction'] or 'as trained'}"
        )
    if m.get("cascade"):
        lines.append("")
        lines.append(
            f"{'cascade threshold':28s}{'accuracy':>12s}{'consulted':>12s}{'images/s':>10s}"
            f"{'vs generalist':>15s}"
        )
        for r in m["cascade"]:
            t = "none" if r["threshold"] is None else f"{r['threshold']:.3f}"
            lines.append(
                f"{t:28s}{pct(r['accuracy']):>12s}{r['mean_consulted']:>12.2f}"
                f"{r['images_per_second']:>10.0f}{r['throughput_ratio']:>14.2f}x"
            )
    if m.get("students"):
        lines.append("")
        lines.append(
            f"{'one model each':28s}{'accuracy':>12s}{'rel. error':>12s}{'conditional':>13s}"
            f"{'images/s':>10s}{'vs generalist':>15s}"
        )
        for r in m["students"]:
            lines.append(
                f"{r['name']:28s}{pct(r['accuracy']):>12s}{pct(r['relative_error_reduction']):>12s}"
                f"{pct(r['conditional_accuracy']):>13s}{r['images_per_second']:>10.0f}"
                f"{r['throughput_ratio']:>14.2f}x"
            )
    if m.get("controls"):
        lines.append("")
        lines.append(
            f"{'controls (same compute)':28s}{'accuracy':>12s}{'rel. error':>12s}{'conditional':>13s}{'train s':>10s}"
        )
        lines.append(
            f"{'generalist':28s}{pct(m['generalist_accuracy']):>12s}{'':>12s}{pct(m['generalist_conditional_accuracy']):>13s}"
        )
        lines.append(
            f"{'specialists (this run)':28s}{pct(m['ensemble_accuracy']):>12s}{pct(rer):>12s}{pct(m['ensemble_conditional_accuracy']):>13s}"
        )
        for r in m["controls"]:
            speed = (
                f"  ({r['architecture']} at {r['input_size']} px: {r['images_per_second']:.0f} "
                f"images/s, {r['throughput_ratio']:.2f}x the generalist)"
                if "images_per_second" in r
                else ""
            )
            lines.append(
                f"{r['name']:28s}{pct(r['accuracy']):>12s}{pct(r['relative_error_reduction']):>12s}"
                f"{pct(r['conditional_accuracy']):>13s}{r['train_seconds']:>10.0f}{speed}"
            )
        if m.get("verdict"):
            lines.append(f"verdict: {m['verdict']}")
    lines.append("")
    lines.append(
        f"{'covered by':>10s}{'examples':>10s}{'delta correct':>15s}{'relative change':>17s}"
    )
    for r in m["coverage_breakdown"]:
        rel = "-" if r["relative_change"] is None else f"{100 * r['relative_change']:+.1f}%"
        lines.append(
            f"{r['n_specialists']:>10d}{r['n_examples']:>10d}{r['delta_correct']:>+15d}{rel:>17s}"
        )
    return "\n".join(lines)


def paired_tries(first, second, images: np.ndarray, tries: int = 3) -> list[tuple[float, float]]:
    """Images per second of two predictors (uint8 images -> probabilities) on ``images``, one
    pair per try: each try times both back to back, in alternating order, so that a slow spell
    of the machine falls on both (one pass of a small model lasts a fraction of a second, and a
    single one swings by tens of percent with whatever else runs)."""
    out = []
    for i in range(tries):
        if i % 2 == 0:
            a = images_per_second(first, images)
            b = images_per_second(second, images)
        else:
            b = images_per_second(second, images)
            a = images_per_second(first, images)
        out.append((a, b))
    return out


def paired_speed(first, second, images: np.ndarray, tries: int = 3) -> tuple[float, float]:
    """``paired_tries``, the best of each."""
    times = paired_tries(first, second, images, tries)
    return max(a for a, _ in times), max(b for _, b in times)


def images_per_second(predict, images: np.ndarray, repeats: int = 1) -> float:
    """Throughput of ``predict`` (uint8 images -> probabilities) on ``images``, after a warm-up."""
    predict(images[:256])
    start = time.perf_counter()
    for _ in range(repeats):
        predict(images)
    return repeats * len(images) / (time.perf_counter() - start)


def student_rows(
    ens: Ensemble, images: np.ndarray, labels: np.ndarray, p_g: np.ndarray
) -> list[dict]:
    """One row per distilled student of the run (the ensemble's, and the controls' where they
    exist): test accuracy, relative error reduction and conditional accuracy against the
    generalist, and images per second against the generalist's, measured back to back."""
    rows = []
    groups = [s.classes for s in ens.specialists]  # conditional accuracy as the ensemble's row
    timed = images[: min(len(images), 2048)]
    for subdir, name in STUDENTS:
        if not ens.run.student(subdir).files.record.is_file():
            continue
        try:
            model, record, transform = load_student(ens.run, ens.device, subdir=subdir)
        except SpecialistsError as e:  # a stale student must not stop the ensemble's evaluation
            log.warning("%s; its row is left out", e)
            continue

        # its traced graph, made once, as the ensemble runs its generalist: the speeds compare
        run = traced(model)

        def predict(x: np.ndarray, run=run, transform=transform) -> np.ndarray:
            return predict_proba(run, x, transform=transform, device=ens.device)

        m = ensemble_metrics(p_g, predict(images), labels, groups)
        generalist_ips, student_ips = paired_speed(ens.generalist_proba, predict, timed)
        rows.append(
            {
                "name": name,
                "architecture": record.architecture,
                "accuracy": m["ensemble_accuracy"],
                "relative_error_reduction": m["relative_error_reduction"],
                "conditional_accuracy": m["ensemble_conditional_accuracy"],
                "images_per_second": round(student_ips, 1),
                "throughput_ratio": round(student_ips / generalist_ips, 3),
                "train_seconds": record.metrics["seconds"],
            }
        )
    return rows


def cascade_curve(ens: Ensemble, images: np.ndarray, labels: np.ndarray) -> list[dict]:
    """The ensemble's accuracy and measured images/s (against the generalist's, timed back to
    back) as the cascade's confidence threshold varies (``cascade_thresholds``). Accuracy comes
    from one pass of every model (``collect``); each speed is the best of two timed passes."""
    from dataclasses import replace

    from .calibrate import cascade_thresholds, collect, score

    comb = ens.combination
    col = collect(ens, images, labels, top_n_max=ens.top_n)
    col.records = ens.specialists  # only the kept ones, as the ensemble has them
    keep_ids = [r.id for r in ens.specialists]
    col.rows = [col.rows[i] for i, r in enumerate(ens.all_specialists) if r.id in keep_ids]
    col.logits = [col.logits[i] for i, r in enumerate(ens.all_specialists) if r.id in keep_ids]
    thresholds = cascade_thresholds(col.p_g)
    timed = images[: min(len(images), 2048)]
    rows = []
    try:
        for t in thresholds:
            ens.combination = replace(comb, confidence=t)
            s = score(col, replace(comb, keep=None, confidence=t))
            g, e = ens.best_throughput(timed)
            rows.append(
                {
                    "threshold": t,
                    "accuracy": round(s["accuracy"], 5),
                    "mean_consulted": round(s["mean_consulted"], 4),
                    "images_per_second": round(e, 1),
                    "throughput_ratio": round(e / g, 3),
                }
            )
    finally:
        ens.combination = comb
    return rows


def plot_cascade(rows: list[dict], m: dict, path: str | Path) -> None:
    """Accuracy against images/s as the cascade's threshold varies, the chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["images_per_second"] for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    ax.plot(xs, ys, "o-", color="#3b75af", label="ensemble, threshold varied")
    for r, x, y in zip(rows, xs, ys):
        label = "none" if r["threshold"] is None else f"{r['threshold']:.2f}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter(
        [m["ensemble_images_per_second"]],
        [100 * m["ensemble_accuracy"]],
        s=120,
        facecolors="none",
        edgecolors="#d62728",
        label="the calibrated combination",
        zorder=3,
    )
    ax.axhline(
        100 * m["generalist_accuracy"], color="#999999", linestyle="--", label="generalist alone"
    )
    ax.set_xlabel("images / second (the threshold labels each point)")
    ax.set_ylabel(f"{m['split']} accuracy (%)")
    ax.set_title("the cascade: inputs the generalist is sure of skip the specialists", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_coverage(m: dict, path: str | Path) -> None:
    """Accuracy of the generalist and of the ensemble on the test examples grouped by how many
    specialists cover their true class (0: none, the ensemble can only match the generalist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = m["coverage_breakdown"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = np.arange(len(rows))
    acc_g = [100 * r.get("generalist_correct", 0) / max(r["n_examples"], 1) for r in rows]
    acc_e = [
        100 * (r.get("generalist_correct", 0) + r["delta_correct"]) / max(r["n_examples"], 1)
        for r in rows
    ]
    w = 0.38
    ax.bar(xs - w / 2, acc_g, w, color="#999999", label="generalist")
    bars = ax.bar(xs + w / 2, acc_e, w, color="#3b75af", label="ensemble")
    for x, b, r in zip(xs, bars, rows):
        rel = "" if r["relative_change"] is None else f" ({100 * r['relative_change']:+.1f}%)"
        ax.annotate(
            f"{r['delta_correct']:+d} correct{rel}",
            (x, max(b.get_height(), acc_g[x]) + 2),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(
        xs, [f"{r['n_specialists']}\n{r['n_examples']} examples" for r in rows], fontsize=8
    )
    half, centre = max(len(rows), 3) / 2, (len(rows) - 1) / 2  # one bucket: not one wide bar
    ax.set_xlim(centre - half, centre + half)
    ax.set_ylim(0, 118)  # room for the labels above a 100% bar, below the title
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("specialists covering the true class")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="upper left", fontsize=8, ncols=2, frameon=False)
    rer = m.get("relative_error_reduction")
    ax.set_title(
        f"ensemble {100 * m['ensemble_accuracy']:.2f}% vs generalist "
        f"{100 * m['generalist_accuracy']:.2f}%"
        + ("" if rer is None else f", relative error reduction {100 * rer:.2f}%"),
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


@writes_run("specialists evaluate")
def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    top_n: int | None = None,
    device: str = "auto",
    cache_size: int | None = None,
    compile: bool = False,
    amp: str = "auto",
) -> dict:
    """Evaluate a run's ensemble against its generalist; write ``metrics.json`` and ``coverage.png``.
    ``compile``: every member under ``torch.compile`` (the generalist's speed too); ``amp``:
    mixed precision on CUDA."""
    run = RunDir.of(run_dir)
    ens = Ensemble.load(
        run.root, device, top_n=top_n, cache_size=cache_size, compile=compile, amp=amp
    )
    # the state scored (the run's lock is held throughout: no writer changes it meanwhile)
    state = {
        "manifest_generation": manifest.generation(run.root),
        "combination_sha256": (file_sha256(run.combination) if run.combination.is_file() else None),
        "specialists_sha256": {str(s.id): s.weights_sha256 for s in ens.all_specialists},
    }
    if data:
        source = parse_source(
            data, seed=ens.record.data["seed"], image_size=ens.data_size or ens.record.input_size
        )
        bundle = load_data(source, min_size=ens.data_size)
    else:  # the generalist's own data (from the run's cache when given in Python)
        source = DataSource.from_dict(ens.record.data)
        bundle = load_run_data(run, ens.record, min_size=ens.data_size)
    if bundle.class_names != ens.record.class_names:
        raise SpecialistsError(
            f"{source.describe()}: its classes differ from the run's generalist ({bundle.n_classes} vs {ens.record.n_classes})"
        )
    part = bundle.split(split)
    images = ens.fit_images(part.images)
    out = ens.run_batch(images)
    m = ensemble_metrics(out.p_g, out.q, part.labels, [s.classes for s in ens.specialists])
    g_ips, e_ips = ens.throughput(images[: min(len(images), 2048)])
    m.update(
        {
            "split": split,
            "data": source.describe(),
            "top_n": ens.top_n,
            "combination": {
                **{k: v for k, v in ens.combination.to_dict().items() if k != "chosen_on"},
                "calibrated": bool(ens.combination.chosen_on),
                "validation_gain": ens.combination.chosen_on.get("gain"),
                "alpha": ens.combination.chosen_on.get("alpha"),
            },
            "generalist_images_per_second": round(g_ips, 1),
            "ensemble_images_per_second": round(e_ips, 1),
            "mean_specialists_consulted": round(float(np.mean([len(c) for c in out.consulted])), 3),
            "run_state": state,
        }
    )
    students = student_rows(ens, images, part.labels, out.p_g)
    if students:
        m["students"] = students
    figures = [run.coverage_png]
    if ens.specialists:
        m["cascade"] = cascade_curve(ens, images, part.labels)
        plot_cascade(m["cascade"], m, run.cascade_png)
        figures.append(run.cascade_png)
    save_json(run.metrics, m)
    plot_coverage(m, run.coverage_png)
    manifest.register(run.root, run.metrics, *figures)
    return m
