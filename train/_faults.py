"""Fault injection for the reliability tests: kill this process at a chosen point.

Set ``SPECIALISTS_FAULT`` to ``specialist:ID:EPOCH`` or ``generalist:EPOCH`` to SIGKILL the
process that trains it right after that epoch's training pass (before anything of the epoch is
saved). With ``SPECIALISTS_FAULT_ONCE=PATH`` the fault fires only if PATH does not exist yet (it is
created first), so a retried job then succeeds. Unset, this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def maybe_die(*where: object) -> None:
    spec = os.environ.get("SPECIALISTS_FAULT")
    if not spec or spec != ":".join(str(w) for w in where):
        return
    once = os.environ.get("SPECIALISTS_FAULT_ONCE")
    if once:
        marker = Path(once)
        if marker.exists():
            return
        marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
