"""Finding the processes a test run left behind, even orphans of daemons it started.

Owns `set_subreaper` (orphans of our descendants are re-parented to the test process) and
`descendants`; conftest.py and the process-heavy test modules use them.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, int(on), 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def descendants() -> dict[int, str]:
    """Live descendants of this process (zombie children are reaped on the way)."""
    parents: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        states[int(entry)] = fields[0].decode()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(parents.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if states.get(pid) == "Z":
            if pid in parents.get(os.getpid(), []):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            continue
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        todo.extend(parents.get(pid, []))
    return found
