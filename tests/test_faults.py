"""Fault injection and damaged runs: each time the pipeline finishes on the next command or stops
with a precise message, and nothing finished is lost."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specialists import manifest
from specialists.cli import main
from specialists.errors import SpecialistsError
from specialists.run import RunDir
from specialists.storage import save_json

from .conftest import TINY_DATA

pytestmark = pytest.mark.faults


def _generalist_cmd(out, epochs=3):
    return [
        sys.executable,
        "-m",
        "specialists.cli",
        "generalist",
        "--data",
        TINY_DATA,
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--quiet",
    ]


@pytest.mark.slow
def test_generalist_killed_mid_epoch_resumes_on_the_next_command(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "SPECIALISTS_FAULT": "generalist:2",
    }  # SIGKILL inside epoch 2, before it is saved
    first = subprocess.run(_generalist_cmd(out), env=env, capture_output=True, text=True)
    assert first.returncode == -9
    run = RunDir.of(out)
    assert not run.generalist_record.exists()  # nothing looks complete
    assert json.loads((run.resume_dir / "latest.json").read_text())["tag"] == "epoch0001"
    second = subprocess.run(_generalist_cmd(out), capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    rec = json.loads(run.generalist_record.read_text())
    assert rec["metrics"]["epochs_run"] == 3 and len(run.history.read_text().splitlines()) == 4
    reference = tmp_path / "ref"
    subprocess.run(_generalist_cmd(reference), check=True, capture_output=True)
    assert (
        json.loads(RunDir.of(reference).generalist_record.read_text())["weights_sha256"]
        == rec["weights_sha256"]
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from specialists.train.generalist import GeneralistConfig, train_generalist

    out = tmp_path_factory.mktemp("faults") / "run"
    train_generalist(
        GeneralistConfig(data=TINY_DATA, epochs=1, batch_size=32, threads=1), out, progress=False
    )
    return out


def test_a_tampered_record_is_named(small_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    rec_path = RunDir.of(out).generalist_record
    rec = json.loads(rec_path.read_text())
    rec["metrics"]["test_accuracy"] = 0.99
    save_json(rec_path, rec)
    assert main(["cluster", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "record.json:" in err and "the run's manifest" in err and err.count("\n") == 1
    # a truncated weights file
    shutil.rmtree(out)
    shutil.copytree(small_run, out)
    weights = RunDir.of(out).generalist_weights
    weights.write_bytes(weights.read_bytes()[:100])
    from specialists.artifacts import load_generalist

    with pytest.raises(
        SpecialistsError, match="model.safetensors: 100 bytes, the run's manifest says"
    ):
        load_generalist(out)


def test_a_newer_manifest_schema_is_refused(small_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(SpecialistsError, match="manifest.json: schema version 99 is newer"):
        manifest.verify(out, RunDir.of(out).generalist_record)


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    import specialists.storage as sio

    target = tmp_path / "metrics.json"
    save_json(target, {"old": True})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio.os, "fsync", no_space)
    with pytest.raises(
        SpecialistsError, match="metrics.json: write failed \\(no space left on device\\)"
    ):
        save_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_full_disk_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    import specialists.storage as sio

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio.os, "fsync", no_space)
    code = main(
        [
            "generalist",
            "--data",
            TINY_DATA,
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no space left on device" in err and err.count("\n") == 1


def test_a_class_missing_from_test_is_a_warning(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from specialists.sources import load_data

    for split, classes in (("train", ["a", "b", "c"]), ("test", ["a", "b"])):
        for c in classes:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(d / f"{i}.png")
    b = load_data(f"folder:{tmp_path}")
    assert b.n_classes == 3 and len(b.test) == 6
    assert "have no folder here" in caplog.text


def _children(pid: int) -> list[int]:
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = Path(f"/proc/{stat}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{stat}/cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"multiprocessing.spawn" in cmd:
                out.append(int(stat))
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text() + Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return "gone"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_stop_when_the_launcher_is_killed(small_run, tmp_path):
    import shutil
    import time

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    assert main(["cluster", str(out), "--n-groups", "3", "--quiet"]) == 0
    cmd = [sys.executable, "-m", "specialists.cli", "train", str(out), "--workers", "1"]
    cmd += ["--epochs", "200", "--examples-per-epoch", "4096", "--quiet"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while not workers and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = _children(launcher.pid)
    assert workers, "the launcher started no worker"
    time.sleep(5)  # the worker is importing or training
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30  # a worker still importing torch watches once it is up
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    states = {w: _state(w) for w in workers}
    assert not any(_alive(w) for w in workers), f"workers outlived their launcher: {states}"
    assert not list(RunDir.of(out).specialists_dir.glob("*.json"))  # nothing half-finished
