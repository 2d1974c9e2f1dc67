"""What the ensemble costs at inference, and what it buys, for specialists that train all their
layers, the last stage and the head, or the head only, measured in one run.

    python benchmarks/bench_ensemble.py [RUN ...] [--trainable all last head] [--top-n 1]

Each RUN needs a generalist and its clusters (e.g. ``specialists demo --out runs/demo``, or
``python benchmarks/real_data.py configs/omniglot.yaml --seeds 0``). For every ``--trainable``
setting the run's generalist and groups are copied to ``--out`` (default ``runs/bench-ensemble``)
and specialists are trained there with the run's own specialist settings but that one (a copy
already trained with it is reused). Then, on the test split, with the paper's combination
(top-n gating, every specialist, equal weights):

- accuracy of the generalist and of the ensemble;
- throughput of each (the best of ``--tries``) and their ratio: the median over the tries,
  each of which times both back to back (in alternating order), with its range;
- the ratio the members alone allow: the same with gating, the row gathers and the combiner
  free (from the profile);
- the ratio again when images are routed one batch at a time instead of in waves (each
  specialist then runs on its sliver of every batch);
- where one wave's time goes (``Ensemble.profile``);
- both again with the members and their inputs channels-last (NHWC);
- for the full copies, their stacked forward pass (``torch.func`` over stacked weights, equal row
  blocks) against one after another.

Without RUN, a quick run on the embedded data (100 classes, the 20 planted groups as clusters,
one epoch: speed only, its accuracies mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from specialists.artifacts import load_student
from specialists.combination import Combination
from specialists.config import load_config_file, write_config
from specialists.data import DataSource
from specialists.ensemble import Ensemble
from specialists.evaluate import paired_tries
from specialists.models import create_model, predict_proba
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import save_json
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig, _set_trainable

COPIED = ("config.yaml", "generalist", "clusters.json", "clusters.png", "cache")


def quick_run(root: Path, model: str) -> Path:
    run = root / "quick"
    train_generalist(GeneralistConfig(model=model, epochs=1), run, progress=False)
    groups = [list(range(5 * g, 5 * g + 5)) for g in range(20)]
    save_json(RunDir.of(run).clusters, {"groups": [{"classes": g} for g in groups]})
    write_config(run / "specialists.yaml", SpecialistConfig(epochs=1, examples_per_epoch=128))
    return run


def with_specialists(run: Path, mode: str, out: Path) -> Path:
    """A copy of ``run``'s generalist and groups with specialists trained ``--trainable mode``."""
    dest = out / f"{run.name}-{mode}"
    done = dest / "specialists" / "000.json"
    if done.is_file() and json.loads(done.read_text())["config"]["trainable"] == mode:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in COPIED:
        src = run / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    files = json.loads((run / "manifest.json").read_text())
    files["files"] = {k: v for k, v in files["files"].items() if (dest / k).exists()}
    (dest / "manifest.json").write_text(json.dumps(files, indent=2))
    settings = run / "specialists.yaml"
    cfg = (
        SpecialistConfig(**load_config_file(settings)) if settings.is_file() else SpecialistConfig()
    )
    t = time.perf_counter()
    train_specialists(dest, replace(cfg, trainable=mode), progress=False, calibrate=False)
    print(f"  trained {mode} specialists of {run.name} in {time.perf_counter() - t:.0f} s")
    return dest


def trained_share(ens: Ensemble, mode: str) -> float:
    """The share of the specialists' weights that ``--trainable mode`` trains, over the
    ensemble's specialists as they are (their heads as wide as their groups plus the dustbin)."""
    trained = total = 0
    for rec in ens.specialists:
        model = create_model(
            rec.architecture, len(rec.classes) + 1, ens.record.in_chans, rec.size(ens.record)
        )
        _set_trainable(model, mode)
        total += sum(p.numel() for p in model.parameters())
        trained += sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained / total


def stacked_vs_one_by_one(ens: Ensemble, images: np.ndarray, tries: int) -> tuple[float, float]:
    """Seconds for every specialist's forward pass on an equal block of rows: one after
    another, and stacked with ``torch.func`` (one vmapped call over stacked weights)."""
    from torch.func import functional_call, stack_module_state

    models = [ens.load_specialist(s) for s in ens.specialists]
    widest = max(m.get_classifier().out_features for m in models)
    padded = []  # stacking needs equal shapes: heads padded with zero rows to the widest
    for m in models:
        head = m.get_classifier()
        twin = copy.deepcopy(m)
        twin.reset_classifier(widest)
        with torch.no_grad():
            new = twin.get_classifier()
            new.weight.zero_()
            new.bias.zero_()
            new.weight[: head.out_features] = head.weight
            new.bias[: head.out_features] = head.bias
        padded.append(twin.to(ens.device).eval())
    models = padded
    rows = max(1, min(len(images), ens.wave_size(len(images))) // len(models))
    x = ens.transform(torch.as_tensor(images[:rows]).to(ens.device))
    xs = x.unsqueeze(0).expand(len(models), *x.shape).contiguous()
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def one(p, b, inputs):
        return functional_call(skeleton, (p, b), (inputs,))

    stacked = torch.vmap(one)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(tries):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        a = best(lambda: [m(xs[i]) for i, m in enumerate(models)])
        b = best(lambda: stacked(params, buffers, xs))
    return a, b


def measure(run: Path, mode: str, args: argparse.Namespace) -> dict:
    comb = Combination(top_n=args.top_n)
    ens = Ensemble.load(run, combination=comb)
    bundle = load_data(DataSource.from_dict(ens.record.data))
    images, labels = bundle.test.images, bundle.test.labels
    out = ens.run_batch(images)
    timed = images[: args.images]
    pairs = paired_tries(ens.generalist_proba, ens.predict_proba, timed, args.tries)
    g, e = max(p[0] for p in pairs), max(p[1] for p in pairs)
    per_try = [e_i / g_i for g_i, e_i in pairs]
    budget = ens.wave_bytes
    ens.wave_bytes = 0  # one batch at a time
    one_batch = [
        e_i / g_i
        for g_i, e_i in paired_tries(ens.generalist_proba, ens.predict_proba, timed, args.tries)
    ]
    ens.wave_bytes = budget
    wave = timed[: ens.wave_size(len(timed))]
    stages = ens.profile(wave, repeats=args.tries)
    total = stages.pop("total")
    spec = sum(v for k, v in stages.items() if k.startswith("specialist"))
    forward = sum(v for k, v in stages.items() if k.startswith("specialist") and "input" not in k)
    # what the ensemble adds besides its members' forward passes: gating, the specialists' row
    # gathers and the combiner
    added = spec - forward + stages.get("gating", 0.0) + stages.get("combiner", 0.0)
    row = {
        "data": ens.record.data["kind"],
        "run": run.name,
        "mode": mode,
        "architecture": ens.record.architecture,
        "classes": ens.record.n_classes,
        "specialists": len(ens.specialists),
        "shared": len(ens.trunks),
        "trained_share": trained_share(ens, mode),
        "consulted": float(np.mean([len(c) for c in out.consulted])),
        "generalist_acc": float((out.p_g.argmax(1) == labels).mean()),
        "ensemble_acc": float((out.q.argmax(1) == labels).mean()),
        "generalist_ips": g,
        "ensemble_ips": e,
        "ratio": float(np.median(per_try)),
        "ratio_range": [float(np.min(per_try)), float(np.max(per_try))],
        "ratio_of_bests": e / g,
        # the ratio if gating, gathers and combining cost nothing: the generalist's share of
        # the wave (with the input transform and the copies it pays alone too) against that
        # plus the specialists' forward passes, from the same profile
        "members_only_ratio": (total - forward - added) / (total - added),
        "added_share": added / total,
        "batch_by_batch_ratio": float(np.median(one_batch)),
        "wave": len(wave),
        "stages_ms": {"total": 1e3 * total, **{k: 1e3 * v for k, v in stages.items()}},
        "profile": {
            "generalist": stages.get("generalist", 0.0) / total,
            "specialists": spec / total,
            "combiner": stages.get("combiner", 0.0) / total,
            "rest": 1
            - (stages.get("generalist", 0.0) + spec + stages.get("combiner", 0.0)) / total,
        },
    }
    nhwc = Ensemble.load(run, combination=comb, channels_last=True)
    pairs = paired_tries(nhwc.generalist_proba, nhwc.predict_proba, timed, args.tries)
    g2, e2 = max(p[0] for p in pairs), max(p[1] for p in pairs)
    ratio = float(np.median([e_i / g_i for g_i, e_i in pairs]))
    row["channels_last"] = {"generalist": g2 / g, "ensemble": e2 / e, "ratio": ratio}
    if mode == "all" and args.stacked:
        row["one_by_one_s"], row["stacked_s"] = stacked_vs_one_by_one(ens, timed, args.tries)
    return row


def student_vs_generalist(run: Path, args: argparse.Namespace) -> str | None:
    """The distilled student's throughput against the generalist's, where ``run`` has one, both
    run by ``predict_proba`` (the model itself, as a deployed student runs)."""
    if not RunDir.of(run).student().files.record.is_file():
        return None
    ens = Ensemble.load(run)
    model, record, transform = load_student(run, ens.device)
    images = load_data(DataSource.from_dict(ens.record.data)).test.images[: args.images]

    def student(x: np.ndarray) -> np.ndarray:
        return predict_proba(model, x, transform=transform, device=ens.device)

    def generalist(x: np.ndarray) -> np.ndarray:  # the same way, as the model itself
        return predict_proba(ens.generalist, x, transform=ens.transform, device=ens.device)

    pairs = paired_tries(generalist, student, images, args.tries)
    g, s = max(p[0] for p in pairs), max(p[1] for p in pairs)
    ratios = [s_i / g_i for g_i, s_i in pairs]
    return (
        f"- {run.name}: student ({record.architecture}) {s:.0f} images/s, generalist {g:.0f} "
        f"images/s (the best tries): student / generalist = {np.median(ratios):.2f} (the median "
        f"of {args.tries} paired tries; {min(ratios):.2f}-{max(ratios):.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="*", help="runs with a generalist and clusters")
    ap.add_argument("--trainable", nargs="+", default=["all", "last", "head"])
    ap.add_argument("--out", default="runs/bench-ensemble", help="where the copies are trained")
    ap.add_argument("--model", default="test_efficientnet", help="the quick run's model")
    ap.add_argument("--top-n", type=int, default=1)
    ap.add_argument("--images", type=int, default=4096, help="test images timed")
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--no-stacked", dest="stacked", action="store_false")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Path(r) for r in args.runs] or [quick_run(Path(tmp), args.model)]
        out = Path(args.out) if args.runs else Path(tmp)
        rows = []
        for run in runs:
            for mode in args.trainable:
                rows.append(measure(with_specialists(run, mode, out), mode, args))
                r = rows[-1]
                print(
                    f"  {r['run']} {mode}: ratio {r['ratio']:.2f} "
                    f"(batch by batch {r['batch_by_batch_ratio']:.2f})"
                )
        students = [line for run in runs if (line := student_vs_generalist(run, args))]
    print(
        f"\ntop-{args.top_n} gating, the paper's combination; {args.tries} tries, each timing "
        f"the generalist and the ensemble back to back on {args.images} test images at most, "
        f"{torch.get_num_threads()} threads: images/s the best try, ensemble / generalist the "
        "median of the tries' ratios\n"
    )
    print(
        "| data | specialists train | share of weights trained | specialists (sharing the "
        "trunk) | consulted per image | generalist accuracy | ensemble accuracy | generalist "
        "images/s | ensemble images/s | **ensemble / generalist** | range over the tries "
        "| members only | batch by batch |"
    )
    print("|" + "---|" * 13)
    for r in rows:
        print(
            f"| {r['data']} ({r['classes']} classes) | {r['mode']} | {100 * r['trained_share']:.0f}% "
            f"| {r['specialists']} ({r['shared']}) | {r['consulted']:.2f} "
            f"| {100 * r['generalist_acc']:.2f}% | {100 * r['ensemble_acc']:.2f}% "
            f"| {r['generalist_ips']:.0f} | {r['ensemble_ips']:.0f} | **{r['ratio']:.2f}x** "
            f"| {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f} "
            f"| {r['members_only_ratio']:.2f}x | {r['batch_by_batch_ratio']:.2f}x |"
        )
    print(
        "\nmembers only: the ratio were gating, the row gathers and the combiner free (the "
        "generalist against the generalist plus the specialists' forward passes, from the "
        "profile below)"
    )
    print("\nwhere one wave's time goes (share of the ensemble's time):\n")
    print(
        "| data | specialists train | generalist | specialists | combiner | the rest | added "
        "by the ensemble (gating, gathers, combiner) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["profile"]
        print(
            f"| {r['data']} | {r['mode']} | {100 * p['generalist']:.0f}% "
            f"| {100 * p['specialists']:.0f}% | {100 * p['combiner']:.1f}% | {100 * p['rest']:.0f}% "
            f"| {100 * r['added_share']:.1f}% |"
        )
    print("\none wave, stage by stage (median ms of the tries, share of the total):\n")
    for r in rows:
        st = dict(r["stages_ms"])
        total = st.pop("total")
        other = total - sum(st.values())
        spec = {k: st.pop(k) for k in list(st) if k.startswith("specialist")}
        forward = [v for k, v in spec.items() if not k.endswith("input")]
        st[f"{len(forward)} specialists' forward passes"] = sum(forward)
        st["their inputs (row gathers)"] = sum(v for k, v in spec.items() if k.endswith("input"))
        parts = [f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in st.items()]
        parts.append(f"other {other:.1f} ({100 * other / total:.0f}%)")
        print(f"- {r['data']} {r['mode']}, {r['wave']} images, {total:.1f} ms: " + ", ".join(parts))
    print("\nchannels-last (NHWC) members and inputs, against the default layout:\n")
    print("| data | specialists train | generalist | ensemble | ensemble / generalist |")
    print("|---|---|---|---|---|")
    for r in rows:
        c = r["channels_last"]
        print(
            f"| {r['data']} | {r['mode']} | {c['generalist']:.2f}x | {c['ensemble']:.2f}x "
            f"| {c['ratio']:.2f}x |"
        )
    stacked = [r for r in rows if "stacked_s" in r]
    if stacked:
        print("\nfull copies, every specialist on an equal block of rows:\n")
        for r in stacked:
            print(
                f"- {r['data']}: one after another {1e3 * r['one_by_one_s']:.1f} ms, stacked "
                f"(torch.func) {1e3 * r['stacked_s']:.1f} ms: stacked / one by one = "
                f"{r['stacked_s'] / r['one_by_one_s']:.2f}"
            )
    if students:
        print("\nthe distilled student against the generalist, both through predict_proba:\n")
        print("\n".join(students))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
