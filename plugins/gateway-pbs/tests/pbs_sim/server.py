"""The simulated PBS server's state: its settings, the job sequence number and one JSON record
per job, in a directory shared by every user, changed only under one file lock.

Owns `Server` (paths, lock, records) and the job record's keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

EXIT_UNKNOWN_JOB = 153
"""PBSE_UNKJOBID (15001) as an 8-bit exit status: ``Unknown Job Id``."""
EXIT_JOB_FINISHED = 35
"""PBSE_HISTJOBID (15139) as an 8-bit exit status: ``Job has finished``."""
EXIT_UNKNOWN_QUEUE = 170
"""PBSE_UNKQUE (15018) as an 8-bit exit status: ``Unknown queue``."""
EXIT_PERMISSION = 159
"""PBSE_PERM (15007) as an 8-bit exit status: ``Unauthorized Request``."""
EXIT_BAD_ATTRIBUTE = 2
"""qsub's exit status for bad options and resource requests."""


def _alive(pid: int | None, start: str | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``start``."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    # fields[0] is the state (field 3); the start time is field 22.
    if fields[0] in ("Z", "X"):
        return False
    return start is None or fields[19] == start


def process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


class Server:
    """The state directory ``root``: ``server.json`` (name, queues), ``seq``, ``lock``,
    ``jobs/<id>.json`` and ``jobs/<id>.sh``, ``spool/`` for output while jobs run."""

    def __init__(self, root: str) -> None:
        self.root = root
        with open(os.path.join(root, "server.json")) as f:
            self.settings: dict[str, Any] = json.load(f)
        self.name: str = self.settings["server"]
        self.jobs_dir = os.path.join(root, "jobs")
        self.spool_dir = os.path.join(root, "spool")

    @staticmethod
    def create(root: str, *, name: str, queues: list[str], start_delay: float = 0.0) -> None:
        """Make an empty server in ``root``, usable by every user."""
        os.makedirs(root, exist_ok=True)
        os.chmod(root, 0o755)
        for sub in ("jobs", "spool"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
            os.chmod(os.path.join(root, sub), 0o1777)
        settings = {
            "server": name,
            "queues": queues,
            "default_queue": queues[0],
            "start_delay": start_delay,
            "hosts": ["localhost", socket.gethostname()],
        }
        with open(os.path.join(root, "server.json"), "w") as f:
            json.dump(settings, f)
        for name_, content in (("seq", "0"), ("lock", "")):
            path = os.path.join(root, name_)
            with open(path, "w") as f:
                f.write(content)
            os.chmod(path, 0o666)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(os.path.join(self.root, "lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def next_sequence(self) -> int:
        """The next job number (call under the lock)."""
        path = os.path.join(self.root, "seq")
        with open(path, "r+") as f:
            seq = int(f.read().strip() or "0") + 1
            f.seek(0)
            f.write(str(seq))
            f.truncate()
        return seq

    def job_path(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.json")

    def script_path(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.sh")

    def full_id(self, job_id: str) -> str:
        """``17`` and ``17.pbs-sim`` both name job ``17.pbs-sim``."""
        return job_id if "." in job_id else f"{job_id}.{self.name}"

    def load(self, job_id: str) -> dict[str, Any] | None:
        """The record of ``job_id`` (None: unknown), with a dead runner noticed."""
        job_id = self.full_id(job_id)
        if "/" in job_id:
            return None
        try:
            with open(self.job_path(job_id)) as f:
                job: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            return None
        if job["state"] in ("R", "E") and not _alive(
            job.get("runner_pid"), job.get("runner_start")
        ):
            # The runner died without recording the end (it was killed): the job is over.
            job["state"] = "F"
            job.setdefault("exit_status", -3)
            job["comment"] = "Job run lost its execution host"
        return job

    def save(self, job: dict[str, Any]) -> None:
        """Write ``job``'s record (call under the lock); readable by everyone, like qstat."""
        path = self.job_path(job["id"])
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(job, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def all_ids(self) -> list[str]:
        ids = [n[: -len(".json")] for n in os.listdir(self.jobs_dir) if n.endswith(".json")]
        return sorted(ids, key=lambda i: int(i.split(".", 1)[0].split("[", 1)[0]))
