import numpy as np
import pytest

from specialists.embedded import (
    DETAIL_KINDS,
    SyntheticConfig,
    _class_table,
    _render,
    detail_kind_of_groups,
    generate_split,
    group_of_classes,
    synthetic_class_names,
)


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
    assert y.dtype == np.int64
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


def test_every_kind_of_detail_is_used_and_rings_never_get_holes():
    cfg = SyntheticConfig()
    kinds = detail_kind_of_groups(cfg)
    assert set(kinds) == set(DETAIL_KINDS) - {"fine"}  # the resolution family only on request
    assert "fine" in detail_kind_of_groups(SyntheticConfig(fine_groups=1))
    names = synthetic_class_names(cfg)
    assert all(kinds[int(n[1:3])] in n for n in names)
    for n_groups in range(1, 60):
        shapes_kinds = detail_kind_of_groups(SyntheticConfig(n_classes=60, n_groups=n_groups))
        assert all(not (g % 8 == 4 and k == "hole") for g, k in enumerate(shapes_kinds))


def test_class_details_are_distinct_inside_every_group():
    # Every class of a group has its own value of the group's detail: the classes are separable.
    for cfg in (SyntheticConfig(), SyntheticConfig(n_classes=40, n_groups=8), small()):
        table = _class_table(cfg)
        groups = group_of_classes(cfg)
        for g in range(cfg.n_groups):
            values = table["value"][groups == g]
            assert len(np.unique(np.round(values, 6))) == len(values)
            assert len(set(table["kind"][groups == g])) == 1


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


def _render_classes(cfg: SyntheticConfig, classes: list[int], n: int = 16) -> np.ndarray:
    """The same n nuisance draws rendered for each class: (len(classes), n, H, W, 3) floats."""
    table = _class_table(cfg)
    out = []
    for c in classes:
        rows = {k: v[np.full(n, c)] for k, v in table.items()}
        out.append(_render(cfg, np.random.default_rng(123), rows).astype(float))
    return np.stack(out)


@pytest.mark.parametrize("kind", DETAIL_KINDS)
def test_classes_of_a_group_differ_only_in_a_detail(kind):
    # Same nuisance (position, scale, phase, brightness, noise), two classes of one group versus a
    # class of another group: the group's look-alike differs in a small detail, never by nothing.
    fine = int(kind == "fine")  # the resolution family exists only on request
    cfg = SyntheticConfig(n_classes=70, n_groups=14, image_size=32, noise=0.0, fine_groups=fine)
    groups = group_of_classes(cfg)
    g = detail_kind_of_groups(cfg).index(kind)
    members = np.flatnonzero(groups == g)
    other = np.flatnonzero(groups == (g + 1) % cfg.n_groups)[0]
    imgs = _render_classes(cfg, [members[0], members[1], other])
    diff = np.abs(imgs[0] - imgs[1]).max(-1)  # neighbouring classes, in 0-255 units
    between = np.abs(imgs[0] - imgs[2]).mean()
    assert (diff > 8).mean() > 0.004  # the detail is there: some pixels differ clearly
    if kind == "fine":  # a grating is no small change in pixels, but a 16 px view loses it
        small_view = _resize(imgs, 16)
        assert np.abs(imgs[0] - imgs[1]).mean() > 0.2 * between  # seen at 32 px
        inside = np.abs(small_view[0] - small_view[1]).mean()
        assert inside < 0.1 * np.abs(small_view[0] - small_view[2]).mean()  # gone at 16 px
        return
    assert np.abs(imgs[0] - imgs[1]).mean() < 0.35 * between  # but small next to the group's look


def _resize(imgs: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W, C) float images resized as the models' transforms do (antialiased)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(imgs).float()
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return y.permute(0, 2, 3, 1).reshape(*lead, size, size, -1).numpy()


def test_generalist_scale_structure_nearest_mean_gets_groups_not_classes():
    # A nearest-class-mean classifier on raw pixels (a very weak model) finds the group almost
    # always but the class inside the group far less often: the detail is the hard part.
    cfg = SyntheticConfig(n_classes=24, n_groups=6, train_per_class=60, test_per_class=30)
    x, y = generate_split(cfg, "train")
    xt, yt = generate_split(cfg, "test")
    feats = x.reshape(len(x), -1).astype(np.float32)
    means = np.stack([feats[y == c].mean(0) for c in range(cfg.n_classes)])
    ft = xt.reshape(len(xt), -1).astype(np.float32)
    dist = (ft**2).sum(1)[:, None] - 2 * ft @ means.T + (means**2).sum(1)[None]
    pred = dist.argmin(1)
    g = group_of_classes(cfg)
    assert (g[pred] == g[yt]).mean() > 0.9
    assert (pred == yt).mean() < 0.7


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_groups"):
        SyntheticConfig(n_classes=4, n_groups=5)
    with pytest.raises(ValueError, match="detail"):
        SyntheticConfig(detail=0)
    with pytest.raises(ValueError, match="split"):
        generate_split(small(), "holdout")
