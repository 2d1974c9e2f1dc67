import numpy as np
import pytest

from train.synthetic import SyntheticConfig, generate_split, group_of_classes, synthetic_class_names


def small(**kw):
    base = dict(
        n_classes=12,
        n_groups=3,
        image_size=16,
        train_per_class=6,
        val_per_class=2,
        test_per_class=2,
    )
    base.update(kw)
    return SyntheticConfig(**base)


def test_same_seed_same_images_other_seed_other_images():
    x1, y1 = generate_split(small(seed=3), "train")
    x2, y2 = generate_split(small(seed=3), "train")
    x3, _ = generate_split(small(seed=4), "train")
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_shapes_counts_and_splits_differ():
    cfg = small()
    x, y = generate_split(cfg, "train")
    assert x.shape == (12 * 6, 16, 16, 3) and x.dtype == np.uint8
    assert np.array_equal(np.bincount(y), np.full(12, 6))
    xv, _ = generate_split(cfg, "val")
    assert len(xv) == 24
    assert not np.array_equal(x[:24], xv)


def test_groups_are_contiguous_and_even():
    cfg = SyntheticConfig()
    g = group_of_classes(cfg)
    assert len(g) == 100 and g.max() == 19
    assert np.array_equal(np.bincount(g), np.full(20, 5))
    assert np.all(np.diff(g) >= 0)
    names = synthetic_class_names(cfg)
    assert len(set(names)) == 100 and names[0].startswith("g00_")
    uneven = group_of_classes(SyntheticConfig(n_classes=10, n_groups=3))
    assert sorted(np.bincount(uneven)) == [3, 3, 4]


def test_look_alike_classes_share_appearance_within_their_group():
    # Mean colour per class: classes of one group are much closer to each other than to others.
    cfg = small(train_per_class=30)
    x, y = generate_split(cfg, "train")
    means = np.stack([x[y == c].reshape(-1, 3).mean(0) for c in range(12)])
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    g = group_of_classes(cfg)
    same = g[:, None] == g[None]
    off = ~np.eye(12, dtype=bool)
    assert d[same & off].max() < d[~same].min()


def test_classes_within_a_group_differ_in_their_detail():
    # The stripe orientation differs: the average image of two classes of one group is not equal.
    cfg = small(train_per_class=30, noise=0.0)
    x, y = generate_split(cfg, "train")
    a, b = x[y == 0].astype(float), x[y == 1].astype(float)
    grad_a = np.abs(np.diff(a, axis=1)).mean() / np.abs(np.diff(a, axis=2)).mean()
    grad_b = np.abs(np.diff(b, axis=1)).mean() / np.abs(np.diff(b, axis=2)).mean()
    assert abs(grad_a - grad_b) > 0.02


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_groups"):
        SyntheticConfig(n_classes=4, n_groups=5)
    with pytest.raises(ValueError, match="split"):
        generate_split(small(), "holdout")
