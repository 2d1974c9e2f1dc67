"""Distillation: the loss by hand, the student learns the teacher, resume, consistent teaching,
and bad input."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from specialists.artifacts import generalist_record, load_student
from specialists.cli import main
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import load_tensors
from specialists.train import distill as distill_module
from specialists.train.distill import DistillConfig, distill_loss, run_distill, soften

from .conftest import TINY_DATA
from .test_ensemble import trained_run  # noqa: F401  (a tiny run with a calibrated ensemble)
from .test_specialists import run_dir  # noqa: F401

FAST = dict(epochs=2, batch_size=32, lr=3e-3)


def test_soften_and_the_loss_match_a_hand_computation():
    q = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, -1])  # the second row has no label (a transfer image)
    t, a = 2.0, 0.75
    # by hand: q_T = q^(1/T) / sum, s_T = softmax(z / T)
    qt = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]) ** (1 / t)
    qt /= qt.sum(1, keepdims=True)
    z = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    st = np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
    kl = [sum(p * math.log(p / s) for p, s in zip(qt[i], st[i]) if p > 0) for i in range(2)]
    ce0 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1 + math.exp(-1.0)))
    expected = ((1 - a) * ce0 + a * t * t * kl[0] + a * t * t * kl[1]) / 2
    got = distill_loss(logits, q, labels, temperature=t, alpha=a)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(soften(q, t).exp(), torch.from_numpy(qt).float(), atol=1e-6)
    assert soften(q, t)[1, 2] == -math.inf  # a zero stays a zero
    # alpha = 0: plain cross-entropy on the labelled rows
    hard = distill_loss(logits[:1], q[:1], labels[:1], temperature=t, alpha=0.0)
    assert hard.item() == pytest.approx(ce0, rel=1e-6)


@pytest.fixture(scope="module")
def distilled(trained_run, tmp_path_factory):  # noqa: F811
    """The tiny run with a student of the ensemble and a hard-label-only student beside it."""
    out = tmp_path_factory.mktemp("distill") / "run"
    shutil.copytree(trained_run, out)
    run_distill(out, DistillConfig(**FAST, init="random"), workers=1, progress=False)
    hard = tmp_path_factory.mktemp("hard") / "run"
    shutil.copytree(trained_run, hard)
    run_distill(hard, DistillConfig(**FAST, init="random", alpha=0.0), workers=1, progress=False)
    return out, hard


def _agreement(run, images) -> float:
    from specialists.ensemble import Ensemble
    from specialists.models import predict_proba

    teacher = Ensemble.load(run).predict(images)
    model, _, transform = load_student(run)
    student = predict_proba(model, images, transform=transform, device=torch.device("cpu"))
    return float((student.argmax(1) == teacher).mean())


def test_the_student_agrees_with_its_teacher_more_than_a_hard_label_student(distilled):
    soft, hard = distilled
    images = load_data(TINY_DATA).test.images
    assert _agreement(soft, images) > _agreement(hard, images)
    rec = load_student(soft)[1]
    assert rec.teacher == "ensemble" and rec.metrics["epochs_run"] == 2
    paths = RunDir.of(soft).student()
    assert paths.history.is_file() and paths.curve.is_file() and not paths.resume_dir.exists()


def test_evaluate_adds_the_student_row_and_predict_uses_it(distilled, capsys, tmp_path):
    soft, _ = distilled
    assert main(["evaluate", str(soft), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "student (distilled ensemble)" in printed and "vs generalist" in printed
    image = tmp_path / "x.png"
    Image.fromarray(load_data(TINY_DATA).test.images[0]).save(image)
    assert main(["predict", str(soft), str(image), "--model", "student", "--quiet"]) == 0
    assert "[student]" in capsys.readouterr().out


def test_a_rerun_is_skipped_and_the_self_distillation_control_runs(distilled, capsys):
    soft, _ = distilled
    assert main(["distill", str(soft), "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
                 "--init", "random", "--controls", "--quiet"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    printed = captured.out
    assert "student of the ensemble" in printed and "(already done)" in printed
    assert "student of the generalist" in printed
    # a student below its generalist on validation is flagged (only the ensemble's student)
    m = load_student(soft)[1].metrics
    below = m["val_acc"] < m["generalist_val_acc"]
    assert captured.err.count("warning: the student is below its generalist") == int(below)
    assert RunDir.of(soft).student(RunDir.SELF_STUDENT_CONTROL).files.record.is_file()


def test_the_online_teacher_sees_the_students_own_augmented_batch(
    trained_run,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    real_teacher = distill_module._teacher

    def spying_teacher(ctx, name, cfg):
        teach = real_teacher(ctx, name, cfg)

        def wrapped(x, raw=None):
            seen["teacher"].append(x.detach().clone())
            return teach(x, raw)

        return wrapped

    real_model = distill_module._student_model

    def spying_model(ctx, cfg):
        model = real_model(ctx, cfg)

        def hook(module, args):
            if module.training:
                seen["student"].append(args[0].detach().clone())

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(distill_module, "_teacher", spying_teacher)
    monkeypatch.setattr(distill_module, "_student_model", spying_model)
    job = distill_module.distill_job(RunDir.of(out), "ensemble", generalist_record(RunDir.of(out)))
    cfg = DistillConfig(epochs=1, batch_size=32, teacher_mode="online")
    distill_module.distill_task(str(out), job, cfg, device="cpu", threads=1)
    train_batches = [x for x in seen["teacher"] if len(x) == 32]  # the val scoring uses 512
    assert len(train_batches) == len(seen["student"]) > 0
    for a, b in zip(train_batches, seen["student"]):
        assert torch.equal(a, b)


def test_the_teacher_gates_with_the_width_asked_for(trained_run):  # noqa: F811
    from specialists.ensemble import Ensemble
    from specialists.train._job import start_job

    ctx = start_job(str(trained_run), device="cpu", threads=1)
    images = load_data(TINY_DATA).test.images[:64]
    x = ctx.eval_transform(torch.from_numpy(images))
    for top_n in (0, 1, 3):  # 0: the calibrated width
        teach = distill_module._teacher(ctx, "ensemble", DistillConfig(teacher_top_n=top_n))
        want = Ensemble.load(trained_run, "cpu", top_n=top_n or None).predict_proba(images)
        assert np.allclose(teach(x).numpy(), want, atol=1e-6)


def test_transfer_images_without_labels_join_the_training(trained_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    folder = tmp_path / "unlabelled" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(load_data(TINY_DATA).test.images[:20]):
        Image.fromarray(image).save(folder / f"{i}.png")
    cfg = DistillConfig(epochs=1, batch_size=32, init="random", transfer=str(folder.parent))
    (result,) = run_distill(out, cfg, workers=1, progress=False)
    assert result.ok, result.error
    assert result.record.metrics["n_transfer"] == 20
    assert RunDir.of(out).transfer_cache(str(folder.parent)).is_file()


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_student_resumes_to_the_same_weights(trained_run, tmp_path):  # noqa: F811
    cmd = ["distill", "--epochs", "3", "--batch-size", "32", "--init", "random", "--quiet"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    shutil.copytree(trained_run, full)
    shutil.copytree(trained_run, cut)
    assert main([cmd[0], str(full), *cmd[1:]]) == 0
    env = {**os.environ, "SPECIALISTS_FAULT": "student:2"}
    first = subprocess.run(
        [sys.executable, "-m", "specialists.cli", cmd[0], str(cut), *cmd[1:]],
        env=env,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 1 and "FAILED" in first.stderr, first.stderr
    assert RunDir.of(cut).student().resume_dir.is_dir()
    # A rerun that started over would die at epoch 1 again: it succeeds only by resuming.
    env["SPECIALISTS_FAULT"] = "student:1"
    second = subprocess.run(
        [sys.executable, "-m", "specialists.cli", cmd[0], str(cut), *cmd[1:]],
        env=env,
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("student of the ensemble:") == 1, second.stdout  # once, even quiet
    a = load_tensors(RunDir.of(full).student().files.weights)
    b = load_tensors(RunDir.of(cut).student().files.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line_and_status_2(run_dir, trained_run, tmp_path, capsys):  # noqa: F811
    def fails(args, message):
        code = main(["distill", *args, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err

    fails([str(run_dir)], "no calibrated ensemble to distil")
    fails([str(tmp_path / "nope")], "run directory not found")
    fails([str(trained_run), "--model", "resnet_nope"], "unknown timm model")
    fails([str(trained_run), "--temperature", "0"], "temperature must be > 0")
    fails([str(trained_run), "--alpha", "1.5"], "alpha must be in [0, 1]")
    fails([str(trained_run), "--teacher-top-n", "-1"], "teacher_top_n must be >= 0")
    fails(
        [str(trained_run), "--teacher-top-n", "13"], "--teacher-top-n 13: must be between 1 and 12"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    fails([str(trained_run), "--transfer", str(empty)], "no images in this folder")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    fails([str(trained_run), "--transfer", str(bad)], "x.png: unreadable image")
    other = tmp_path / "other.safetensors"
    from specialists.models import create_model
    from specialists.storage import save_tensors

    save_tensors(other, create_model("test_resnet", 12, 3).state_dict())
    fails([str(trained_run), "--init", str(other)], "does not match test_efficientnet")
    fails([str(trained_run), "--model", "test_resnet", "--init", "generalist"], "--init generalist")
