"""Process-tree helpers for tests that start real processes: what is left, and cleaning it up.

Owns `descendants` (live processes below this one, orphans included once `set_subreaper` is
on), `start_times` and `kill_tree` (which never signals a pid the kernel gave to someone else
since), and `check_no_process_left` behind the ``no_process_left_behind`` fixture. Linux only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> None:
    """Orphans of this process's descendants are re-parented to it, not to init, so
    `descendants` still sees what a daemonising child left behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()  # after "pid (comm) "


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19].decode() if fields is not None else None


def start_times(pids: Iterable[int]) -> dict[int, str]:
    """pid -> when it started (clock ticks since boot), for those still there: what
    `kill_tree` checks before signalling."""
    found = {pid: _start_time(pid) for pid in pids}
    return {pid: when for pid, when in found.items() if when is not None}


def descendants(root: int | None = None, *, reap: bool = False) -> dict[int, str]:
    """Live descendants of ``root`` (default: this process): pid -> command line.

    Zombies are left out; with ``reap``, zombie children of this process are reaped on the way
    (only for processes no `subprocess.Popen` waits for: reaping behind Popen's back loses the
    exit status it would report).
    """
    me = os.getpid()
    root = me if root is None else root
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        states[int(entry)] = fields[0].decode()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if states.get(pid) == "Z":
            if reap and pid in children.get(me, []):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            continue
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        todo.extend(children.get(pid, []))
    return found


def kill_tree(started: Mapping[int, str]) -> None:
    """SIGKILL each pid of a `start_times` record that is still the process recorded."""
    for pid, when in started.items():
        if _start_time(pid) == when:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def check_no_process_left(before: set[int], *, grace: float = 10.0) -> None:
    """Wait up to ``grace`` seconds for every descendant not in ``before`` to end; then kill
    what is left and raise AssertionError naming it."""
    deadline = time.monotonic() + grace
    left = {p: c for p, c in descendants(reap=True).items() if p not in before}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p: c for p, c in descendants(reap=True).items() if p not in before}
    if left:
        kill_tree(start_times(left))
        time.sleep(0.05)
        descendants(reap=True)  # reap what was just killed
        raise AssertionError(f"processes left behind: {left}")
