"""The Ray backend on a cluster of several nodes: Ray's own multi-node test cluster on this
machine (``ray.cluster_utils.Cluster``: a head and two worker nodes, each a real raylet with its
own worker processes). A node is removed while it trains: its raylet and workers are killed."""

import json
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest

from specialists import manifest
from specialists.records import Record
from specialists.run import RunDir
from specialists.storage import save_json, save_tensors
from specialists.train.launch import Job, run_jobs
from specialists.train.specialist import SpecialistConfig, specialist_job

from .test_specialists import run_dir  # noqa: F401  (the shared tiny run fixture)

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.faults]

GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 4, 8], [1, 5, 9], [2, 6, 10]]
CFG = SpecialistConfig(epochs=4, batch_size=32, examples_per_epoch=2048)


@pytest.fixture(scope="module")
def cluster():
    """A head that runs no task, and two worker nodes of one CPU each."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=True)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _busy(node_id: str) -> bool:
    """Whether a task holds the node's CPU (Ray's per-node accounting, which leaves out a
    resource none of which is free)."""
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    return node_id in free and free[node_id].get("CPU", 0) < 1


def test_a_node_removed_mid_training_its_jobs_finish_on_the_others(
    cluster,
    tmp_path,
    run_dir,  # noqa: F811
    capfd,
    caplog,
):
    c, (doomed, survivor) = cluster
    caplog.set_level(logging.INFO, logger="specialists")  # the workers log at the driver's level
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("specialists"))
    run = RunDir.of(out)
    sha = json.loads(run.generalist_record.read_text())["weights_sha256"]
    jobs = [specialist_job(i, g, sha) for i, g in enumerate(GROUPS)]
    removed, logs = {}, []

    def remove_once_it_trains():
        """Wait until a job says it started on the doomed node (its line reached the driver),
        then remove the node while that job trains."""
        tag = f"started on node {doomed.node_id[:8]}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and tag not in "".join(logs):
            logs.extend(capfd.readouterr())
            time.sleep(0.1)
        time.sleep(0.5)  # inside the job's training (a few seconds)
        removed["finished"] = {
            p.name: p.stat().st_mtime_ns for p in run.specialists_dir.glob("*") if p.is_file()
        }
        removed["busy"] = _busy(doomed.node_id)
        c.remove_node(doomed)  # kills the node's raylet and its worker processes

    killer = threading.Thread(target=remove_once_it_trains)
    killer.start()
    results = run_jobs(
        run,
        jobs,
        cfg=CFG,
        generalist_sha=sha,
        backend="ray",
        ray_address=c.address,
        progress=False,
    )
    killer.join()
    time.sleep(2)  # Ray's log monitor forwards worker lines about once a second
    logs.extend(capfd.readouterr())
    lines = "".join(logs).splitlines()
    assert removed.get("busy"), "the node was removed while it ran a job"
    assert [r.ok for r in results] == [True] * len(GROUPS), [r.error for r in results]
    assert [r.record.classes for r in results] == GROUPS
    for name, mtime in removed["finished"].items():  # what had finished is untouched
        if not name.startswith("."):
            assert (run.specialists_dir / name).stat().st_mtime_ns == mtime, name
    files = json.loads(run.manifest.read_text())["files"]
    for i in range(len(GROUPS)):
        for path in run.specialist(i)[:2]:
            manifest.verify(run.root, path)
            assert path.relative_to(out).as_posix() in files
    on = {}  # job -> nodes it started on, from the workers' lines the driver printed
    for line in lines:
        if "started on node " in line:
            job = line.split("specialist")[-1].split(":")[0].strip()
            on.setdefault(job, []).append(line.split("started on node ")[1][:8])
    interrupted = [
        j
        for j, nodes in on.items()
        if nodes[0] == doomed.node_id[:8]
        and not any(
            f"specialist{j.rjust(4)}: finished on node {doomed.node_id[:8]}" in x for x in lines
        )
    ]
    # the jobs were spread over both nodes; the one the removal cut short ran again on the other
    assert {doomed.node_id[:8], survivor.node_id[:8]} <= {n for v in on.values() for n in v}
    assert interrupted, "\n".join(lines[-30:])
    for j in interrupted:
        assert on[j][-1] == survivor.node_id[:8], "\n".join(lines[-30:])


# -- fractional GPUs --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ShareRecord(Record):
    """What a GPU-share job saw: its GPU ids and when it ran."""

    kind: ClassVar[str] = "share"
    id: int
    gpus: list
    start: float
    end: float


def _share_task(run_root, job, cfg, *, device, threads):
    """A job that holds its share of a GPU for a moment and writes a valid artifact."""
    start = time.time()
    time.sleep(3.0)
    files = RunDir.of(run_root).artifact(job.out, job.id)
    import torch

    save_tensors(files.weights, {"w": torch.zeros(1)})
    rec = ShareRecord(
        id=job.id, gpus=[str(g) for g in ray.get_gpu_ids()], start=start, end=time.time()
    )
    save_json(files.record, rec.to_dict())
    return rec


def test_fractional_gpus_let_four_jobs_share_one_gpu(cluster, tmp_path):
    c, _ = cluster
    # a node that declares one GPU: Ray schedules by the declared amount, as on real hardware
    gpu_node = c.add_node(num_cpus=4, num_gpus=1)
    c.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        run = RunDir.of(tmp_path / "run")
        run.root.mkdir()
        jobs = [Job(i, "shares", _share_task, ShareRecord) for i in range(4)]
        results = run_jobs(
            run,
            jobs,
            cfg=CFG,
            generalist_sha="-",
            backend="ray",
            workers=4,
            device="cuda",
            gpus_per_job=0.25,
            progress=False,
        )
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        c.remove_node(gpu_node)
    assert all(r.ok for r in results), [r.error for r in results]
    recs = [r.record for r in results]
    assert all(r.gpus == ["0"] for r in recs)  # all four on the one GPU
    # they ran at the same time: each started before any ended
    assert max(r.start for r in recs) < min(r.end for r in recs)


def test_more_gpu_than_the_cluster_has_is_one_line(cluster, tmp_path):
    c, _ = cluster
    run = RunDir.of(tmp_path / "run")
    run.root.mkdir()
    jobs = [Job(0, "shares", _share_task, ShareRecord)]
    from specialists.errors import SpecialistsError

    with pytest.raises(SpecialistsError, match=r"--gpus-per-job 0.5: the Ray cluster has 0 GPU"):
        run_jobs(
            run,
            jobs,
            cfg=CFG,
            generalist_sha="-",
            backend="ray",
            device="cuda",
            gpus_per_job=0.5,
            progress=False,
        )
    with pytest.raises(SpecialistsError, match=r"--gpus-per-job 2: must be in \(0, 1\]"):
        run_jobs(
            run, jobs, cfg=CFG, generalist_sha="-", backend="ray", gpus_per_job=2, progress=False
        )
