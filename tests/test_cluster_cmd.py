"""`specialists cluster RUN`: the run-level glue around the clustering package."""

import json
import shutil

import numpy as np
import pytest

from specialists import manifest
from specialists.cli import main
from specialists.run import RunDir
from specialists.storage import save_npy
from specialists.train.generalist import GeneralistConfig, train_generalist

from .test_specialists import GROUPS, run_dir  # noqa: F401  (the shared tiny run fixture)


def test_cluster_writes_report_and_picture(run_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists", "clusters.json"))
    assert main(["cluster", str(out), "--n-groups", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 groups" in printed and "ARI" in printed
    report = json.loads(RunDir.of(out).clusters.read_text())
    groups = [g["classes"] for g in report["groups"]]
    assert sorted(c for g in groups for c in g) == list(range(12))  # disjoint cover of all classes
    assert {"confusion_captured", "random_baseline", "ari", "nmi"} <= set(report["quality"])
    assert RunDir.of(out).clusters_png.stat().st_size > 1000
    # the default chooses the number of groups and says why; every group holds enough training
    # images for its specialist (40 per class here, so 1000 would need 25 classes: capped at K/2)
    assert main(["cluster", str(out), "--quiet"]) == 0
    assert "chosen from the data" in capsys.readouterr().out
    report = json.loads(RunDir.of(out).clusters.read_text())
    assert min(len(g["classes"]) for g in report["groups"]) >= 6
    assert main(["cluster", str(out), "--min-group-images", "120", "--quiet"]) == 0
    report = json.loads(RunDir.of(out).clusters.read_text())
    assert min(len(g["classes"]) for g in report["groups"]) >= 3
    # overlapping fixed-size groups
    assert (
        main(
            [
                "cluster",
                str(out),
                "--mode",
                "overlapping",
                "--n-groups",
                "3",
                "--group-size",
                "5",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(RunDir.of(out).clusters.read_text())
    assert [len(g["classes"]) for g in report["groups"]] == [5, 5, 5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n-groups", "13"], "--n-groups 13: must be between 1 and the number of classes (12)"),
        (
            ["--mode", "overlapping", "--n-groups", "2", "--group-size", "20"],
            "--group-size 20: must be between 2",
        ),
    ],
)
def test_bad_options_are_one_line(run_dir, capsys, args, message):  # noqa: F811
    assert main(["cluster", str(run_dir), *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_runs_are_one_line(run_dir, tmp_path, capsys):  # noqa: F811
    assert main(["cluster", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "nogen").mkdir()
    assert main(["cluster", str(tmp_path / "nogen"), "--quiet"]) == 2
    assert "no trained generalist" in capsys.readouterr().err
    out = tmp_path / "broken"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    run = RunDir.of(out)
    probs = np.load(run.val_probs)
    probs[3, 2] = np.nan
    save_npy(run.val_probs, probs)
    # changed behind the run's back: the manifest catches it
    assert main(["cluster", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        "val_probs.npy: checksum does not match the run's manifest" in err and err.count("\n") == 1
    )
    # a generalist that really produced NaN (registered as such): the statistics refuse it
    manifest.register(run.root, run.val_probs)
    assert main(["cluster", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "val_probs.npy" in err and "NaN" in err and err.count("\n") == 1, err
    run.val_probs.unlink()
    assert main(["cluster", str(out), "--quiet"]) == 2
    assert "val_probs.npy: missing" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_recovers_the_planted_groups(tmp_path, capsys):
    data = "embedded:n_classes=40,n_groups=8,train_per_class=100,val_per_class=40,test_per_class=10"
    train_generalist(
        GeneralistConfig(data=data, epochs=6, threads=2), tmp_path / "run", progress=False
    )
    # 100 training images per class: groups of 5 give each specialist 500 images
    args = ["cluster", str(tmp_path / "run"), "--min-group-images", "500", "--quiet"]
    assert main(args) == 0
    report = json.loads(RunDir.of(tmp_path / "run").clusters.read_text())
    assert report["quality"]["ari"] >= 0.9, capsys.readouterr().out


def test_a_confident_generalist_over_few_classes_is_grouped_on_the_second_moment(
    run_dir,  # noqa: F811
    tmp_path,
    caplog,
):
    """Outputs on one simplex co-vary negatively: a generalist that puts 0.95 on the true class
    and 0.04 on one look-alike has cov_ij = E[p_i p_j] - mu_i mu_j < 0 for every pair, planted
    look-alikes included. The covariance then holds no positive mass to group; the run falls back
    to E[p p^T] (its off-diagonal is the soft confusion) and recovers the planted groups."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists", "clusters.json"))
    run = RunDir.of(out)
    labels = np.load(run.val_labels)
    k = 12
    rng = np.random.default_rng(0)
    probs = np.full((len(labels), k), 0.01 / (k - 2))
    for i, y in enumerate(labels):
        g = GROUPS[y // 4]
        twin = rng.choice([c for c in g if c != y])  # a look-alike from the same planted group
        probs[i, y], probs[i, twin] = 0.95, 0.04
    cov = np.cov(probs.T, bias=True)
    assert (cov[~np.eye(k, dtype=bool)] < 0).all()  # the situation this test is about
    save_npy(run.val_probs, probs)
    manifest.register(run.root, run.val_probs)
    with caplog.at_level("WARNING"):
        assert main(["cluster", str(out), "--n-groups", "3", "--quiet"]) == 0
    assert any("second moment" in r.getMessage() for r in caplog.records)
    report = json.loads(run.clusters.read_text())
    assert report["matrix"] == "second moment"
    assert sorted(g["classes"] for g in report["groups"]) == GROUPS
    q = report["quality"]
    assert q["confusion_captured"] > 0.8 and q["confusion_captured"] > 2 * q["random_baseline"]
    # the default (group count chosen from the data) no longer stops at "no confusion to group"
    assert main(["cluster", str(out), "--quiet"]) == 0
    assert json.loads(run.clusters.read_text())["quality"]["confusion_captured"] > 0.5


def test_sparse_statistics_when_dense_ones_do_not_fit(run_dir, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Where a dense K x K matrix would not fit in memory the step switches to sparse top-k
    statistics by itself and says why; they group the tiny run as the dense ones do."""
    import logging

    from specialists import grouping

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists", "clusters.json"))
    assert main(["cluster", str(out), "--n-groups", "3", "--quiet"]) == 0
    dense = json.loads(RunDir.of(out).clusters.read_text())
    assert dense["statistics"]["kind"] == "dense"
    monkeypatch.setattr(grouping, "_physical_memory", lambda: 4096)  # a 4 KiB machine
    with caplog.at_level(logging.INFO, logger="specialists"):
        assert main(["cluster", str(out), "--n-groups", "3", "--top-k", "4"]) == 0
    assert "sparse top-4 statistics" in caplog.text and "available" in caplog.text
    report = json.loads(RunDir.of(out).clusters.read_text())
    assert report["statistics"]["kind"] == "sparse top-4"
    assert 0.5 < report["statistics"]["captured_mass"] <= 1.0
    assert report["matrix"] == "second moment"
    groups = sorted(sorted(g["classes"]) for g in report["groups"])
    assert groups == sorted(sorted(g["classes"]) for g in dense["groups"])
    assert RunDir.of(out).clusters_png.stat().st_size > 1000
    manifest.verify(out, RunDir.of(out).clusters, RunDir.of(out).clusters_png)


def test_sparse_statistics_over_many_classes_need_the_group_count(
    run_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    from specialists import grouping

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists", "clusters.json"))
    monkeypatch.setattr(grouping, "CHOOSER_MAX_CLASSES", 10)  # the tiny run's 12 are "many"
    assert main(["cluster", str(out), "--statistics", "sparse", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-groups" in err[0] and "too many to choose" in err[0]
    assert not RunDir.of(out).clusters.exists()
