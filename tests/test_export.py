"""The ensemble as an ``nn.Module``, exported to a self-contained folder and to ONNX."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from specialists.cli import main
from specialists.combination import Combination
from specialists.ensemble import Ensemble
from specialists.errors import SpecialistsError
from specialists.sources import load_data

from .conftest import TINY_DATA
from .test_ensemble import trained_run  # noqa: F401  (the shared trained run)
from .test_specialists import run_dir  # noqa: F401


@pytest.fixture(scope="module")
def images():
    return load_data(TINY_DATA).test.images[:40]


def test_the_ensemble_is_a_module(trained_run, images):  # noqa: F811
    ens = Ensemble.load(trained_run, "cpu", combination=Combination())  # all 3 specialists
    assert isinstance(ens, torch.nn.Module) and not ens.training
    out = ens.run_batch(images)
    x = ens.preprocess(images)
    assert x.dtype == torch.float32 and x.shape == (40, 3, 16, 16)
    with torch.inference_mode():
        log_q = ens(x)
    assert np.abs(log_q.exp().numpy() - out.q).max() <= 1e-6
    # every consulted member is a registered submodule: .to() and state_dict see them
    assert {int(k) for k in ens.loaded} == {c for row in out.consulted for c in row}
    assert ens.to("cpu") is ens and ens.device.type == "cpu"
    assert not any(p.requires_grad for p in ens.parameters())
    ens.train()  # the flag only: batch norm keeps its running statistics
    assert ens.training and not any(m.training for m in ens.modules() if m is not ens)
    with torch.inference_mode():
        assert torch.equal(ens(x), log_q)
    ens.eval()
    # larger inputs are resized as in training; wrong shapes are one clear error
    from specialists.transforms import BatchTransform

    twice = torch.from_numpy(np.repeat(np.repeat(images, 2, axis=1), 2, axis=2))
    x32 = BatchTransform(ens.record.mean, ens.record.std, 32)(twice)
    with torch.inference_mode():
        assert (ens(x32) - ens(ens.preprocess(twice))).abs().max() <= 1e-5
    with pytest.raises(SpecialistsError, match=r"expected a float batch of shape \(B, 3, H, W\)"):
        ens(x[:, :1])
    with pytest.raises(SpecialistsError, match="inputs are 8x8 but the ensemble takes 16 px"):
        ens(x[..., ::2, ::2])


@pytest.mark.slow
def test_torch_compile_gives_the_same_answer(trained_run, images):  # noqa: F811
    ens = Ensemble.load(trained_run, "cpu", combination=Combination())
    x = ens.preprocess(images)
    with torch.inference_mode():
        want = ens(x)
        got = torch.compile(ens)(x)
    assert (got - want).abs().max().item() <= 1e-4  # inductor fuses the float32 ops otherwise


def test_export_loads_in_a_fresh_process_without_the_run(trained_run, images, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ens = Ensemble.load(run, "cpu", combination=Combination(top_n=2, spec_weight=2.0))
    ens.export(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "ensemble.json").read_text())
    assert meta["format"] == "specialists-ensemble" and len(meta["specialists"]) == 3
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "ensemble.json",
        "generalist.safetensors",
        "specialist-0.safetensors",
        "specialist-1.safetensors",
        "specialist-2.safetensors",
    ]
    # the weights are the run's files byte for byte
    assert (tmp_path / "export" / "specialist-1.safetensors").read_bytes() == (
        run / "specialists" / "001.safetensors"
    ).read_bytes()
    with torch.inference_mode():
        want = ens(ens.preprocess(images)).numpy()
    shutil.rmtree(run)  # the export stands alone
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np, torch\n"
        "from specialists.ensemble import Ensemble\n"
        "ens = Ensemble.from_pretrained(sys.argv[1], 'cpu')\n"
        "x = ens.preprocess(np.load(sys.argv[2]))\n"
        "with torch.inference_mode():\n"
        "    np.save(sys.argv[3], ens(x).numpy())\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "export"),
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npy"),
        ],
        check=True,
        cwd=tmp_path,
    )
    assert np.abs(np.load(tmp_path / "out.npy") - want).max() <= 1e-5
    loaded = Ensemble.from_pretrained(tmp_path / "export", "cpu")
    assert loaded.combination == ens.combination and loaded.run is None
    # a changed file is caught before use
    w = tmp_path / "export" / "specialist-2.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SpecialistsError, match="specialist-2.safetensors: checksum does not match"):
        Ensemble.from_pretrained(tmp_path / "export", "cpu")


def test_the_export_command(trained_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "exp"
    assert main(["export", str(trained_run), str(out)]) == 0
    assert f"Ensemble.from_pretrained({str(out)!r})" in capsys.readouterr().out
    calibrated = Ensemble.load(trained_run, "cpu")
    kept = [s.id for s in calibrated.specialists]
    meta = json.loads((out / "ensemble.json").read_text())
    assert [s["id"] for s in meta["specialists"]] == kept  # only the consulted ones travel
    # every record says what made it
    for record in (
        meta["generalist"],
        json.loads((trained_run / "specialists" / "000.json").read_text()),
    ):
        v = record["versions"]
        assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__
        assert {"specialists", "git_revision", "python", "cuda", "timm", "faiss"} <= set(v)
    # a second export refuses to overwrite, --force replaces
    assert main(["export", str(trained_run), str(out)]) == 2
    assert "already exists (give --force to replace it)" in capsys.readouterr().err
    assert main(["export", str(trained_run), str(out), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # a folder that is not an export
    (tmp_path / "other").mkdir()
    assert main(["export", str(trained_run), str(tmp_path / "other"), "--force"]) == 2
    assert "is not an exported ensemble; not replacing it" in capsys.readouterr().err
    # a run directory has an ensemble.json too: never replaced, never written into
    run_copy = tmp_path / "another-run"
    shutil.copytree(trained_run, run_copy)
    assert main(["export", str(trained_run), str(run_copy), "--force"]) == 2
    assert "is not an exported ensemble; not replacing it" in capsys.readouterr().err
    assert (run_copy / "generalist" / "record.json").is_file()
    assert main(["export", str(run_copy), str(run_copy / "exp")]) == 2
    assert "inside (or around) the run" in capsys.readouterr().err
    for bad, message in [
        (tmp_path / "missing", "does not exist; not an exported ensemble"),
        (tmp_path / "other", "has no ensemble.json; not an exported ensemble"),
    ]:
        with pytest.raises(SpecialistsError, match=message):
            Ensemble.from_pretrained(bad)


@pytest.mark.slow
def test_onnx_members_agree_with_pytorch(trained_run, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    from specialists.export import check_onnx

    ens = Ensemble.load(trained_run, "cpu", combination=Combination())
    meta = ens.export(tmp_path / "exp", onnx=True)
    assert set(meta["onnx"]) == {"generalist", "specialist-0", "specialist-1", "specialist-2"}
    for name, r in meta["onnx"].items():
        assert r["max_abs_diff"] <= 1e-4
        model = (
            ens.generalist
            if name == "generalist"
            else ens.load_specialist(ens.specialists[int(name.split("-")[1])])
        )
        # checked again here, on other inputs (a batch size the export never saw)
        diff = check_onnx(model, tmp_path / "exp" / r["file"], 3, r["input_size"], batch=5)
        assert diff <= 1e-4


def test_an_onnx_failure_is_one_line(trained_run, tmp_path, capsys, monkeypatch):  # noqa: F811
    pytest.importorskip("onnxruntime")

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::mystery\nlong trace follows")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert main(["export", str(trained_run), str(tmp_path / "exp"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "cannot be exported to ONNX (Unsupported operator aten::mystery)" in err
    assert not (tmp_path / "exp").exists()


def _write_pngs(folder, images, names):
    from PIL import Image

    for img, name in zip(images, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def test_predict_writes_one_row_per_readable_image(trained_run, images, tmp_path, capsys):  # noqa: F811
    import csv

    folder = tmp_path / "in"
    names = [f"{'a' if i % 2 else 'b/c'}/img{i:03d}.png" for i in range(len(images))]
    _write_pngs(folder, images, names)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "a" / "notes.txt").write_text("not an image")  # not listed: not an image name
    (folder / ".hidden").mkdir()
    _write_pngs(folder / ".hidden", images[:1], ["x.png"])  # hidden: skipped
    out = tmp_path / "preds.csv"
    args = ["predict", str(trained_run), str(folder), "-o", str(out), "--top-k", "3"]
    assert main([*args, "--batch-size", "7", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "broken.png: skipped (unreadable image" in captured.err
    assert "1 of 41 file(s) unreadable and skipped" in captured.err
    assert f"40 image(s) predicted, written to {out}" in captured.out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 40 and {r["path"] for r in rows} == {str(folder / n) for n in names}
    assert list(rows[0]) == [
        "path",
        *(f"{k}_{i}" for i in (1, 2, 3) for k in ("class", "prob")),
        "consulted",
    ]
    # the same answers as the ensemble on the same images, in the same order of files
    ens = Ensemble.load(trained_run, "cpu")
    by_path = {r["path"]: r for r in rows}
    q = ens.predict_proba(images)
    for i, n in enumerate(names):
        r = by_path[str(folder / n)]
        assert r["class_1"] == ens.record.class_names[int(q[i].argmax())]
        assert float(r["prob_1"]) == pytest.approx(float(q[i].max()), abs=1e-6)
    # JSON lines, from the exported folder, for a file and a folder together
    ens.export(tmp_path / "exp")
    out_j = tmp_path / "preds.jsonl"
    one = folder / names[0]
    assert (
        main(
            [
                "predict",
                str(tmp_path / "exp"),
                str(one),
                str(folder / "a"),
                "-o",
                str(out_j),
                "--quiet",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in out_j.read_text().splitlines()]
    assert len(lines) == 1 + 20 and lines[0]["path"] == str(one)
    assert len(lines[0]["top"]) == 5 and set(lines[0]) == {"path", "top", "consulted"}
    assert (
        main(["predict", str(tmp_path / "exp"), str(one), "-o", str(tmp_path / "p.txt"), "-q"]) == 2
    )
    assert "the output must end in .csv or .jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_a_folder_of_ten_thousand_images(trained_run, tmp_path, capsys):  # noqa: F811
    import csv

    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    for d in range(10):
        (folder / f"d{d}").mkdir(parents=True)
    for i in range(10_000):
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"d{i % 10}" / f"{i:05d}.png", compress_level=0)
    corrupt = [folder / "d3" / "bad1.png", folder / "d7" / "bad2.jpg", folder / "bad3.png"]
    for p in corrupt:
        p.write_bytes(b"garbage")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run), str(folder), "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert all(f"{p}: skipped" in err for p in corrupt)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10_000 and len({r["path"] for r in rows}) == 10_000
