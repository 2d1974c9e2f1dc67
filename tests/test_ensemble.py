import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from specialists.calibrate import (
    ALPHA,
    calibrate_run,
    collect,
    kept_specialists,
    paired_gain,
    score,
    select_and_confirm,
    split_halves,
    subset,
)
from specialists.cli import main
from specialists.combination import Combination
from specialists.ensemble import Ensemble
from specialists.errors import SpecialistsError
from specialists.evaluate import ensemble_metrics
from specialists.run import RunDir
from specialists.sources import load_data
from specialists.storage import save_json
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig

from .conftest import TINY_DATA
from .test_specialists import GROUPS, run_dir  # noqa: F401  (the shared tiny run fixture)

REQUIRED_KEYS = {
    "n_test",
    "generalist_accuracy",
    "ensemble_accuracy",
    "generalist_conditional_accuracy",
    "ensemble_conditional_accuracy",
    "coverage_breakdown",
    "generalist_images_per_second",
    "ensemble_images_per_second",
}


def test_metrics_by_hand():
    # 4 classes; one specialist on {0, 1}; class 3 uncovered.
    p_g = np.array(
        [[0.5, 0.4, 0.05, 0.05], [0.3, 0.2, 0.45, 0.05], [0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.5, 0.1]]
    )
    q = np.array(
        [[0.3, 0.6, 0.05, 0.05], [0.5, 0.1, 0.35, 0.05], [0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.5, 0.1]]
    )
    labels = np.array([1, 0, 3, 1])
    m = ensemble_metrics(p_g, q, labels, [[0, 1]])
    assert m["generalist_accuracy"] == 0.25  # only example 2
    assert m["ensemble_accuracy"] == 0.75  # examples 0, 1, 2
    assert m["relative_error_reduction"] == pytest.approx((0.75 - 0.25) / 0.75, abs=1e-5)
    # covered: examples 0, 1, 3; restricted to {0, 1}: generalist right on 1 only; ensemble on 0, 1
    assert m["n_covered"] == 3
    assert m["generalist_conditional_accuracy"] == pytest.approx(1 / 3, abs=1e-5)
    assert m["ensemble_conditional_accuracy"] == pytest.approx(2 / 3, abs=1e-5)
    rows = {r["n_specialists"]: r for r in m["coverage_breakdown"]}
    assert rows[0] == {
        "n_specialists": 0,
        "n_examples": 1,
        "generalist_correct": 1,
        "delta_correct": 0,
        "relative_change": 0.0,
    }
    assert (
        rows[1]["n_examples"] == 3
        and rows[1]["delta_correct"] == 2
        and rows[1]["relative_change"] is None
    )


@pytest.fixture(scope="module")
def trained_run(run_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ens") / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    train_specialists(
        out,
        SpecialistConfig(epochs=2, batch_size=32, examples_per_epoch=256),
        workers=1,
        progress=False,
    )
    return out


def test_a_load_reads_each_file_once(trained_run, monkeypatch):
    """Every file of the ensemble is checked (manifest and record checksums) and hashed once."""
    from collections import Counter

    from specialists import manifest

    hashed: Counter = Counter()
    real = manifest.file_sha256

    def counting(path, *args, **kwargs):
        hashed[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest, "file_sha256", counting)
    Ensemble.load(trained_run)
    run = RunDir.of(trained_run)
    weights = [run.generalist_weights] + [run.specialist(i).weights for i in range(len(GROUPS))]
    assert all(hashed[str(w)] == 1 for w in weights), hashed
    assert max(hashed.values()) == 1, hashed


def test_ensemble_outputs_are_distributions_and_batch_invariant(trained_run):
    ens = Ensemble.load(trained_run, combination=Combination())  # the paper's: top-1, all
    images = load_data(TINY_DATA).test.images[:20]
    out = ens.run_batch(images)
    assert out.q.shape == (20, 12) and np.allclose(out.q.sum(1), 1, atol=1e-5)
    one_by_one = np.concatenate([ens.predict_proba(images[i : i + 1]) for i in range(20)])
    # on CUDA, TF32 convolutions round differently with the batch size
    assert np.allclose(one_by_one, out.q, atol=1e-5 if ens.device.type == "cpu" else 1e-3)
    # every example consults exactly the specialist of its generalist's top class (top-1 gating)
    top = out.p_g.argmax(1)
    assert out.consulted == [[int(t) // 4] for t in top]
    small_cache = Ensemble.load(trained_run, cache_size=1, combination=Combination())
    assert np.allclose(small_cache.predict_proba(images), out.q, atol=1e-6)
    with pytest.raises(SpecialistsError, match="expected uint8 images of shape"):
        ens.predict_proba(np.zeros((2, 16, 16, 1), dtype=np.uint8))
    with pytest.raises(SpecialistsError, match="images are 8x8 but the generalist takes 16 px"):
        ens.predict_proba(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    # larger images are resized by every model as in training (the originals are welcome)
    assert ens.predict_proba(np.zeros((2, 32, 32, 3), dtype=np.uint8)).shape == (2, 12)


def test_profile_names_every_stage_of_a_batch(trained_run):
    """Where the time goes: the generalist, the gating, each consulted specialist (its input and
    its forward pass), the combiner and the copies, each timed, none above the whole."""
    ens = Ensemble.load(trained_run, combination=Combination())
    images = load_data(TINY_DATA).test.images[:40]
    consulted = {s for c in ens.run_batch(images).consulted for s in c}
    stages = ens.profile(images, repeats=2)
    expected = {"input to device, transform", "generalist", "gating", "combiner", "outputs to host"}
    expected |= {f"specialist {s}" for s in consulted} | {
        f"specialist {s} input" for s in consulted
    }
    assert set(stages) == expected | {"total"}
    assert all(v >= 0 for v in stages.values())
    assert sum(v for k, v in stages.items() if k != "total") <= stages["total"] * 1.05
    assert ens._clock is None  # profiling leaves no timer behind
    assert np.allclose(ens.predict_proba(images), ens.run_batch(images).q)


def test_offline_scoring_matches_the_ensemble(trained_run):
    # calibration and the ablations score combinations from stored outputs; they must agree
    # with what the ensemble itself computes
    images = load_data(TINY_DATA).test
    for comb in (
        Combination(),
        Combination(2, 4.0, "none"),
        Combination(3, 0.5, "natural", [0, 2]),
    ):
        ens = Ensemble.load(trained_run, combination=comb)
        col = collect(ens, images.images, images.labels)
        q_offline = score(col, comb)["q"].numpy()
        assert np.allclose(q_offline, ens.run_batch(images.images).q, atol=1e-4)


def test_training_calibrates_the_combination_on_validation(trained_run):
    run = RunDir.of(trained_run)
    comb = Combination.from_dict(json.loads((run.root / "ensemble.json").read_text()))
    grid = comb.chosen_on["grid"]
    assert len(grid) == 3 * 5 * 3  # top-n x weights x corrections
    best = comb.chosen_on.get("best_accuracy", comb.chosen_on["accuracy"])
    assert best == max(g["accuracy"] for g in grid)
    # the specialists are kept only when the choice is confirmed on the other half
    gain = comb.chosen_on["gain"]
    assert (comb.keep == []) == (gain["p_value"] > ALPHA)
    recs = Ensemble.load(run.root, combination=Combination()).all_specialists
    rule = kept_specialists(recs)
    if comb.keep != []:
        assert comb.keep == (None if len(rule) == len(recs) else rule)
    # the stored score is reproduced from scratch on the selection half of the validation split
    val = load_data(TINY_DATA).val
    col = collect(Ensemble.load(run.root, combination=Combination()), val.images, val.labels)
    sel, _ = split_halves(val.labels, 0)
    assert comb.chosen_on["n_selection"] == len(sel)
    assert score(subset(col, sel), replace(comb, keep=comb.keep or None))[
        "accuracy"
    ] == pytest.approx(best, abs=1e-6)
    # loading uses the calibrated combination unless told otherwise
    ens = Ensemble.load(run.root)
    assert (ens.top_n, ens.combination.spec_weight) == (comb.top_n, comb.spec_weight)
    kept = [r.id for r in recs] if comb.keep is None else comb.keep
    assert [s.id for s in ens.specialists] == kept
    assert Ensemble.load(run.root, top_n=3).top_n == 3


def test_the_choice_never_looks_at_the_confirmation_half(trained_run):
    val = load_data(TINY_DATA).val
    col = collect(Ensemble.load(trained_run, combination=Combination()), val.images, val.labels)
    select, confirm = split_halves(val.labels, 0)
    assert len(np.intersect1d(select, confirm)) == 0 and len(select) + len(confirm) == len(val)
    assert abs(len(select) - len(confirm)) <= len(np.unique(val.labels))  # halves, per class
    # wreck what the confirmation half holds: its labels and the specialists' outputs on it
    # (the generalist's are left, since they decide which specialist ran on which image)
    g = torch.Generator().manual_seed(0)
    wrecked = replace(col, labels=col.labels.copy(), logits=[])
    wrecked.labels[confirm] = (wrecked.labels[confirm] + 1) % 12
    for rows, logits in zip(col.rows, col.logits):
        hit = torch.from_numpy(np.isin(rows.numpy(), confirm))
        noisy = logits.clone()
        noisy[hit] = torch.randn(int(hit.sum()), logits.shape[1], generator=g).double()
        wrecked.logits.append(noisy)
    halves = (select, confirm)  # the split itself is stratified by the (unwrecked) labels
    a, b = select_and_confirm(col, 0), select_and_confirm(wrecked, 0, halves=halves)
    assert a.chosen_on["grid"] == b.chosen_on["grid"]
    assert (a.top_n, a.spec_weight, a.correction, a.keep) == (
        b.top_n,
        b.spec_weight,
        b.correction,
        b.keep,
    )
    assert a.chosen_on["confirmation_accuracy"] != b.chosen_on["confirmation_accuracy"]
    # and the confirmation half is what the stored gain was measured on
    conf = subset(col, confirm)
    assert a.chosen_on["gain"] == paired_gain(conf, score(conf, a)["q"])


def test_paired_gain_by_hand():
    from types import SimpleNamespace

    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    p_g = torch.eye(3)[[0, 1, 2, 1, 2, 0, 1]]  # right on the first 3 only
    q = torch.eye(3)[[0, 1, 0, 0, 1, 2, 1]]  # loses example 2, wins 3, 4 and 5; both miss 6
    col = SimpleNamespace(labels=labels, p_g=p_g)
    # one-sided exact binomial: P(X >= 3 | n = 4, 1/2) = 5/16
    assert paired_gain(col, q) == {
        "wins": 3,
        "losses": 1,
        "z": round(2 / math.sqrt(4), 4),
        "p_value": 0.3125,
    }
    assert paired_gain(col, p_g)["z"] == 0.0 and paired_gain(col, p_g)["p_value"] == 1.0


def test_a_gain_within_noise_falls_back_to_the_generalist(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    said = []
    # no test: the best point of the grid, specialists kept by the in-group rule
    comb = calibrate_run(out, alpha=1.0, say=said.append)
    assert comb.keep != [] and "generalist alone" not in said[-1]
    # an unreachable level: no specialist, and the ensemble is the generalist itself
    comb = calibrate_run(out, alpha=0.0, say=said.append)
    assert comb.keep == [] and "specialists kept: none" in said[-1]
    assert "not confirmed; the ensemble answers with the generalist alone" in said[-2]
    assert comb.chosen_on["accuracy"] == comb.chosen_on["generalist_accuracy"]
    assert comb.chosen_on["best_accuracy"] > 0
    ens = Ensemble.load(out)
    assert ens.specialists == []
    images = load_data(TINY_DATA).test.images[:32]
    out_ = ens.run_batch(images)
    assert np.allclose(out_.q, out_.p_g, atol=1e-6)
    # the evaluation says why no specialist is consulted
    assert main(["evaluate", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "combination (chosen on validation): the generalist alone" in printed
    assert "relative error reduction: 0.00%" in printed


def test_calibrate_command(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    (out / "ensemble.json").unlink()
    assert main(["calibrate", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "combination chosen on 60 of 120 validation images" in printed
    assert f"written to {out / 'ensemble.json'}" in printed
    chosen_on = json.loads((out / "ensemble.json").read_text())["chosen_on"]
    assert chosen_on["split"] == "val" and chosen_on["alpha"] == ALPHA  # the CLI's default
    assert main(["calibrate", str(tmp_path / "nowhere"), "--quiet"]) == 2


def test_kept_specialists_rule():
    from types import SimpleNamespace as R

    def rec(i, mine, theirs, n):
        return R(
            id=i,
            metrics={"in_group_acc": mine, "generalist_in_group_acc": theirs, "n_group_val": n},
        )

    recs = [
        rec(0, 0.90, 0.80, 400),  # better: kept
        rec(1, 0.70, 0.80, 400),  # worse by 5 standard errors (0.02): dropped
        rec(2, 0.78, 0.80, 400),  # worse by 1 standard error: within noise, kept
        rec(3, 0.70, 0.80, 20),  # worse, but on 20 examples (SE 0.09): kept
        R(id=4, metrics={}),  # not measured: kept
    ]
    assert kept_specialists(recs) == [0, 2, 3, 4]


def test_evaluate_writes_the_metrics(trained_run, capsys):
    assert main(["evaluate", str(trained_run), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "conditional accuracy" in printed and "covered by" in printed
    m = json.loads(RunDir.of(trained_run).metrics.read_text())
    assert set(m) >= REQUIRED_KEYS
    assert m["combination"]["calibrated"] and "chosen on validation" in printed
    assert m["n_test"] == 120 and sum(r["n_examples"] for r in m["coverage_breakdown"]) == 120
    assert (RunDir.of(trained_run).root / "coverage.png").stat().st_size > 1000
    assert main(["evaluate", str(trained_run), "--top-n", "2", "--quiet"]) == 0


def _broken_copy(src, dst, breakage):
    shutil.copytree(src, dst)
    breakage(RunDir.of(dst))
    return dst


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: (r.specialists_dir / "001.json").unlink(), "specialist 1 is missing"),
        (
            lambda r: (r.specialists_dir / "002.safetensors").write_bytes(b"\x00" * 10),
            "(truncated or changed); to make it again, rerun `specialists train",
        ),
        (
            lambda r: save_json(
                r.clusters,
                {"groups": [{"classes": [0, 1, 2]}, *({"classes": g} for g in GROUPS[1:])]},
            ),
            "do not match group 0",
        ),
        (
            lambda r: (r.specialists_dir / "000.json").write_text("{not json"),
            "000.json: 9 bytes, the run's manifest says",
        ),
        (lambda r: r.clusters.unlink(), "no clusters in this run"),
    ],
)
def test_broken_runs_are_one_clear_error(trained_run, tmp_path, capsys, breakage, message):
    run = _broken_copy(trained_run, tmp_path / "broken", breakage)
    assert main(["evaluate", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_predict_prints_classes_and_specialists(trained_run, tmp_path, capsys):
    from PIL import Image

    img = load_data(TINY_DATA).test.images[0]
    Image.fromarray(img).resize((40, 40)).save(tmp_path / "a b é.png")  # any size; resized
    assert (
        main(["predict", str(trained_run), str(tmp_path / "a b é.png"), "--top-k", "3", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "consulted specialist(s): " in out and len(out.strip().splitlines()) == 4
    (tmp_path / "bad.png").write_bytes(b"")
    assert main(["predict", str(trained_run), str(tmp_path / "bad.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.png: skipped (unreadable image" in err
    assert "error: no readable image among 1 file(s)" in err
    assert main(["predict", str(trained_run), str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err


def test_the_cascade_threshold_scan_by_hand():
    from types import SimpleNamespace

    from specialists.calibrate import Collected, cascade_scan, pick_cascade
    from specialists.gating import GroupIndex, gate

    # one specialist for classes {0, 1}; its dustbin never wins; weight 8 lets it decide
    p_g = torch.tensor(
        [
            [0.90, 0.05, 0.03, 0.02],  # sure and right (class 0)
            [0.60, 0.35, 0.03, 0.02],  # unsure and wrong: class 1, the specialist knows
            [0.45, 0.50, 0.03, 0.02],  # unsure and wrong: class 0, the specialist knows
            [0.02, 0.03, 0.90, 0.05],  # outside the group: never consults
        ],
        dtype=torch.float64,
    )
    labels = np.array([0, 1, 0, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]], dtype=torch.float64)
    rec = SimpleNamespace(id=0, classes=[0, 1], logit_offset=[0.0, 0.0, 0.0], train_fraction=0.5)
    col = Collected(p_g, labels, [rec], 4, 1, [torch.tensor([0, 1, 2])], [logits])
    assert gate(p_g, GroupIndex.from_lists([[0, 1]], 4), 1, 0.6).rows.tolist() == [2]
    comb = Combination(spec_weight=8.0)

    def speed(c):  # a stand-in meter: each consultation costs as much as the generalist
        return 1 / (1 + score(col, c)["mean_consulted"])

    scan = cascade_scan(col, comb, speed, thresholds=[None, 0.9, 0.6, 0.0])
    # None: rows 0-2 consult, all right; 0.9: rows 1, 2 consult (0.9 is sure), all right;
    # 0.6: row 2 only (0.6 is sure), row 1 stays wrong; 0: the generalist alone
    assert [r["accuracy"] for r in scan] == [1.0, 1.0, 0.75, 0.5]
    assert [r["mean_consulted"] for r in scan] == [0.75, 0.5, 0.25, 0.0]
    assert [r["throughput_ratio"] for r in scan] == [
        round(1 / 1.75, 4),
        round(1 / 1.5, 4),
        0.8,
        1.0,
    ]
    assert pick_cascade(scan, 0.5)["threshold"] == 0.9  # best accuracy, then the faster
    assert pick_cascade(scan, 0.6)["threshold"] == 0.9
    assert pick_cascade(scan, 0.7)["threshold"] == 0.6
    assert pick_cascade(scan, 0.9)["threshold"] == 0.0


def test_calibrate_with_a_throughput_floor_and_the_evaluation_curve(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    assert (
        main(["calibrate", str(out), "--quiet", "--alpha", "1", "--min-throughput-ratio", "0.5"])
        == 0
    )
    comb = Combination.from_dict(json.loads((out / "ensemble.json").read_text()))
    cascade = comb.chosen_on["cascade"]
    chosen = cascade["chosen"]
    assert chosen["throughput_ratio"] >= 0.5 or chosen["threshold"] == 0.0
    assert comb.confidence == chosen["threshold"]
    fast_enough = [r for r in cascade["scan"] if r["throughput_ratio"] >= 0.5]
    assert chosen["accuracy"] == max(r["accuracy"] for r in fast_enough)
    assert cascade["scan"][0]["threshold"] is None and cascade["scan"][-1]["threshold"] == 0.0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    if comb.keep != []:
        assert (out / "cascade.png").is_file() and "cascade threshold" in capsys.readouterr().out
        curve = m["cascade"]
        assert curve[-1]["mean_consulted"] == 0.0 and curve[0]["threshold"] is None
        assert curve[-1]["accuracy"] == m["generalist_accuracy"]
    assert main(["calibrate", str(out), "--quiet", "--min-throughput-ratio", "0"]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err
