import json

import numpy as np
import pytest
import torch

from specialists.artifacts import load_generalist
from specialists.cli import main
from specialists.errors import SpecialistsError
from specialists.models import create_model, predict_proba
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import load_tensors, save_tensors
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.transforms import make_transforms

from .conftest import TINY_DATA


def tiny_cfg(**kw) -> GeneralistConfig:
    base = dict(data=TINY_DATA, epochs=1, batch_size=32, threads=1, eval_batch_size=64)
    base.update(kw)
    return GeneralistConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # on the CPU: the exact-reload test below compares against CPU inference
    record = train_generalist(tiny_cfg(epochs=2, device="cpu"), out, progress=False)
    return out, record


def test_one_epoch_writes_a_complete_run(trained):
    out, record = trained
    run = RunDir.of(out)
    for path in (
        run.generalist_weights,
        run.generalist_record,
        run.history,
        run.val_probs,
        run.val_labels,
        run.config,
    ):
        assert path.is_file(), path
    assert run.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the training curve, a figure
    assert not run.resume_dir.exists()  # the resume state is removed once training is complete
    probs = np.load(run.val_probs)
    assert probs.shape == (120, 12) and np.allclose(probs.sum(1), 1, atol=1e-5)
    rows = run.history.read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss") and len(rows) == 3
    assert record.n_classes == 12 and record.coarse == [0] * 4 + [1] * 4 + [2] * 4
    assert json.loads(run.generalist_record.read_text())["architecture"] == "test_efficientnet"


def test_reload_reproduces_the_recorded_validation_accuracy_exactly(trained):
    out, record = trained
    model, rec = load_generalist(out)
    bundle = load_data(TINY_DATA)
    _, eval_tf = make_transforms(rec)
    probs = predict_proba(
        model,
        bundle.val.images,
        transform=eval_tf,
        device=torch.device("cpu"),
        batch_size=rec.eval_batch_size,
    )
    assert float((probs.argmax(1) == bundle.val.labels).mean()) == rec.metrics["val_accuracy"]
    assert np.array_equal(probs, np.load(RunDir.of(out).val_probs))


def test_same_seed_same_weights(tmp_path):
    a = train_generalist(tiny_cfg(), tmp_path / "a", progress=False)
    b = train_generalist(tiny_cfg(), tmp_path / "b", progress=False)
    assert a.weights_sha256 == b.weights_sha256
    c = train_generalist(tiny_cfg(seed=1), tmp_path / "c", progress=False)
    assert c.weights_sha256 != a.weights_sha256


def test_interrupted_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    import specialists.train.generalist as g

    full = train_generalist(tiny_cfg(epochs=3), tmp_path / "full", progress=False)
    calls = {"n": 0}
    real = g.train_one_epoch

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(g, "train_one_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_generalist(tiny_cfg(epochs=3), tmp_path / "cut", progress=False)
    run = RunDir.of(tmp_path / "cut")
    assert not run.generalist_record.exists() and (run.resume_dir / "latest.json").is_file()
    monkeypatch.setattr(g, "train_one_epoch", real)
    resumed = train_generalist(tiny_cfg(epochs=3), tmp_path / "cut", progress=False)
    assert resumed.weights_sha256 == full.weights_sha256
    assert resumed.metrics["epochs_run"] == 3


def test_checkpoint_start_and_class_count_mismatch(tmp_path, trained):
    out, _ = trained
    # same class count: starts from the checkpoint
    rec = train_generalist(
        tiny_cfg(checkpoint=str(RunDir.of(out).generalist_weights)), tmp_path / "ft", progress=False
    )
    assert rec.metrics["epochs_run"] == 1
    # another class count: timm's way, a new classifier; another architecture: a clear error
    other = create_model("test_efficientnet", 7)
    save_tensors(tmp_path / "seven.safetensors", other.state_dict())
    rec = train_generalist(
        tiny_cfg(checkpoint=str(tmp_path / "seven.safetensors")), tmp_path / "new", progress=False
    )
    assert rec.n_classes == 12
    save_tensors(tmp_path / "resnet.safetensors", create_model("test_resnet", 12).state_dict())
    with pytest.raises(SpecialistsError, match="does not match test_efficientnet"):
        train_generalist(
            tiny_cfg(checkpoint=str(tmp_path / "resnet.safetensors")),
            tmp_path / "bad",
            progress=False,
        )
    assert not (tmp_path / "bad" / "generalist" / "record.json").exists()
    # torch format is read weights-only
    torch.save(load_tensors(RunDir.of(out).generalist_weights), tmp_path / "w.pth")
    train_generalist(tiny_cfg(checkpoint=str(tmp_path / "w.pth")), tmp_path / "pth", progress=False)


def test_cli_trains_and_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "generalist",
                "--data",
                TINY_DATA,
                "--out",
                str(tmp_path / "r"),
                "--epochs",
                "1",
                "--quiet",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "test accuracy" in capsys.readouterr().out
    assert main(["generalist", "--data", TINY_DATA, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "already trained" in capsys.readouterr().err

    cases = [
        (["--model", "no_such_net"], "unknown timm model 'no_such_net'"),
        (["--data", str(tmp_path / "missing")], "data path not found"),
        (["--checkpoint", str(tmp_path / "none.pt")], "checkpoint not found"),
        (["--epochs", "0"], "--epochs 0: epochs must be >= 1, got 0"),
    ]
    for extra, message in cases:
        out = tmp_path / "x"
        code = main(["generalist", "--data", TINY_DATA, "--out", str(out), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (out / "generalist" / "record.json").exists()


def test_unwritable_output_directory(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        target = "/proc/specialists-run"  # root can write anywhere except pseudo file systems
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    code = main(["generalist", "--data", TINY_DATA, "--out", target, "--quiet"])
    assert code == 2 and "cannot" in capsys.readouterr().err


def test_config_file_unknown_keys_and_types(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    assert main(["generalist", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    cfg.write_text("epochs: one\n")
    assert main(["generalist", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "epochs='one' has the wrong type" in capsys.readouterr().err


def test_a_checkpoint_is_imported_the_timm_way(tmp_path):
    """An RGB checkpoint of 1000 classes on gray data of 10: the first convolution adapted (the
    sum over its colour channels, as timm does), a new classifier, and the checkpoint's own
    normalisation and input size from timm's config.json beside it; --normalize data and
    --input-size override them."""
    import json

    from specialists.models import model_from_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    rgb = create_model("test_efficientnet", 1000, 3)
    save_tensors(folder / "model.safetensors", rgb.state_dict())
    cfg = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.15], "input_size": [3, 24, 24]}
    (folder / "config.json").write_text(json.dumps({"num_classes": 1000, "pretrained_cfg": cfg}))
    gray = model_from_checkpoint("test_efficientnet", 10, 1, 24, folder)
    stem = rgb.state_dict()["conv_stem.weight"]
    assert torch.allclose(gray.state_dict()["conv_stem.weight"], stem.sum(1, keepdim=True))
    assert gray.get_classifier().weight.shape == (10, gray.get_classifier().in_features)
    same = model_from_checkpoint("test_efficientnet", 1000, 3, 24, folder / "model.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(same.state_dict().values(), rgb.state_dict().values())
    )

    from dataclasses import replace

    rgb_data = load_data(TINY_DATA)
    gray = replace(
        rgb_data,
        **{
            s: replace(
                rgb_data.split(s),
                images=rgb_data.split(s).images.mean(-1, keepdims=True).astype(np.uint8),
            )
            for s in ("train", "val", "test")
        },
    )
    base = dict(data=TINY_DATA, epochs=1, batch_size=32, threads=1, checkpoint=str(folder))
    rec = train_generalist(GeneralistConfig(**base), tmp_path / "ck", bundle=gray, progress=False)
    assert rec.in_chans == 1 and rec.input_size == 24 and rec.n_classes == 12
    assert rec.mean == pytest.approx([0.4]) and rec.std == pytest.approx([0.2])
    rec = train_generalist(
        GeneralistConfig(**base, normalize="data", input_size=16),
        tmp_path / "own",
        bundle=gray,
        progress=False,
    )
    assert rec.input_size == 16 and rec.mean != pytest.approx([0.4])
