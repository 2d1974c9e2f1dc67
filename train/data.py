"""Data sources behind one small interface.

A source is named by a spec string and resolves to a :class:`DataBundle`: train/val/test splits
held in memory as uint8 arrays (N, H, W, C), class names, and the known coarse groups where the
data has them. Sources:

- ``embedded`` (default) or ``embedded:n_classes=40,n_groups=8,...``: the procedural dataset;
- ``folder:PATH`` or just ``PATH``: an ``ImageFolder`` tree with ``train/``, ``test/`` and an
  optional ``val/`` (carved from ``train/``, stratified and seeded, when absent);
- ``cifar10:ROOT``, ``cifar100:ROOT``, ``mnist:ROOT``: torchvision datasets already on disk
  (never downloaded); CIFAR-100's 20 superclasses are its coarse groups;
- ``omniglot:DIR`` (the npz release; alphabets are the coarse groups) and ``fashion-mnist:DIR``
  (the four IDX files).
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from specialists.errors import SpecialistsError
from specialists.imageio import read_images

from .synthetic import SyntheticConfig, generate_split, group_of_classes, synthetic_class_names

__all__ = ["ArraySplit", "DataBundle", "DataSpec", "load_data", "parse_data_spec"]

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
KINDS = ("embedded", "folder", "cifar10", "cifar100", "mnist", "omniglot", "fashion-mnist")


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from, JSON-serialisable so a run can reload exactly the same data."""

    kind: str = "embedded"
    path: str | None = None
    options: dict = field(default_factory=dict)
    seed: int = 0
    val_fraction: float = 0.1
    image_size: int | None = None  # folder sources: size images are decoded to (default 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(**d)

    def describe(self) -> str:
        if self.kind == "embedded":
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            return "embedded" + (f":{opts}" if opts else "")
        return f"{self.kind}:{self.path}"


def parse_data_spec(
    text: str, seed: int = 0, val_fraction: float = 0.1, image_size: int | None = None
) -> DataSpec:
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
        return DataSpec("embedded", None, options, seed, val_fraction, image_size)
    if sep and kind in KINDS:
        return DataSpec(kind, str(Path(rest).expanduser()), {}, seed, val_fraction, image_size)
    if sep and re.fullmatch(r"[a-z0-9-]+", kind) and not Path(text).exists():
        raise SpecialistsError(
            f"--data {text}: unknown source kind {kind!r}; known: {', '.join(KINDS)}"
        )
    return DataSpec("folder", str(Path(text).expanduser()), {}, seed, val_fraction, image_size)


@dataclass
class ArraySplit:
    """One split in memory: ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArraySplit:
        return ArraySplit(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    spec: DataSpec
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    class_names: list[str]
    coarse: np.ndarray | None = None  # (K,) coarse group id of every class, when known
    coarse_names: list[str] | None = None
    hflip: bool = False  # whether a horizontal flip preserves the class

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    def split(self, name: str) -> ArraySplit:
        if name not in ("train", "val", "test"):
            raise SpecialistsError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (a seeded sample)."""
        imgs = self.train.images
        rng = np.random.default_rng(0)
        sample = imgs[rng.choice(len(imgs), size=min(len(imgs), 5000), replace=False)]
        x = sample.reshape(-1, imgs.shape[-1]).astype(np.float64) / 255.0
        std = np.maximum(x.std(0), 1e-3)
        return x.mean(0).round(6).tolist(), std.round(6).tolist()


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, carved): ``fraction`` of every class carved out, at least one per class
    when the class has two or more examples."""
    rng = np.random.default_rng([seed, 4242])
    keep, carved = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1 if len(idx) >= 2 else 0), len(idx) - 1) if fraction > 0 else 0
        carved.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(carved))


def _carve_val(train: ArraySplit, spec: DataSpec) -> tuple[ArraySplit, ArraySplit]:
    keep, val = stratified_split(train.labels, spec.val_fraction, spec.seed)
    if len(val) == 0:
        raise SpecialistsError(
            f"{spec.describe()}: too few training images to carve a validation split"
        )
    return train.subset(keep), train.subset(val)


def load_data(spec: DataSpec | str) -> DataBundle:
    """Resolve a spec to a :class:`DataBundle`, with one clear error on bad input."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    loader = {
        "embedded": _load_embedded,
        "folder": _load_folder,
        "cifar10": _load_torchvision,
        "cifar100": _load_torchvision,
        "mnist": _load_torchvision,
        "omniglot": _load_omniglot,
        "fashion-mnist": _load_fashion_mnist,
    }.get(spec.kind)
    if loader is None:
        raise SpecialistsError(f"unknown data source kind {spec.kind!r}; known: {', '.join(KINDS)}")
    if spec.kind != "embedded" and not Path(spec.path or "").exists():
        raise SpecialistsError(f"{spec.path}: data path not found")
    bundle = loader(spec)
    if bundle.n_classes < 2:
        raise SpecialistsError(
            f"{spec.describe()}: needs at least 2 classes, found {bundle.n_classes}"
        )
    return bundle


# ---------------------------------------------------------------------------------------------
# embedded


def _load_embedded(spec: DataSpec) -> DataBundle:
    try:
        cfg = SyntheticConfig(**spec.options, seed=spec.seed)
    except (TypeError, ValueError) as e:
        raise SpecialistsError(f"--data {spec.describe()}: {e}") from e
    splits = {s: ArraySplit(*generate_split(cfg, s)) for s in ("train", "val", "test")}
    groups = group_of_classes(cfg)
    return DataBundle(
        spec,
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


def _load_folder(spec: DataSpec) -> DataBundle:
    root = Path(spec.path)
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
    size = spec.image_size or 64
    train_files, _ = _list_class_images(train_dir)
    skipped = 0
    if not train_files:
        raise SpecialistsError(f"{train_dir}: no class folders")
    for name, files in train_files.items():
        if not files:
            raise SpecialistsError(f"{train_dir / name}: class folder has no images")
    class_names = list(train_files)
    index = {n: i for i, n in enumerate(class_names)}

    def build(split_dir: Path) -> ArraySplit:
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
        return ArraySplit(read_images(paths, size, channels=3), labels)

    train = build(train_dir)
    test = build(root / "test")
    if (root / "val").is_dir():
        val = build(root / "val")
    else:
        train, val = _carve_val(train, spec)
    if skipped:
        log.warning("%s: skipped %d non-image file(s)", root, skipped)
    return DataBundle(
        spec, train, val, test, class_names, hflip=bool(spec.options.get("hflip", False))
    )


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


def _load_torchvision(spec: DataSpec) -> DataBundle:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[spec.kind]
    try:
        train_ds = cls(spec.path, train=True, download=False)
        test_ds = cls(spec.path, train=False, download=False)
    except RuntimeError as e:
        raise SpecialistsError(
            f"{spec.path}: no {spec.kind} dataset here ({e}); it is never downloaded"
        ) from e

    def arrays(ds) -> ArraySplit:
        x = np.asarray(ds.data)
        if x.ndim == 3:
            x = x[..., None]
        return ArraySplit(x.astype(np.uint8), np.asarray(ds.targets, dtype=np.int64))

    train, val = _carve_val(arrays(train_ds), spec)
    class_names = list(train_ds.classes)
    coarse = coarse_names = None
    if spec.kind == "cifar100":
        coarse_names = list(CIFAR100_COARSE)
        of = {fine: i for i, (_, fines) in enumerate(CIFAR100_COARSE.items()) for fine in fines}
        coarse = np.array([of[n] for n in class_names], dtype=np.int64)
    return DataBundle(
        spec,
        train,
        val,
        arrays(test_ds),
        class_names,
        coarse,
        coarse_names,
        hflip=spec.kind != "mnist",
    )


# ---------------------------------------------------------------------------------------------
# Omniglot and Fashion-MNIST in the formats of the shared data folder


def _load_omniglot(spec: DataSpec) -> DataBundle:
    """Omniglot background set at 28x28, ink white on black. Options: ``set`` (background or
    evaluation), ``n_train`` drawings per character (15; the other 5 are test), ``size`` (28)."""
    import torch
    import torch.nn.functional as F

    root = Path(spec.path)
    which = spec.options.get("set", "background")
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
    size = int(spec.options.get("size", 28))
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

    n_train = int(spec.options.get("n_train", 15))
    labels = np.repeat(np.arange(n_chars), n_draw).reshape(n_chars, n_draw)
    train = ArraySplit(small[:, :n_train].reshape(-1, size, size, 1), labels[:, :n_train].ravel())
    test = ArraySplit(small[:, n_train:].reshape(-1, size, size, 1), labels[:, n_train:].ravel())
    train, val = _carve_val(train, spec)
    return DataBundle(spec, train, val, test, class_names, alphabet_of, alphabets, hflip=False)


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


def _load_fashion_mnist(spec: DataSpec) -> DataBundle:
    root = Path(spec.path)

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

    train, val = _carve_val(split("train"), spec)
    coarse_names = ["tops", "trouser", "dress", "footwear", "bag"]
    coarse = np.array([0, 1, 0, 2, 0, 3, 0, 3, 4, 3], dtype=np.int64)
    return DataBundle(
        spec, train, val, split("t10k"), list(FASHION_CLASSES), coarse, coarse_names, hflip=True
    )
