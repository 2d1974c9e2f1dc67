"""The KL combiner of a generalist and its specialists (Hinton, Vinyals & Dean 2015, section 5).

For one input, the generalist gives ``p_g`` over all K classes and every *active* specialist m
gives ``p_m`` over its group S_m plus a dustbin that stands for every class outside S_m. The
combined distribution q over the K classes minimises

    w_g KL(p_g || q) + sum over active m of w_m KL(p_m || A_m q),

where ``A_m q`` is q seen by specialist m: q_c for c in S_m and the mass of q outside S_m for the
dustbin. Weights default to 1, which is the paper's equation. The paper minimises this by gradient
descent on the logits of q; it is a convex "grouped multinomial" problem, so the EM fixed point

    q_c <- (w_g p_g(c) + sum_{m: c in S_m} w_m p_m(c) + sum_{m: c not in S_m} w_m d_m q_c / Q_m)
           / (w_g + sum_m w_m),        d_m = p_m(dustbin),  Q_m = sum of q outside S_m,

solves it exactly, batched and in a few dozen cheap iterations (``solve_em``; the derivation is
in docs/design.md, "The combiner"). ``specialists.reference.solve_gd`` keeps the paper's method as
a reference for tests and benchmarks; the groups and the gate live in :mod:`specialists.gating`.

Representation. Only the active (example, specialist) pairs are stored, each with its |S_m|
probabilities at compact class indices: memory is O(B K + sum over pairs of |S_m|), never
O(B M K).

Typical use (the ensemble)::

    groups = GroupIndex.from_lists(group_lists, n_classes=K)
    pairs = gate(p_g, groups, top_n=1)
    outputs = [                        # softmax outputs, (n_m, |S_m| + 1) each:
        specialist_probs(m, x[rows])   # the classes of S_m in ascending order, then the dustbin
        for m, rows in enumerate(pairs.per_specialist(len(groups)))
        if len(rows)
    ]
    q = combine(p_g, outputs, pairs, groups)  # (B, K)

(Over 400 lines on purpose: the packed representation, the EM map and its SQUAREM acceleration
are one algorithm whose pieces share the packed state; split up, one derivation would be read
across files.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .gating import ActivePairs, GroupIndex

logger = logging.getLogger(__name__)

__all__ = ["CombineResult", "combine", "default_tol", "objective", "solve_em"]

# Cap on the EM ratio w_m d_m / Q_m, in units of the example's total weight D = w_g + sum w_m.
# At the optimum Q_m >= w_m d_m / D, so the ratio is <= D and the cap never binds there. It binds
# only while Q_m is vanishingly small (a generalist that puts ~0 outside S_m): EM still multiplies
# the outside mass by up to 1e6 per step to escape, and the float64 cancellation in
# "row's ratios - ratios of the groups holding c" stays ~1e-10, below any tolerance used.
_RATIO_CAP = 1e6
_MAX_STEP = 1e4  # SQUAREM's longest extrapolation, in steps of plain EM
_BACKTRACKS = 4  # tries of a shorter jump (toward plain EM) before taking plain EM
_warned_max_iter = False  # the iteration cap is a warning once per process, then debug

SpecProbs = Tensor | Sequence[Tensor]


# --------------------------------------------------------------------------------------------
# Packing the active pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Packed:
    """One combination problem restricted to the R examples that have an active specialist.

    Entries are the (pair, class in its group) slots, E = sum over pairs of |S_m|; U <= E are
    the distinct (row, class) positions they touch."""

    p_g: Tensor  # (B, K)
    w_g: float
    act_rows: Tensor  # (R,) long: rows of p_g with >= 1 active pair
    pair_row: Tensor  # (A,) long in [0, R)
    pair_w: Tensor  # (A,) float64: w_m of each pair
    dust: Tensor  # (A,) float64: d_m of each pair
    entry_pair: Tensor  # (E,) long in [0, A)
    entry_flat: Tensor  # (E,) long: position in the flattened (R, K) array
    entry_prob: Tensor  # (E,) p_g.dtype: p_m(c)
    entry_u: Tensor  # (E,) long in [0, U)
    u_flat: Tensor  # (U,) long: distinct positions in the flattened (R, K) array
    u_row: Tensor  # (U,) long in [0, R)

    @property
    def n_active_rows(self) -> int:
        return self.act_rows.numel()

    def inside_mass(self, q: Tensor) -> Tensor:
        """(A,) float64: mass of q inside each pair's group; q is (R, K)."""
        q_e = q.reshape(-1)[self.entry_flat].double()  # (E,)
        inside = torch.zeros(self.pair_row.numel(), dtype=torch.float64, device=q.device)
        return inside.index_add_(0, self.entry_pair, q_e)

    def spec_terms(self, q: Tensor, logq: Tensor) -> Tensor:
        """(R,) float64: sum over active pairs of w_m KL(p_m || A_m q); q, logq are (R, K)."""
        n_rows = q.shape[0]
        p_e = self.entry_prob.double()
        lq_e = logq.reshape(-1)[self.entry_flat].double()  # (E,)
        ent = torch.xlogy(p_e, p_e) - torch.where(p_e > 0, p_e * lq_e, torch.zeros_like(lq_e))
        per_pair = torch.zeros(self.pair_row.numel(), dtype=torch.float64, device=q.device)
        per_pair = per_pair.index_add(0, self.entry_pair, ent)  # (A,)
        total = q.double().sum(1)  # (R,)
        outside = (total[self.pair_row] - self.inside_mass(q)).clamp_min(0.0)  # (A,)
        d = self.dust
        log_out = torch.log(outside)
        per_pair = per_pair + torch.xlogy(d, d) - torch.where(d > 0, d * log_out, 0.0)
        out = torch.zeros(n_rows, dtype=torch.float64, device=q.device)
        return out.index_add(0, self.pair_row, self.pair_w * per_pair)


def _flatten_spec_probs(
    spec_probs: SpecProbs, sizes: Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(E,) probabilities inside the groups and (A,) dustbin probabilities, from either a padded
    (A, L) tensor or a sequence of (n_i, |S|+1) blocks stacked in pair order."""
    n_pairs = sizes.numel()
    if isinstance(spec_probs, Tensor):
        probs = spec_probs.to(device=device, dtype=dtype)
        if probs.dim() != 2 or probs.shape[0] != n_pairs:
            raise ValueError(
                f"spec_probs must be (A={n_pairs}, L) with L >= max |S_m| + 1, "
                f"got {tuple(probs.shape)}"
            )
        if n_pairs == 0:
            return probs.new_zeros(0), probs.new_zeros(0)
        if probs.shape[1] < int(sizes.max()) + 1:
            raise ValueError(
                f"spec_probs has {probs.shape[1]} columns; an active specialist needs "
                f"{int(sizes.max()) + 1} (|S_m| classes then the dustbin)"
            )
        cols = torch.arange(probs.shape[1], device=device)
        inside = probs[cols[None, :] < sizes[:, None]]  # (E,) row-major: pair by pair
        dust = probs.gather(1, sizes[:, None]).squeeze(1)  # (A,)
        return inside, dust
    blocks = [torch.as_tensor(b).to(device=device, dtype=dtype) for b in spec_probs]
    if any(b.dim() != 2 for b in blocks):
        raise ValueError("each block of spec_probs must be 2-D (n_rows, |S_m| + 1)")
    blocks = [b for b in blocks if b.shape[0] > 0]
    n_rows = sum(b.shape[0] for b in blocks)
    if n_rows != n_pairs:
        raise ValueError(f"spec_probs blocks hold {n_rows} rows for {n_pairs} active pairs")
    if n_pairs == 0:
        empty = torch.zeros(0, dtype=dtype, device=device)
        return empty, empty
    widths = torch.tensor([b.shape[1] for b in blocks], device=device)
    counts = torch.tensor([b.shape[0] for b in blocks], device=device)
    if bool((torch.repeat_interleave(widths, counts) != sizes + 1).any()):
        raise ValueError(
            "a spec_probs block's width is not |S_m| + 1 for the specialist of its pairs "
            "(blocks must follow pair order, as pairs.per_specialist() gives it)"
        )
    inside = torch.cat([b[:, :-1].reshape(-1) for b in blocks])
    dust = torch.cat([b[:, -1] for b in blocks])
    return inside, dust


class _Entries(NamedTuple):
    """The active pairs unpacked: each pair's example, weight and dustbin probability, and one
    entry per (pair, class of its group) with that class and the specialist's probability."""

    rows: Tensor  # (A,) long: the example of each pair
    pair_w: Tensor  # (A,) float64
    dust: Tensor  # (A,) float64
    entry_pair: Tensor  # (E,) long in [0, A)
    entry_class: Tensor  # (E,) long in [0, K)
    entry_prob: Tensor  # (E,) p_g.dtype


def _entries(
    p_g: Tensor,
    spec_probs: SpecProbs,
    pairs: ActivePairs,
    groups: GroupIndex,
    spec_weights: Tensor | Sequence[float] | None,
    generalist_weight: float,
) -> _Entries:
    """The inputs of ``combine``, checked and unpacked."""
    if p_g.dim() != 2 or p_g.shape[1] != groups.n_classes:
        raise ValueError(f"p_g must be (B, {groups.n_classes}), got {tuple(p_g.shape)}")
    if not p_g.is_floating_point():
        raise ValueError(f"p_g must be a floating-point tensor, got {p_g.dtype}")
    if not generalist_weight > 0:
        raise ValueError(f"generalist_weight must be positive, got {generalist_weight}")
    device, dtype = p_g.device, p_g.dtype
    n_rows = p_g.shape[0]
    groups = groups.to(device)
    rows = pairs.rows.to(device=device, dtype=torch.long)
    specs = pairs.specs.to(device=device, dtype=torch.long)
    if rows.shape != specs.shape or rows.dim() != 1:
        raise ValueError("pairs.rows and pairs.specs must be 1-D and of equal length")
    if rows.numel() and (
        int(rows.min()) < 0
        or int(rows.max()) >= n_rows
        or int(specs.min()) < 0
        or int(specs.max()) >= len(groups)
    ):
        raise ValueError(f"a pair is out of range (B={n_rows}, M={len(groups)})")

    if spec_weights is None:
        weights = torch.ones(len(groups), dtype=torch.float64, device=device)
    else:
        weights = torch.as_tensor(spec_weights, dtype=torch.float64).to(device)
        if weights.shape != (len(groups),):
            raise ValueError(
                f"spec_weights must have one weight per group ({len(groups)}), "
                f"got shape {tuple(weights.shape)}"
            )
        if bool((weights < 0).any()):
            raise ValueError("spec_weights must be non-negative")

    sizes = groups.sizes[specs]  # (A,)
    inside, dust = _flatten_spec_probs(spec_probs, sizes, dtype, device)
    n_pairs = rows.numel()
    entry_pair = torch.repeat_interleave(torch.arange(n_pairs, device=device), sizes)  # (E,)
    starts = torch.cumsum(sizes, 0) - sizes  # (A,)
    local = torch.arange(entry_pair.numel(), device=device) - starts[entry_pair]  # (E,)
    entry_class = groups.members[groups.offsets[specs][entry_pair] + local]  # (E,)
    return _Entries(rows, weights[specs], dust.double(), entry_pair, entry_class, inside)


def _packed(p_g: Tensor, w_g: float, e: _Entries, keep: Tensor | None = None) -> _Packed:
    """The problem packed for EM, restricted to the pairs ``keep`` (a mask; default all)."""
    if keep is not None:
        index = torch.full_like(keep, -1, dtype=torch.long)
        index[keep] = torch.arange(int(keep.sum()), device=keep.device)
        on = keep[e.entry_pair]
        e = _Entries(
            e.rows[keep],
            e.pair_w[keep],
            e.dust[keep],
            index[e.entry_pair[on]],
            e.entry_class[on],
            e.entry_prob[on],
        )
    n_classes = p_g.shape[1]
    act_rows, pair_row = torch.unique(e.rows, return_inverse=True)  # (R,), (A,)
    entry_flat = pair_row[e.entry_pair] * n_classes + e.entry_class  # (E,)
    u_flat, entry_u = torch.unique(entry_flat, return_inverse=True)  # (U,), (E,)
    return _Packed(
        p_g=p_g,
        w_g=float(w_g),
        act_rows=act_rows,
        pair_row=pair_row,
        pair_w=e.pair_w,
        dust=e.dust,
        entry_pair=e.entry_pair,
        entry_flat=entry_flat,
        entry_prob=e.entry_prob,
        entry_u=entry_u,
        u_flat=u_flat,
        u_row=u_flat // n_classes,
    )


def pack(
    p_g: Tensor,
    spec_probs: SpecProbs,
    pairs: ActivePairs,
    groups: GroupIndex,
    spec_weights: Tensor | Sequence[float] | None,
    generalist_weight: float,
) -> _Packed:
    e = _entries(p_g, spec_probs, pairs, groups, spec_weights, generalist_weight)
    return _packed(p_g, generalist_weight, e)


def _scaled(p: Tensor, factor: Tensor) -> Tensor:
    """Rows of ``p`` times ``factor`` (float64, one per row), in ``p``'s dtype. A factor beyond
    that dtype's range (a generalist so sure that its mass outside a group is denormal) is
    applied in float64, so the products, at most 1, stay finite and 0 stays 0."""
    if float(factor.max()) < torch.finfo(p.dtype).max:
        return p.mul_(factor.to(p.dtype)[:, None])
    return p.copy_(p.double().mul_(factor[:, None]))


def _outside_factor(w_g: float, w: Tensor | float, d: Tensor, outside: Tensor) -> Tensor:
    """The closed form's factor on p_g outside the group: the mass there, (w_g G + w d) / D,
    over p_g's own, G (D = w_g + w)."""
    return (w_g * outside + w * d) / ((w_g + w) * outside)


def _has_outside(outside: Tensor, total: Tensor) -> Tensor:
    """Whether the generalist's mass outside a group is there, not rounding noise (a group of
    every class leaves none: its closed form would not hold)."""
    return outside > 1e-12 * total


def _one_specialist(p_g: Tensor, w_g: float, e: _Entries) -> tuple[Tensor, Tensor]:
    """q (B, K) in p_g's dtype, solved in closed form for the examples with exactly one active
    specialist (top-1 gating over disjoint groups), p_g elsewhere, and the mask of the pairs
    so solved.

    With one specialist m the objective separates: inside S_m each class gets
    q_c = (w_g p_g(c) + w_m p_m(c)) / D, and the mass outside, (w_g G + w_m d_m) / D with
    G = p_g's mass outside S_m, is shared among those classes in p_g's proportions (D = w_g +
    w_m). This is EM's fixed point, reached without iterating. A generalist with no mass at all
    outside S_m (G = 0) has no attained optimum: such pairs are left to EM and its cap.

    The sums and the group's entries are computed in float64; the classes outside are p_g
    times one factor per example, a single pass over (B, K) in p_g's own precision."""
    n_rows, n_pairs = p_g.shape[0], e.rows.numel()
    if n_pairs == 0:
        return p_g.clone(), torch.zeros(0, dtype=torch.bool, device=p_g.device)
    pg_e = p_g[e.rows[e.entry_pair], e.entry_class].double()  # (E,) p_g inside each group
    inside = torch.zeros(n_pairs, dtype=torch.float64, device=p_g.device)
    inside.index_add_(0, e.entry_pair, pg_e)
    total = p_g.sum(1, dtype=torch.float64)[e.rows]
    outside = total - inside  # (A,)
    alone = torch.bincount(e.rows, minlength=n_rows)[e.rows] == 1
    solved = alone & _has_outside(outside, total)
    w, d = e.pair_w, e.dust
    denom = w_g + w  # (A,)
    scale = torch.ones(n_rows, dtype=torch.float64, device=p_g.device)
    factor = _outside_factor(w_g, w, d, outside.clamp_min(1e-300))
    scale[e.rows[solved]] = factor[solved]
    q = _scaled(p_g.clone(), scale)
    value = (w_g * pg_e + w[e.entry_pair] * e.entry_prob.double()) / denom[e.entry_pair]
    on = solved[e.entry_pair]
    q[e.rows[e.entry_pair[on]], e.entry_class[on]] = value[on].to(p_g.dtype)
    return q, solved


def _one_specialist_blocks(
    p_g: Tensor,
    blocks: Sequence[Tensor],
    pairs: ActivePairs,
    groups: GroupIndex,
    spec_weights: Tensor | Sequence[float] | None,
    w_g: float,
) -> Tensor | None:
    """``_one_specialist`` for the ensemble's layout: each block holds rows of one specialist
    (as ``pairs.per_specialist`` splits them), every example has at most one pair, and every
    generalist row puts mass outside its group. None when any of that does not hold
    (``combine`` then takes the general path).

    The rows are copied once in pair order, so each block is a contiguous slice whose group's
    columns are read and written by one small column index. A row's mass outside its group,
    G, is summed directly over the classes outside (the group's columns zeroed first): a sum
    of positive terms, with no cancellation, so accurate to a few roundings of p_g however
    small G is."""
    rows = pairs.rows
    n_rows = len(p_g)
    if rows.numel() == 0 or n_rows == 0:
        return None
    if int(torch.bincount(rows, minlength=n_rows).max()) > 1:
        return None
    weights = (
        torch.ones(len(groups), dtype=torch.float64)
        if spec_weights is None
        else torch.as_tensor(spec_weights, dtype=torch.float64).cpu()
    )
    if weights.shape != (len(groups),) or bool((weights < 0).any()):
        return None  # the general path raises the clear error
    blocks = [b for b in blocks if len(b)]
    lengths = torch.tensor([len(b) for b in blocks], dtype=torch.long)
    if int(lengths.sum()) != rows.numel():
        return None
    specs = pairs.specs
    first = specs[lengths.cumsum(0).to(specs.device) - lengths.to(specs.device)]
    if not torch.equal(torch.repeat_interleave(first, lengths.to(specs.device)), specs):
        return None  # a block that mixes specialists
    device = p_g.device
    rows = rows.to(device)
    members, offsets = groups.members.to(device), groups.offsets.tolist()
    out = p_g.index_select(0, rows)  # (A, K) the rows in pair order
    start = 0
    for block, m in zip(blocks, first.tolist()):
        n = len(block)
        if block.shape[1] != offsets[m + 1] - offsets[m] + 1:
            return None
        cls = members[offsets[m] : offsets[m + 1]]
        pg = out[start : start + n]  # (n, K) a view
        pg_in = pg.index_select(1, cls)  # (n, |S|)
        outside = pg.index_fill_(1, cls, 0).sum(1).double()  # (n,) G
        w = float(weights[m])
        dust = block[:, -1].to(device=device, dtype=torch.float64)
        factor = _outside_factor(w_g, w, dust, outside)
        # G = 0 (a group of every class leaves nothing outside) or so small that the factor
        # overflows even float64 (a float64 p_g with a denormal G): no closed form here
        if not bool(torch.isfinite(factor).all()):
            return None
        _scaled(pg, factor)
        inside = pg_in.mul_(w_g / (w_g + w)).add_(block[:, :-1].to(pg_in), alpha=w / (w_g + w))
        pg.index_copy_(1, cls, inside)
        start += n
    if rows.numel() == n_rows:  # every row has its pair: rows is a permutation
        return out.index_select(0, torch.argsort(rows))
    return p_g.clone().index_copy_(0, rows, out)


# --------------------------------------------------------------------------------------------
# EM solver, objective, gradient-descent reference
# --------------------------------------------------------------------------------------------


class CombineResult(NamedTuple):
    """q (B, K) in p_g's dtype; n_iter: EM updates done (the most any example needed, 0 when
    no pair is active); converged: every example's last change was <= tol."""

    q: Tensor
    n_iter: int
    converged: bool


def default_tol(dtype: torch.dtype) -> float:
    """Stopping tolerance on the max abs change of q: near the rounding noise of the dtype."""
    return 1e-7 if torch.finfo(dtype).eps > 1e-10 else 1e-9


def _em(packed: _Packed, tol: float, max_iter: int, accelerate: bool = True) -> CombineResult:
    """EM on the touched positions only.

    For an example b, call *touched* the classes in at least one of its active groups (the U
    positions) and *free* the rest. A free class gets no specialist probability and the same
    dustbin factor as every other free class, so from q = p_g it stays q_c = alpha_b p_g(c): the
    free classes are carried by one scale alpha_b per example. An iteration then costs
    O(E + U + R) instead of O(R K), and runs in float64 whatever the input dtype.

    ``accelerate``: SQUAREM (Varadhan & Roland 2008), per example: from two EM steps r = F(q) - q
    and v = F(F(q)) - 2 F(q) + q, jump to q - 2 s r + s^2 v with s = -|r| / |v| (s = -1 is two
    plain EM steps), then take one EM step from there. A jump that leaves the simplex is
    shortened toward s = -1; one that ends with a higher objective than the two plain steps is
    not taken, so the objective never rises and the fixed point is EM's. Where EM crawls (a
    heavily weighted specialist, or a confident generalist against a specialist's large
    dustbin), it gets there in several times fewer steps, and much closer to the optimum at a
    given tolerance."""
    p_g = packed.p_g
    q_full = p_g.clone()
    if packed.n_active_rows == 0:
        return CombineResult(q_full, 0, True)
    f64, device = torch.float64, p_g.device
    n_rows, n_pairs, n_u = packed.n_active_rows, packed.pair_row.numel(), packed.u_flat.numel()
    u_row, pair_row, entry_pair, entry_u = (
        packed.u_row,
        packed.pair_row,
        packed.entry_pair,
        packed.entry_u,
    )

    def per_row(values: Tensor) -> Tensor:  # (U,) -> (R,) sums
        return torch.zeros(n_rows, dtype=f64, device=device).index_add_(0, u_row, values)

    free = p_g[packed.act_rows].contiguous()  # (R, K) a copy: p_g on the free classes below
    pg_u = free.view(-1)[packed.u_flat].double()  # (U,)
    w_e = packed.pair_w[entry_pair] * packed.entry_prob.double()  # (E,)
    base_u = packed.w_g * pg_u
    base_u = base_u.index_add(0, entry_u, w_e)  # (U,) w_g p_g(c) + sum_{c in S_m} w_m p_m(c)
    free.view(-1)[packed.u_flat] = 0
    free_pg = free.sum(1, dtype=f64)  # (R,) summed directly: no cancellation
    free_pg = torch.where(free_pg > 1e-300, free_pg, 0.0)  # alpha stays finite
    free_max = free.amax(1).double()  # (R,) largest free p_g(c): bounds their changes
    free_sq = free.double().pow(2).sum(1)  # (R,) a change of alpha moves q by this much, squared
    wd = packed.pair_w * packed.dust  # (A,) w_m d_m
    # A group of all K classes leaves its dustbin nowhere to go: its term is constant in q.
    wd = torch.where(torch.bincount(entry_pair, minlength=n_pairs) == p_g.shape[1], 0.0, wd)
    total_w = torch.full((n_rows,), packed.w_g, dtype=f64, device=device)
    total_w.index_add_(0, pair_row, packed.pair_w)  # (R,) D = w_g + sum w_m
    ratio_cap = _RATIO_CAP * total_w.index_select(0, pair_row)  # (A,)

    def outside_mass(q_u: Tensor, alpha: Tensor) -> Tensor:  # (A,) Q_m: q's mass outside S_m
        inside = torch.zeros(n_pairs, dtype=f64, device=device)
        inside.index_add_(0, entry_pair, q_u.index_select(0, entry_u))
        row_mass = alpha * free_pg + per_row(q_u)  # (R,)
        return (row_mass.index_select(0, pair_row) - inside).clamp_min(1e-300)

    def em_map(q_u: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One EM update of every active row: (U,), (R,) -> (U,), (R,), and (R,) bool: the
        rows where a ratio hit its cap, hence still far from the optimum."""
        ratio = torch.minimum(wd / outside_mass(q_u, alpha), ratio_cap)  # (A,) w_m d_m / Q_m
        capped = torch.zeros(n_rows, dtype=torch.bool, device=device)
        capped[pair_row[ratio >= ratio_cap]] = True  # (R,)
        ratio_row = torch.zeros(n_rows, dtype=f64, device=device)
        ratio_row.index_add_(0, pair_row, ratio)  # (R,)
        ratio_in = torch.zeros(n_u, dtype=f64, device=device)
        ratio_in.index_add_(0, entry_u, ratio.index_select(0, entry_pair))  # (U,)
        # Dustbin share of class c: q_c times the ratios of the row's pairs whose group misses c.
        coef = (ratio_row.index_select(0, u_row) - ratio_in).clamp_min(0.0)  # (U,)
        new_u = base_u + q_u * coef
        new_alpha = packed.w_g + alpha * ratio_row  # (R,) free classes: p_g(c) times this
        new_alpha = torch.where(free_pg > 0, new_alpha, 0.0)  # no free mass: keep it finite
        norm = new_alpha * free_pg + per_row(new_u)  # (R,) = w_g + sum w_m, up to rounding
        return new_u / norm.index_select(0, u_row), new_alpha / norm, capped

    def row_change(d_u: Tensor, d_alpha: Tensor) -> Tensor:  # (R,) max abs change of q
        change = torch.zeros(n_rows, dtype=f64, device=device)
        change.scatter_reduce_(0, u_row, d_u.abs(), reduce="amax")
        return torch.maximum(change, d_alpha.abs() * free_max)

    def row_sq(d_u: Tensor, d_alpha: Tensor) -> Tensor:  # (R,) squared norm of a step of q
        return per_row(d_u * d_u) + d_alpha * d_alpha * free_sq

    entry_row = pair_row.index_select(0, entry_pair)  # (E,)
    has_free = free_pg > 0

    def merit(q_u: Tensor, alpha: Tensor) -> Tensor:
        """(R,) the objective of each example, up to a constant of the example."""
        lq = torch.log(q_u.clamp_min(1e-300))
        log_alpha = torch.where(has_free, torch.log(alpha.clamp_min(1e-300)), 0.0)
        f = packed.w_g * (per_row(pg_u * lq) + free_pg * log_alpha)
        f.index_add_(0, entry_row, w_e * lq.index_select(0, entry_u))
        f.index_add_(0, pair_row, wd * torch.log(outside_mass(q_u, alpha)))
        return -f

    q_u, alpha = pg_u, torch.ones(n_rows, dtype=f64, device=device)  # start at q = p_g
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    n_iter = 0
    while n_iter < max_iter:
        u1, a1, capped = em_map(q_u, alpha)
        n_iter += 1
        change = row_change(u1 - q_u, a1 - alpha)
        new_u, new_alpha = u1, a1
        if accelerate and n_iter + 2 <= max_iter:
            # SQUAREM: two EM steps give r and v; extrapolate along them, then one more EM step.
            u2, a2, capped2 = em_map(u1, a1)
            r_u, r_a, v_u, v_a = u1 - q_u, a1 - alpha, u2 - 2 * u1 + q_u, a2 - 2 * a1 + alpha
            step = -torch.sqrt(row_sq(r_u, r_a) / row_sq(v_u, v_a).clamp_min(1e-300))
            step = torch.nan_to_num(step, nan=-1.0).clamp(-_MAX_STEP, -1.0)  # -1: plain EM
            x_u, x_a = u2, a2
            todo = ~(capped | capped2)
            for _ in range(_BACKTRACKS):  # a jump that leaves the simplex: a quarter as long
                s_u = step.index_select(0, u_row)
                y_u = q_u - 2 * s_u * r_u + s_u * s_u * v_u
                y_a = alpha - 2 * step * r_a + step * step * v_a
                bad = torch.zeros(n_rows, dtype=torch.bool, device=device)
                bad[u_row[~(y_u >= 0)]] = True  # (NaN counts as outside)
                ok = todo & ~bad & (y_a >= 0)
                x_u = torch.where(ok.index_select(0, u_row), y_u, x_u)
                x_a = torch.where(ok, y_a, x_a)
                todo &= ~ok
                if not bool(todo.any()):
                    break
                step = -1.0 + (step + 1.0) / 4
            u3, a3, capped3 = em_map(x_u, x_a)
            n_iter += 2
            change2, change3 = row_change(u2 - u1, a2 - a1), row_change(u3 - x_u, a3 - x_a)
            # A row settled by the first step keeps it; a jump that ends with a higher objective
            # than plain EM's two steps is not taken (so the objective still never rises).
            settled = (change <= tol) & ~capped
            take = ~settled & (merit(u3, a3) <= merit(u2, a2))
            keep2 = ~settled & ~take
            new_u = torch.where(take.index_select(0, u_row), u3, new_u)
            new_u = torch.where(keep2.index_select(0, u_row), u2, new_u)
            new_alpha = torch.where(take, a3, torch.where(keep2, a2, new_alpha))
            change = torch.where(take, change3, torch.where(keep2, change2, change))
            capped = torch.where(take, capped3, torch.where(keep2, capped2, capped))
        # Finished examples stay put, so an example's answer does not depend on its batch.
        q_u = torch.where(done.index_select(0, u_row), q_u, new_u)
        alpha = torch.where(done, alpha, new_alpha)
        done |= (change <= tol) & ~capped
        if bool(done.all()):
            break
    converged = bool(done.all())
    if not converged:
        # A warning once per process (a slow tail at high specialist weights recurs in every
        # batch of an evaluation), then debug; spent only when shown, since calibration
        # silences this logger for its grid.
        global _warned_max_iter
        left = float(change[~done].max())
        loud = not _warned_max_iter and logger.isEnabledFor(logging.WARNING)
        _warned_max_iter = _warned_max_iter or loud
        level = logging.WARNING if loud else logging.DEBUG
        logger.log(
            level,
            "EM combiner stopped at max_iter=%d with %d of %d examples above tol=%g "
            "(largest remaining change %.1e)",
            max_iter,
            int((~done).sum()),
            n_rows,
            tol,
            left,
        )
    q_rows = _scaled(free, alpha)  # (R, K) free classes: alpha_b p_g(c)
    q_rows.view(-1)[packed.u_flat] = q_u.to(p_g.dtype)
    q_full[packed.act_rows] = q_rows
    return CombineResult(q_full, n_iter, converged)


def solve_em(
    p_g: Tensor,
    spec_probs: SpecProbs,
    pairs: ActivePairs,
    groups: GroupIndex,
    *,
    spec_weights: Tensor | Sequence[float] | None = None,
    generalist_weight: float = 1.0,
    tol: float | None = None,
    max_iter: int = 500,
    accelerate: bool = True,
) -> CombineResult:
    """Minimise w_g KL(p_g || q) + sum over active pairs of w_m KL(p_m || A_m q) for every
    example of the batch by the EM fixed point, started at q = p_g.

    Inputs (see ``combine``). Each example stops when the max abs change of its q is <= tol
    (default ``default_tol(p_g.dtype)``), so its result does not depend on the rest of the
    batch; examples with no active pair get exactly p_g. Zeros of p_g outside every active
    group stay zero (a fixed point of EM), so pass softmax outputs, which are positive.
    Iterates in float64 on the classes of the active groups only; returns p_g's dtype.
    ``accelerate`` (default) takes SQUAREM jumps between EM steps (see ``_em``); False runs
    plain EM, for comparison. ``max_iter`` counts EM steps either way."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    packed = pack(p_g, spec_probs, pairs, groups, spec_weights, generalist_weight)
    with torch.no_grad():
        tol = default_tol(p_g.dtype) if tol is None else tol
        return _em(packed, tol, max_iter, accelerate)


def combine(
    p_g: Tensor,
    spec_probs: SpecProbs,
    pairs: ActivePairs,
    groups: GroupIndex,
    *,
    spec_weights: Tensor | Sequence[float] | None = None,
    generalist_weight: float = 1.0,
    tol: float | None = None,
    max_iter: int = 500,
) -> Tensor:
    """The combined distribution q (B, K) of a generalist and its active specialists.

    - p_g: (B, K) generalist probabilities (softmax outputs; float32 or float64, any device).
    - pairs: the active (row, specialist) pairs, usually ``gate(p_g, groups, top_n)``.
    - spec_probs: for each pair a, in pair order, specialist ``pairs.specs[a]``'s distribution
      on example ``pairs.rows[a]``: its |S_m| class probabilities in the ascending class order of
      ``groups.group(m)``, then the dustbin probability. Either
        * a sequence of 2-D blocks (n_i, |S_m| + 1) stacked along dim 0 in pair order, e.g. the
          outputs of each specialist on ``x[rows_m]`` for ``rows_m in pairs.per_specialist(M)``
          (skipping idle specialists), or
        * one (A, L) tensor with L >= max |S_m| + 1, row a padded after its dustbin (columns
          past |S_m| are ignored) - with equal-size groups simply the stacked outputs.
    - spec_weights: (M,) non-negative w_m (default 1); generalist_weight: w_g > 0 (default 1).
    Rows with no active pair come back as exactly p_g. A row with exactly one active
    specialist (every row, under top-1 gating over disjoint groups) is solved in closed form,
    without iterating; rows with several by EM (``solve_em``). Each row's q depends on its
    own inputs only, up to rounding in the last bits (how the batch is laid out decides
    where the arithmetic runs in float64)."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    with torch.no_grad():
        if not isinstance(spec_probs, Tensor) and p_g.dim() == 2 and generalist_weight > 0:
            q = _one_specialist_blocks(
                p_g, spec_probs, pairs, groups, spec_weights, generalist_weight
            )
            if q is not None:
                return q
        e = _entries(p_g, spec_probs, pairs, groups, spec_weights, generalist_weight)
        q, solved = _one_specialist(p_g, generalist_weight, e)
        if not bool(solved.all()):  # examples with several specialists: EM
            tol = default_tol(p_g.dtype) if tol is None else tol
            packed = _packed(p_g, generalist_weight, e, keep=~solved)
            q[packed.act_rows] = _em(packed, tol, max_iter, True).q[packed.act_rows]
        return q


def objective(
    q: Tensor,
    p_g: Tensor,
    spec_probs: SpecProbs,
    pairs: ActivePairs,
    groups: GroupIndex,
    *,
    spec_weights: Tensor | Sequence[float] | None = None,
    generalist_weight: float = 1.0,
) -> Tensor:
    """(B,) float64: w_g KL(p_g || q) + sum over active pairs of w_m KL(p_m || A_m q) per
    example, computed in float64 (+inf where q is 0 on a class the models give mass to)."""
    packed = pack(p_g, spec_probs, pairs, groups, spec_weights, generalist_weight)
    if q.shape != p_g.shape:
        raise ValueError(f"q must have p_g's shape {tuple(p_g.shape)}, got {tuple(q.shape)}")
    q64 = q.to(device=p_g.device, dtype=torch.float64)
    logq = torch.log(q64)
    return objective_of_packed(packed, q64, logq)


def objective_of_packed(packed: _Packed, q64: Tensor, logq: Tensor) -> Tensor:
    pg = packed.p_g.double()
    zero = torch.zeros((), dtype=torch.float64, device=pg.device)
    gen = packed.w_g * (torch.xlogy(pg, pg) - torch.where(pg > 0, pg * logq, zero)).sum(1)
    if packed.n_active_rows == 0:
        return gen
    rows = packed.act_rows
    return gen.index_add(0, rows, packed.spec_terms(q64[rows], logq[rows]))
