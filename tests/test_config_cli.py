"""One configuration, one source of flags: every setting has a flag, files and flags agree, and
one experiment file runs the whole pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from specialists.cli import CONFIGS, _config_class, build_parser, main

from .conftest import TINY_DATA

ROOT = Path(__file__).resolve().parents[1]


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", list(CONFIGS))
def test_every_setting_has_a_flag_with_help_and_its_default(command):
    sub = _subparsers()[command]
    actions = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(_config_class(command)):
        assert f.name in actions, f"{command}: no flag for {f.name}"
        text = actions[f.name].help or ""
        assert "default" in text and len(text) > len("(default x)") + 3, (command, f.name, text)
    assert "print_config" in actions


def test_print_config_round_trips_through_a_file(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--epochs", "3", "--lr", "0.01", "--print-config"]) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert values["epochs"] == 3 and values["lr"] == 0.01 and values["enrich_fraction"] == 0.5
    (tmp_path / "s.yaml").write_text(printed)
    assert (
        main(["train", str(tmp_path), "--config", str(tmp_path / "s.yaml"), "--print-config"]) == 0
    )
    assert capsys.readouterr().out == printed
    # a flag of a setting that had none before, with a YAML value
    groups = "{3: {input_size: 32}}"
    assert main(["train", str(tmp_path), "--groups", groups, "--amp", "off", "--print-config"]) == 0
    values = yaml.safe_load(capsys.readouterr().out)
    assert values["groups"] == {"3": {"input_size": 32}} and values["amp"] == "off"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_experiment_files_work_with_every_step(path, tmp_path, capsys):
    experiment = yaml.safe_load(path.read_text())
    assert (
        main(["generalist", "--config", str(path), "--out", str(tmp_path), "--print-config"]) == 0
    )
    gen = yaml.safe_load(capsys.readouterr().out)
    assert gen["data"] == experiment["data"] and gen["model"] == experiment["generalist"]["model"]
    for command in ("cluster", "train", "distill"):
        assert main([command, str(tmp_path), "--config", str(path), "--print-config"]) == 0
        capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path), "--print-config"]) == 0
    sections = yaml.safe_load(capsys.readouterr().out)
    assert set(sections) == {"generalist", "cluster", "specialists"} | (
        {"distill"} if "distill" in experiment else set()
    )


def test_experiment_files_refuse_unknown_sections(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generalist: {epochs: 1}\nspecialist: {}\n")
    assert main(["generalist", "--config", str(bad), "--out", str(tmp_path / "r"), "-q"]) == 2
    assert "unknown section 'specialist'" in capsys.readouterr().err
    flat = tmp_path / "flat.yaml"
    flat.write_text("epochs: 1\n")
    assert main(["run", str(flat), "--out", str(tmp_path / "r"), "-q"]) == 2
    assert "not an experiment file" in capsys.readouterr().err


@pytest.mark.slow
def test_one_experiment_file_runs_the_whole_pipeline(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"data: {TINY_DATA}\n"
        "generalist: {epochs: 3, batch_size: 32, threads: 1}\n"
        "cluster: {n_groups: 3}\n"
        "specialists: {epochs: 2, batch_size: 32, examples_per_epoch: 256}\n"
    )
    out = tmp_path / "run"
    assert main(["run", str(exp), "--out", str(out), "--workers", "1", "-q"]) == 0
    text = capsys.readouterr().out
    assert "1/5 generalist test_efficientnet" in text and "5/5 evaluation" in text
    assert "distillation: not asked for" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 120
    assert len(json.loads((out / "clusters.json").read_text())["groups"]) == 3
    # a second run resumes: nothing is trained again
    assert main(["run", str(exp), "--out", str(out), "--workers", "1", "-q"]) == 0
    assert "1/5 generalist: already trained" in capsys.readouterr().out
    # an experiment that no longer matches the run's generalist is refused, not mixed
    exp.write_text(exp.read_text().replace("epochs: 3,", "epochs: 4,"))
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 2
    assert (
        "its generalist was trained with epochs=3, the experiment says 4" in capsys.readouterr().err
    )
