"""Nothing executes on load; records and the image-folder loader hold up on generated input."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from specialists.errors import SpecialistsError
from specialists.models import load_checkpoint_weights
from specialists.records import GeneralistRecord, SpecialistRecord
from specialists.sources import load_data


class _Boom:
    """Unpickling this runs ``os.system``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["evil.pth", "evil.pt", "evil.safetensors"])
def test_a_crafted_pickle_is_refused_without_running_it(tmp_path, name):
    marker = tmp_path / "executed"
    path = tmp_path / name
    torch.save({"weight": _Boom(str(marker))}, path)  # pickles the payload; nothing runs yet
    with pytest.raises(SpecialistsError, match=name):
        load_checkpoint_weights(path)
    assert not marker.exists()


def test_a_crafted_pickle_in_place_of_run_weights_is_refused(tmp_path):
    from specialists.artifacts import load_generalist
    from specialists.storage import save_json

    marker = tmp_path / "executed"
    gen = tmp_path / "run" / "generalist"
    gen.mkdir(parents=True)
    torch.save(_Boom(str(marker)), gen / "model.safetensors")
    record = GeneralistRecord(
        architecture="test_efficientnet",
        n_classes=2,
        class_names=["a", "b"],
        in_chans=3,
        input_size=16,
        mean=[0.5] * 3,
        std=[0.2] * 3,
        data={},
        hflip=False,
        metrics={},
        weights_sha256="0" * 64,
    )
    save_json(gen / "record.json", record.to_dict())
    with pytest.raises(SpecialistsError, match="model.safetensors"):
        load_generalist(tmp_path / "run")
    assert not marker.exists()


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(
    classes=st.lists(names, min_size=1, max_size=5),
    mean=st.lists(floats, min_size=1, max_size=3),
    metrics=st.dictionaries(names, floats, max_size=4),
)
def test_generalist_record_json_round_trip(classes, mean, metrics):
    rec = GeneralistRecord(
        architecture="resnet18",
        n_classes=len(classes),
        class_names=classes,
        in_chans=len(mean),
        input_size=32,
        mean=mean,
        std=mean,
        data={"kind": "embedded"},
        hflip=False,
        metrics=metrics,
        weights_sha256="ab" * 32,
        coarse=list(range(len(classes))),
        coarse_names=classes,
    )
    text = json.dumps(rec.to_dict(), ensure_ascii=False)
    assert GeneralistRecord.from_dict(json.loads(text)) == rec


@given(
    classes=st.lists(st.integers(0, 10_000), min_size=1, max_size=8, unique=True).map(sorted),
    offset=floats,
    prior=st.floats(0, 1),
)
def test_specialist_record_json_round_trip(classes, offset, prior):
    rec = SpecialistRecord(
        id=3,
        classes=classes,
        class_names=[f"c{c}" for c in classes],
        group_hash="f" * 16,
        generalist_sha256="a" * 64,
        architecture="test_efficientnet",
        train_fraction=0.5,
        natural_prior=prior,
        gated_prior=prior,
        correction="gated",
        logit_offset=[offset] * (len(classes) + 1),
        metrics={"a": 1.0},
        history=[{"epoch": 1, "val": 0.5}],
        config={"lr": 0.001},
        weights_sha256="b" * 64,
    )
    assert SpecialistRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_records_refuse_unknown_keys_and_newer_schemas():
    d = GeneralistRecord("m", 1, ["a"], 3, 8, [0.0], [1.0], {}, False, {}, "x").to_dict()
    with pytest.raises(SpecialistsError, match="unknown key 'surprise'"):
        GeneralistRecord.from_dict({**d, "surprise": 1})
    with pytest.raises(SpecialistsError, match="newer than this program"):
        GeneralistRecord.from_dict({**d, "schema_version": 99})


folder_name = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\:"),
    min_size=1,
    max_size=10,
).filter(lambda s: s.strip() == s and not s.startswith(".") and s not in (".", ".."))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    classes=st.lists(folder_name, min_size=2, max_size=4, unique_by=lambda s: s.casefold()),
    counts=st.lists(st.integers(2, 5), min_size=4, max_size=4),
    modes=st.lists(st.sampled_from(["RGB", "L", "RGBA", "P"]), min_size=4, max_size=4),
    junk=st.integers(0, 2),
)
def test_image_folder_loader_on_generated_trees(classes, counts, modes, junk):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for j, c in enumerate(classes):
            for split, n in (("train", counts[j]), ("test", 1)):
                d = root / split / c
                d.mkdir(parents=True)
                for i in range(n):
                    arr = rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)
                    Image.fromarray(arr).convert(modes[j]).save(d / f"{i}.png")
            for k in range(junk):
                (root / "train" / c / f"notes{k}.txt").write_text("x")
        b = load_data(f"folder:{root}")
        assert b.class_names == sorted(classes)
        assert len(b.train) + len(b.val) == sum(counts[: len(classes)])
        assert len(b.test) == len(classes)
        assert b.train.images.shape[1:] == (64, 64, 3) and b.train.images.dtype == np.uint8
        per_class = np.bincount(
            np.concatenate([b.train.labels, b.val.labels]), minlength=len(classes)
        )
        by_name = dict(zip(classes, counts))
        assert per_class.tolist() == [by_name[c] for c in b.class_names]
