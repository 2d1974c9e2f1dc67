"""The paper's way to combine: gradient descent on the logits of q. A reference, not a runtime path.

The combiner (:mod:`specialists.combiner`) reaches the same optimum by an EM fixed point, much
faster; the tests use this solver to prove that, and ``benchmarks/bench_combiner.py`` to measure
the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .combiner import SpecProbs, objective_of_packed, pack
from .gating import ActivePairs, GroupIndex

__all__ = ["GDResult", "solve_gd"]


class GDResult(NamedTuple):
    """q (B, K) in p_g's dtype, the optimiser steps taken, and the (B,) float64 objective."""

    q: Tensor
    n_steps: int
    objective: Tensor


def solve_gd(
    p_g: Tensor,
    spec_probs: SpecProbs,
    pairs: ActivePairs,
    groups: GroupIndex,
    *,
    spec_weights: Tensor | Sequence[float] | None = None,
    generalist_weight: float = 1.0,
    method: str = "adam",
    max_steps: int = 1000,
    lr: float | None = None,
    lr_decay: float = 0.995,
    target: Tensor | None = None,
    rtol: float = 1e-6,
    check_every: int = 10,
) -> GDResult:
    """Reference solver, the paper's method: descend the summed objective on the logits z of
    q = softmax(z), in float64, from z = log p_g. Slow; for tests and benchmarks.

    ``method`` "adam" (default: lr 0.3, multiplied by ``lr_decay`` every step) or "lbfgs"
    (lr 1, strong-Wolfe line search on the whole batch). With ``target`` (B,), stop as soon as
    every example's objective is <= target + rtol |target| (checked every ``check_every``
    steps); otherwise run ``max_steps`` steps, or until L-BFGS meets its own tolerances."""
    if method not in ("lbfgs", "adam"):
        raise ValueError(f"method must be 'lbfgs' or 'adam', got {method!r}")
    packed = pack(p_g, spec_probs, pairs, groups, spec_weights, generalist_weight)
    q_full = p_g.clone()
    q64 = p_g.double()
    if packed.n_active_rows == 0:
        return GDResult(q_full, 0, objective_of_packed(packed, q64, torch.log(q64)))
    rows = packed.act_rows
    pg = q64[rows]  # (R, K)
    z = torch.log(pg.clamp_min(1e-300)).requires_grad_(True)  # (R, K)
    zero = torch.zeros((), dtype=torch.float64, device=p_g.device)
    xlogx = torch.xlogy(pg, pg).sum(1)  # (R,)
    bound = None
    if target is not None:
        tgt = target.to(device=p_g.device, dtype=torch.float64)[rows]
        bound = tgt + rtol * tgt.abs()

    def per_row(z: Tensor) -> Tensor:  # (R,) objective
        logq = torch.log_softmax(z, dim=1)
        gen = xlogx - torch.where(pg > 0, pg * logq, zero).sum(1)
        return packed.w_g * gen + packed.spec_terms(logq.exp(), logq)

    def reached() -> bool:
        if bound is None:
            return False
        with torch.no_grad():
            return bool((per_row(z) <= bound).all())

    n_steps = 0
    if method == "lbfgs":
        chunk = check_every if bound is not None else max_steps
        opt = torch.optim.LBFGS(
            [z],
            lr=1.0 if lr is None else lr,
            max_iter=chunk,
            max_eval=25 * chunk,  # let the step count, not the line search, bound a chunk
            history_size=50,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = per_row(z).sum()
            loss.backward()
            return loss

        while n_steps < max_steps:
            before = opt.state[z].get("n_iter", 0)
            opt.step(closure)
            taken = opt.state[z]["n_iter"] - before
            n_steps += taken
            if reached() or taken < chunk:
                break  # target met, or L-BFGS stopped on its own tolerances
    else:
        opt = torch.optim.Adam([z], lr=0.3 if lr is None else lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
        while n_steps < max_steps:
            opt.zero_grad()
            per_row(z).sum().backward()
            opt.step()
            sched.step()
            n_steps += 1
            if n_steps % check_every == 0 and reached():
                break
    with torch.no_grad():
        q_full[rows] = torch.softmax(z, dim=1).to(p_g.dtype)
        obj = objective_of_packed(packed, q64, torch.log(q64))  # rows without a pair: q = p_g
        obj[rows] = per_row(z)
    return GDResult(q_full, n_steps, obj)
