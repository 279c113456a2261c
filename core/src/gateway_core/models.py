"""Records the gateway keeps about users, clusters and workers.

Owns the status enums (named as on the wire), the `User`, `Cluster` and `Worker` records and the
cluster's JSON form that the REST API sends (PROTOCOL.md, `<cluster>`).
"""

from __future__ import annotations

import copy
import enum
import json
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from attrs import define, field

if TYPE_CHECKING:
    from .config import ClusterConfig


class ClusterStatus(enum.IntEnum):
    """Where a cluster is in its life; the names are the wire names."""

    PENDING = 1
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5

    @property
    def is_active(self) -> bool:
        """True while the cluster may still hold resources (PENDING, RUNNING, STOPPING)."""
        return self <= ClusterStatus.STOPPING

    @classmethod
    def parse(cls, text: str) -> ClusterStatus:
        """Parse a status name case-insensitively; raise ValueError naming the bad value."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.name for s in cls)
            raise ValueError(f"unknown cluster status {text!r}; expected one of {names}") from None


class WorkerStatus(enum.IntEnum):
    """Where a worker is in its life."""

    PENDING = 1
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5

    @property
    def is_active(self) -> bool:
        return self <= WorkerStatus.STOPPING


def now_ms() -> int:
    """Milliseconds since the epoch, the unit of every timestamp on the wire."""
    return int(time.time() * 1000)


def new_token() -> str:
    """A fresh cluster token: 32 random bytes, hex encoded."""
    return secrets.token_hex(32)


def new_name() -> str:
    """A fresh cluster or worker name: 32 hex characters, safe in URLs and SNI labels."""
    return secrets.token_hex(16)


DEFAULT_GROUP = "default"
"""The worker group of the `[cluster]` settings (`gateway_core.config.DEFAULT_GROUP`)."""


def worker_name(cluster_name: str, group: str = DEFAULT_GROUP) -> str:
    """A fresh name for a worker of ``group``: ``<cluster>-<hex>`` for the default group,
    ``<cluster>-<group>-<hex>`` for a named one (the scheduler's agent reads the group back
    with `group_of_worker`)."""
    suffix = secrets.token_hex(5)
    if group == DEFAULT_GROUP:
        return f"{cluster_name}-{suffix}"
    return f"{cluster_name}-{group}-{suffix}"


def group_of_worker(cluster_name: str, name: str) -> str:
    """The group a worker name made by `worker_name` belongs to (default for other names)."""
    rest = name.removeprefix(f"{cluster_name}-")
    if rest == name:
        return DEFAULT_GROUP
    group, sep, _ = rest.rpartition("-")
    return group if sep and group else DEFAULT_GROUP


def _frozen_groups(groups: Iterable[str]) -> frozenset[str]:
    """`User.groups` from any iterable of names (typed, so callers passing sets type-check)."""
    return frozenset(groups)


@define(kw_only=True, frozen=True)
class User:
    """An authenticated person (or service) acting on the API."""

    name: str
    groups: frozenset[str] = field(default=frozenset(), converter=_frozen_groups)
    admin: bool = False


@define(kw_only=True)
class Worker:
    """One Dask worker of a cluster, as the reconciler tracks it.

    ``status`` is where the worker is; ``target`` is where the reconciler drives it. ``state`` is
    the driver's own record (a pid, a job id) and survives a gateway restart.
    """

    name: str
    cluster_name: str
    status: WorkerStatus = WorkerStatus.PENDING
    target: WorkerStatus = WorkerStatus.RUNNING
    state: dict[str, Any] = field(factory=dict)
    start_time: int = field(factory=now_ms)
    stop_time: int | None = None
    close_expected: bool = False
    reason: str | None = None
    group: str = DEFAULT_GROUP
    """The worker group it belongs to (`ClusterConfig.worker_groups`)."""


@define(kw_only=True)
class Cluster:
    """One Dask cluster of one user (its owner, ``username``), maybe shared with others.

    ``options`` are the user's normalized options (shown back to the user); ``config`` is the
    resolved cluster configuration as a plain dict (what the store keeps), ``typed_config`` the
    same as the backend's cluster config class (what drivers read, through
    ``driver.cluster_config(cluster)``). ``count`` is the number of workers the scheduler wants;
    ``state`` is the driver's own record.
    """

    name: str
    username: str
    token: str
    options: dict[str, Any] = field(factory=dict)
    config: dict[str, Any] = field(factory=dict)
    status: ClusterStatus = ClusterStatus.PENDING
    target: ClusterStatus = ClusterStatus.RUNNING
    count: int = 0
    group_counts: dict[str, int] = field(factory=dict)
    """Workers wanted per named worker group (the default group's are ``count``)."""
    state: dict[str, Any] = field(factory=dict)
    scheduler_address: str = ""
    dashboard_address: str = ""
    api_address: str = ""
    tls_cert: bytes = b""
    tls_key: bytes = b""
    start_time: int = field(factory=now_ms)
    stop_time: int | None = None
    last_heartbeat: float | None = None
    worker_start_failures: int = 0
    reason: str | None = None
    shared_users: list[str] = field(factory=list)
    """Users (besides the owner) who may see, connect to and read the logs of this cluster."""
    shared_groups: list[str] = field(factory=list)
    """Groups (`User.groups`) whose members may do what ``shared_users`` may."""
    workers: dict[str, Worker] = field(factory=dict, eq=False, repr=False)
    typed_config: ClusterConfig | None = field(default=None, eq=False, repr=False)
    """``config`` structured once by `ProcessBackend` (not stored: rebuilt when loaded); None
    until then, or when the stored config no longer fits the cluster config class."""
    _encoded: tuple[tuple[Any, ...], bytes] | None = field(
        default=None, init=False, eq=False, repr=False, alias="_encoded"
    )
    """The last `json_bytes` answer and what it was made from (not stored)."""

    @property
    def active_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.status.is_active]

    def count_of(self, group: str) -> int:
        """Workers of ``group`` the scheduler wants."""
        return self.count if group == DEFAULT_GROUP else self.group_counts.get(group, 0)

    def workers_per_group(self) -> dict[str, dict[str, int]]:
        """Per group (the default one, the named ones with a count or workers): the workers
        wanted (``count``) and the active ones by status (``pending``, ``running``,
        ``stopping``); the v2 ``groups`` of a cluster."""
        out: dict[str, dict[str, int]] = {
            DEFAULT_GROUP: {"count": self.count, "pending": 0, "running": 0, "stopping": 0}
        }
        for group, count in self.group_counts.items():
            out[group] = {"count": count, "pending": 0, "running": 0, "stopping": 0}
        for worker in self.active_workers:
            entry = out.setdefault(
                worker.group, {"count": 0, "pending": 0, "running": 0, "stopping": 0}
            )
            entry[worker.status.name.lower()] += 1
        return out

    def json_bytes(self, *, prefix: str = "") -> bytes:
        """`to_json` encoded as ``json.dumps`` does it, UTF-8; the same bytes are answered
        again until a field the JSON shows changes (a listing of many clusters encodes only
        the ones that changed since the last). ``options`` is compared by value."""
        key = (
            prefix,
            self.status,
            self.start_time,
            self.stop_time,
            self.dashboard_address,
            self.tls_cert,
            self.tls_key,
            self.options,
        )
        cached = self._encoded
        if cached is not None and cached[0] == key:
            return cached[1]
        encoded = json.dumps(self.to_json(prefix=prefix)).encode()
        # A copy of the options: a change made to the dict in place still shows.
        self._encoded = ((*key[:-1], copy.deepcopy(self.options)), encoded)
        return encoded

    def to_json(self, *, prefix: str = "") -> dict[str, Any]:
        """The cluster as the REST API shows it (PROTOCOL.md `<cluster>`); every key is v1."""
        running = self.status == ClusterStatus.RUNNING
        return {
            "name": self.name,
            "dashboard_route": (
                f"{prefix}/clusters/{self.name}/status"
                if running and self.dashboard_address
                else None
            ),
            "status": self.status.name,
            "start_time": self.start_time,
            "stop_time": self.stop_time,
            "options": self.options,
            "tls_cert": self.tls_cert.decode() if running and self.tls_cert else None,
            "tls_key": self.tls_key.decode() if running and self.tls_key else None,
        }
