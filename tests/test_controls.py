"""Controls: random groups, extra-compute generalist, plain ensemble."""

import json

import numpy as np
import pytest

from specialists.cli import main
from specialists.run import RunDir
from specialists.storage import save_json
from specialists.train.controls import random_groups
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig


def test_random_groups_keep_sizes_and_are_seeded():
    g = random_groups([5, 5, 3], 20, seed=1)
    assert [len(x) for x in g] == [5, 5, 3]
    assert len({c for x in g for c in x}) == 13  # disjoint when the sizes allow it
    assert g == random_groups([5, 5, 3], 20, seed=1) and g != random_groups([5, 5, 3], 20, seed=2)
    overlapping = random_groups([8, 8, 8], 10, seed=0)
    assert all(len(set(x)) == 8 for x in overlapping)


def test_controls_need_trained_specialists(tmp_path, capsys):
    from .test_specialists import GROUPS  # noqa: F401

    run = tmp_path / "run"
    train_generalist(
        GeneralistConfig(
            data="embedded:n_classes=6,n_groups=2,image_size=16,train_per_class=10,val_per_class=4,test_per_class=4",
            epochs=1,
            threads=1,
        ),
        run,
        progress=False,
    )
    save_json(RunDir.of(run).clusters, {"groups": [{"classes": [0, 1, 2]}, {"classes": [3, 4, 5]}]})
    assert main(["controls", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "controls need the run's trained specialists" in err and err.count("\n") == 1


@pytest.mark.slow
def test_true_groups_beat_random_groups_on_the_embedded_data(tmp_path, capsys):
    data = "embedded:n_classes=20,n_groups=4,train_per_class=150,val_per_class=40,test_per_class=60"
    run = tmp_path / "run"
    train_generalist(GeneralistConfig(data=data, epochs=15, patience=4), run, progress=False)
    save_json(
        RunDir.of(run).clusters,
        {"groups": [{"classes": list(range(5 * g, 5 * g + 5))} for g in range(4)]},
    )
    train_specialists(run, SpecialistConfig(), workers=2, progress=False)
    assert main(["controls", str(run), "--workers", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "random groups" in printed and "verdict:" in printed
    m = json.loads(RunDir.of(run).metrics.read_text())
    rows = {r["name"]: r for r in m["controls"]}
    assert set(rows) == {"random groups", "extra-compute generalist", "plain ensemble"}
    assert m["ensemble_accuracy"] > rows["random groups"]["accuracy"], printed
    assert all(np.isfinite(r["train_seconds"]) for r in rows.values())
    # resumable: a second run retrains nothing
    assert main(["controls", str(run), "--workers", "2", "--quiet"]) == 0
