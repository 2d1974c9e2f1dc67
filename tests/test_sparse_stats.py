"""Fast tests of the sparse path of clustering/: top-k statistics, sparse clustering, dense_fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from specialists import clustering as cl

# ---------------------------------------------------------------- fixtures


def softmax_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    z = 2 * np.random.default_rng(seed).standard_normal((n, k))
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def truncated(probs: np.ndarray, k: int) -> np.ndarray:
    """Each row with everything but its k largest entries set to zero (the reference)."""
    cut = -np.sort(-probs, axis=1)[:, k - 1 : k]
    return np.where(probs >= cut, probs, 0.0)


def topk_stream(coarse: np.ndarray, n: int, batch: int = 5000, **kw) -> cl.TopKStats:
    stats = cl.TopKStats(len(coarse), 10)
    for i, n0 in enumerate(range(0, n, batch)):
        idx, val, labels = cl.planted_topk(coarse, min(batch, n - n0), seed=i, **kw)
        stats.update(indices=idx, values=val, labels=labels)
    return stats


@pytest.fixture(scope="module")
def small_planted():
    """K = 200 classes in 10 planted groups: the sparse second moment of 20,000 examples."""
    coarse = cl.planted_groups(200, 10, seed=3)
    return coarse, topk_stream(coarse, 20_000)


# ---------------------------------------------------------------- statistics


def test_second_moment_equals_dense_reference():
    probs = softmax_rows(700, 30)
    labels = np.random.default_rng(1).integers(0, 30, 700)
    stats = cl.TopKStats(30, k=5, flush_pairs=100)  # many small merges into the CSR
    for a, b in [(0, 1), (1, 50), (50, 333), (333, 333), (333, 700)]:  # uneven, one empty
        stats.update(probs[a:b], labels[a:b])
    t = truncated(probs, 5)
    s = stats.second_moment(np.float64)
    assert isinstance(s, sparse.csr_array) and s.has_canonical_format
    np.testing.assert_allclose(s.toarray(), np.einsum("ni,nj->ij", t, t) / 700, rtol=1e-12)
    np.testing.assert_allclose(stats.mean(), t.mean(0), rtol=1e-12)
    assert stats.captured_mass() == pytest.approx(t.sum(1).mean(), rel=1e-12)
    assert stats.n_seen == stats.n_labelled == 700
    reference = np.zeros((30, 30), dtype=np.int64)
    np.add.at(reference, (labels, probs.argmax(1)), 1)
    np.testing.assert_array_equal(stats.confusion().toarray(), reference)
    rows = np.maximum(reference.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(stats.confusion("true").toarray(), reference / rows)
    default = stats.second_moment()
    assert default.dtype == np.float32
    np.testing.assert_allclose(default.toarray(), s.toarray(), rtol=1e-6)
    assert stats.nbytes > 0


def test_dense_rows_and_topk_pairs_give_the_same_statistics():
    probs = softmax_rows(400, 50, seed=2)
    labels = np.random.default_rng(3).integers(0, 50, 400)
    order = np.argsort(-probs, axis=1)[:, :8]
    shuffle = np.random.default_rng(4).permuted(order, axis=1)  # any order within a row
    dense = cl.TopKStats(50, k=8).update(probs, labels)
    pairs = cl.TopKStats(50, k=8).update(
        labels=labels, indices=shuffle, values=np.take_along_axis(probs, shuffle, axis=1)
    )
    np.testing.assert_allclose(
        dense.second_moment(np.float64).toarray(), pairs.second_moment(np.float64).toarray()
    )
    np.testing.assert_allclose(dense.mean(), pairs.mean())
    assert dense.captured_mass() == pytest.approx(pairs.captured_mass())
    np.testing.assert_array_equal(dense.confusion().toarray(), pairs.confusion().toarray())


def test_planted_topk_rows_are_distinct_and_mostly_in_group():
    coarse = cl.planted_groups(1000, 20, seed=0)
    idx, val, labels = cl.planted_topk(coarse, 3000, k=10, cross=0.2, residual=0.05, seed=5)
    assert idx.shape == val.shape == (3000, 10)
    assert (np.diff(np.sort(idx, axis=1), axis=1) > 0).all()
    np.testing.assert_array_equal(idx[:, 0], labels)
    mass = val.sum(1)
    assert (mass <= 1).all() and 0.9 < mass.mean() < 0.99
    same = coarse[idx[:, 1:]] == coarse[labels][:, None]
    assert 0.75 < same.mean() < 0.85  # 20% of slots drawn from anywhere, 1/20 land in-group
    assert (val.argmax(1) == 0).mean() > 0.5  # y usually, not always, on top
    tiny = cl.planted_topk(np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]), 50, k=6, seed=0)[0]
    assert (np.diff(np.sort(tiny, axis=1), axis=1) > 0).all()  # groups smaller than k


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "either probs"),
        ({"probs": np.full((2, 20), 0.05), "indices": np.zeros((2, 3), int)}, "either probs"),
        ({"indices": np.zeros((2, 3), int)}, "pass both"),
        ({"indices": np.zeros((2, 4), int), "values": np.zeros((2, 4))}, r"shape \(N, 3\)"),
        ({"indices": np.zeros((2, 3)), "values": np.zeros((2, 3))}, "integer class"),
        ({"indices": np.full((1, 3), 20), "values": np.zeros((1, 3))}, r"in \[0, 20\)"),
        ({"indices": [[0, 1, 2]], "values": [[0.5, -0.1, 0.1]]}, "negative"),
        ({"indices": [[0, 1, 2]], "values": [[0.5, np.nan, 0.1]]}, "NaN"),
        ({"indices": [[0, 1, 2], [3, 5, 3]], "values": np.full((2, 3), 0.2)}, "row 1"),
        ({"probs": np.full((2, 19), 0.05)}, r"shape \(N, 20\)"),
        ({"probs": np.full((2, 20), 0.05), "labels": [0, 20]}, r"labels must be in \[0, 20\)"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cl.TopKStats(20, k=3).update(**kwargs)


def test_bad_construction_and_reads_are_rejected():
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        cl.TopKStats(1)
    with pytest.raises(ValueError, match=r"k must be in \[1, n_classes=5\]"):
        cl.TopKStats(5, k=6)
    stats = cl.TopKStats(5, k=2)
    with pytest.raises(ValueError, match="call update"):
        stats.second_moment()
    stats.update(np.eye(5))
    with pytest.raises(ValueError, match="needs labels"):
        stats.confusion()


# ---------------------------------------------------------------- clustering


def test_sparse_clustering_recovers_planted_groups():
    coarse = cl.planted_groups(2000, 40, seed=1)
    s = topk_stream(coarse, 40_000, cross=0.2).second_moment()
    for max_dense in (4096, 1000):  # columns as points, then the sparse sketch
        model = cl.ConfusionClustering(40, n_init=2, max_dense_classes=max_dense).fit(s)
        assert model.sparse_ and model.sketched_ == (max_dense == 1000)
        assert cl.coarse_agreement(model.groups_, coarse)["ari"] >= 0.9
    assert 0.5 < cl.confusion_captured(s, model.groups_) <= 1


def test_dense_and_sparse_fits_agree(small_planted):
    coarse, stats = small_planted
    s = stats.second_moment()
    dense = s.toarray()
    params = [
        {},
        {"max_dense_classes": 50},
        {"mode": "overlapping", "group_size": 30},
        {"diagonal": "keep", "normalize": False},
    ]
    for p in params:
        a = cl.ConfusionClustering(10, **p).fit(s)
        b = cl.ConfusionClustering(10, **p).fit(dense)
        assert a.sparse_ and not b.sparse_
        assert a.groups_ == b.groups_, p
        np.testing.assert_allclose(a.group_mass_, b.group_mass_, rtol=1e-5)
        if not p:
            assert cl.coarse_agreement(a.groups_, coarse)["ari"] == 1.0
    groups = cl.ConfusionClustering(10, mode="overlapping", group_size=30).fit(s).groups_
    assert cl.confusion_mass(s) == pytest.approx(cl.confusion_mass(dense), rel=1e-6)
    assert cl.confusion_captured(s, groups) == pytest.approx(
        cl.confusion_captured(dense, groups), rel=1e-6
    )
    np.testing.assert_allclose(
        cl.random_split_baseline(s, groups), cl.random_split_baseline(dense, groups), rtol=1e-5
    )
    confusion = stats.confusion()
    by_sparse = cl.group_stats(s, groups, confusion)
    by_dense = cl.group_stats(dense, groups, confusion.toarray())
    for x, y in zip(by_sparse, by_dense):
        assert x["n_examples"] == y["n_examples"] and x["accuracy"] == y["accuracy"]
        assert x["mass"] == pytest.approx(y["mass"], rel=1e-6)


def test_sparse_confusion_matrix_is_symmetrized_like_a_dense_one(small_planted):
    coarse, stats = small_planted
    confusion = stats.confusion()  # asymmetric counts, int64
    a = cl.ConfusionClustering(10).fit(confusion)
    b = cl.ConfusionClustering(10).fit(confusion.toarray())
    assert a.groups_ == b.groups_
    assert cl.coarse_agreement(a.groups_, coarse)["ari"] >= 0.9
    c = confusion.tocoo()
    extra = sparse.coo_array(  # an entry stored twice is summed, as scipy does
        (np.r_[c.data, 1], (np.r_[c.row, 0], np.r_[c.col, 1])), shape=c.shape
    )
    assert cl.confusion_mass(extra) == cl.confusion_mass(confusion.toarray()) + 1


def test_spectral_and_the_chooser_take_a_sparse_matrix(small_planted):
    coarse, stats = small_planted
    s = stats.second_moment()
    model = cl.ConfusionClustering(10, method="spectral").fit(s)
    assert model.sparse_ and cl.coarse_agreement(model.groups_, coarse)["ari"] >= 0.9
    choice = cl.choose_grouping(s, 200, max_groups=20, n_init=1)
    assert choice.model.sparse_ and choice.n_groups == 10


def test_bad_sparse_matrices_are_rejected():
    with pytest.raises(ValueError, match="square"):
        cl.ConfusionClustering(2).fit(sparse.csr_array((3, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        cl.confusion_mass(sparse.csr_array(np.diag([1.0, np.inf, 1.0])))
    with pytest.raises(ValueError, match="real-valued"):
        cl.confusion_mass(sparse.csr_array(np.eye(3, dtype=complex)))


# ---------------------------------------------------------------- dense or sparse


def test_dense_fits_small_k_but_not_100k():
    fits, reason = cl.dense_fits(1000)
    assert fits and reason.endswith("dense covariance")
    fits, reason = cl.dense_fits(100_000, memory_bytes=22 * 2**30)
    assert not fits
    assert "100,000 classes need 298 GiB" in reason and "22 GiB available" in reason
    assert reason.endswith("sparse top-10 statistics")
    assert cl.dense_fits(15_000, memory_bytes=22 * 2**30)[0]  # 6.7 GiB of 11 usable
    assert not cl.dense_fits(15_000, memory_bytes=8 * 2**30)[0]
    with pytest.raises(ValueError, match="safety"):
        cl.dense_fits(100, safety=0)
