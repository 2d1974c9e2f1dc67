"""The data sources, one registry entry each, and the parser of ``--data`` strings.

- ``embedded`` (default) or ``embedded:n_classes=40,n_groups=8,...``: the procedural dataset;
- ``folder:PATH`` or just ``PATH``: an ``ImageFolder`` tree with ``train/``, ``test/`` and an
  optional ``val/`` (carved from ``train/``, stratified and seeded, when absent);
- ``cifar10:ROOT``, ``cifar100:ROOT``, ``mnist:ROOT``: torchvision datasets already on disk
  (never downloaded); CIFAR-100's 20 superclasses are its coarse groups;
- ``omniglot:DIR`` (the npz release; alphabets are the coarse groups), with options
  ``omniglot:DIR,set=evaluation,n_train=15,size=28``, and ``fashion-mnist:DIR`` (the four IDX
  files).

A new source is one function ``DataSource -> DataBundle`` and one entry in ``SOURCES``.
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from .data import ArraySplit, DataBundle, DataSource, carve_val
from .decode import decode_to_npy, folder_cache_dir, load_decoded
from .embedded import SyntheticConfig, generate_split, group_of_classes, synthetic_class_names
from .errors import SpecialistsError
from .image_files import read_images
from .transforms import resize_images

__all__ = [
    "SOURCES",
    "load_data",
    "load_unlabelled",
    "parse_source",
    "read_idx",
    "source_at",
    "stored_size",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
}


# Options a path source takes after its folder (``KIND:DIR,key=value``): the allowed values, or
# int for a number.
PATH_OPTIONS: dict[str, dict[str, tuple[str, ...] | type]] = {
    "omniglot": {"set": ("background", "evaluation"), "n_train": int, "size": int},
    # group: a regular expression searched in each training image's path below train/
    # (class/file) whose first group (or whole match) names its source; group_csv: a CSV of
    # path,group rows, paths below train/. Values cannot hold commas (they separate options).
    # resize: crop keeps the aspect ratio (the centred square), squash does not
    "folder": {"group": str, "group_csv": str, "resize": ("crop", "squash")},
}


def parse_source(
    text: str, seed: int = 0, val_fraction: float = 0.1, image_size: int | None = None
) -> DataSource:
    """Parse ``embedded[:k=v,...]``, ``KIND:PATH`` or a bare folder path."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if kind == "embedded":
        options: dict = {}
        if rest:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                if not eq:
                    raise SpecialistsError(
                        f"--data {text}: expected key=value pairs after 'embedded:'"
                    )
                if key not in SyntheticConfig.__dataclass_fields__ or key == "seed":
                    allowed = sorted(set(SyntheticConfig.__dataclass_fields__) - {"seed"})
                    raise SpecialistsError(
                        f"--data {text}: unknown option {key!r}; allowed: {', '.join(allowed)}"
                    )
                try:
                    options[key] = float(value) if "." in value else int(value)
                except ValueError as e:
                    raise SpecialistsError(f"--data {text}: {key}={value!r} is not a number") from e
        return DataSource("embedded", None, options, seed, val_fraction, image_size)
    if sep and kind in PATH_OPTIONS:
        path, *items = rest.split(",")
        options = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or key not in PATH_OPTIONS[kind]:
                raise SpecialistsError(
                    f"--data {text}: expected {kind}:DIR[,key=value...] with keys "
                    f"{', '.join(PATH_OPTIONS[kind])}"
                )
            choices = PATH_OPTIONS[kind][key]
            if choices is str:
                if key == "group":
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise SpecialistsError(
                            f"--data {text}: group={value!r} is not a regular expression ({e})"
                        ) from e
                if key == "group_csv":
                    value = str(Path(value).expanduser().resolve())
                options[key] = value
            elif isinstance(choices, tuple):
                if value not in choices:
                    raise SpecialistsError(
                        f"--data {text}: {key} must be one of {', '.join(choices)}, got {value!r}"
                    )
                options[key] = value
            else:
                try:
                    options[key] = int(value)
                except ValueError as e:
                    raise SpecialistsError(f"--data {text}: {key}={value!r} is not a number") from e
        if kind == "folder":
            options.setdefault("resize", "crop")
        return DataSource(
            kind, str(Path(path).expanduser()), options, seed, val_fraction, image_size
        )
    if sep and kind in SOURCES:
        return DataSource(kind, str(Path(rest).expanduser()), {}, seed, val_fraction, image_size)
    if sep and re.fullmatch(r"[a-z0-9-]+", kind) and not Path(text).exists():
        raise SpecialistsError(
            f"--data {text}: unknown source kind {kind!r}; known: {', '.join(SOURCES)}"
        )
    return DataSource(
        "folder", str(Path(text).expanduser()), {"resize": "crop"}, seed, val_fraction, image_size
    )


def load_unlabelled(text: str, *, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """Images without labels, uint8 (N, size, size, channels): every image file below a folder
    that is not a data source's tree (no ``train/``), else the training split of the data source
    ``text`` names (its labels ignored)."""
    path = Path(text).expanduser()
    if path.is_dir() and not (path / "train").is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise SpecialistsError(f"{path}: no images in this folder")
        return read_images(files, size, channels)
    bundle = load_data(parse_source(text, seed=seed, image_size=size))
    return resize_images(bundle.train.images, size, channels)


# Sources whose images exist only at one size: (that size, what to call it).
FIXED_SIZES = {"cifar10": 32, "cifar100": 32, "mnist": 28, "fashion-mnist": 28}
OMNIGLOT_ORIGINAL = 105


def stored_size(source: DataSource) -> int:
    """The side in pixels of the images ``source`` loads (before any model resizes them)."""
    if source.kind == "embedded":
        return int(source.options.get("image_size", SyntheticConfig.image_size))
    if source.kind == "omniglot":
        return int(source.options.get("size", 28))
    if source.kind == "folder":
        return source.image_size or 64
    return FIXED_SIZES[source.kind]


def source_at(source: DataSource, size: int) -> DataSource:
    """``source`` with its images made at ``size`` pixels from the originals: rendered again
    (embedded), reduced from the 105 px drawings (Omniglot) or decoded again (image folders).
    Sources that exist at one size only cannot go above it; the error says so."""
    if size == stored_size(source):
        return source
    if source.kind == "embedded":
        return replace(source, options={**source.options, "image_size": int(size)})
    if source.kind == "omniglot":
        if size > OMNIGLOT_ORIGINAL:
            raise SpecialistsError(
                f"{source.describe()}: input size {size} is above Omniglot's {OMNIGLOT_ORIGINAL} px originals"
            )
        return replace(source, options={**source.options, "size": int(size)})
    if source.kind == "folder":
        return replace(source, image_size=int(size))
    native = FIXED_SIZES[source.kind]
    if size > native:
        raise SpecialistsError(
            f"{source.describe()}: input size {size} is above the data's {native} px; "
            f"{source.kind} has no larger originals to read"
        )
    return source


def load_data(source: DataSource | str, *, min_size: int | None = None) -> DataBundle:
    """Resolve a source to a :class:`DataBundle`, with one clear error on bad input.

    ``min_size``: the images come at least that large, made from the originals when the source
    stores them smaller (see :func:`source_at`); models resize from there to their own size."""
    if isinstance(source, str):
        source = parse_source(source)
    if min_size is not None and source.kind in SOURCES and min_size > stored_size(source):
        source = source_at(source, min_size)
    loader = SOURCES.get(source.kind)
    if source.kind == "dataset":
        raise SpecialistsError(
            f"{source.describe()}: data given in Python cannot be read again; read a run's copy "
            "with specialists.datasets.load_run_data"
        )
    if loader is None:
        raise SpecialistsError(
            f"unknown data source kind {source.kind!r}; known: {', '.join(SOURCES)}"
        )
    if source.kind != "embedded" and not Path(source.path or "").exists():
        raise SpecialistsError(f"{source.path}: data path not found")
    bundle = loader(source)
    if bundle.n_classes < 2:
        raise SpecialistsError(
            f"{source.describe()}: needs at least 2 classes, found {bundle.n_classes}"
        )
    return bundle


# ---------------------------------------------------------------------------------------------
# embedded


def _load_embedded(source: DataSource) -> DataBundle:
    try:
        cfg = SyntheticConfig(**source.options, seed=source.seed)
    except (TypeError, ValueError) as e:
        raise SpecialistsError(f"--data {source.describe()}: {e}") from e
    splits = {s: ArraySplit(*generate_split(cfg, s)) for s in ("train", "val", "test")}
    groups = group_of_classes(cfg)
    return DataBundle(
        source,
        **splits,
        class_names=synthetic_class_names(cfg),
        coarse=groups.astype(np.int64),
        coarse_names=[f"group{g:02d}" for g in range(cfg.n_groups)],
        hflip=False,  # a flip changes the stripe orientation, i.e. the class
    )


# ---------------------------------------------------------------------------------------------
# image folders


def _list_class_images(split_dir: Path) -> tuple[dict[str, list[Path]], int]:
    classes: dict[str, list[Path]] = {}
    skipped = 0
    for class_dir in sorted(
        p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        files = []
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
            else:
                skipped += 1
        classes[class_dir.name] = files
    return classes, skipped


def _load_folder(source: DataSource) -> DataBundle:
    """An image folder, listed, then decoded in parallel into memory-mapped arrays in the
    decode cache (:mod:`specialists.decode`): a folder larger than memory is never held in
    it, and a second load decodes nothing."""
    root = Path(source.path)
    if not root.is_dir():
        raise SpecialistsError(f"{root}: not a directory")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise SpecialistsError(
            f"{root}: no train/ folder (expected train/<class>/<image> and test/<class>/<image>)"
        )
    if not (root / "test").is_dir():
        raise SpecialistsError(
            f"{root}: no test/ folder (expected train/<class>/<image> and test/<class>/<image>)"
        )
    size = source.image_size or 64
    resize = source.options.get("resize", "squash")  # runs recorded before the option: squash
    train_files, _ = _list_class_images(train_dir)
    skipped = 0
    if not train_files:
        raise SpecialistsError(f"{train_dir}: no class folders")
    for name, files in train_files.items():
        if not files:
            raise SpecialistsError(f"{train_dir / name}: class folder has no images")
    class_names = list(train_files)
    index = {n: i for i, n in enumerate(class_names)}

    group_of = _group_keys(source, train_dir)

    def listing(split_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray | None]:
        nonlocal skipped
        files, n_skip = _list_class_images(split_dir)
        skipped += n_skip
        unknown = sorted(set(files) - set(index))
        if unknown:
            raise SpecialistsError(f"{split_dir / unknown[0]}: class not present in {train_dir}")
        missing = sorted(set(index) - set(files))
        if missing:
            log.warning(
                "%s: %d class(es) have no folder here (e.g. %r)",
                split_dir,
                len(missing),
                missing[0],
            )
        paths = [p for name in files for p in files[name]]
        labels = np.array([index[name] for name in files for _ in files[name]], dtype=np.int64)
        if not paths:
            raise SpecialistsError(f"{split_dir}: no images")
        groups = None
        if group_of is not None and split_dir == train_dir:
            groups = np.array([group_of(p.relative_to(split_dir).as_posix()) for p in paths])
            if all(g.startswith("file:") for g in groups):
                how = "the group CSV" if "group_csv" in source.options else "group=REGEX"
                raise SpecialistsError(
                    f"{source.describe()}: {how} names the source of no training image (it is "
                    f"matched against paths below train/, such as {paths[0].relative_to(split_dir).as_posix()!r})"
                )
        return paths, labels, groups

    lists = {"train": listing(train_dir), "test": listing(root / "test")}
    if (root / "val").is_dir():
        lists["val"] = listing(root / "val")
    else:  # carved from the file list, before decoding: the same split carve_val makes
        paths, labels, groups = lists["train"]
        keep, val = _carve_indices(labels, groups, source)
        lists["train"] = ([paths[i] for i in keep], labels[keep], _take(groups, keep))
        lists["val"] = ([paths[i] for i in val], labels[val], _take(groups, val))
    if skipped:
        log.warning("%s: skipped %d non-image file(s)", root, skipped)
    identity = {"root": str(root.resolve()), "size": size, "channels": 3, "resize": resize}
    cache = folder_cache_dir(identity, {split: lists[split][0] for split in lists})
    splits = {}
    for split in ("train", "val", "test"):
        paths, labels, groups = lists[split]
        images_file = cache / f"{split}_images.npy"
        images = load_decoded(images_file, len(paths), size, 3)
        if images is None:
            images = decode_to_npy(
                paths, size, 3, images_file, resize=resize, desc=f"decoding {split}/"
            )
        splits[split] = ArraySplit(images, labels, groups)
    return DataBundle(
        source,
        splits["train"],
        splits["val"],
        splits["test"],
        class_names,
        hflip=bool(source.options.get("hflip", False)),
    )


def _take(a: np.ndarray | None, index: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[index]


def _carve_indices(
    labels: np.ndarray, groups: np.ndarray | None, source: DataSource
) -> tuple[np.ndarray, np.ndarray]:
    """(keep, val) indices of the training split: :func:`carve_val`'s split, from the labels
    (and groups) alone."""
    placeholder = ArraySplit(np.zeros((len(labels), 1, 1, 1), np.uint8), labels, groups)
    keep, val = carve_val(placeholder, source, indices=True)
    return keep, val


def _group_keys(source: DataSource, train_dir: Path):
    """path below train/ -> the name of its source (video, writer, product), from the
    ``group`` regular expression or the ``group_csv`` file; None without either. Paths that
    neither names are their own group (counted in one warning)."""
    pattern, csv_path = source.options.get("group"), source.options.get("group_csv")
    if pattern is None and csv_path is None:
        return None
    unnamed: list[str] = []
    if csv_path is not None:
        import csv

        path = Path(csv_path).expanduser()
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SpecialistsError(f"{path}: unreadable group CSV ({e})") from e
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "group"]:
            rows = rows[1:]
        bad = next((i for i, r in enumerate(rows) if len(r) < 2), None)
        if bad is not None:
            raise SpecialistsError(f"{path}: row {bad + 1} is not 'path,group'")
        table = {r[0].strip(): r[1].strip() for r in rows}

        def key(rel: str) -> str:
            if rel not in table:
                unnamed.append(rel)
                return f"file:{rel}"
            return table[rel]
    else:
        regex = re.compile(pattern)

        def key(rel: str) -> str:
            m = regex.search(rel)
            if m is None:
                unnamed.append(rel)
                return f"file:{rel}"
            return m.group(1) if m.groups() else m.group(0)

    def counted(rel: str) -> str:
        out = key(rel)
        if len(unnamed) == 1 and out.startswith("file:"):
            log.warning(
                "%s: %s names no group for %r (and maybe others); such images are each their own group",
                train_dir,
                "the group CSV" if csv_path else f"group={pattern!r}",
                rel,
            )
        return out

    return counted


# ---------------------------------------------------------------------------------------------
# torchvision datasets on disk

CIFAR100_COARSE = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def _load_torchvision(source: DataSource) -> DataBundle:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[source.kind]
    try:
        train_ds = cls(source.path, train=True, download=False)
        test_ds = cls(source.path, train=False, download=False)
    except RuntimeError as e:
        raise SpecialistsError(
            f"{source.path}: no {source.kind} dataset here ({e}); it is never downloaded"
        ) from e

    def arrays(ds) -> ArraySplit:
        x = np.asarray(ds.data)
        if x.ndim == 3:
            x = x[..., None]
        return ArraySplit(x.astype(np.uint8), np.asarray(ds.targets, dtype=np.int64))

    train, val = carve_val(arrays(train_ds), source)
    class_names = list(train_ds.classes)
    coarse = coarse_names = None
    if source.kind == "cifar100":
        coarse_names = list(CIFAR100_COARSE)
        of = {fine: i for i, (_, fines) in enumerate(CIFAR100_COARSE.items()) for fine in fines}
        coarse = np.array([of[n] for n in class_names], dtype=np.int64)
    return DataBundle(
        source,
        train,
        val,
        arrays(test_ds),
        class_names,
        coarse,
        coarse_names,
        hflip=source.kind != "mnist",
    )


# ---------------------------------------------------------------------------------------------
# Omniglot and Fashion-MNIST in the formats of the shared data folder


def _load_omniglot(source: DataSource) -> DataBundle:
    """Omniglot background set at 28x28, ink white on black. Options: ``set`` (background or
    evaluation), ``n_train`` drawings per character (15; the other 5 are test), ``size`` (28)."""
    import torch
    import torch.nn.functional as F

    root = Path(source.path)
    which = source.options.get("set", "background")
    npz = root / f"images_{which}.npz"
    tsv = root / "alphabets.tsv"
    for f in (npz, tsv):
        if not f.is_file():
            raise SpecialistsError(f"{f}: file not found (expected the Omniglot npz release)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            images = z["images"]  # (n_chars, 20, 105, 105) bool, True = background
    except (OSError, ValueError, KeyError) as e:
        raise SpecialistsError(f"{npz}: unreadable Omniglot archive ({e})") from e
    n_chars, n_draw = images.shape[:2]
    size = int(source.options.get("size", 28))
    ink = torch.from_numpy(~images).reshape(-1, 1, *images.shape[2:]).float()
    small = F.interpolate(ink, size=(size, size), mode="area")
    small = (
        (small.clamp(0, 1) * 255 + 0.5)
        .to(torch.uint8)
        .reshape(n_chars, n_draw, size, size, 1)
        .numpy()
    )

    offset = 0 if which == "background" else 964
    alphabet_of = np.full(n_chars, -1, dtype=np.int64)
    alphabets: list[str] = []
    for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
        split, alphabet, first, last = line.split("\t")
        if split.strip() != which:
            continue
        alphabets.append(alphabet)
        alphabet_of[int(first) - 1 - offset : int(last) - offset] = len(alphabets) - 1
    if (alphabet_of < 0).any():
        raise SpecialistsError(f"{tsv}: does not assign every {which} character to an alphabet")
    class_names = []
    for c in range(n_chars):
        a = alphabet_of[c]
        class_names.append(
            f"{alphabets[a]}/char{c - int(np.flatnonzero(alphabet_of == a)[0]) + 1:02d}"
        )

    n_train = int(source.options.get("n_train", 15))
    if not 1 <= n_train < n_draw:
        raise SpecialistsError(
            f"{source.describe()}: n_train must leave test drawings (1 to {n_draw - 1}), got {n_train}"
        )
    labels = np.repeat(np.arange(n_chars), n_draw).reshape(n_chars, n_draw)
    train = ArraySplit(small[:, :n_train].reshape(-1, size, size, 1), labels[:, :n_train].ravel())
    test = ArraySplit(small[:, n_train:].reshape(-1, size, size, 1), labels[:, n_train:].ravel())
    train, val = carve_val(train, source)
    return DataBundle(source, train, val, test, class_names, alphabet_of, alphabets, hflip=False)


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpecialistsError(f"{path}: unreadable IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SpecialistsError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SpecialistsError(
            f"{path}: truncated IDX file ({body.size} of {int(np.prod(shape))} values)"
        )
    return body.reshape(shape)


def _load_fashion_mnist(source: DataSource) -> DataBundle:
    root = Path(source.path)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise SpecialistsError(
            f"{root / stem}.gz: file not found (expected the four Fashion-MNIST IDX files)"
        )

    def split(prefix: str) -> ArraySplit:
        x = read_idx(find(f"{prefix}-images-idx3-ubyte"))
        y = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(x) != len(y):
            raise SpecialistsError(f"{root}: {prefix} images and labels differ in length")
        return ArraySplit(x[..., None].copy(), y)

    train, val = carve_val(split("train"), source)
    coarse_names = ["tops", "trouser", "dress", "footwear", "bag"]
    coarse = np.array([0, 1, 0, 2, 0, 3, 0, 3, 4, 3], dtype=np.int64)
    return DataBundle(
        source, train, val, split("t10k"), list(FASHION_CLASSES), coarse, coarse_names, hflip=True
    )


# The registry: a source kind and the function that loads it.
SOURCES = {
    "embedded": _load_embedded,
    "folder": _load_folder,
    "cifar10": _load_torchvision,
    "cifar100": _load_torchvision,
    "mnist": _load_torchvision,
    "omniglot": _load_omniglot,
    "fashion-mnist": _load_fashion_mnist,
}
