"""Data given in Python as torch Datasets: read once, kept in the run, used by every step."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from specialists.data import DataSource
from specialists.datasets import bundle_from_datasets, load_run_data
from specialists.errors import SpecialistsError
from specialists.evaluate import evaluate_run
from specialists.grouping import ClusterConfig, cluster_run
from specialists.records import GeneralistRecord
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig

from .conftest import TINY_DATA

PERM = np.array([3, 7, 1, 0, 11, 5, 9, 2, 10, 4, 8, 6])  # classes renamed: not the source's labels


class TensorDataset(torch.utils.data.Dataset):
    """(C, H, W) float tensors in [0, 1], as torchvision's ToTensor gives, and tensor labels."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.classes = [f"shape{c:02d}" for c in range(12)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255
        return x, torch.tensor(self.labels[i])


class PilDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), int(self.labels[i])


@pytest.fixture(scope="module")
def datasets():
    src = load_data(TINY_DATA)
    # 25 training images per class, not the source's 40: a step that read the default source
    # instead would see other counts
    keep = np.concatenate([np.flatnonzero(src.train.labels == c)[:25] for c in range(12)])
    train = TensorDataset(src.train.images[keep], PERM[src.train.labels[keep]])
    test = PilDataset(src.test.images, PERM[src.test.labels])
    return train, test


@pytest.mark.slow
def test_a_torch_dataset_runs_the_whole_pipeline(datasets, tmp_path):
    train, test = datasets
    bundle = bundle_from_datasets(train, test, name="shapes", val_fraction=0.2)
    assert bundle.class_names == train.classes and len(bundle.train) + len(bundle.val) == 300
    assert bundle.source.kind == "dataset" and bundle.source.describe() == "dataset:shapes"
    out = tmp_path / "run"
    cfg = GeneralistConfig(epochs=3, batch_size=32, threads=1)  # data: the default, overridden
    rec = train_generalist(cfg, out, bundle=bundle, progress=False)
    assert rec.data["kind"] == "dataset" and rec.metrics["n_train"] == len(bundle.train)
    run = RunDir.of(out)
    again = load_run_data(run, rec)  # every later step reads the run's copy
    for split in ("train", "val", "test"):
        assert np.array_equal(again.split(split).images, bundle.split(split).images)
        assert np.array_equal(again.split(split).labels, bundle.split(split).labels)
    cluster_run(out, ClusterConfig(n_groups=3, min_group_images=10))
    train_specialists(
        out,
        SpecialistConfig(epochs=1, batch_size=32, examples_per_epoch=128),
        workers=1,
        progress=False,
    )
    # the specialists trained on the dataset: their groups' training counts are its counts
    for path in sorted(run.specialists_dir.glob("*.json")):
        spec = json.loads(path.read_text())
        inside = np.isin(bundle.train.labels, spec["classes"]).sum()
        assert spec["metrics"]["n_group_train"] == inside
        assert spec["metrics"]["n_group_val"] == np.isin(bundle.val.labels, spec["classes"]).sum()
    combination = json.loads(run.combination.read_text())
    assert combination["chosen_on"]["n_examples"] == len(bundle.val)
    m = evaluate_run(out)
    assert m["n_test"] == len(test) == 120
    with pytest.raises(SpecialistsError, match="data given in Python cannot be read again"):
        load_data(DataSource.from_dict(rec.data))


def test_datasets_of_the_wrong_kind_are_one_clear_line():
    good = PilDataset(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]))

    class Items(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    img = np.zeros((8, 8, 3), np.uint8)
    cases = [
        (Items([img, img]), "train dataset item 0: expected a pair (image, label), got ndarray"),
        (Items([(img, "cat")]), "train dataset item 0: the label is 'cat'"),
        (Items([(img, 0), (np.zeros((9, 8, 3), np.uint8), 1)]), "item 1: image of shape (9, 8, 3)"),
        (Items([(np.full((8, 8, 3), 2.5), 0)]), "float image with values outside [0, 1]"),
        (Items([("a path", 0)]), "the image is a str"),
        (Items([]), "the train dataset is empty"),
        ([1, 2, 3].__iter__(), "has no len()"),
    ]
    for bad, message in cases:
        with pytest.raises(SpecialistsError, match=re.escape(message)):
            bundle_from_datasets(bad, good)
    with pytest.raises(
        SpecialistsError, match="labels run from 0 to 1 but there are 1 class names"
    ):
        bundle_from_datasets(good, good, class_names=["only"])


def test_a_run_without_its_cached_copy_says_so(tmp_path):
    rec = GeneralistRecord(
        architecture="test_efficientnet",
        n_classes=2,
        class_names=["a", "b"],
        in_chans=3,
        input_size=8,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        data=DataSource("dataset", None, {"name": "x"}, 0, 0.1, 8).to_dict(),
        hflip=False,
        metrics={},
        weights_sha256="0",
    )
    with pytest.raises(SpecialistsError, match="train_labels.npy: missing; data given in Python"):
        load_run_data(RunDir.of(tmp_path), rec)
    with pytest.raises(SpecialistsError, match="given in Python at 8 px; a model at 16 px"):
        load_run_data(RunDir.of(tmp_path), rec, min_size=16)
