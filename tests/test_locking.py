"""Shared runs are safe: the run lock, under two writers at once and a writer with a reader.

The repeated tests race real processes (forked, so each repetition costs milliseconds, not an
interpreter start); the jobs they race over copy finished artifacts instead of training, which
keeps twenty repetitions fast and leaves the locking, the only thing under test, as it is.
"""

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from specialists import manifest
from specialists.calibrate import calibrate_run
from specialists.errors import SpecialistsError
from specialists.evaluate import evaluate_run
from specialists.lock import held, run_lock
from specialists.run import RunDir
from specialists.storage import file_sha256, load_json
from specialists.train import launch
from specialists.train.pipeline import train_specialists
from specialists.train.specialist import SpecialistConfig

from .test_specialists import FAST, run_dir  # noqa: F401  (the shared tiny run fixture)

REPEATS = 20
FORK = mp.get_context("fork")


def _in_process(target, *args) -> mp.Process:
    p = FORK.Process(target=target, args=args)
    p.start()
    return p


def _join(*procs: mp.Process) -> None:
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"a racing process failed (exit code {p.exitcode})"


def _hold(root, seconds, started):
    with run_lock(root, "specialists train"):
        started.set()
        time.sleep(seconds)


def test_a_second_writer_waits_and_says_for_whom(tmp_path):
    started = FORK.Event()
    holder = _in_process(_hold, tmp_path, 1.0, started)
    assert started.wait(30)
    with (
        pytest.raises(SpecialistsError, match=r"in use by `specialists train` \(pid"),
        run_lock(tmp_path, "specialists evaluate", wait=False),
    ):
        pass
    said, t0 = [], time.perf_counter()
    with run_lock(tmp_path, "specialists evaluate", say=said.append):
        waited = time.perf_counter() - t0
        assert held(tmp_path)
        with run_lock(tmp_path, "inner step"):  # re-entrant in the holding thread
            pass
    _join(holder)
    assert waited > 0.3
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "waiting" in said[0]
    assert not held(tmp_path) and not (tmp_path / ".lock.json").exists()


def test_threads_of_one_process_exclude_each_other(tmp_path):
    inside, overlaps = [], []

    def work(n):
        with run_lock(tmp_path, f"thread {n}", say=lambda line: None):
            inside.append(n)
            if len(inside) > 1:
                overlaps.append(list(inside))
            time.sleep(0.05)
            inside.remove(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


def test_a_missing_run_is_one_line_and_not_created(tmp_path):
    with (
        pytest.raises(SpecialistsError, match="run directory not found"),
        run_lock(tmp_path / "nope", "specialists cluster"),
    ):
        pass
    assert not (tmp_path / "nope").exists()


def _register_many(root, prefix, n):
    for i in range(n):
        path = root / f"{prefix}{i:02d}.txt"
        path.write_text(f"{prefix} {i}")
        manifest.register(root, path)


def test_two_writers_lose_no_manifest_entry(tmp_path):
    for rep in range(REPEATS):
        root = tmp_path / f"r{rep}"
        root.mkdir()
        _join(*[_in_process(_register_many, root, p, 15) for p in ("a", "b")])
        data = load_json(root / "manifest.json")
        assert len(data["files"]) == 30, f"repetition {rep}: entries lost"
        assert data["generation"] == 30


# -- two `train` at once, and `evaluate` while `train` retrains ----------------------------------


@pytest.fixture(scope="module")
def two_states(run_dir, tmp_path_factory):  # noqa: F811
    """The tiny run with two complete states: specialists and combination A, and B (retrained
    with another seed, calibrated again); the files of each are kept aside."""
    base = tmp_path_factory.mktemp("locking")
    states = {}
    for name, seed in (("A", 0), ("B", 1)):
        out = base / name
        shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists", "ensemble.json"))
        train_specialists(
            out,
            SpecialistConfig(**{**FAST.__dict__, "seed": seed}),
            workers=1,
            progress=False,
            calibrate=False,
        )
        calibrate_run(out, "cpu", alpha=1.0)
        states[name] = out
    return states


def _copy_state(src: RunDir, dst: RunDir, ids, pause: float = 0.0) -> None:
    """Write ``src``'s specialists ``ids`` into ``dst`` one by one, as a training would."""
    for i in ids:
        for a, b in zip(src.specialist(i)[:2], dst.specialist(i)[:2], strict=True):
            b.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(a, b)
        manifest.register(dst.root, *dst.specialist(i)[:2])
        time.sleep(pause)


def _fake_run_local(template, log_path):
    """A launcher that 'trains' by copying the template's artifacts, logging every job it runs."""

    def run_local(run, jobs, *, cfg, workers, device, progress):
        results = []
        for job in jobs:
            with open(log_path, "a") as f:
                f.write(f"{os.getpid()} {job.id}\n")
            time.sleep(0.02)  # a window for a racing writer to see the job as still to do
            _copy_state(RunDir.of(template), run, [job.id])
            results.append(launch._collect(run, job, 0))
        return results

    return run_local


def test_two_trains_at_once_train_each_specialist_once(two_states, tmp_path, monkeypatch):
    """The race a user hit: two `specialists train` on one run trained the same specialists
    twice. Under the lock the second waits, then finds them done."""
    log_path = tmp_path / "jobs.log"
    monkeypatch.setattr(launch, "run_local", _fake_run_local(two_states["A"], log_path))
    for rep in range(REPEATS):
        out = tmp_path / f"r{rep}"
        shutil.copytree(
            two_states["A"], out, ignore=shutil.ignore_patterns("specialists", "ensemble.json")
        )
        log_path.write_text("")
        train = (out, FAST)
        _join(*[_in_process(_train_quietly, *train) for _ in range(2)])
        ids = [line.split()[1] for line in log_path.read_text().splitlines()]
        assert sorted(ids) == ["0", "1", "2"], f"repetition {rep}: jobs run {ids}"
        files = load_json(out / "manifest.json")["files"]
        assert all(f"specialists/{i:03d}.safetensors" in files for i in range(3))


def _train_quietly(out, cfg):
    train_specialists(out, cfg, workers=1, progress=False, calibrate=False)


def _retrain_as(out, template):
    """What `specialists train` does to a run, state for state: new specialists, then their
    combination (the template's, calibrated for them)."""
    run, src = RunDir.of(out), RunDir.of(template)
    with run_lock(out, "specialists train"):
        _copy_state(src, run, range(3), pause=0.05)
        shutil.copyfile(src.combination, run.combination)
        manifest.register(run.root, run.combination)


def _evaluate(out, said):
    """The reader: an evaluation, noting to ``said`` whether it had to wait for the writer."""
    import logging

    handler = logging.FileHandler(said)
    logging.getLogger("specialists.lock").addHandler(handler)
    evaluate_run(out, device="cpu")


def test_evaluate_while_train_retrains_scores_one_state(two_states, tmp_path):
    """`evaluate` started while `train` retrained wrote a metrics.json that scored the new
    specialists with the old combination. Under the lock it scores one state, A or B."""
    states = {}
    for name, root in two_states.items():
        run = RunDir.of(root)
        states[name] = (
            file_sha256(run.combination),
            {str(i): load_json(run.specialist(i).record)["weights_sha256"] for i in range(3)},
        )
    seen, waited = set(), 0
    for rep in range(REPEATS):
        out = tmp_path / f"r{rep}"
        shutil.copytree(two_states["A"], out)
        said = tmp_path / f"said{rep}.log"
        writer = _in_process(_retrain_as, out, two_states["B"])
        time.sleep(0.01 * (rep % 5))  # the reader starts before, during or after the writer
        reader = _in_process(_evaluate, out, said)
        _join(writer, reader)
        waited += "waiting for it to finish" in said.read_text()
        state = load_json(out / "metrics.json")["run_state"]
        scored = (state["combination_sha256"], state["specialists_sha256"])
        assert scored in states.values(), f"repetition {rep}: metrics.json mixes two states"
        seen.add(next(k for k, v in states.items() if v == scored))
    # the two did race: the evaluation found the retraining under way (and waited) at least once
    assert waited >= 1, f"no repetition overlapped (states scored: {seen})"


def test_a_combination_chosen_for_other_specialists_is_refused(two_states, tmp_path):
    """A training stopped between its specialists and its calibration leaves the old
    combination beside new specialists: loading it is one line saying what to run."""
    out = tmp_path / "run"
    shutil.copytree(two_states["A"], out)
    _copy_state(RunDir.of(two_states["B"]), RunDir.of(out), [1])
    with pytest.raises(SpecialistsError, match=r"chosen for other specialists \(specialist 1"):
        evaluate_run(out, device="cpu")


def test_cli_no_wait_names_the_writer(two_states, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_states["A"], out)
    started = FORK.Event()
    holder = _in_process(_hold, out, 20.0, started)
    try:
        assert started.wait(30)
        r = subprocess.run(
            [sys.executable, "-m", "specialists.cli", "evaluate", str(out), "--no-wait"],
            capture_output=True,
            text=True,
        )
    finally:
        holder.kill()
        holder.join()
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by `specialists train`" in lines[0], r.stderr
    assert not (out / "metrics.json").exists()  # it stopped before writing anything


def test_a_specialist_changed_after_loading_is_refused_not_mixed_in(two_states, tmp_path):
    """An ensemble loads its specialists on first use, after the lock is let go: one rewritten
    meanwhile is an error naming it, never a model of another state in the answer."""
    from specialists.ensemble import Ensemble

    out = tmp_path / "run"
    shutil.copytree(two_states["A"], out)
    ens = Ensemble.load(out, "cpu")
    assert len(ens.loaded) == 0  # nothing read yet
    _copy_state(RunDir.of(two_states["B"]), RunDir.of(out), range(3))
    assert ens.specialists  # calibrated with alpha=1: every specialist kept
    with pytest.raises(SpecialistsError, match=r"00\d\.safetensors: changed since its ensemble"):
        for m in range(len(ens.specialists)):
            ens.specialist(m)
