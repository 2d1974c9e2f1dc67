"""Fast tests of clustering/: statistics, the estimator, the chooser, metrics, report and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from specialists import clustering as cl

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def planted():
    """A generalist's predictions confusing classes inside 20 planted groups of 5 (K = 100)."""
    coarse = cl.planted_groups(100, 20, seed=0)
    probs, labels = cl.planted_predictions(coarse, 5000, seed=0)
    stats = cl.PredictionStats(100)
    for r0 in range(0, len(probs), 700):  # streamed, uneven last batch
        stats.update(probs[r0 : r0 + 700], labels[r0 : r0 + 700])
    return coarse, probs, labels, stats


@pytest.fixture(scope="module")
def cov(planted):
    return planted[3].covariance()


def two_blocks() -> np.ndarray:
    """Blocks {0,1,2} and {3,4,5}; classes 2 and 3 are also confused with each other."""
    m = np.zeros((6, 6))
    m[:3, :3] = m[3:, 3:] = 1.0
    m[2, 3] = m[3, 2] = 0.5
    np.fill_diagonal(m, 2.0)
    return m


# ---------------------------------------------------------------- statistics


def test_covariance_of_tiny_predictions_by_hand():
    # Two one-hot predictions: E[p] = (.5, .5), E[p p^T] = diag(.5, .5).
    stats = cl.PredictionStats(2).update(np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(stats.covariance(), [[0.25, -0.25], [-0.25, 0.25]])
    np.testing.assert_allclose(stats.mean(), [0.5, 0.5])
    assert stats.n_seen == 2
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(
        cl.prediction_stats(p).covariance(), np.cov(p.T, bias=True), atol=1e-15
    )


def test_streaming_equals_one_shot(planted):
    _, probs, labels, stats = planted
    order = np.argsort(labels, kind="stable")  # sorted by class: the hard case for a naive sum
    one = cl.PredictionStats(100).update(probs[order], labels[order])
    many = cl.PredictionStats(100)
    for a, b in [(0, 1), (1, 8), (8, 1000), (1000, 1001), (1001, 5000)]:
        many.update(probs[order][a:b], labels[order][a:b])
    ref = np.cov(probs.astype(np.float64).T, bias=True)
    for s in (one, many, stats):
        np.testing.assert_allclose(s.covariance(), ref, rtol=1e-9, atol=1e-15)
        np.testing.assert_array_equal(s.confusion(), one.confusion())
    assert many.covariance(np.float32).dtype == np.float32
    np.testing.assert_allclose(many.covariance(np.float32), ref, rtol=1e-5, atol=1e-9)


def test_streaming_keeps_precision_with_a_large_offset():
    rng = np.random.default_rng(0)
    x = 1e4 + rng.random((3000, 3))  # tiny variance on a big mean: E[x^2] - E[x]^2 would fail
    stats = cl.PredictionStats(3)
    for r0 in range(0, 3000, 250):
        stats.update(x[r0 : r0 + 250])
    np.testing.assert_allclose(stats.covariance(), np.cov(x.T, bias=True), rtol=1e-8)


def test_confusion_matrix_by_hand():
    probs = np.array([[0.9, 0.1, 0, 0], [0.2, 0.7, 0.1, 0], [0, 0.6, 0.4, 0], [0, 0, 0.1, 0.9]])
    labels = np.array([0, 0, 1, 2])  # predicted 0, 1, 1, 3; class 3 is never the true class
    stats = cl.PredictionStats(4).update(probs, labels)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[2, 3] = 1
    np.testing.assert_array_equal(stats.confusion(), expected)
    np.testing.assert_allclose(stats.confusion("true")[0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(stats.confusion("true")[3], 0)
    assert stats.n_labelled == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_predictions_rejected(bad):
    p = np.full((3, 4), 0.25)
    p[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf values \(first in row 1\)"):
        cl.PredictionStats(4).update(p)


def test_stats_input_errors():
    stats = cl.PredictionStats(3)
    with pytest.raises(ValueError, match="no predictions accumulated"):
        stats.covariance()
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        stats.update(np.ones((2, 4)) / 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        stats.update(np.ones((2, 3)) / 3, np.array([0, 3]))
    stats.update(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="needs labels"):
        stats.confusion()
    with pytest.raises(ValueError, match="normalize"):
        stats.update(np.ones((1, 3)) / 3, [1]).confusion("pred")


# ---------------------------------------------------------------- estimator


def test_overlapping_groups_sizes_and_overlaps():
    model = cl.ConfusionClustering(2, mode="overlapping", group_size=4).fit(two_blocks())
    # Each group is its block plus the outside class nearest its centroid (the 2 <-> 3 link).
    assert model.groups_ == [[0, 1, 2, 3], [2, 3, 4, 5]]
    np.testing.assert_array_equal(model.coverage_, [1, 1, 2, 2, 1, 1])
    assert model.labels_ is None


def test_overlapping_on_planted(cov):
    model = cl.ConfusionClustering(20, mode="overlapping", group_size=8).fit(cov)
    assert all(len(g) == 8 and g == sorted(set(g)) for g in model.groups_)
    counts = np.bincount(np.concatenate(model.groups_), minlength=100)
    np.testing.assert_array_equal(model.coverage_, counts)
    assert counts.sum() == 8 * len(model.groups_) and counts.max() >= 2  # 160 slots, 100 classes
    assert np.all(np.diff(model.group_mass_) <= 0)


def test_disjoint_size_limits(cov):
    model = cl.ConfusionClustering(15, min_size=6, max_size=7).fit(cov)
    sizes = [len(g) for g in model.groups_]
    assert min(sizes) >= 6 and max(sizes) <= 7
    assert sorted(np.concatenate(model.groups_).tolist()) == list(range(100))
    model = cl.ConfusionClustering(30, min_size=4).fit(cov)  # 30 centroids for 20 true groups
    assert min(len(g) for g in model.groups_) >= 4 and len(model.groups_) <= 25
    np.testing.assert_array_equal(np.sort(np.unique(model.labels_)), np.arange(len(model.groups_)))


@pytest.mark.parametrize(
    "params",
    [
        {"n_groups": 20},
        {"n_groups": 20, "method": "spectral"},
        {"n_groups": 20, "max_dense_classes": 50},  # sketch path
        {"n_groups": 12, "mode": "overlapping", "group_size": 10},
    ],
)
def test_same_seed_same_output(cov, params):
    a = cl.ConfusionClustering(**params, random_state=7).fit(cov)
    b = cl.ConfusionClustering(**params, random_state=7).fit(cov)
    assert a.groups_ == b.groups_
    np.testing.assert_array_equal(a.centroids_, b.centroids_)
    assert a.inertia_ == b.inertia_


@pytest.mark.parametrize(
    "params",
    [
        {"n_groups": 20},
        {"n_groups": 20, "method": "spectral"},
        {"n_groups": 20, "max_dense_classes": 50},  # sketch path
        {"n_groups": 20, "method": "spectral", "max_dense_classes": 50},  # sparse graph
    ],
)
@pytest.mark.parametrize("kind", ["covariance", "confusion"])
def test_planted_groups_recovered(planted, params, kind):
    coarse, _, _, stats = planted
    matrix = stats.covariance() if kind == "covariance" else stats.confusion()
    model = cl.ConfusionClustering(**params).fit(matrix)
    assert cl.coarse_agreement(model.groups_, coarse)["ari"] >= 0.9


def test_default_chooser_recovers_planted_groups(planted, cov):
    coarse = planted[0]
    choice = cl.choose_grouping(cov, 100)
    assert choice.n_groups == 20 and choice.mode == "disjoint"
    assert cl.coarse_agreement(choice.model.groups_, coarse)["ari"] >= 0.9
    assert "20 groups" in choice.reason and "random" in choice.reason
    assert choice.captured > 10 * choice.baseline
    json.dumps(choice.to_dict())


def test_chooser_overlapping_mode(cov):
    choice = cl.choose_grouping(cov, mode="overlapping")
    assert choice.group_size == 8  # ceil(1.5 * 100 / 20)
    assert all(len(g) == 8 for g in choice.model.groups_)
    assert "widened" in choice.reason


def test_chooser_respects_max_size_and_top_m(planted, cov):
    choice = cl.choose_grouping(cov, max_size=4, top_m=5)
    assert len(choice.model.groups_) == 5 and max(len(g) for g in choice.model.groups_) <= 4
    assert "top_m" in choice.reason and "[25, 33]" in choice.reason  # at least ceil(100 / 4)


def _sparse_confusion(k: int = 40) -> np.ndarray:
    """Confusion among classes 0-3 and 5-6 only; the other 34 classes are never confused."""
    m = np.zeros((k, k))
    for a, b in [(0, 1), (1, 2), (2, 3), (5, 6)]:
        m[a, b] = m[b, a] = 1.0
    np.fill_diagonal(m, 5.0)
    return m


def test_chooser_never_returns_one_group_of_everything():
    """Dissolving undersized groups used to collapse k-means into one group of all classes on a
    sparse matrix: a retrained copy of the generalist, not a specialist. Two groups of min_size
    fit, so two groups it is, the confused classes together."""
    m = _sparse_confusion()
    for min_size in (3, 10, 20):
        groups = cl.choose_grouping(m, min_size=min_size).model.groups_
        assert len(groups) >= 2 and min(len(g) for g in groups) >= min_size
        assert any({0, 1, 2, 3} <= set(g) for g in groups)
    groups = cl.ConfusionClustering(2, min_size=20, random_state=0).fit(m).groups_
    assert sorted(len(g) for g in groups) == [20, 20]


def test_top_m_keeps_highest_mass_groups():
    strength = {0: 1.0, 1: 3.0, 2: 2.0}  # block b covers classes 4b..4b+3
    m = np.zeros((12, 12))
    for b, s in strength.items():
        m[4 * b : 4 * b + 4, 4 * b : 4 * b + 4] = s
    full = cl.ConfusionClustering(3).fit(m)
    assert full.groups_ == [[4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]
    np.testing.assert_allclose(full.group_mass_, [0.5, 1 / 3, 1 / 6])
    top = cl.ConfusionClustering(3, top_m=2).fit(m)
    assert top.groups_ == full.groups_[:2]
    np.testing.assert_array_equal(top.labels_, [-1] * 4 + [0] * 4 + [1] * 4)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_groups": 7}, r"n_groups=7 is more than the number of classes \(6\)"),
        ({"mode": "overlapping", "group_size": 9}, r"group_size=9 is larger than the number"),
        ({"mode": "overlapping"}, "needs group_size"),
        ({"n_groups": 2, "max_size": 2}, "no grouping of 6 classes"),
        ({"method": "dbscan"}, "method must be"),
        ({"n_groups": 0}, "n_groups must be a positive integer"),
    ],
)
def test_bad_parameters_raise_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        cl.ConfusionClustering(**{"n_groups": 2, **params}).fit(two_blocks())


def test_bad_matrices_raise_clear_errors():
    with pytest.raises(ValueError, match="square"):
        cl.ConfusionClustering(2).fit(np.ones((3, 4)))
    bad = two_blocks()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        cl.ConfusionClustering(2).fit(bad)


# ---------------------------------------------------------------- metrics


def test_confusion_captured_by_hand():
    m = np.array([[5, 2, 1, 0], [3, 6, 0, 1], [0, 0, 4, 2], [1, 0, 2, 7]], dtype=float)
    # Off-diagonal total 12; inside {0,1}: 2 + 3, inside {2,3}: 2 + 2.
    assert cl.confusion_captured(m, [[0, 1], [2, 3]]) == pytest.approx(9 / 12)
    assert cl.confusion_captured(m, [[0, 1], [1, 2], [0, 1, 2]]) == pytest.approx(6 / 12)
    c = np.array([[1.0, 0.3, -0.2], [0.3, 1.0, -0.4], [-0.2, -0.4, 1.0]])  # covariance
    assert cl.confusion_captured(c, [[0, 1]]) == 1.0  # only positive off-diagonal mass counts
    assert cl.confusion_captured(c, [[1, 2]]) == 0.0


def test_random_baseline_is_seeded_and_near_its_expectation(cov):
    groups = [list(range(5 * i, 5 * i + 5)) for i in range(20)]
    a = cl.random_split_baseline(cov, groups, n_repeats=20, random_state=1)
    assert a == cl.random_split_baseline(cov, groups, n_repeats=20, random_state=1)
    assert a[0] == pytest.approx(cl.expected_random_captured([5] * 20, 100), abs=0.02)
    assert cl.expected_random_captured([5] * 20, 100) == pytest.approx(20 * 20 / 9900)


def test_group_labels_best_ranked_group_and_singletons():
    labels = cl.group_labels([[1, 2], [2, 3]], 5)
    np.testing.assert_array_equal(labels, [2, 0, 0, 1, 6])  # 0 and 4 uncovered: own labels
    agree = cl.coarse_agreement([[0, 1], [2, 3]], np.array([0, 0, 1, 1]))
    assert agree == {"ari": 1.0, "nmi": 1.0}


def test_group_stats_by_hand():
    m = np.array([[5, 2, 1, 0], [3, 6, 0, 1], [0, 0, 4, 2], [1, 0, 2, 7]], dtype=float)
    stats = cl.group_stats(m, [[0, 1], [2, 3]], confusion=m)
    # Rows 0 and 1 hold 8 + 10 examples, 5 + 6 of them correct.
    assert stats[0] == {"size": 2, "mass": 5.0, "mass_share": 5 / 12, "n_examples": 18,
                        "accuracy": 11 / 18}  # fmt: skip
    assert stats[1]["accuracy"] == pytest.approx(11 / 16)


# ---------------------------------------------------------------- report and plot


def test_report_is_plain_json(planted, cov, tmp_path):
    coarse, _, _, stats = planted
    choice = cl.choose_grouping(cov)
    names = [f"class{i}" for i in range(100)]
    report = cl.build_report(
        cov, choice.model, class_names=names, coarse=coarse, confusion=stats.confusion(),
        choice=choice,
    )  # fmt: skip
    loaded = json.loads(json.dumps(report, allow_nan=False))
    assert loaded == json.loads(json.dumps(report))
    assert loaded["quality"]["ari"] >= 0.9
    assert loaded["quality"]["confusion_captured"] > loaded["quality"]["random_baseline"]
    g = loaded["groups"][0]
    assert g["names"] == [names[c] for c in g["classes"]] and 0 < g["accuracy"] <= 1
    assert loaded["method"]["params"]["n_groups"] == 20
    assert loaded["coverage"] == {"covered": 100, "uncovered": 0, "max": 1,
                                  "classes_by_count": {"1": 100}}  # fmt: skip


def test_plot_draws_one_box_per_group_and_writes_no_file(cov, tmp_path, monkeypatch):
    import io

    monkeypatch.chdir(tmp_path)
    model = cl.ConfusionClustering(20).fit(cov)  # disjoint: every group gets its own box
    fig = cl.grouped_matrix_figure(cov, model.groups_)
    assert len(fig.axes[0].patches) == 20
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == []  # the clustering package writes no files


def test_plot_order_is_capped_for_huge_k():
    groups = [list(range(0, 300)), list(range(200, 500))]
    order, blocks = cl.grouped_order(groups, 5000, max_classes=100)
    assert len(order) <= 100 and len(set(order.tolist())) == len(order)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(order)  # uncovered classes dropped first
    order, blocks = cl.grouped_order(groups, 600)
    assert len(order) == 600 and blocks == [(0, 300), (300, 500)]
