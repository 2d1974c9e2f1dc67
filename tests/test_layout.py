"""The package's shape as a user meets it: one import namespace, layers that hold, a small API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_ensemble import trained_run  # noqa: F401  (a tiny run with specialists)
from .test_specialists import run_dir  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", ["train", "clustering"])
def test_no_top_level_train_or_clustering_module_is_installed(tmp_path, name):
    proc = _python(f"import {name}", tmp_path)
    assert proc.returncode != 0 and "No module named" in proc.stderr, proc.stderr
    ok = _python(f"import specialists.{name} as m; print(m.__name__)", tmp_path)
    assert ok.stdout.strip() == f"specialists.{name}", ok.stderr


def test_inference_works_beside_a_users_train_py_and_clustering_py(tmp_path, trained_run):  # noqa: F811
    """The most common script names in ML sit in the user's folder, which is first on the path."""
    for name in ("train", "clustering"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py ran')\n")
    code = (
        "from specialists import Ensemble, load_data\n"
        f"ens = Ensemble.load({str(trained_run)!r})\n"
        f"images = load_data({_tiny_data()!r}).test.images[:8]\n"
        "q = ens.predict_proba(images)\n"
        "print(q.shape, round(float(q.sum(1).mean()), 4))\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(")")[0] == "(8, 12" and proc.stdout.strip().endswith("1.0")
    image = tmp_path / "x.png"
    _python(
        "import numpy as np; from PIL import Image; "
        f"Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save({str(image)!r})",
        tmp_path,
    )
    cli = subprocess.run(
        [sys.executable, "-m", "specialists.cli", "predict", str(trained_run), str(image)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "consulted specialist(s)" in cli.stdout, cli.stderr


def test_a_script_without_a_main_guard_can_train(tmp_path, run_dir):  # noqa: F811
    """Local workers are spawned processes; they must not run the caller's script again."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    script = tmp_path / "script.py"
    script.write_text(
        "from specialists import SpecialistConfig, train_specialists\n"
        "cfg = SpecialistConfig(epochs=1, batch_size=32, examples_per_epoch=64)\n"
        f"results = train_specialists({str(out)!r}, cfg, workers=2, only=[0, 1], progress=False)\n"
        "print('ok' if all(r.ok for r in results) else [r.error for r in results])\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout


def test_the_python_api_is_importable_from_the_top():
    import specialists

    names = set(specialists.__all__) - {"__version__"}
    assert names == set(specialists._EXPORTS)
    for name in names:
        assert getattr(specialists, name) is not None
    assert "Ensemble" in dir(specialists)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        specialists.nope  # noqa: B018


def test_importing_the_command_line_does_not_load_torch(tmp_path):
    """`specialists --help` answers at once: the steps load only when a command runs."""
    proc = _python("import sys, specialists.cli; print('torch' in sys.modules)", tmp_path)
    assert proc.stdout.strip() == "False", proc.stderr


def test_the_import_layers_hold():
    """clustering < the core < train < the command line, and no import cycles (pyproject.toml)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 kept, 0 broken" in proc.stdout


def _tiny_data() -> str:
    from .conftest import TINY_DATA

    return TINY_DATA
