import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from specialists.artifacts import load_generalist
from specialists.dustbin import build_specialist, prior_offsets, project_to_group
from specialists.models import create_model, predict_proba
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import save_json
from specialists.train._job import cache_data
from specialists.train.generalist import GeneralistConfig, train_generalist
from specialists.train.launch import run_jobs
from specialists.train.specialist import (
    EnrichedBatchSampler,
    SpecialistConfig,
    specialist_job,
    train_specialist,
)
from specialists.transforms import make_transforms

from .conftest import TINY_DATA

GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
FAST = SpecialistConfig(epochs=2, batch_size=32, examples_per_epoch=256)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec_run")
    train_generalist(
        GeneralistConfig(data=TINY_DATA, epochs=3, batch_size=32, threads=1), out, progress=False
    )
    run = RunDir.of(out)
    cache_data(run, load_data(TINY_DATA))
    save_json(run.clusters, {"groups": [{"classes": g} for g in GROUPS]})
    return out


def test_sampler_ratio_and_label_mapping_by_hand():
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    s = EnrichedBatchSampler(
        labels, classes=[4, 1], n_classes=6, batch_size=8, fraction=0.25, seed=0
    )
    assert s.labels_for(np.array([0, 1, 2, 3, 4, 5])).tolist() == [
        2,
        0,
        2,
        2,
        1,
        2,
    ]  # S sorted, dustbin = 2
    batches = s.batches(40)
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    for b in batches:
        assert np.isin(labels[b], [1, 4]).sum() == 2  # round(0.25 * 8)
    # every in-group example is used before any is repeated
    first = np.concatenate([b[np.isin(labels[b], [1, 4])] for b in batches[:2]])
    assert sorted(first.tolist()) == [1, 4, 7, 10]


def test_head_initialisation_matches_the_generalist_on_its_group():
    torch.manual_seed(0)
    g = create_model("test_efficientnet", 12, 3).eval()
    with torch.no_grad():
        g.get_classifier().weight.mul_(5)
    x = torch.randn(48, 3, 16, 16)
    classes = [2, 5, 7]
    s = build_specialist(g, classes, sample=x[:32]).eval()
    with torch.no_grad():
        pg, ps = torch.softmax(g(x), 1), torch.softmax(s(x), 1)
    inside = pg[:, classes] / pg[:, classes].sum(1, keepdim=True)
    assert torch.allclose(ps[:, :3] / ps[:, :3].sum(1, keepdim=True), inside, atol=1e-5)
    # the dustbin starts near the generalist's mass outside S, on held-out inputs too
    outside = 1 - pg[:, classes].sum(1)
    assert (ps[32:, 3] - outside[32:]).abs().mean() < 0.02
    assert torch.allclose(project_to_group(pg, torch.tensor(classes)).sum(1), torch.ones(48))


def test_prior_offsets_closed_form():
    off = prior_offsets(0.1, 0.5, 3)
    assert np.allclose(off[:3], np.log(0.1 / 0.5)) and np.isclose(off[3], np.log(0.9 / 0.5))
    assert np.allclose(prior_offsets(0.5, 0.5, 2), 0)


def test_natural_correction_recovers_the_dustbin_share(run_dir):
    classes = [0, 1]  # 2 of 12 classes: the natural dustbin share is 5/6
    cfg = SpecialistConfig(
        epochs=6, batch_size=64, examples_per_epoch=1024, correction="natural", lr=3e-3, patience=6
    )
    rec = train_specialist(run_dir, 50, classes, cfg, device="cpu", threads=1)
    assert np.isclose(rec.natural_prior, 1 / 6)
    _, grec = load_generalist(run_dir)
    model = create_model(grec.architecture, 3, grec.in_chans)
    from specialists.storage import load_tensors

    model.load_state_dict(load_tensors(RunDir.of(run_dir).specialist(50).weights))
    bundle = load_data(TINY_DATA)
    _, eval_tf = make_transforms(grec)
    logits = torch.log(
        torch.from_numpy(
            predict_proba(model, bundle.test.images, transform=eval_tf, device=torch.device("cpu"))
        )
    )
    raw = torch.softmax(logits, 1)[:, -1].mean().item()
    fixed = (
        torch.softmax(logits + torch.tensor(rec.logit_offset, dtype=logits.dtype), 1)[:, -1]
        .mean()
        .item()
    )
    truth = float((~np.isin(bundle.test.labels, classes)).mean())
    assert abs(fixed - truth) < 0.05
    assert abs(fixed - truth) < 0.5 * abs(raw - truth)


def test_local_backend_two_workers(run_dir):
    run = RunDir.of(run_dir)
    sha = json.loads(run.generalist_record.read_text())["weights_sha256"]
    jobs = [specialist_job(i, g, sha) for i, g in enumerate(GROUPS)]
    results = run_jobs(run, jobs, cfg=FAST, generalist_sha=sha, workers=2, progress=False)
    assert [r.ok for r in results] == [True] * 3
    for r in results:
        assert run.specialist(r.job.id).record.is_file()
        assert r.record.classes == GROUPS[r.job.id]
        assert len(r.record.logit_offset) == 5
    again = run_jobs(run, jobs, cfg=FAST, generalist_sha=sha, workers=2, progress=False)
    assert all(r.skipped for r in again)  # nothing retrained
    changed = run_jobs(
        run,
        [specialist_job(0, [0, 1, 2], sha), *jobs[1:]],
        cfg=FAST,
        generalist_sha=sha,
        workers=2,
        progress=False,
    )
    assert [r.skipped for r in changed] == [False, True, True]  # only the changed group


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_job_is_isolated_and_the_rerun_trains_only_it(tmp_path, run_dir):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    cmd = [
        sys.executable,
        "-m",
        "specialists.cli",
        "train",
        str(out),
        "--workers",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--examples-per-epoch",
        "256",
        "--quiet",
    ]
    env = {**__import__("os").environ, "SPECIALISTS_FAULT": "specialist:1:1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 1
    assert "specialist 1: FAILED: worker killed by signal SIGKILL" in first.stderr
    spec_dir = RunDir.of(out).specialists_dir
    assert sorted(p.name for p in spec_dir.glob("*.json")) == ["000.json", "002.json"]
    assert not (spec_dir / "001.safetensors").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in spec_dir.glob("00[02].*")}
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "3 of 3 specialists ready (2 already done)" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in spec_dir.glob("00[02].*")} == mtimes


def test_cli_train_bad_input(tmp_path, run_dir, capsys):
    from specialists.cli import main

    assert main(["train", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["train", str(run_dir), "--only", "9", "--quiet"]) == 2
    assert "--only 9: no such group" in capsys.readouterr().err
    assert main(["train", str(run_dir), "--enrich-fraction", "1.5", "--quiet"]) == 2
    assert "enrich_fraction" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["head", "last"])
def test_cheap_specialists_train_only_the_last_stages(mode):
    from specialists.models import get_classifier
    from specialists.train.specialist import _set_trainable

    model = create_model("test_efficientnet", 5, 3)
    _set_trainable(model, mode)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {
        n
        for n, p in model.named_parameters()
        if any(p is q for q in get_classifier(model).parameters())
    }
    assert head <= trainable
    assert len(trainable) < len(list(model.parameters()))
    if mode == "head":
        assert trainable == head
    else:
        assert len(trainable) > len(head)
        assert not any(n.startswith(("conv_stem", "bn1", "blocks.0.")) for n in trainable)


def test_gpus_per_job_must_be_a_share_of_one_gpu():
    from specialists.errors import SpecialistsError
    from specialists.train.launch import check_gpus_per_job, default_workers

    for bad in (0, -0.5, 1.5, 2):
        with pytest.raises(SpecialistsError, match=r"--gpus-per-job .*: must be in \(0, 1\]"):
            check_gpus_per_job(bad)
    for good in (None, 0.25, 1):
        check_gpus_per_job(good)
    assert default_workers("cpu", 0.25) >= 1  # no GPU: one worker per core, the share ignored
