import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from specialists.data import stratified_split
from specialists.errors import SpecialistsError
from specialists.sources import load_data, parse_source, read_idx
from specialists.transforms import BatchTransform


def _write_images(folder, n, mode="RGB", size=(20, 20), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
        shape = size[::-1] + ((channels,) if channels else ())
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
            folder / f"img{i}.png"
        )


def make_tree(root, classes=("cat", "dog", "émeu rouge"), n_train=10, n_test=3, val=False):
    for j, c in enumerate(classes):
        _write_images(root / "train" / c, n_train, mode=["RGB", "L", "RGBA"][j % 3], seed=j)
        _write_images(root / "test" / c, n_test, seed=10 + j)
        if val:
            _write_images(root / "val" / c, 2, seed=20 + j)
    return root


def test_image_folder_carves_a_stratified_seeded_val(tmp_path):
    root = make_tree(tmp_path / "d")
    b = load_data(f"folder:{root}")
    assert b.class_names == ["cat", "dog", "émeu rouge"]
    assert b.train.images.shape[1:] == (64, 64, 3)  # decoded to the default size, all as RGB
    assert np.array_equal(np.bincount(b.val.labels), [1, 1, 1])  # 10% of 10 per class
    assert np.array_equal(np.bincount(b.train.labels), [9, 9, 9])
    assert len(b.test) == 9
    again = load_data(f"folder:{root}")
    assert np.array_equal(again.val.images, b.val.images)
    other = load_data(parse_source(str(root), seed=1))
    assert not np.array_equal(other.val.images, b.val.images)


def test_image_folder_with_val_and_size(tmp_path):
    root = make_tree(tmp_path / "d", val=True)
    b = load_data(parse_source(str(root), image_size=24))
    assert len(b.val) == 6 and len(b.train) == 30
    assert b.image_size == 24 and b.channels == 3


def test_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    root = make_tree(tmp_path / "d")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    b = load_data(f"folder:{root}")
    assert len(b.train) + len(b.val) == 30
    assert "skipped 1 non-image" in caplog.text


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: None, "data path not found"),
        (lambda r: (r / "train").mkdir(parents=True), "no test/ folder"),
        (lambda r: (make_tree(r), (r / "train" / "empty").mkdir()), "class folder has no images"),
        (
            lambda r: (
                make_tree(r),
                (r / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG garbage"),
            ),
            "bad.png: unreadable image",
        ),
        (
            lambda r: (make_tree(r), (r / "train" / "cat" / "zero.jpg").write_bytes(b"")),
            "zero.jpg: unreadable image",
        ),
        (
            lambda r: (make_tree(r), _write_images(r / "test" / "wolf", 1)),
            "wolf: class not present",
        ),
        (lambda r: make_tree(r, classes=("only",)), "at least 2 classes"),
    ],
)
def test_bad_folders_are_one_clear_error(tmp_path, breakage, message):
    root = tmp_path / "d"
    breakage(root)
    with pytest.raises(SpecialistsError, match=message):
        load_data(f"folder:{root}")


def test_spec_parsing():
    assert parse_source("embedded").kind == "embedded"
    s = parse_source("embedded:n_classes=10,n_groups=2,stripe_contrast=0.5")
    assert s.options == {"n_classes": 10, "n_groups": 2, "stripe_contrast": 0.5}
    assert parse_source("cifar100:/data").kind == "cifar100"
    assert parse_source("/some/folder").kind == "folder"
    s = parse_source("omniglot:/data/omniglot,set=evaluation,n_train=10")
    assert (s.path, s.options) == ("/data/omniglot", {"set": "evaluation", "n_train": 10})
    assert s.describe() == "omniglot:/data/omniglot,n_train=10,set=evaluation"
    with pytest.raises(SpecialistsError, match="set must be one of background, evaluation"):
        parse_source("omniglot:/data,set=test")
    with pytest.raises(SpecialistsError, match="with keys set, n_train, size"):
        parse_source("omniglot:/data,colour=1")
    with pytest.raises(SpecialistsError, match="unknown option 'colours'"):
        parse_source("embedded:colours=3")
    with pytest.raises(SpecialistsError, match="unknown source kind"):
        parse_source("imagenet:/x")


def test_embedded_source_exposes_planted_groups():
    b = load_data(
        "embedded:n_classes=12,n_groups=3,image_size=16,train_per_class=10,val_per_class=2,test_per_class=2"
    )
    assert b.n_classes == 12 and b.channels == 3 and b.image_size == 16
    assert b.coarse.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert not b.hflip  # a flip would change the class


def test_stratified_split_keeps_every_class():
    labels = np.repeat(np.arange(4), [2, 5, 10, 1])
    keep, val = stratified_split(labels, 0.2, seed=0)
    assert set(labels[val]) == {0, 1, 2}  # the single-example class stays in train
    assert len(np.intersect1d(keep, val)) == 0 and len(keep) + len(val) == len(labels)


def test_omniglot_from_shared_files(shared_data):
    b = load_data(f"omniglot:{shared_data / 'omniglot'}")
    assert b.n_classes == 964 and b.image_size == 28 and b.channels == 1
    assert len(b.test) == 964 * 5 and len(b.train) + len(b.val) == 964 * 15
    assert b.coarse.max() + 1 == 30 and len(b.coarse_names) == 30
    assert b.class_names[0].startswith("Arcadian/")
    # ink is white on a black background
    assert b.train.images.mean() < 60


def test_omniglot_evaluation_set_from_shared_files(shared_data):
    b = load_data(f"omniglot:{shared_data / 'omniglot'},set=evaluation,n_train=10")
    assert b.n_classes == 659 and b.coarse.max() + 1 == 20
    assert len(b.test) == 659 * 10 and len(b.train) + len(b.val) == 659 * 10


def test_fashion_mnist_from_shared_files(shared_data):
    b = load_data(f"fashion-mnist:{shared_data / 'fashion-mnist'}")
    assert b.n_classes == 10 and len(b.test) == 10_000 and len(b.train) + len(b.val) == 60_000
    assert b.class_names[0] == "T-shirt/top" and b.channels == 1


def test_truncated_idx_is_reported(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3]))
    with pytest.raises(SpecialistsError, match="truncated"):
        read_idx(p)


def _video_tree(root, n_classes=3, n_objects=6, n_frames=8, n_test_objects=3):
    """Frames of objects: every object a smooth random pattern of its class's colour, each frame
    a one-pixel shift of it plus a little noise (near-copies of each other)."""
    rng = np.random.default_rng(0)

    def obj(c):
        base = rng.normal(size=(6, 6, 3))
        big = np.kron(base, np.ones((4, 4, 1)))  # 24 x 24 blocks
        big[..., c % 3] += 1.5
        return big

    def frames(folder, pattern, n, start):
        folder.mkdir(parents=True, exist_ok=True)
        for o in range(n):
            base = obj(c)
            for f in range(n_frames):
                img = np.roll(base, (f % 3 - 1, f // 3 - 1), axis=(0, 1))
                img = img + rng.normal(scale=0.05, size=img.shape)
                arr = np.clip(127 + 40 * img, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{pattern}{start + o:02d}_frame{f}.png")

    for c in range(n_classes):
        frames(root / "train" / f"c{c}", "obj", n_objects, 10 * c)
        frames(root / "test" / f"c{c}", "testobj", n_test_objects, 10 * c)
    return root


def test_near_copies_in_validation_are_detected_and_a_group_split_keeps_sources_whole(tmp_path):
    from specialists.data import split_warning

    root = _video_tree(tmp_path / "video")
    carved = load_data(f"folder:{root}")
    warning = split_warning(carved)
    assert warning is not None and "validation looks like a copy of training" in warning
    assert "group=REGEX" in warning  # the fix, for an image folder
    grouped = load_data(f"folder:{root},group=(obj\\d+)_frame")
    assert split_warning(grouped) is None
    train_groups, val_groups = set(grouped.train.groups), set(grouped.val.groups)
    assert not train_groups & val_groups and len(val_groups) >= 1
    assert len(train_groups | val_groups) == 18  # every object, each wholly on one side
    counts = {g: 0 for g in train_groups | val_groups}
    for g in [*grouped.train.groups, *grouped.val.groups]:
        counts[g] += 1
    assert set(counts.values()) == {8}
    # the same from a CSV of path,group rows
    rows = ["path,group"] + [
        f"c{c}/obj{10 * c + o:02d}_frame{f}.png,o{10 * c + o}"
        for c in range(3)
        for o in range(6)
        for f in range(8)
    ]
    (tmp_path / "groups.csv").write_text("\n".join(rows))
    by_csv = load_data(f"folder:{root},group_csv={tmp_path / 'groups.csv'}")
    assert not set(by_csv.train.groups) & set(by_csv.val.groups)
    with pytest.raises(SpecialistsError, match="is not a regular expression"):
        parse_source(f"folder:{root},group=(obj")


def test_a_validation_accuracy_far_above_test_is_flagged():
    from specialists.data import accuracy_gap_warning

    assert "far above test accuracy" in accuracy_gap_warning(0.9997, 3000, 0.971, 3000)
    assert accuracy_gap_warning(0.93, 3000, 0.925, 3000) is None  # within noise
    assert accuracy_gap_warning(0.99, 100, 0.97, 100) is None  # too few images to tell


def test_the_sample_grid_labels_every_row(tmp_path):
    from specialists.preview import save_sample_grid

    from .conftest import TINY_DATA

    bundle = load_data(TINY_DATA)
    save_sample_grid(bundle, tmp_path / "grid.png", n_classes=5, per_class=4, scale=2)
    im = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    tiles_w = 4 * (16 + 2) * 2
    assert im.shape == (5 * 18 * 2, im.shape[1]) and im.shape[1] > tiles_w + 40
    margin = im[:, : im.shape[1] - tiles_w]
    for r in range(5):  # text in the margin of every row, and white between rows of text
        row = margin[r * 36 : (r + 1) * 36]
        assert (row < 128).sum() > 20, r


def test_folders_decode_once_into_a_shared_memory_map(tmp_path, monkeypatch):
    from specialists import decode

    root = make_tree(tmp_path / "d", n_train=30)
    calls = []
    real = decode.decode_to_npy

    def counting(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr("specialists.sources.decode_to_npy", counting)
    b = load_data(f"folder:{root}")
    assert len(calls) == 3  # train, val, test
    assert isinstance(b.train.images, np.memmap) and not b.train.images.flags.writeable
    again = load_data(f"folder:{root}")
    assert len(calls) == 3  # nothing decoded the second time
    assert np.array_equal(again.train.images, b.train.images)
    labels = np.concatenate([b.train.labels, b.val.labels])  # every training image, once
    assert sorted(labels.tolist()) == [0] * 30 + [1] * 30 + [2] * 30
    # a changed file makes another cache; workers decode the same bytes as one process
    _write_images(root / "train" / "cat", 1, seed=99)  # img0.png rewritten
    b2 = load_data(f"folder:{root}")
    assert len(calls) == 6 and not np.array_equal(b2.train.images, b.train.images)
    files = sorted((root / "train").rglob("*.png"))
    one = real(files, 32, 3, tmp_path / "one.npy", workers=1, progress=False)
    two = real(files, 32, 3, tmp_path / "two.npy", workers=2, progress=False)
    assert np.array_equal(one, two) and one.shape == (90, 32, 32, 3)


def test_folders_keep_the_aspect_ratio_unless_asked_to_squash(tmp_path):
    from specialists.image_files import read_image

    img = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: a red square left of centre...
    img[:, 10:30] = (255, 0, 0)  # ...the centred 20 x 20 is all red
    Image.fromarray(img).save(tmp_path / "wide.png")
    crop = read_image(tmp_path / "wide.png", 10, 3, resize="crop")
    squash = read_image(tmp_path / "wide.png", 10, 3, resize="squash")
    assert (crop[:, 1:-1, 0] == 255).all() and (crop[..., 0] > 200).all()  # the filter's edge
    assert (crop[..., 1] == 0).all()
    assert (squash[:, 0, 0] < 50).all() and (squash[:, 5, 0] == 255).all()  # black margins kept
    assert parse_source(str(tmp_path)).options["resize"] == "crop"  # the default for folders
    assert parse_source(f"folder:{tmp_path},resize=squash").options["resize"] == "squash"


def test_an_unreadable_training_image_is_one_line_naming_it(tmp_path):
    root = make_tree(tmp_path / "d")
    (root / "train" / "dog" / "img3.png").write_bytes(b"broken")
    with pytest.raises(SpecialistsError, match=r"img3.png: unreadable image"):
        load_data(f"folder:{root}")
    assert not list((tmp_path / "d").rglob("*.tmp"))


def test_jobs_read_the_cache_without_a_private_copy(tmp_path):
    """What a specialist, a control or a student trains on is a view of the memory-mapped
    cache: one copy of the pages for every worker, however large the data."""
    from specialists.storage import save_npy
    from specialists.train._job import mapped_tensor

    save_npy(tmp_path / "x.npy", np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    t = mapped_tensor(mapped)
    assert t.data_ptr() == mapped.ctypes.data and t.shape == (4, 8, 8, 3)
    assert np.array_equal(t[2].numpy(), mapped[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_the_eval_transform_normalises_in_the_images_layout(channels):
    """The fast path (no resize, no augmentation) equals (x / 255 - mean) / std and keeps the
    uint8 images' channels-last layout, as the resizing path does."""
    mean, std = [0.5, 0.4, 0.3][:channels], [0.2, 0.25, 0.3][:channels]
    x = torch.randint(0, 256, (16, 12, 12, channels), dtype=torch.uint8)
    want = (
        x.permute(0, 3, 1, 2).double() / 255
        - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    ) / torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    fast = BatchTransform(mean, std, 12)(x)
    assert fast.dtype == torch.float32 and fast.shape == (16, channels, 12, 12)
    assert torch.allclose(fast.double(), want, rtol=0, atol=1e-6)
    assert fast.stride() == x.permute(0, 3, 1, 2).stride()
    big = torch.randint(0, 256, (4, 20, 20, channels), dtype=torch.uint8)
    small = F.interpolate(
        big.permute(0, 3, 1, 2).float() / 255, size=(12, 12), mode="bilinear", antialias=True
    )
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    assert torch.allclose(BatchTransform(mean, std, 12)(big), (small - m) / s, atol=1e-6)
