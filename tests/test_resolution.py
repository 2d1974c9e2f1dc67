"""Specialists with their own input size: the resolution family of the embedded data, data made
at each size from the originals, inference that resizes for each model as training did."""

import numpy as np
import pytest
import torch

from specialists.calibrate import collect
from specialists.cli import main
from specialists.combination import Combination
from specialists.data import DataSource
from specialists.embedded import SyntheticConfig, detail_kind_of_groups
from specialists.ensemble import Ensemble
from specialists.errors import SpecialistsError
from specialists.models import create_model
from specialists.run import RunDir
from specialists.sources import load_data, source_at
from specialists.storage import load_npy, save_json, save_tensors
from specialists.train._job import cache_data, cache_sizes, load_cached
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.specialist import SpecialistConfig, train_specialist
from specialists.transforms import BatchTransform

# Group 0 is told apart only by a grating of 14 cycles per image: a 32 px view resolves it, a
# 16 px view cannot. Group 1 is an ordinary group. Stored at 32 px, the generalist looks at 16.
FAMILY = (
    "embedded:n_classes=6,n_groups=2,fine_groups=1,image_size=32,"
    "train_per_class=120,val_per_class=30,test_per_class=10"
)
GROUPS = [[0, 1, 2], [3, 4, 5]]
FAST = SpecialistConfig(epochs=5, batch_size=32, examples_per_epoch=640, lr=3e-3)


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("family")
    cfg = GeneralistConfig(data=FAMILY, input_size=16, epochs=3, batch_size=32, threads=1)
    train_generalist(cfg, out, progress=False)
    run = RunDir.of(out)
    cache_data(run, load_data(FAMILY))
    save_json(run.clusters, {"groups": [{"classes": g} for g in GROUPS]})
    return out


def test_the_family_is_planted_where_asked_and_the_default_data_is_untouched():
    cfg = SyntheticConfig(n_classes=20, n_groups=4, fine_groups=2)
    assert detail_kind_of_groups(cfg)[:2] == ["fine", "fine"]
    assert detail_kind_of_groups(cfg)[2:] == detail_kind_of_groups(SyntheticConfig(20, 4))[2:]
    with pytest.raises(ValueError, match="fine_cycles must be between 1 and image_size / 2"):
        SyntheticConfig(image_size=16, fine_groups=1)  # 14 cycles need at least 28 px


def test_a_16px_view_cannot_separate_the_family_and_a_32px_specialist_can(family_run):
    torch.manual_seed(0)
    low = train_specialist(family_run, 0, GROUPS[0], FAST, threads=1, out="low")
    high = train_specialist(
        family_run, 0, GROUPS[0], FAST, threads=1, member=("test_efficientnet", 32, None)
    )
    assert low.input_size is None and high.input_size == 32
    # three classes: chance is 1/3; the grating is all that tells them apart
    assert low.metrics["in_group_acc"] < 0.6, low.metrics
    assert low.metrics["generalist_in_group_acc"] < 0.6, low.metrics
    assert high.metrics["in_group_acc"] > 0.85, high.metrics


def test_inference_resizes_each_model_exactly_as_training_did(family_run):
    train_specialist(family_run, 1, GROUPS[1], FAST, threads=1)  # the generalist's 16 px
    run = RunDir.of(family_run)
    if not run.specialist(0).record.is_file():  # when run alone
        train_specialist(
            family_run, 0, GROUPS[0], FAST, threads=1, member=("test_efficientnet", 32, None)
        )
    ens = Ensemble.load(family_run, "cpu", combination=Combination())
    assert ens.input_size == 32 and ens.mixed_sizes
    val = load_data(DataSource.from_dict(ens.record.data), min_size=ens.input_size).val
    cached, _ = load_cached(run, "val")
    assert np.array_equal(val.images, cached)  # the data a job trained on, from the source
    # the generalist: its validation outputs at training time, again through the ensemble
    assert np.allclose(ens.generalist_proba(val.images), load_npy(run.val_probs), atol=1e-6)
    # each specialist: its validation accuracy in its group, again through the ensemble
    col = collect(ens, val.images, val.labels, top_n_max=2)
    for m, rec in enumerate(ens.specialists):
        inside = np.flatnonzero(np.isin(val.labels, rec.classes))
        model = ens.load_specialist(rec)
        x = ens.transform_for(rec)(torch.from_numpy(val.images[inside]))
        assert x.shape[-1] == rec.size(ens.record)
        with torch.no_grad():
            pred = model(x)[:, : len(rec.classes)].argmax(1).numpy()
        acc = float((np.asarray(rec.classes)[pred] == val.labels[inside]).mean())
        assert acc == pytest.approx(rec.metrics["in_group_acc"], abs=1e-9), rec.id
        assert col.logits[m].shape[1] == len(rec.classes) + 1
    q = ens.predict_proba(val.images)
    assert q.shape == (len(val), 6) and np.allclose(q.sum(1), 1, atol=1e-5)
    # the module's forward: one float batch at 32 px, each member resizing it to its own size
    with torch.inference_mode():
        log_q = ens(ens.preprocess(val.images))
    assert log_q.shape == (len(val), 6)
    assert np.abs(log_q.exp().numpy() - q).max() <= 1e-5
    with pytest.raises(SpecialistsError, match="images are 16x16 but specialist 0 takes 32 px"):
        ens.predict_proba(val.images[:, ::2, ::2])


def test_data_is_made_again_at_a_larger_size_with_the_same_examples(family_run, tmp_path):
    run = RunDir.of(family_run)
    from specialists.artifacts import generalist_record

    cache_sizes(run, generalist_record(run), [48])
    images, labels = load_cached(run, "train", 48)
    base_images, base_labels = load_cached(run, "train")
    assert images.shape[1:3] == (48, 48) and np.array_equal(labels, base_labels)
    assert load_cached(run, "train", 24)[0].shape[1] == 32  # smaller sizes read the stored data
    t = BatchTransform([0.5] * 3, [0.25] * 3, 16)
    assert t(torch.from_numpy(np.array(images[:4]))).shape == (4, 3, 16, 16)


def test_sources_make_larger_images_only_from_originals():
    emb = source_at(DataSource("embedded", None, {"image_size": 16}), 40)
    assert load_data(emb.__class__(**{**emb.to_dict(), "options": {
        **emb.options, "n_classes": 2, "n_groups": 1, "train_per_class": 2,
        "val_per_class": 1, "test_per_class": 1}})).image_size == 40  # fmt: skip
    omni = source_at(DataSource("omniglot", "/data/omniglot"), 56)
    assert omni.options["size"] == 56
    with pytest.raises(SpecialistsError, match="above Omniglot's 105 px originals"):
        source_at(DataSource("omniglot", "/data/omniglot"), 128)
    with pytest.raises(
        SpecialistsError, match="above the data's 28 px; fashion-mnist has no larger"
    ):
        source_at(DataSource("fashion-mnist", "/data/fm"), 56)
    assert source_at(DataSource("folder", "/data/x", image_size=32), 64).image_size == 64


def test_per_group_settings_override_the_run_wide_ones(family_run):
    from specialists.artifacts import generalist_record

    grec = generalist_record(RunDir.of(family_run))
    cfg = SpecialistConfig(input_size=24, groups={"1": {"input_size": 32, "model": "resnet10t"}})
    assert cfg.member(0, grec) == ("test_efficientnet", 24, None)
    assert cfg.member(1, grec) == ("resnet10t", 32, None)
    assert SpecialistConfig().member(0, grec) == ("test_efficientnet", 16, None)
    with pytest.raises(ValueError, match="groups: .x. is not a group id"):
        SpecialistConfig(groups={"x": {"input_size": 32}})
    with pytest.raises(ValueError, match="groups: 0: expected a mapping with keys among"):
        SpecialistConfig(groups={0: {"size": 32}})


def test_bad_specialist_settings_are_one_line_and_status_2(family_run, tmp_path, capsys):
    def fails(args, message):
        code = main(["train", str(family_run), "--quiet", "--workers", "1", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err

    fails(["--specialist-input-size", "12"], "input size 12 is below the generalist's 16")
    fails(["--specialist-model", "resnet_nope"], "unknown timm model 'resnet_nope'")
    other = tmp_path / "other.safetensors"
    save_tensors(other, create_model("resnet10t", 6, 3).state_dict())
    fails(["--specialist-checkpoint", str(other)], "does not match test_efficientnet")
    config = tmp_path / "s.yaml"
    config.write_text("groups:\n  5:\n    input_size: 32\n")
    fails(["--config", str(config)], "groups: 5: no such group (the run has groups 0..1)")


@pytest.mark.slow
def test_controls_add_the_large_generalist_at_the_specialists_size(family_run, tmp_path, capsys):
    import json
    import shutil

    from specialists.train.pipeline import train_specialists

    out = tmp_path / "run"
    shutil.copytree(family_run, out)
    cfg = SpecialistConfig(**{**FAST.__dict__, "input_size": 32})
    train_specialists(out, cfg, workers=1, progress=False)
    assert main(["controls", str(out), "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((out / "metrics.json").read_text())["controls"]}
    large = rows["large generalist"]
    assert large["input_size"] == 32 and large["architecture"] == "test_efficientnet"
    assert large["images_per_second"] > 0 and large["throughput_ratio"] > 0
    assert "large generalist" in printed and "at 32 px" in printed
    rec = json.loads((out / "controls" / "large" / "000.json").read_text())
    spent = sum(
        json.loads((out / "specialists" / f"00{i}.json").read_text())["metrics"]["examples_seen"]
        for i in range(2)
    )
    assert rec["input_size"] == 32 and rec["examples"] == spent  # the specialists' compute
    # the random groups run at the specialists' size too
    rand = [
        json.loads((out / "controls/random/specialists" / f"00{i}.json").read_text())
        for i in range(2)
    ]
    assert all(r["input_size"] == 32 for r in rand)


@pytest.mark.slow
def test_a_student_learns_from_specialists_at_their_own_size(family_run, tmp_path, capsys):
    import json
    import shutil

    from specialists.train.distill import DistillConfig, run_distill
    from specialists.train.pipeline import train_specialists

    out = tmp_path / "run"
    shutil.copytree(family_run, out)
    cfg = SpecialistConfig(**{**FAST.__dict__, "groups": {"0": {"input_size": 32}}})
    train_specialists(out, cfg, workers=1, progress=False)
    ens = Ensemble.load(out, "cpu")
    assert [s.size(ens.record) for s in ens.all_specialists] == [32, 16]
    assert main(["distill", str(out), "--teacher", "online", "--quiet"]) == 2
    assert "the teacher must see the originals" in capsys.readouterr().err
    results = run_distill(out, DistillConfig(epochs=1, batch_size=64), workers=1, progress=False)
    assert results[0].ok, results[0].error
    student = json.loads((out / "student" / "000.json").read_text())
    assert 0 <= student["metrics"]["teacher_val_acc"] <= 1
    assert main(["evaluate", str(out), "--quiet"]) == 0  # the student's row at its own size
    assert "student (distilled ensemble)" in capsys.readouterr().out


def test_records_from_before_a_setting_existed_still_count_as_done():
    from dataclasses import asdict

    from specialists.train.launch import same_config

    cfg = SpecialistConfig()
    old = {k: v for k, v in asdict(cfg).items() if k not in ("model", "input_size", "groups")}
    assert same_config(old, cfg)
    assert not same_config(old, SpecialistConfig(input_size=32))
    # group ids from YAML (ints) compare equal to the same ids read back from a record's JSON
    yaml_cfg = SpecialistConfig(groups={3: {"input_size": 32}})
    assert yaml_cfg.groups == {"3": {"input_size": 32}}
    assert same_config(json_roundtrip(asdict(yaml_cfg)), yaml_cfg)


def json_roundtrip(d):
    import json

    return json.loads(json.dumps(d))


def test_halves_are_never_empty_with_one_example_per_class():
    from specialists.calibrate import split_halves

    select, confirm = split_halves(np.arange(9), 0)  # nine classes, one example each
    assert len(select) and len(confirm) and len(select) + len(confirm) == 9
    assert not set(select) & set(confirm)


def test_a_generalist_above_the_stored_size_keeps_the_stored_data(tmp_path):
    """No specialist size given: nothing is remade at the generalist's input size (the
    specialists and the evaluation read the stored images, as before sizes existed)."""
    from specialists.evaluate import evaluate_run
    from specialists.train.pipeline import train_specialists

    data = "embedded:n_classes=6,n_groups=2,image_size=16,train_per_class=30,val_per_class=10,test_per_class=10"
    out = tmp_path / "run"
    train_generalist(
        GeneralistConfig(data=data, input_size=24, epochs=1, batch_size=32, threads=1),
        out,
        progress=False,
    )
    save_json(RunDir.of(out).clusters, {"groups": [{"classes": g} for g in GROUPS]})
    fast = SpecialistConfig(epochs=1, batch_size=32, examples_per_epoch=64)
    train_specialists(out, fast, workers=1, progress=False)
    assert not (out / "cache" / "24px").exists()
    m = evaluate_run(out, device="cpu")
    assert m["n_test"] == 60
