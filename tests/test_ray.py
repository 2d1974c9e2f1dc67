"""The Ray backend against a real local Ray instance (not a mock)."""

import json
import os
import shutil

import pytest

from specialists.run import RunDir
from specialists.train.launch import run_jobs
from specialists.train.specialist import SpecialistConfig, specialist_job

from .test_specialists import GROUPS, run_dir  # noqa: F401  (the shared tiny run fixture)

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance whose workers SIGKILL themselves once, after the first epoch of
    specialist 1 (Ray workers take the environment of the process that starts Ray)."""
    marker = tmp_path_factory.mktemp("fault") / "killed-once"
    env = {"SPECIALISTS_FAULT": "specialist:1:1", "SPECIALISTS_FAULT_ONCE": str(marker)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield marker
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_ray_trains_specialists_and_retries_a_killed_worker(tmp_path, run_dir, local_ray):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    run = RunDir.of(out)
    sha = json.loads(run.generalist_record.read_text())["weights_sha256"]
    # The worker that trains specialist 1 is SIGKILLed after its first epoch, once; Ray retries it.
    cfg = SpecialistConfig(epochs=2, batch_size=32, examples_per_epoch=256)
    jobs = [specialist_job(i, g, sha) for i, g in enumerate(GROUPS[:2])]
    results = run_jobs(
        run, jobs, cfg=cfg, generalist_sha=sha, backend="ray", workers=2, progress=False
    )
    assert local_ray.exists()  # the fault did fire
    assert [r.ok for r in results] == [True, True], [r.error for r in results]
    assert [r.record.classes for r in results] == GROUPS[:2]
    assert all(run.specialist(i).record.is_file() for i in range(2))


def test_ray_reports_a_failing_job_without_stopping_the_others(tmp_path, run_dir, local_ray):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    run = RunDir.of(out)
    sha = json.loads(run.generalist_record.read_text())["weights_sha256"]
    cfg = SpecialistConfig(epochs=1, batch_size=32, examples_per_epoch=128)
    jobs = [specialist_job(0, [0, 1], sha), specialist_job(1, [0, 99], sha)]
    results = run_jobs(run, jobs, cfg=cfg, generalist_sha=sha, backend="ray", progress=False)
    assert results[0].ok and not results[1].ok
    assert "out of range" in results[1].error
