"""An image folder larger than memory: decoded under a memory limit, with 1 and with 2 workers.

    python benchmarks/memory.py                           # 60,000 JPEGs at 224 px, 2 GiB cap
    python benchmarks/memory.py --n 6000 --limit-gb 1     # a quick look

It writes ``--n`` JPEGs at ``--size`` px in ``--classes`` class folders under ``--dir`` (kept for
the next run), then loads the folder as a data source (``folder:DIR`` read at ``--size``: listing, the
validation carve, the parallel decode into the memory-mapped cache) in a fresh process whose
anonymous memory is capped at ``--limit-gb`` (``RLIMIT_DATA``: the heap and private mappings;
the memory-mapped cache is file-backed, written back to disk and dropped by the kernel as it
needs; importing torch needs most of 1 GiB of its address space). Once with
``SPECIALISTS_DECODE_WORKERS=1``, once with 2 (decoding threads), each into an empty cache.

``--workers-memory``: a specialist job's memory against the size of its run's data. Two runs of
the embedded data (100 classes at 32 px, ``--per-class`` training images per class, e.g. 200 and
1,600: 60 MB and 490 MB of images), a generalist of one epoch each, then one specialist job in a
fresh process on each, its peak anonymous memory sampled the same way: a job that copied the
data would grow by its size.

Printed for each: wall seconds, images/s, the peak anonymous resident memory of the process and
any children (``RssAnon`` from ``/proc``, sampled every 50 ms) and the peak
resident memory of the main process (``VmHWM``, file-backed pages included); then the speed-up
of 2 workers over 1, and the decoded size against the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
sys.path.insert(0, sys.argv[3])
from specialists.sources import load_data, parse_source
t = time.perf_counter()
b = load_data(parse_source(sys.argv[1], image_size=int(sys.argv[4])))
seconds = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "n": len(b.train) + len(b.val) + len(b.test),
                  "shape": list(b.train.images.shape[1:]), "vm_hwm_kb": hwm}))
"""


def _write_class(args: tuple[str, int, int, int, int]) -> int:
    """JPEGs of one class: smooth random colour fields (cheap to make, realistic to decode)."""
    from PIL import Image

    folder, label, count, size, seed = args
    rng = np.random.default_rng([seed, label])
    Path(folder).mkdir(parents=True, exist_ok=True)
    tint = rng.integers(0, 256, 3)
    for i in range(count):
        low = rng.integers(0, 256, (14, 14, 3)).astype(np.float32)
        low = (0.6 * low + 0.4 * tint).astype(np.uint8)
        im = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        im.save(Path(folder) / f"{i:05d}.jpg", quality=85)
    return count


def make_folder(root: Path, n: int, size: int, classes: int, workers: int) -> None:
    marker = root / f".complete-{n}-{size}-{classes}"
    if marker.is_file():
        return
    shutil.rmtree(root, ignore_errors=True)
    per_class = n // classes
    test_per_class = max(1, per_class // 20)
    jobs = []
    for c in range(classes):
        jobs.append((str(root / "train" / f"c{c:03d}"), c, per_class - test_per_class, size, 0))
        jobs.append((str(root / "test" / f"c{c:03d}"), c, test_per_class, size, 1))
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        total = sum(pool.map(_write_class, jobs))
    print(f"wrote {total} JPEGs at {size} px in {time.perf_counter() - t:.0f} s under {root}")
    marker.write_text("")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_anon_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(source: str, size: int, workers: int, limit: int) -> dict:
    cache = tempfile.mkdtemp(prefix="specialists-memory-cache-")
    env = {**os.environ, "SPECIALISTS_CACHE": cache, "SPECIALISTS_DECODE_WORKERS": str(workers)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, source, str(limit), str(ROOT), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_anon_kb(_tree(proc.pid)))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"decoding with {workers} worker(s) failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_anon_kb"] = peak
    return result


WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
from specialists.train.specialist import SpecialistConfig, train_specialist
train_specialist(sys.argv[1], 0, [0, 1, 2, 3, 4], SpecialistConfig(epochs=1, examples_per_epoch=2048), threads=2)
"""


def worker_memory(per_class: int, root: Path) -> dict:
    """Peak anonymous memory of one specialist job on a run with ``per_class`` training images
    per class (100 classes at 32 px)."""
    sys.path.insert(0, str(ROOT))
    from specialists.run import RunDir
    from specialists.sources import load_data
    from specialists.storage import save_json
    from specialists.train._job import cache_data
    from specialists.train.generalist import GeneralistConfig, train_generalist

    data = (
        f"embedded:n_classes=100,n_groups=20,image_size=32,train_per_class={per_class},"
        "val_per_class=20,test_per_class=20"
    )
    run = RunDir.of(root / f"run{per_class}")
    if not run.generalist_record.is_file():
        train_generalist(GeneralistConfig(data=data, epochs=1, threads=2), run.root, progress=False)
        cache_data(run, load_data(data))
        save_json(
            run.clusters,
            {"groups": [{"classes": list(range(5 * g, 5 * g + 5))} for g in range(20)]},
        )
    shutil.rmtree(run.specialists_dir, ignore_errors=True)
    n_bytes = np.load(run.cache_images("train"), mmap_mode="r").nbytes
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(run.root), str(ROOT)], stderr=subprocess.PIPE, text=True
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _rss_anon_kb(_tree(proc.pid)))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"the specialist job failed:\n{proc.stderr.read()[-3000:]}")
    return {"train_bytes": n_bytes, "peak_rss_anon_kb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=60_000, help="images (default 60,000)")
    p.add_argument("--size", type=int, default=224, help="side in pixels (default 224)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument(
        "--limit-gb", type=float, default=2.0, help="anonymous memory cap, GiB (default 2)"
    )
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "specialists-memory")
    p.add_argument("--workers-memory", action="store_true", help="the specialist jobs' part")
    p.add_argument("--per-class", type=int, nargs="+", default=[200, 1600])
    args = p.parse_args()
    if args.workers_memory:
        for per_class in args.per_class:
            r = worker_memory(per_class, args.dir / "runs")
            print(
                f"{per_class} training images per class ({r['train_bytes'] / 2**20:.0f} MiB of "
                f"images): the specialist job's peak anonymous memory "
                f"{r['peak_rss_anon_kb'] / 2**10:.0f} MiB"
            )
        return
    make_folder(args.dir, args.n, args.size, args.classes, workers=os.cpu_count() or 1)
    limit = int(args.limit_gb * 2**30)
    source = f"folder:{args.dir}"
    decoded = args.n * args.size * args.size * 3
    rows = {}
    for workers in (1, 2):
        rows[workers] = r = measure(source, args.size, workers, limit)
        print(
            f"{workers} worker(s): {r['n']} images in {r['seconds']:.1f} s "
            f"({r['n'] / r['seconds']:.0f} images/s); peak anonymous memory "
            f"{r['peak_rss_anon_kb'] / 2**20:.2f} GiB (process and workers); main process peak "
            f"resident {r['vm_hwm_kb'] / 2**20:.2f} GiB"
        )
    speedup = rows[1]["seconds"] / rows[2]["seconds"]
    print(
        f"decoded size {decoded / 2**30:.2f} GiB = {decoded / limit:.1f}x the {args.limit_gb:g} GiB "
        f"limit; 2 workers decode {speedup:.2f}x as fast as 1"
    )


if __name__ == "__main__":
    main()
