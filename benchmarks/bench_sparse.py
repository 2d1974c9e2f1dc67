"""Sparse top-k statistics and clustering for very many classes: time and peak memory against K.

For each K: a synthetic top-k prediction stream (``planted_topk``: groups of ~``--group-size``
classes, generated in batches, never a dense row) into ``TopKStats``, then ``ConfusionClustering``
on the sparse second moment into the planted number of disjoint groups, then ARI/NMI against the
planted groups and the share of the off-diagonal mass the groups capture. Each K runs in a fresh
spawned process, so its peak resident memory (ru_maxrss, which only grows) is its own.

Run: python benchmarks/bench_sparse.py [--classes 15000 30000 60000 100000] [--examples 1000000]
Times are wall seconds; "stats" is update() and second_moment(), without generating the stream.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

from specialists import clustering as cl

BATCH = 100_000  # examples per generated batch


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_one(k: int, args: argparse.Namespace) -> dict:
    """Statistics and clustering of one K; runs in its own process."""
    n_groups = max(2, round(k / args.group_size))
    coarse = cl.planted_groups(k, n_groups, seed=0)
    stats = cl.TopKStats(k, args.top_k)
    gen_s = 0.0
    t0 = time.perf_counter()
    for i, n0 in enumerate(range(0, args.examples, BATCH)):
        t = time.perf_counter()
        idx, val, labels = cl.planted_topk(
            coarse, min(BATCH, args.examples - n0), k=args.top_k, cross=args.cross, seed=1 + i
        )
        gen_s += time.perf_counter() - t
        stats.update(indices=idx, values=val, labels=labels)
    s = stats.second_moment()
    stats_s = time.perf_counter() - t0 - gen_s
    stats_peak = peak_gib()
    t = time.perf_counter()
    model = cl.ConfusionClustering(
        n_groups, n_init=args.n_init, sketch_dim=args.sketch_dim, random_state=0
    ).fit(s)
    fit_s = time.perf_counter() - t
    assert model.sparse_
    peak = peak_gib()  # statistics and clustering; the metrics below are not counted
    t = time.perf_counter()
    agree = cl.coarse_agreement(model.groups_, coarse)
    captured = cl.confusion_captured(s, model.groups_)
    planted = cl.confusion_captured(s, [(coarse == g).nonzero()[0] for g in range(n_groups)])
    return {
        "k": k,
        "groups": n_groups,
        "formed": len(model.groups_),
        "gen_s": gen_s,
        "stats_s": stats_s,
        "fit_s": fit_s,
        "stats_peak": stats_peak,
        "peak": peak,
        "nnz": s.nnz,
        "s_mib": (s.data.nbytes + s.indices.nbytes + s.indptr.nbytes) / 2**20,
        "top_k_mass": stats.captured_mass(),
        "dims": model.n_features_,
        "ari": agree["ari"],
        "nmi": agree["nmi"],
        "captured": captured,
        "planted": planted,
        "metrics_s": time.perf_counter() - t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[15000, 30000, 60000, 100000])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=300, help="planted classes per group")
    ap.add_argument("--cross", type=float, default=0.1, help="share of top-k slots off-group")
    ap.add_argument("--n-init", type=int, default=5, help="k-means restarts (estimator default)")
    ap.add_argument("--sketch-dim", type=int, help="default: the estimator's, max(256, 2G)")
    args = ap.parse_args()
    print(
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average "
        f"{os.getloadavg()[0]:.1f}; {args.examples:,} examples, top-{args.top_k}, groups of "
        f"~{args.group_size}, {args.cross:.0%} of slots off-group; n_init={args.n_init}"
    )
    head = (
        f"{'K':>7} {'groups':>6} {'gen s':>6} {'stats s':>7} {'fit s':>6} {'total s':>7} "
        f"{'peak GiB':>8} {'nnz(S)':>11} {'S MiB':>6} {'dims':>4} {'ARI':>6} {'NMI':>6} "
        f"{'captured':>8}"
    )
    print(head)
    rows = []
    for k in args.classes:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            r = pool.submit(run_one, k, args).result()
        rows.append(r)
        total = r["gen_s"] + r["stats_s"] + r["fit_s"]
        print(
            f"{r['k']:>7} {r['formed']:>6} {r['gen_s']:>6.1f} {r['stats_s']:>7.1f} "
            f"{r['fit_s']:>6.1f} {total:>7.1f} {r['peak']:>8.2f} {r['nnz']:>11,} "
            f"{r['s_mib']:>6.0f} {r['dims']:>4} {r['ari']:>6.3f} {r['nmi']:>6.3f} "
            f"{r['captured']:>8.1%}"
        )
        print(
            f"        top-{args.top_k} mass {r['top_k_mass']:.1%}; peak after statistics "
            f"{r['stats_peak']:.2f} GiB; planted groups capture {r['planted']:.1%}; metrics "
            f"{r['metrics_s']:.1f} s (not in total)"
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]

        def total(r: dict) -> float:
            return r["gen_s"] + r["stats_s"] + r["fit_s"]

        print(
            f"K {b['k']:,} vs {a['k']:,} ({b['k'] / a['k']:.1f}x classes): statistics "
            f"{b['stats_s'] / a['stats_s']:.2f}x, clustering {b['fit_s'] / a['fit_s']:.2f}x, "
            f"total time {total(b) / total(a):.2f}x, peak memory {b['peak'] / a['peak']:.2f}x, "
            f"nnz(S) {b['nnz'] / a['nnz']:.2f}x"
        )


if __name__ == "__main__":
    main()
