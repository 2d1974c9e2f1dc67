"""The run lock: one writer at a time per run directory.

Every step that writes a run (the generalist, the clustering, the specialists and their
calibration, the evaluation, distillation, the controls) holds ``RUN/.lock`` while it works; so
does ``manifest.register``'s read-modify-write, and ``Ensemble.load`` while it reads, so that a
reader sees the artifacts of one state of the run, never a mix of two. The lock is
``filelock.FileLock``: ``flock`` on a local disk, which the kernel drops when its process dies,
however it dies, so a killed job never leaves the run locked; on NFS an NFS lock, which the server
drops when the client's lease ends. On a file system without locks filelock falls back to the
file's existence, which a killed process leaves behind: delete ``RUN/.lock`` then.

It is re-entrant in the thread that holds it (a step calls others: ``specialists run`` trains,
then evaluates) and exclusive between threads and processes. The holder writes who it is to
``RUN/.lock.json``, so that a second command can say whom it waits for; ``wait=False`` stops it
with that line instead. Worker processes (local or on Ray) never take the lock: their launcher
holds it for them, and registers what they write.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import SpecialistsError
from .run import RunDir
from .storage import save_json

__all__ = ["held", "lock_holder", "mark_worker", "run_lock", "writes_run"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.json"

_local = threading.local()  # this thread's holds: resolved run path -> depth
_worker = False  # set in worker processes, whose launcher holds the lock for them


def mark_worker() -> None:
    """Mark this process as a job worker: its launcher holds the run's lock, so ``run_lock``
    passes through here (taking it would wait for the launcher, which waits for the worker)."""
    global _worker
    _worker = True


def _depths() -> dict[str, int]:
    if not hasattr(_local, "depths"):
        _local.depths = {}
    return _local.depths


def held(root: str | os.PathLike) -> bool:
    """Whether this thread holds the lock of the run ``root``."""
    return _depths().get(str(Path(root).resolve()), 0) > 0


def lock_holder(root: str | os.PathLike) -> str:
    """Who holds (or last held) the run's lock, in words; ``"another process"`` if unknown."""
    path = Path(root) / HOLDER_NAME
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"`{h['command']}` (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(
    root: str | os.PathLike,
    command: str,
    *,
    wait: bool = True,
    say=log.warning,
    reader: bool = False,
    create: bool = False,
) -> Iterator[None]:
    """Hold the lock of the run ``root`` inside the block (``create``: making ``root`` if it is
    not there; otherwise a missing run is one line).

    ``command`` names the holder for whoever waits (``specialists train``). A second writer
    waits, saying for whom (``say``), or with ``wait=False`` raises one line. Re-entrant: an
    inner ``run_lock`` of the same run in the same thread passes straight through. A ``reader``
    of a run it cannot write (read-only storage, another user's run) reads without the lock.
    """
    root = Path(root).expanduser()
    key = str(root.resolve())
    depths = _depths()
    if _worker:
        yield
        return
    if depths.get(key, 0):
        depths[key] += 1
        try:
            yield
        finally:
            depths[key] -= 1
        return
    created = False
    if not root.is_dir():
        if not create:
            raise SpecialistsError(f"{root}: run directory not found")
        try:
            root.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass  # made meanwhile by another writer, or a file in the way (the lock says which)
        except OSError as e:
            raise SpecialistsError(f"{root}: cannot write here ({e.strerror})") from e
    # thread_local=False: the hold is this thread's by our own bookkeeping above; another thread
    # opens its own FileLock on the same file and waits for it like another process would.
    lock = FileLock(root / LOCK_NAME, thread_local=False)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = lock_holder(root)
            if not wait:
                raise SpecialistsError(
                    f"{root}: the run is in use by {holder}; try again when it has finished "
                    "(or leave out --no-wait to wait for it)"
                ) from None
            say(f"{root}: the run is in use by {holder}; waiting for it to finish")
            lock.acquire()
        locked = True
    except OSError as e:
        if not reader:
            raise SpecialistsError(f"{root / LOCK_NAME}: cannot lock the run ({e.strerror})") from e
        log.info("%s: reading without the run's lock (%s)", root, e.strerror)
        locked = False
    if not locked:
        yield
        return
    depths[key] = 1
    try:
        with contextlib.suppress(SpecialistsError):  # who holds it is information, not a must
            save_json(
                root / HOLDER_NAME,
                {
                    "command": command,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.datetime.now().isoformat(timespec="seconds"),
                },
            )
        yield
    finally:
        del depths[key]
        with contextlib.suppress(OSError):
            (root / HOLDER_NAME).unlink()
        lock.release()
        if created:
            _remove_if_empty(root)


def _remove_if_empty(root: Path) -> None:
    """A run this lock created, left with nothing but the lock file (the step stopped on bad
    input), is removed: a mistyped command leaves no folder behind. (A second command that
    waited on this lock file then holds an unlinked one; filelock re-opens the path in that case.)
    """
    with contextlib.suppress(OSError):
        if [p.name for p in root.iterdir()] == [LOCK_NAME]:
            (root / LOCK_NAME).unlink()
            root.rmdir()


def writes_run(command: str, arg: str = "run_dir", *, create: bool = False):
    """Decorate a step that writes a run: it runs under ``run_lock`` of its argument ``arg``
    (``create``: the step may start a new run)."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            root = signature.bind(*args, **kwargs).arguments[arg]
            if not create:  # never a lock file in a folder that is not a run
                RunDir.of(root).require_generalist()
            with run_lock(root, command, create=create):
                return fn(*args, **kwargs)

        return locked

    return decorate
