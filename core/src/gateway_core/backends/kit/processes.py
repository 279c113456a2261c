"""Process groups on the gateway's host: start them, watch them, stop them, even after a restart.

Owns `/proc` parsing (`read_stat`, `boot_id`, `launched_with_output`), `ProcessRef` (what a
driver stores to find a process again without mistaking a reused pid for it), `ProcessGroups`
(start in a new session, alive, terminate with grace, wait until gone) and `describe_exit`.
Linux only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from attrs import define

if TYPE_CHECKING:
    from .accounts import RunAs

log = logging.getLogger("gateway.backend.processes")

StopSteps: TypeAlias = Sequence[tuple[signal.Signals, float]]
"""How `ProcessGroups.terminate` stops a process: each signal in turn, each followed by up to
that many seconds of waiting, e.g. ``[(SIGINT, 10), (SIGTERM, 5), (SIGKILL, 5)]``."""


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------


@define(kw_only=True, frozen=True)
class ProcStat:
    """What ``/proc/<pid>/stat`` says about a process (the fields drivers and tests need)."""

    pid: int
    state: str
    """One letter: ``R`` running, ``S`` sleeping, ``Z`` zombie (exited, not reaped), ..."""
    ppid: int
    pgrp: int
    start_ticks: int
    """When it started, in clock ticks since boot: with the pid, names one process."""

    @property
    def running(self) -> bool:
        """Not exited: neither a zombie nor dead."""
        return self.state not in ("Z", "X")


def read_stat(pid: int | str) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed (``pid`` may be ``"self"``); None when there is no such
    process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after
    # the last ")".
    head, _, tail = raw.rpartition(b")")
    fields = tail.split()
    return ProcStat(
        pid=int(head.split(b" ", 1)[0]),
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        start_ticks=int(fields[19]),
    )


def all_stats() -> list[ProcStat]:
    """Every process there is now (those that vanish while being read are left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(entry)
            if st is not None:
                found.append(st)
    return found


@functools.cache
def boot_id() -> str:
    """This boot's id: pids and start times from another boot mean nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def group_members(pgid: int) -> list[int]:
    """Pids of the running (not zombie) processes in process group ``pgid``."""
    return [st.pid for st in all_stats() if st.pgrp == pgid and st.running]


def launched_with_output(path: str | os.PathLike[str]) -> list[ProcessRef]:
    """The running processes that lead their own process group and write their output
    (file descriptor 1) to the file ``path``: what a launcher started with that file as its
    log, found again without anything stored about it.

    The mark is set by the kernel, not by the process: the launcher points the child's
    stdout at the log before the child runs any code of its own (``ProcessGroups.start``
    and the fork server both do), so a process forked just before its launcher died is found
    as soon as it has its log, and nothing in it can forget or rewrite the mark. Children a
    process starts (a nanny's worker) share its output but not its group lead, and are left
    out. Reading another user's ``/proc/<pid>/fd`` needs root: as anyone else only one's own
    processes are found."""
    wanted = os.path.realpath(path)
    found = []
    for st in all_stats():
        if st.pgrp != st.pid or not st.running:
            continue
        try:
            target = os.readlink(f"/proc/{st.pid}/fd/1")
        except OSError:  # gone, or not ours to read
            continue
        if target == wanted:
            found.append(ProcessRef(pid=st.pid, start_ticks=st.start_ticks, boot_id=boot_id()))
    return found


def describe_exit(code: int | None) -> str:
    """A `subprocess` return code in words: ``"exited with status 3"``, ``"was killed by signal
    9 (SIGKILL)"``; ``"exited"`` when it is not known (a process this gateway did not start)."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


# --------------------------------------------------------------------------------------------
# One process, as stored
# --------------------------------------------------------------------------------------------


@define(kw_only=True, frozen=True)
class ProcessRef:
    """One launched process, as driver state stores it: the pid plus what tells it apart from a
    later process given the same pid (its start time in clock ticks since boot, and the boot).

    Store ``ref.to_state()`` in the dict a start operation yields; get it back with
    ``ProcessRef.from_state(cluster.state)``.
    """

    pid: int
    start_ticks: int
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        """The process running as ``pid`` now; None when there is none."""
        st = read_stat(pid)
        if st is None:
            return None
        return cls(pid=pid, start_ticks=st.start_ticks, boot_id=boot_id())

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ProcessRef | None:
        """The reference `to_state` stored in ``state``; None when it holds none."""
        pid, ticks = state.get("pid"), state.get("start_ticks")
        if not isinstance(pid, int) or not isinstance(ticks, int) or pid <= 0:
            return None
        return cls(pid=pid, start_ticks=ticks, boot_id=str(state.get("boot_id", "")))

    def to_state(self) -> dict[str, Any]:
        """``{"pid", "start_ticks", "boot_id"}``, for driver state (JSON)."""
        return {"pid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id}

    def reused(self) -> bool:
        """Does the pid belong to another process now (or is this reference from another
        boot)? Then nothing may be signalled through it."""
        if self.boot_id != boot_id():
            return True
        st = read_stat(self.pid)
        return st is not None and st.start_ticks != self.start_ticks

    def running(self) -> bool:
        """Is the process still running: not exited, not a zombie, not another process that
        was given the same pid later?"""
        if self.boot_id != boot_id():
            return False
        st = read_stat(self.pid)
        return st is not None and st.start_ticks == self.start_ticks and st.running


# --------------------------------------------------------------------------------------------
# The process groups of one driver
# --------------------------------------------------------------------------------------------


class ProcessGroups:
    """Starts, watches and stops process groups on the gateway's host for one driver.

    Every process starts in a session of its own, so its pid is also its process-group id and
    stopping it reaches whatever it started; nothing ties it to the gateway (no parent-death
    signal, no controlling terminal, no shared process group), so it outlives a gateway that
    dies. Everything works from a `ProcessRef` alone, so a driver made after a gateway restart
    watches and stops the processes its predecessor started (adopted: not its children, reaped
    by init or a subreaper, exit status unknown); the processes this object started itself are
    also reaped as they exit (no zombies), and their exit status is known (`exit_status`).
    """

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str],
        stdout: int,
        run_as: RunAs | None = None,
    ) -> ProcessRef:
        """Start ``argv`` in a new session, in ``cwd``, with stdin from /dev/null and stdout
        and stderr to the file descriptor ``stdout``, as ``run_as`` (uid, gid and groups; the
        gateway must be root) or as the gateway's user. ``argv[0]`` is looked up on ``env``'s
        ``PATH``. Raises RuntimeError ``cannot run '<argv[0]>': ...`` when it cannot start."""
        identity: dict[str, Any] = {}
        if run_as is not None:
            identity = {"user": run_as.uid, "group": run_as.gid, "extra_groups": run_as.groups}
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                **identity,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"cannot run {argv[0]!r}: {exc}") from exc
        self._children[popen.pid] = popen
        st = read_stat(popen.pid)  # our child: /proc/<pid> stays until we reap it
        ticks = st.start_ticks if st is not None else -1
        return ProcessRef(pid=popen.pid, start_ticks=ticks, boot_id=boot_id())

    def alive(self, ref: ProcessRef | None) -> bool:
        """Is the process ``ref`` names still running? (Reaps it if it is a child that exited.)"""
        if ref is None:
            return False
        popen = self._children.get(ref.pid)
        if popen is not None and popen.poll() is not None:
            return False  # reaped just now, or before
        return ref.running()

    def group_alive(self, ref: ProcessRef) -> bool:
        """Is anything left of ``ref``'s process group (the process, or what it started)?"""
        if self.alive(ref):
            return True
        if ref.reused():
            return False  # the pid was reused, so no group of ours can hold it any more
        try:
            os.killpg(ref.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return bool(group_members(ref.pid))

    def started_here(self, ref: ProcessRef) -> bool:
        """Did this object start ``ref``'s process (it is then the gateway's child, reaped here,
        with a known exit status)? False for a process adopted from an earlier gateway process
        or forked by the fork server: those are watched and stopped through ``/proc`` and
        signals alone, and someone else reaps them."""
        popen = self._children.get(ref.pid)
        return popen is not None and ref.boot_id == boot_id()

    def exit_status(self, ref: ProcessRef) -> int | None:
        """The return code of a process this object started and that has exited (negative:
        the signal that killed it); None when it runs or was not started here."""
        popen = self._children.get(ref.pid)
        # poll(), not returncode: it may have exited after the last liveness check, and only
        # reaping it tells its status.
        return popen.poll() if popen is not None else None

    def signal(self, ref: ProcessRef, sig: signal.Signals, *, group: bool = False) -> None:
        """Send ``sig`` to the process while it lives (a Dask nanny then stops its worker in
        order), to what is left of its group otherwise; SIGKILL, or any signal with ``group``,
        always goes to the whole group. Nothing is sent through a reused pid."""
        if ref.reused():
            return
        try:
            if sig != signal.SIGKILL and not group and self.alive(ref):
                os.kill(ref.pid, sig)
            else:
                os.killpg(ref.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("Cannot signal process group %d: %s", ref.pid, exc)

    async def wait_gone(self, ref: ProcessRef, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until nothing is left of ``ref``'s group; True when
        that happened."""
        deadline = time.monotonic() + timeout
        pause = 0.01
        while self.group_alive(ref):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.25)
        return True

    async def terminate(
        self, ref: ProcessRef, steps: StopSteps, *, what: str, group: bool = False
    ) -> bool:
        """Stop ``ref``'s process group: each signal of ``steps`` in turn (see `signal`;
        ``group`` sends each to the whole group at once), until nothing is left of the group.
        True when it is gone; False (and a warning naming ``what``) when something outlived the
        last step (a zombie, or a process stuck in the kernel)."""
        try:
            for sig, timeout in steps:
                if not self.group_alive(ref):
                    return True
                log.debug("Sending %s to the %s (process group %d)", sig.name, what, ref.pid)
                self.signal(ref, sig, group=group)
                if await self.wait_gone(ref, timeout):
                    return True
            if not steps:
                return not self.group_alive(ref)
            sig, timeout = steps[-1]
            log.warning(
                "The %s (process group %d) is still there %g s after %s; leaving it "
                "(a zombie, or stuck in the kernel)",
                what,
                ref.pid,
                timeout,
                sig.name,
            )
            return False
        finally:
            popen = self._children.get(ref.pid)
            if popen is not None and popen.poll() is not None:
                del self._children[ref.pid]

    def forget_exited(self) -> None:
        """Drop the children that have exited (reaping them)."""
        for pid, popen in list(self._children.items()):
            if popen.poll() is not None:
                del self._children[pid]
