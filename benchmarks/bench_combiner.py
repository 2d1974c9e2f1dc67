"""Benchmark of the KL combiner: the EM fixed point against the paper's gradient descent on logits.

Three cases on synthetic instances:
1. realistic (default K=1000, M=20 overlapping random groups of 100, B=256, top-1 gating): EM,
   then the gradient-descent reference (Adam; with --lbfgs also L-BFGS) run until every example's objective is
   within 1e-6 (relative) of EM's, or until its step cap, reporting how far it got. Times and the
   ratio come from the same run.
2. slow (the realistic instance with top-3 gating and every specialist weighted 8, where plain EM
   crawls): the default accelerated EM (SQUAREM jumps) against plain EM, same run.
2b. top-1 over 20 disjoint groups of 50 (K=1000, B=512, float32, as in the ensemble): every
   example has one specialist, which ``combine`` solves in closed form (the ensemble's
   blocks of rows, and one padded tensor); against EM.
3. large (default K=15,000, 61 groups of 300, B=64): EM alone.
4. huge (default K=100,000, 300 overlapping groups of 600, B=64): the group index (held
   sparsely), gating and EM, time per image and the process's peak memory.

Instances: generalist logits ~ N(0, 3^2); each active specialist's distribution is the
generalist's projected onto its group + dustbin, perturbed by N(0, 1) noise on the log scale (so
the dustbins are far from empty and active groups overlap). Times are the median of --repeats runs
after a warm-up; the GD references run once.

    python benchmarks/bench_combiner.py [--device cpu|cuda] [--threads N] [--top-n N] [--lbfgs]
    python benchmarks/bench_combiner.py --only-huge   # case 4 alone
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch

from specialists.combiner import combine, objective, solve_em
from specialists.gating import GroupIndex, gate
from specialists.reference import solve_gd


def make_instance(
    n_rows: int,
    n_classes: int,
    n_groups: int,
    group_size: int,
    top_n: int,
    seed: int,
    dtype: torch.dtype,
    device: str,
    disjoint: bool = False,
):
    """Random overlapping (or ``disjoint``) groups of equal size, a generalist and the active
    specialists' outputs as one (A, |S| + 1) tensor."""
    gen = torch.Generator().manual_seed(seed)
    if disjoint:
        order = torch.randperm(n_classes, generator=gen)
        lists = [order[i * group_size : (i + 1) * group_size].tolist() for i in range(n_groups)]
    else:
        lists = [
            torch.randperm(n_classes, generator=gen)[:group_size].tolist() for _ in range(n_groups)
        ]
    groups = GroupIndex.from_lists(lists, n_classes, device=device)
    logits = 3.0 * torch.randn(n_rows, n_classes, generator=gen, dtype=torch.float64)
    p_g = torch.softmax(logits, 1)
    pairs = gate(p_g, groups.to("cpu"), top_n=top_n)
    members = groups.members.cpu().view(n_groups, group_size)[pairs.specs]  # (A, S)
    inside = p_g[pairs.rows].gather(1, members)  # (A, S)
    seen = torch.cat([inside, (1 - inside.sum(1, keepdim=True)).clamp_min(1e-12)], 1)
    noise = torch.randn(seen.shape, generator=gen, dtype=torch.float64)
    spec = torch.softmax(seen.log() + noise, 1)  # (A, S + 1)
    return p_g.to(device, dtype), spec.to(device, dtype), pairs, groups


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_em(p_g, spec, pairs, groups, repeats: int, device: str, **kw):
    solve_em(p_g, spec, pairs, groups, **kw)  # warm-up
    runs = [timed(lambda: solve_em(p_g, spec, pairs, groups, **kw), device) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[0][1]


def describe(p_g, pairs, groups) -> str:
    per_row = torch.bincount(pairs.rows.cpu(), minlength=len(p_g))
    covered = int((groups.coverage > 0).sum())
    return (
        f"B={len(p_g)} K={groups.n_classes} M={len(groups)} |S|={int(groups.sizes[0])} "
        f"classes covered={covered}/{groups.n_classes} max coverage={int(groups.coverage.max())} "
        f"active pairs={pairs.n_pairs} examples with >=2 specialists={int((per_row >= 2).sum())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-n", type=int, default=1)
    parser.add_argument("--gd-steps", type=int, default=3000, help="step cap of each reference")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument(
        "--lbfgs", action="store_true", help="also time L-BFGS (slow: minutes on a CPU)"
    )
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--only-huge", action="store_true", help="run case 4 alone")
    parser.add_argument("--huge-classes", type=int, default=100_000)
    parser.add_argument("--huge-groups", type=int, default=300)
    parser.add_argument("--huge-group-size", type=int, default=600)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, f32, f64 = args.device, torch.float32, torch.float64
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")
    if args.only_huge:
        bench_huge(args)
        return

    print(f"\n[1] realistic case, top-{args.top_n} gating: EM vs gradient descent on logits")
    p_g, spec, pairs, groups = make_instance(256, 1000, 20, 100, args.top_n, args.seed, f64, dev)
    print("   ", describe(p_g, pairs, groups))
    # The comparison runs both solvers in float64, so that "equal objective" is not blurred by
    # float32 rounding of q (which moves the objective by ~1e-6 relative on its own).
    t_em, em = bench_em(p_g, spec, pairs, groups, args.repeats, dev)
    f_em = objective(em.q, p_g, spec, pairs, groups)  # (B,) float64
    print(
        f"    EM float64 : {t_em * 1e3:9.1f} ms  {em.n_iter} iterations, "
        f"converged={em.converged}, mean objective {f_em.mean():.8f}"
    )
    t32, em32 = bench_em(p_g.float(), spec.float(), pairs, groups, args.repeats, dev)
    print(f"    EM float32 : {t32 * 1e3:9.1f} ms  {em32.n_iter} iterations (for reference)")
    for method in ["adam"] + (["lbfgs"] if args.lbfgs else []):

        def run(method: str = method):
            return solve_gd(
                p_g,
                spec,
                pairs,
                groups,
                method=method,
                max_steps=args.gd_steps,
                target=f_em,
                rtol=args.rtol,
            )

        t_gd, gd = timed(run, dev)
        gap = ((gd.objective - f_em) / f_em.abs().clamp_min(1e-12)).max().item()
        reached = gap <= args.rtol
        verdict = "reached" if reached else f"did NOT reach (cap {args.gd_steps} steps)"
        bound = "" if reached else " (lower bound)"
        print(
            f"    GD {method:7s}: {t_gd * 1e3:9.1f} ms  {gd.n_steps} steps, {verdict} EM's "
            f"objective within {args.rtol:g} (worst relative gap {gap:.1e}); "
            f"time GD / EM = {t_gd / t_em:.0f}x{bound}"
        )

    print("\n[2] slow case, top-3 gating, specialist weight 8: accelerated EM vs plain EM")
    p_g, spec, pairs, groups = make_instance(256, 1000, 20, 100, 3, args.seed, f64, dev)
    print("   ", describe(p_g, pairs, groups))
    kw = {"spec_weights": [8.0] * len(groups), "max_iter": 5000}
    t_plain, plain = bench_em(p_g, spec, pairs, groups, args.repeats, dev, accelerate=False, **kw)
    t_fast, fast = bench_em(p_g, spec, pairs, groups, args.repeats, dev, **kw)
    weighted = {"spec_weights": kw["spec_weights"]}
    f_plain = objective(plain.q, p_g, spec, pairs, groups, **weighted)
    f_fast = objective(fast.q, p_g, spec, pairs, groups, **weighted)
    print(
        f"    plain EM   : {t_plain * 1e3:9.1f} ms  {plain.n_iter} iterations, "
        f"converged={plain.converged}\n"
        f"    accelerated: {t_fast * 1e3:9.1f} ms  {fast.n_iter} iterations, "
        f"converged={fast.converged}; time plain / accelerated = {t_plain / t_fast:.1f}x, "
        f"max |q difference| {(fast.q - plain.q).abs().max():.1e}, "
        f"mean objective {f_plain.mean():.10f} vs {f_fast.mean():.10f}"
    )

    print("\n[2b] top-1 over disjoint groups, one specialist per example: closed form vs EM")
    p_g, spec, pairs, groups = make_instance(
        512, 1000, 20, 50, 1, args.seed, f32, dev, disjoint=True
    )
    print("   ", describe(p_g, pairs, groups))
    t_em, em = bench_em(p_g, spec, pairs, groups, args.repeats, dev)
    print(f"    EM float32 : {t_em * 1e3:9.2f} ms  {em.n_iter} iterations")
    # the ensemble's layout: one block of rows per specialist; and one padded (A, L) tensor
    blocks = list(torch.split(spec, torch.bincount(pairs.specs, minlength=20).tolist()))
    for name, probs in (("blocks", blocks), ("padded", spec)):
        combine(p_g, probs, pairs, groups)  # warm-up
        runs = [
            timed(lambda probs=probs: combine(p_g, probs, pairs, groups), dev)
            for _ in range(args.repeats)
        ]
        t_cf, q = statistics.median(t for t, _ in runs), runs[0][1]
        print(
            f"    closed form, {name:6s}: {t_cf * 1e3:6.2f} ms  (combine); time EM / closed form "
            f"= {t_em / t_cf:.1f}x, max |q difference| {(q - em.q).abs().max():.1e}"
        )

    if args.skip_large:
        return
    print("\n[3] large case: EM alone")
    p_g, spec, pairs, groups = make_instance(64, 15000, 61, 300, args.top_n, args.seed, f64, dev)
    print("   ", describe(p_g, pairs, groups))
    for dtype in (f32, f64):
        t_em, em = bench_em(p_g.to(dtype), spec.to(dtype), pairs, groups, args.repeats, dev)
        print(
            f"    EM {str(dtype)[6:]:7s} : {t_em * 1e3:9.1f} ms  {em.n_iter} iterations, "
            f"converged={em.converged}, {t_em / len(p_g) * 1e6:.0f} us per example"
        )
    bench_huge(args)


def bench_huge(args) -> None:
    k, m, size, b = args.huge_classes, args.huge_groups, args.huge_group_size, 64
    dev = args.device
    print(f"\n[4] huge case: K={k:,} classes, {m} overlapping groups of {size}, B={b}")
    gen = torch.Generator().manual_seed(args.seed)
    lists = [torch.randperm(k, generator=gen)[:size].tolist() for _ in range(m)]
    t_index, groups = timed(lambda: GroupIndex.from_lists(lists, k, device=dev), dev)
    held = sum(
        t.numel() * t.element_size()
        for t in (groups.members, groups.offsets, groups.class_groups, groups.class_offsets)
    )
    print(
        f"    group index: {t_index:.2f} s to build, {held / 2**20:.1f} MiB (a dense (M, K) "
        f"membership would be {m * k / 2**20:.0f} MiB of booleans); classes covered "
        f"{int((groups.coverage > 0).sum()):,}, max coverage {int(groups.coverage.max())}"
    )
    for top_n in sorted({1, args.top_n, 3}):
        logits = 3.0 * torch.randn(b, k, generator=gen, dtype=torch.float64)
        p_g = torch.softmax(logits, 1).to(dev)
        pairs = gate(p_g, groups, top_n=top_n)
        t_gate = statistics.median(
            timed(lambda p=p_g, n=top_n: gate(p, groups, top_n=n), dev)[0]
            for _ in range(args.repeats)
        )
        members = [groups.members[groups.offsets[s] : groups.offsets[s + 1]] for s in range(m)]
        idx = torch.stack([members[s] for s in pairs.specs.tolist()])  # (A, S)
        inside = p_g[pairs.rows].gather(1, idx)
        seen = torch.cat([inside, (1 - inside.sum(1, keepdim=True)).clamp_min(1e-12)], 1)
        noise = torch.randn(seen.shape, generator=gen, dtype=torch.float64).to(dev)
        spec = torch.softmax(seen.log() + noise, 1)
        print(
            f"    top-{top_n} gating: {t_gate * 1e3:.2f} ms per batch, {pairs.n_pairs} active "
            f"pairs ({pairs.n_pairs / b:.2f} specialists per image)"
        )
        for dtype in (torch.float32, torch.float64):
            t_em, em = bench_em(p_g.to(dtype), spec.to(dtype), pairs, groups, args.repeats, dev)
            print(
                f"      EM {str(dtype)[6:]:7s}: {t_em * 1e3:8.1f} ms per batch, "
                f"{(t_em + t_gate) / b * 1e6:.0f} us per image with gating, {em.n_iter} "
                f"iterations, converged={em.converged}"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"    peak memory of the process (ru_maxrss): {peak:.2f} GiB")


if __name__ == "__main__":
    main()
