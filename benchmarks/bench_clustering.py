"""Scale benchmark of clustering/: the paper's JFT setting and K = 1,000 end to end.

(a) K = 15,000 classes: a synthetic float32 covariance with 61 planted groups, clustered into
    61 overlapping groups of 300 classes (DESIGN §1.2); seconds and peak memory.
(b) K = 1,000 classes in 100 planted groups: predictions streamed in batches into
    PredictionStats, then the default chooser and an explicit 100-group k-means, then metrics.

Run: python benchmarks/bench_clustering.py [--jft-classes 15000] [--only a|b] [--threads N]
Peak memory is the process's ru_maxrss (Linux: KiB), so (a) runs first.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from specialists import clustering as cl


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_jft(k: int, n_groups: int, group_size: int) -> None:
    print(f"(a) JFT setting: K={k}, {n_groups} overlapping groups of {group_size}")
    coarse = cl.planted_groups(k, n_groups, seed=1)
    t = time.perf_counter()
    cov = cl.planted_covariance(coarse, seed=1)  # (K, K) float32
    print(
        f"    synthetic covariance: {cov.nbytes / 2**30:.2f} GiB float32, "
        f"{time.perf_counter() - t:.1f} s, peak RSS so far {peak_gib():.2f} GiB"
    )
    t = time.perf_counter()
    model = cl.ConfusionClustering(
        n_groups, mode="overlapping", group_size=group_size, n_init=3, random_state=0
    ).fit(cov)
    fit_s = time.perf_counter() - t
    print(
        f"    fit: {fit_s:.1f} s (sketch: {model.sketched_}, {model.n_features_} dims), "
        f"peak RSS {peak_gib():.2f} GiB"
    )
    t = time.perf_counter()
    captured = cl.confusion_captured(cov, model.groups_)
    rand = cl.expected_random_captured([len(g) for g in model.groups_], k, disjoint=False)
    agree = cl.coarse_agreement(model.groups_, coarse)
    print(
        f"    metrics: {time.perf_counter() - t:.1f} s; confusion captured {captured:.1%} "
        f"(random groups of the same sizes: {rand:.1%}); ARI {agree['ari']:.3f}, "
        f"NMI {agree['nmi']:.3f} vs planted"
    )
    cover = np.bincount(model.coverage_)
    hist = ", ".join(f"{n} in {c}" for c, n in enumerate(cover[:4]))
    print(f"    coverage (classes in 0, 1, 2, 3 groups): {hist}; max {len(cover) - 1} groups")
    t = time.perf_counter()
    disjoint = cl.ConfusionClustering(n_groups, n_init=3, random_state=0).fit(cov)
    agree = cl.coarse_agreement(disjoint.groups_, coarse)
    sizes = [len(g) for g in disjoint.groups_]
    print(
        f"    same matrix, {n_groups} disjoint groups: {time.perf_counter() - t:.1f} s, sizes "
        f"{min(sizes)}-{max(sizes)}, ARI {agree['ari']:.3f} vs planted"
    )
    print(f"    peak RSS {peak_gib():.2f} GiB")
    del cov


def bench_end_to_end(k: int, n_groups: int, per_class: int, batch: int) -> None:
    print(f"(b) end to end: K={k}, {n_groups} planted groups, {per_class * k} predictions")
    coarse = cl.planted_groups(k, n_groups, seed=2)
    t0 = time.perf_counter()
    stats = cl.PredictionStats(k)
    for i in range(per_class * k // batch):
        probs, labels = cl.planted_predictions(coarse, batch, group_strength=3.0, seed=100 + i)
        stats.update(probs, labels)
    cov = stats.covariance()
    t1 = time.perf_counter()
    print(
        f"    streaming stats ({stats.n_seen} predictions in batches of {batch}): "
        f"{t1 - t0:.1f} s (includes generating them)"
    )
    choice = cl.choose_grouping(cov, k)
    t2 = time.perf_counter()
    ari = cl.coarse_agreement(choice.model.groups_, coarse)["ari"]
    print(f"    default chooser: {t2 - t1:.1f} s -> {choice.n_groups} groups, ARI {ari:.3f}")
    print(f"      reason: {choice.reason}")
    model = cl.ConfusionClustering(n_groups, random_state=0).fit(cov)
    t3 = time.perf_counter()
    report = cl.build_report(cov, model, coarse=coarse, confusion=stats.confusion())
    t4 = time.perf_counter()
    q = report["quality"]
    print(
        f"    explicit n_groups={n_groups}: fit {t3 - t2:.1f} s, report {t4 - t3:.1f} s; "
        f"ARI {q['ari']:.3f}, NMI {q['nmi']:.3f}, captured {q['confusion_captured']:.1%} "
        f"vs random {q['random_baseline']:.1%}"
    )
    print(f"    total {t4 - t0:.1f} s, peak RSS {peak_gib():.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jft-classes", type=int, default=15000)
    ap.add_argument("--only", choices=["a", "b"])
    ap.add_argument("--threads", type=int, help="BLAS and faiss threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        import faiss
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(args.threads)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    if args.only in (None, "a"):
        bench_jft(args.jft_classes, 61, 300)
    if args.only in (None, "b"):
        bench_end_to_end(1000, 100, per_class=20, batch=2000)


if __name__ == "__main__":
    main()
