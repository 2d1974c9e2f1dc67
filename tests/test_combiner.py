"""Tests of the KL combiner: gating, the EM solver against the gradient-descent reference and
against closed forms, and the input contract."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from specialists.combiner import combine, default_tol, objective, solve_em
from specialists.gating import ActivePairs, GroupIndex, gate
from specialists.reference import solve_gd

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contention on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_instance(
    seed: int,
    n_rows: int = 6,
    n_classes: int = 24,
    n_groups: int = 6,
    sizes: tuple[int, int] = (4, 9),
    top_n: int = 2,
    dtype: torch.dtype = F64,
):
    """Random overlapping groups of varied sizes (some classes in none), a peaked generalist and
    specialists with sizeable dustbin mass. spec_probs is returned padded, (A, max |S| + 1)."""
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for _ in range(n_groups):
        size = int(torch.randint(sizes[0], sizes[1] + 1, (1,), generator=gen))
        lists.append(torch.randperm(n_classes, generator=gen)[:size].tolist())
    groups = GroupIndex.from_lists(lists, n_classes)
    p_g = torch.softmax(2.0 * torch.randn(n_rows, n_classes, generator=gen, dtype=F64), 1)
    pairs = gate(p_g, groups, top_n=top_n)
    width = int(groups.sizes.max()) + 1
    spec = torch.zeros(pairs.n_pairs, width, dtype=F64)
    for a, m in enumerate(pairs.specs.tolist()):
        size = len(lists[m])
        spec[a, : size + 1] = torch.softmax(torch.randn(size + 1, generator=gen, dtype=F64), 0)
    return p_g.to(dtype), spec.to(dtype), pairs, groups


def rel_gap(f: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (f - ref) / ref.abs().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Groups and gating
# ---------------------------------------------------------------------------------------------


def test_group_index_from_lists():
    groups = GroupIndex.from_lists([[3, 1], [1, 2, 4], [0]], n_classes=6)
    assert len(groups) == groups.n_groups == 3
    assert groups.to_lists() == [[1, 3], [1, 2, 4], [0]]
    assert groups.sizes.tolist() == [2, 3, 1]
    assert groups.coverage.tolist() == [1, 2, 1, 1, 1, 0]
    assert groups.membership[1].tolist() == [False, True, True, False, True, False]
    for bad in ([[0, 0]], [[]], [[6]], [[-1]]):
        with pytest.raises(ValueError):
            GroupIndex.from_lists(bad, n_classes=6)


@pytest.mark.parametrize("top_n", [1, 3, 7])
@pytest.mark.parametrize("cascade", [False, True])
def test_sparse_gate_matches_the_dense_membership_rule(top_n, cascade):
    """Gating through the groups of each class gives exactly the pairs of the dense rule
    "group m holds one of b's top-n classes", sorted by specialist, then row."""
    gen = torch.Generator().manual_seed(top_n)
    k = 200
    lists = [
        torch.randperm(k, generator=gen)[: int(torch.randint(1, 20, (1,), generator=gen))].tolist()
        for _ in range(30)
    ]
    groups = GroupIndex.from_lists(lists, k)
    p = torch.softmax(2 * torch.randn(64, k, generator=gen, dtype=F64), 1)
    # the cascade's threshold at the median top probability: half the rows gate nothing
    confidence = float(p.max(1).values.median()) if cascade else None
    active = groups.membership[:, p.topk(top_n, 1).indices].any(2)  # (M, B), the dense rule
    if confidence is not None:
        active &= (p.max(1).values < confidence)[None, :]
    specs, rows = active.nonzero(as_tuple=True)
    pairs = gate(p, groups, top_n, confidence)
    assert len(rows) > 0
    assert torch.equal(pairs.rows, rows) and torch.equal(pairs.specs, specs)


def test_group_index_at_100000_classes_is_sparse():
    """300 overlapping groups of 600 over 100,000 classes: the index holds O(K + sum |S|)
    integers (a dense membership would be 30 MB of booleans) and gates a batch."""
    gen = torch.Generator().manual_seed(0)
    k, m, size = 100_000, 300, 600
    lists = [torch.randperm(k, generator=gen)[:size].tolist() for _ in range(m)]
    groups = GroupIndex.from_lists(lists, k)
    held = sum(
        t.numel()
        for t in (groups.members, groups.offsets, groups.class_groups, groups.class_offsets)
    )
    assert held == 2 * m * size + m + 1 + k + 1
    assert int(groups.coverage.sum()) == m * size
    p = torch.softmax(torch.randn(64, k, generator=gen), 1)
    pairs = gate(p, groups, top_n=2)
    groups_of: dict[int, set[int]] = {}
    for m_, classes in enumerate(lists):
        for c in classes:
            groups_of.setdefault(c, set()).add(m_)
    expected = sorted(  # the rule, pair by pair: (specialist, row) of every top class's groups
        (m_, row)
        for row, top in enumerate(p.topk(2, 1).indices.tolist())
        for m_ in set().union(*(groups_of.get(c, set()) for c in top))
    )
    assert list(zip(pairs.specs.tolist(), pairs.rows.tolist(), strict=True)) == expected


TOY_GROUPS = [[0, 1, 2], [2, 3], [4], [1, 5]]
TOY_P = torch.tensor(
    [
        [0.40, 0.05, 0.30, 0.05, 0.15, 0.05],  # ranking 0, 2, 4, ...
        [0.05, 0.05, 0.05, 0.10, 0.50, 0.25],  # ranking 4, 5, 3, ...
        [0.05, 0.05, 0.05, 0.05, 0.10, 0.70],  # ranking 5, 4, ...
    ],
    dtype=F64,
)


@pytest.mark.parametrize(
    ("top_n", "expected"),
    [
        # (row, spec) pairs worked out by hand from TOY_GROUPS and the rankings above
        (1, {(0, 0), (1, 2), (2, 3)}),
        (2, {(0, 0), (0, 1), (1, 2), (1, 3), (2, 3), (2, 2)}),
        (3, {(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 1), (2, 3), (2, 2), (2, 0), (2, 1)}),
    ],
)
def test_gate_toy(top_n, expected):
    # at n=3 row 2 would end in a 4-way tie at 0.05: break it (its ranking becomes 5, 4, 2)
    groups = GroupIndex.from_lists(TOY_GROUPS, 6)
    p = TOY_P.clone()
    if top_n == 3:
        p[2] = torch.tensor([0.04, 0.04, 0.07, 0.05, 0.10, 0.70], dtype=F64)  # ranks 5, 4, 2
    pairs = gate(p, groups, top_n=top_n)
    assert set(zip(pairs.rows.tolist(), pairs.specs.tolist())) == expected
    keys = (pairs.specs * 10 + pairs.rows).tolist()
    assert keys == sorted(keys)  # sorted by specialist, then row
    assert pairs.rows.dtype == pairs.specs.dtype == torch.long


def test_gate_rejects_bad_input():
    groups = GroupIndex.from_lists(TOY_GROUPS, 6)
    with pytest.raises(ValueError):
        gate(TOY_P[:, :5], groups)
    with pytest.raises(ValueError):
        gate(TOY_P, groups, top_n=0)


def test_per_specialist_splits_rows_in_pair_order():
    groups = GroupIndex.from_lists(TOY_GROUPS, 6)
    pairs = gate(TOY_P, groups, top_n=2)
    per = pairs.per_specialist(len(groups))
    assert [r.tolist() for r in per] == [[0], [0], [1, 2], [1, 2]]
    assert torch.equal(torch.cat(per), pairs.rows)
    shuffled = ActivePairs(pairs.rows.flip(0), pairs.specs.flip(0))
    with pytest.raises(ValueError):
        shuffled.per_specialist(len(groups))


# ---------------------------------------------------------------------------------------------
# The objective itself
# ---------------------------------------------------------------------------------------------


def test_objective_matches_a_direct_computation():
    p_g, spec, pairs, groups = random_instance(0)
    q = torch.softmax(torch.randn(p_g.shape, dtype=F64), 1)
    got = objective(q, p_g, spec, pairs, groups, spec_weights=[0.5, 1, 2, 1, 3, 1.5])
    weights = [0.5, 1, 2, 1, 3, 1.5]
    expected = [sum(p * math.log(p / r) for p, r in zip(p_g[b], q[b])) for b in range(6)]
    for a, (b, m) in enumerate(zip(pairs.rows.tolist(), pairs.specs.tolist())):
        members = groups.group(m)
        seen = q[b, members].tolist() + [1.0 - float(q[b, members].sum())]  # A_m q
        probs = spec[a, : len(members) + 1].tolist()
        expected[b] += weights[m] * sum(p * math.log(p / r) for p, r in zip(probs, seen))
    assert torch.allclose(got, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# EM against the gradient-descent reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_em_matches_gradient_descent_reference(seed):
    p_g, spec, pairs, groups = random_instance(seed)
    assert int(torch.bincount(pairs.rows).max()) >= 3  # overlapping active groups
    em = solve_em(p_g, spec, pairs, groups)
    assert em.converged
    gd = solve_gd(p_g, spec, pairs, groups, max_steps=600)
    f_em = objective(em.q, p_g, spec, pairs, groups)
    assert torch.allclose(f_em, gd.objective, rtol=1e-6, atol=1e-12)
    assert bool((f_em <= gd.objective * (1 + 1e-12) + 1e-14).all())  # EM is never worse
    assert torch.allclose(em.q, gd.q, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_weighted_em_matches_gradient_descent_reference(seed):
    p_g, spec, pairs, groups = random_instance(10 + seed)
    weights = torch.tensor([0.3, 2.0, 1.0, 0.0, 4.0, 0.7], dtype=F64)
    kw = {"spec_weights": weights, "generalist_weight": 1.7}
    em = solve_em(p_g, spec, pairs, groups, **kw)
    gd = solve_gd(p_g, spec, pairs, groups, max_steps=600, **kw)
    f_em = objective(em.q, p_g, spec, pairs, groups, **kw)
    assert torch.allclose(f_em, gd.objective, rtol=1e-6, atol=1e-12)
    assert bool((f_em <= gd.objective * (1 + 1e-12) + 1e-14).all())
    unweighted = objective(em.q, p_g, spec, pairs, groups)
    assert not torch.allclose(unweighted, f_em)  # the weights do change the problem


def test_accelerated_em_reaches_plain_em_fixed_point_in_fewer_steps():
    """SQUAREM jumps (the default) and plain EM stop at the same q; on a slow instance (sharp,
    disagreeing models under a heavy specialist weight) the jumps need far fewer EM steps."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(40, generator=gen)
    groups = GroupIndex.from_lists([perm[10 * i : 10 * i + 15].tolist() for i in range(3)], 40)
    p_g = torch.softmax(3.0 * torch.randn(64, 40, generator=gen, dtype=F64), 1)
    pairs = gate(p_g, groups, top_n=3)
    spec = torch.zeros(pairs.n_pairs, 16, dtype=F64)
    spec[:, :15] = 0.9 * torch.softmax(3.0 * torch.randn(pairs.n_pairs, 15, generator=gen), 1)
    spec[:, 15] = 0.1
    kw = {"spec_weights": [8.0] * 3}
    plain = solve_em(p_g, spec, pairs, groups, accelerate=False, max_iter=5000, **kw)
    fast = solve_em(p_g, spec, pairs, groups, **kw)
    assert plain.converged and fast.converged
    assert fast.n_iter * 2 < plain.n_iter
    assert torch.allclose(fast.q, plain.q, atol=1e-7)
    f_fast = objective(fast.q, p_g, spec, pairs, groups, **kw)
    f_plain = objective(plain.q, p_g, spec, pairs, groups, **kw)
    assert bool((f_fast <= f_plain * (1 + 1e-12) + 1e-14).all())


def test_active_groups_covering_every_class():
    """No free class left for the dustbins: their mass must go to classes of other groups."""
    gen = torch.Generator().manual_seed(3)
    groups = GroupIndex.from_lists([[0, 1, 2, 3], [2, 3, 4, 5], [0, 5]], 6)
    p_g = torch.softmax(torch.randn(4, 6, generator=gen, dtype=F64), 1)
    pairs = ActivePairs(torch.tensor([0, 0, 1, 1, 1, 2, 3]), torch.tensor([0, 1, 0, 1, 2, 0, 2]))
    spec = torch.softmax(torch.randn(7, 5, generator=gen, dtype=F64), 1)
    spec[[5, 6], 3:] = 0.0  # a 2-class group: columns past its dustbin are padding
    spec[6, :3] = torch.softmax(torch.randn(3, generator=gen, dtype=F64), 0)
    em = solve_em(p_g, spec, pairs, groups)
    gd = solve_gd(p_g, spec, pairs, groups, max_steps=800)
    f_em = objective(em.q, p_g, spec, pairs, groups)
    assert torch.allclose(f_em, gd.objective, rtol=1e-6, atol=1e-12)
    assert bool((f_em <= gd.objective * (1 + 1e-12) + 1e-14).all())


def test_group_of_every_class_stays_finite():
    """A group of all K classes leaves its dustbin nowhere to go (the objective is +inf for any
    q): the answer must still be a finite distribution."""
    groups = GroupIndex.from_lists([list(range(5)), [1, 2]], 5)
    gen = torch.Generator().manual_seed(1)
    p_g = torch.softmax(torch.randn(1, 5, generator=gen, dtype=F64), 1)
    pairs = ActivePairs(torch.tensor([0, 0]), torch.tensor([0, 1]))
    spec = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.1, 0.2], [0.3, 0.3, 0.4, 0, 0, 0]], dtype=F64)
    res = solve_em(p_g, spec, pairs, groups)
    assert res.converged and bool(torch.isfinite(res.q).all())
    assert torch.allclose(res.q.sum(1), torch.ones(1, dtype=F64))


def test_float32_path_matches_float64():
    p64, spec64, pairs, groups = random_instance(3, n_rows=16, n_classes=60, n_groups=8)
    p32, spec32 = p64.float(), spec64.float()
    em32 = solve_em(p32, spec32, pairs, groups)
    em64 = solve_em(p64, spec64, pairs, groups)
    assert em32.q.dtype == torch.float32 and em64.q.dtype == F64
    assert default_tol(torch.float32) > default_tol(F64)
    assert torch.allclose(em32.q.double(), em64.q, rtol=1e-5, atol=1e-6)
    assert torch.allclose(em32.q.sum(1), torch.ones(16), atol=1e-6)
    gd = solve_gd(p64, spec64, pairs, groups, max_steps=600)
    f32 = objective(em32.q, p64, spec64, pairs, groups)
    assert torch.allclose(f32, gd.objective, rtol=1e-5, atol=1e-7)


def test_gd_reference_stops_at_target():
    p_g, spec, pairs, groups = random_instance(5)
    em = solve_em(p_g, spec, pairs, groups)
    target = objective(em.q, p_g, spec, pairs, groups)
    gd = solve_gd(p_g, spec, pairs, groups, target=target, max_steps=2000)
    assert gd.n_steps < 2000
    assert bool((gd.objective <= target * (1 + 1e-6)).all())
    lbfgs = solve_gd(p_g, spec, pairs, groups, method="lbfgs", target=target, max_steps=3000)
    assert bool((lbfgs.objective <= target * (1 + 1e-4)).all())


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


def extend(spec: torch.Tensor, pairs: ActivePairs, groups: GroupIndex) -> torch.Tensor:
    """(A, K): each pair's specialist probabilities, extended by zero outside its group."""
    ext = torch.zeros(pairs.n_pairs, groups.n_classes, dtype=spec.dtype)
    for a, m in enumerate(pairs.specs.tolist()):
        members = groups.group(m)
        ext[a, members] = spec[a, : len(members)]
    return ext


@pytest.mark.parametrize("weighted", [False, True])
def test_no_dustbin_mass_gives_the_arithmetic_mean(weighted):
    p_g, spec, pairs, groups = random_instance(7)
    for a, m in enumerate(pairs.specs.tolist()):  # move each dustbin's mass onto the group
        size = int(groups.sizes[m])
        spec[a, :size] /= spec[a, :size].sum()
        spec[a, size] = 0.0
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.25], dtype=F64) if weighted else torch.ones(6)
    w_g = 1.5 if weighted else 1.0
    q = combine(p_g, spec, pairs, groups, spec_weights=w, generalist_weight=w_g)
    ext = extend(spec, pairs, groups)
    w_pair = w[pairs.specs].double()
    num = (w_g * p_g).index_add(0, pairs.rows, w_pair[:, None] * ext)
    den = torch.full((len(p_g),), w_g, dtype=F64).index_add(0, pairs.rows, w_pair)
    assert torch.allclose(q, num / den[:, None], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("w_g", "w_m"), [(1.0, 1.0), (0.5, 3.0)])
def test_one_active_specialist_closed_form(w_g, w_m):
    """With one active specialist the optimum is explicit: inside S_m the weighted mean of p_g
    and p_m; outside, p_g rescaled to hold (w_g P_out + w_m d) / (w_g + w_m)."""
    gen = torch.Generator().manual_seed(1)
    p_g = torch.softmax(torch.randn(3, 10, generator=gen, dtype=F64), 1)
    groups = GroupIndex.from_lists([[1, 4, 7], [0, 2]], 10)
    pairs = ActivePairs(torch.tensor([0, 2]), torch.tensor([0, 1]))
    spec = torch.zeros(2, 4, dtype=F64)
    spec[0] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    spec[1, :3] = torch.tensor([0.5, 0.1, 0.4], dtype=F64)
    q = combine(p_g, spec, pairs, groups, spec_weights=[w_m, w_m], generalist_weight=w_g)
    expected = p_g.clone()
    for (b, members), probs in zip([(0, [1, 4, 7]), (2, [0, 2])], spec):
        n = len(members)
        inside = torch.zeros(10, dtype=torch.bool)
        inside[members] = True
        p_out, d = float(p_g[b, ~inside].sum()), float(probs[n])
        expected[b, inside] = (w_g * p_g[b, inside] + w_m * probs[:n]) / (w_g + w_m)
        expected[b, ~inside] = p_g[b, ~inside] * (w_g * p_out + w_m * d) / ((w_g + w_m) * p_out)
    assert torch.allclose(q, expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(q[1], p_g[1])


def test_no_active_specialist_returns_p_g_exactly():
    p_g, spec, pairs, groups = random_instance(2, dtype=torch.float32)
    none = ActivePairs(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    res = solve_em(p_g, torch.zeros(0, 10), none, groups, generalist_weight=0.3)
    assert torch.equal(res.q, p_g) and res.n_iter == 0 and res.converged
    assert torch.equal(combine(p_g, [], none, groups), p_g)
    keep = pairs.rows != 0  # drop every pair of row 0: it alone must come back as p_g
    partial = ActivePairs(pairs.rows[keep], pairs.specs[keep])
    q = combine(p_g, spec[keep], partial, groups, generalist_weight=0.3)
    assert torch.equal(q[0], p_g[0])
    assert not torch.equal(q[1:], p_g[1:])


def test_vanishing_outside_mass_stays_finite():
    """The generalist puts ~1e-30 outside the group while the specialist's dustbin holds 0.6:
    EM must grow Q_m by ~30 orders of magnitude (capped ratios), and reach the closed form."""
    logits = torch.full((1, 8), -70.0, dtype=F64)
    logits[0, :3] = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    p_g = torch.softmax(logits, 1)
    groups = GroupIndex.from_lists([[0, 1, 2]], 8)
    pairs = ActivePairs(torch.tensor([0]), torch.tensor([0]))
    spec = torch.tensor([[0.2, 0.1, 0.1, 0.6]], dtype=F64)
    res = solve_em(p_g, spec, pairs, groups)
    assert res.converged and bool(torch.isfinite(res.q).all())
    p_out = float(p_g[0, 3:].sum())
    assert torch.allclose(res.q[0, 3:], p_g[0, 3:] * (p_out + 0.6) / (2 * p_out), rtol=1e-6)
    assert torch.allclose(res.q[0, :3], (p_g[0, :3] + spec[0, :3]) / 2, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Properties of the output and the input contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_outputs_are_distributions(dtype):
    for seed in range(5):
        p_g, spec, pairs, groups = random_instance(20 + seed, n_rows=32, top_n=3, dtype=dtype)
        q = combine(p_g, spec, pairs, groups)
        assert q.dtype == dtype and q.shape == p_g.shape
        assert bool((q >= 0).all())
        atol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(q.sum(1), torch.ones(32, dtype=dtype), atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_batch_equals_one_example_at_a_time(dtype):
    p_g, spec, pairs, groups = random_instance(4, n_rows=12, dtype=dtype)
    q = combine(p_g, spec, pairs, groups)
    for b in range(len(p_g)):
        mine = pairs.rows == b
        one = ActivePairs(torch.zeros(int(mine.sum()), dtype=torch.long), pairs.specs[mine])
        q_b = combine(p_g[b : b + 1], spec[mine], one, groups)
        assert torch.allclose(q_b[0], q[b], rtol=0, atol=1e-15)


def test_spec_probs_blocks_and_padded_tensor_agree():
    p_g, spec, pairs, groups = random_instance(8, n_rows=10, top_n=2)
    blocks, start = [], 0
    for m, rows in enumerate(pairs.per_specialist(len(groups))):
        if len(rows):
            size = int(groups.sizes[m])
            blocks.append(spec[start : start + len(rows), : size + 1])
            start += len(rows)
    assert len({b.shape[1] for b in blocks}) > 1  # groups of different sizes
    q_blocks = combine(p_g, blocks, pairs, groups)
    q_padded = combine(p_g, spec, pairs, groups)
    assert torch.equal(q_blocks, q_padded)
    with pytest.raises(ValueError, match="width"):
        combine(p_g, [b[:, :-1] for b in blocks], pairs, groups)
    with pytest.raises(ValueError, match="rows"):
        combine(p_g, blocks[1:], pairs, groups)


def test_bad_input_is_rejected():
    p_g, spec, pairs, groups = random_instance(9)
    with pytest.raises(ValueError, match="columns"):
        combine(p_g, spec[:, :3], pairs, groups)
    with pytest.raises(ValueError, match="spec_weights"):
        combine(p_g, spec, pairs, groups, spec_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        combine(p_g, spec, pairs, groups, spec_weights=[-1.0] * 6)
    with pytest.raises(ValueError, match="generalist_weight"):
        combine(p_g, spec, pairs, groups, generalist_weight=0.0)
    with pytest.raises(ValueError, match="p_g"):
        combine(p_g[:, :-1], spec, pairs, groups)
    with pytest.raises(ValueError, match="out of range"):
        combine(p_g[:2], spec, pairs, groups)


def test_iteration_cap_is_reported(monkeypatch, caplog):
    """Reported in the result every time; said as a warning once per process (an evaluation
    meets the same slow tail in every batch), with the change still left."""
    import specialists.combiner as combiner_module

    monkeypatch.setattr(combiner_module, "_warned_max_iter", False)
    p_g, spec, pairs, groups = random_instance(0)
    em_log = logging.getLogger("specialists.combiner")
    level = em_log.level
    em_log.setLevel(logging.ERROR)  # silenced, as calibration does
    try:
        solve_em(p_g, spec, pairs, groups, tol=0.0, max_iter=3)
    finally:
        em_log.setLevel(level)
    assert not combiner_module._warned_max_iter  # nothing shown: the warning is still to come
    with caplog.at_level(logging.DEBUG, logger="specialists.combiner"):
        for _ in range(2):
            res = solve_em(p_g, spec, pairs, groups, tol=0.0, max_iter=3)
            assert res.n_iter == 3 and not res.converged
            assert torch.allclose(res.q.sum(1), torch.ones(len(p_g), dtype=F64))
    said = [r for r in caplog.records if "max_iter=3" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]
    assert "largest remaining change" in said[0].getMessage()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p_g, spec, pairs, groups = random_instance(6, n_rows=32, top_n=3)
    q_cpu = combine(p_g, spec, pairs, groups)
    q_gpu = combine(p_g.cuda(), spec.cuda(), pairs, groups.to("cuda"))
    assert q_gpu.device.type == "cuda"
    assert torch.allclose(q_gpu.cpu(), q_cpu, atol=1e-12)
    # specialist outputs left on the CPU are moved to p_g's device; kernels may sum in another order
    mixed = combine(p_g.cuda(), spec, pairs, groups)
    assert mixed.device.type == "cuda"
    assert torch.allclose(mixed.cpu(), q_gpu.cpu(), atol=1e-12)
