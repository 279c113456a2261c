"""Quotas across all of a user's clusters: what is in use, what fits, and why not.

Owns `Usage` (clusters, workers, cores, memory of a set of clusters), `Shape` (what one cluster
takes), `Pool` (a quota with the clusters it covers) and `QuotaBook`, which the cluster manager
asks before creating, scaling or adapting a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import define, field

from .config import QUOTA_KEYS, ClusterConfig, Quota, QuotasConfig
from .models import Cluster, ClusterStatus, User, WorkerStatus
from .units import format_memory


@define(kw_only=True, frozen=True)
class Shape:
    """What one cluster takes: its scheduler, and each of its workers."""

    scheduler_cores: float
    scheduler_memory: int
    worker_cores: float
    worker_memory: int

    @classmethod
    def of(cls, config: ClusterConfig) -> Shape:
        return cls(
            scheduler_cores=config.scheduler_cores,
            scheduler_memory=int(config.scheduler_memory),
            worker_cores=config.worker_cores,
            worker_memory=int(config.worker_memory),
        )

    def usage(self, workers: int) -> Usage:
        """One cluster of this shape with ``workers`` workers."""
        return Usage(
            clusters=1,
            workers=workers,
            cores=self.scheduler_cores + workers * self.worker_cores,
            memory=self.scheduler_memory + workers * self.worker_memory,
        )


@define(kw_only=True)
class Usage:
    """Resources held by some clusters (pending and running alike)."""

    clusters: int = 0
    workers: int = 0
    cores: float = 0.0
    memory: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            clusters=self.clusters + other.clusters,
            workers=self.workers + other.workers,
            cores=self.cores + other.cores,
            memory=self.memory + other.memory,
        )

    def get(self, key: str) -> float:
        """The amount a quota key limits (``max_cores`` → ``cores``)."""
        value: float = getattr(self, key.removeprefix("max_"))
        return value

    def to_json(self) -> dict[str, Any]:
        return {
            "clusters": self.clusters,
            "workers": self.workers,
            "cores": self.cores,
            "memory": self.memory,
        }


def show(key: str, amount: float) -> str:
    """An amount of what ``key`` limits, for messages: ``3 clusters``, ``8 GiB``, ``4 cores``."""
    if key == "max_memory":
        return format_memory(int(amount))
    noun = key.removeprefix("max_")
    if key == "max_cores":
        noun = "core" if amount == 1 else "cores"
        return f"{amount:g} {noun}"
    return f"{int(amount)} {noun[:-1] if amount == 1 else noun}"


def quota_json(quota: Quota) -> dict[str, Any]:
    """The limits as the API shows them; null for no limit."""
    return {key: getattr(quota, key) for key in QUOTA_KEYS}


@define(kw_only=True, frozen=True)
class Pool:
    """A quota and whom it covers: one user, or the members of one group together."""

    kind: str
    """``user`` or ``group``."""
    name: str
    quota: Quota
    members: frozenset[str]
    """Users whose clusters count against this quota."""

    @property
    def scope(self) -> str:
        return f"{self.kind} {self.name}"


@define(kw_only=True, frozen=True)
class Room:
    """The most workers one cluster may have under the quotas that cover it, and the quota
    that binds, to explain a lowered count."""

    workers: int
    pool: Pool
    key: str
    others: Usage
    """What the pool's other clusters hold."""
    shape: Shape

    def explain(self, asked: int) -> str:
        return clamp_message(self.pool, self.key, self.others, self.shape, asked, self.workers)


@define(kw_only=True)
class QuotaBook:
    """The `[quotas]` config and what the manager learned while serving.

    Group pools need every member's clusters, but a cluster record names only its user: the
    book remembers the groups of every user the API has seen (`note`) since the gateway
    started. After a restart, a member's clusters count against a group pool again once that
    member makes any request. ``claims`` keeps the worker count last granted to each cluster
    (a scale's count, an adapt's maximum) until the scheduler reports it, so two quick
    requests cannot both spend the same room.
    """

    config: QuotasConfig
    groups_of: dict[str, frozenset[str]] = field(factory=dict)
    claims: dict[str, int] = field(factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(
            self.config.default.is_limited
            or any(q.is_limited for q in self.config.users.values())
            or any(q.is_limited for q in self.config.groups.values())
        )

    def note(self, user: User) -> None:
        """Remember ``user``'s groups (from its authenticator) for the group pools."""
        self.groups_of[user.name] = frozenset(user.groups)

    def pools(self, username: str) -> list[Pool]:
        """Every quota that covers ``username``'s clusters: its own, then its groups' pools."""
        pools = []
        own = self.config.for_user(username)
        if own.is_limited:
            pools.append(Pool(kind="user", name=username, quota=own, members=frozenset({username})))
        for group in sorted(self.groups_of.get(username, frozenset())):
            quota = self.config.groups.get(group)
            if quota is None or not quota.is_limited:
                continue
            members = frozenset(u for u, gs in self.groups_of.items() if group in gs)
            pools.append(Pool(kind="group", name=group, quota=quota, members=members))
        return pools

    def workers_of(self, cluster: Cluster) -> int:
        """Workers a cluster holds or is about to: the most of what its scheduler wants, what
        the gateway last granted it, and its active workers."""
        active = sum(
            1
            for w in cluster.workers.values()
            if w.status.is_active and w.target == WorkerStatus.RUNNING
        )
        return max(cluster.count, active, self.claims.get(cluster.name, 0))

    def usage(
        self,
        clusters: Iterable[Cluster],
        members: frozenset[str],
        shapes: Mapping[str, Shape],
        *,
        leave_out: str = "",
    ) -> Usage:
        """What the active clusters of ``members`` hold (all but ``leave_out``)."""
        total = Usage()
        for cluster in clusters:
            if cluster.username not in members or cluster.name == leave_out:
                continue
            if not counts(cluster):
                continue
            total = total + shapes[cluster.name].usage(self.workers_of(cluster))
        return total

    def room(
        self, cluster: Cluster, clusters: Iterable[Cluster], shapes: Mapping[str, Shape]
    ) -> Room | None:
        """The most workers ``cluster`` may have under every quota covering its user (the
        tightest wins); None when no quota limits workers, cores or memory."""
        found: Room | None = None
        listed = list(clusters)
        shape = shapes[cluster.name]
        for pool in self.pools(cluster.username):
            others = self.usage(listed, pool.members, shapes, leave_out=cluster.name)
            fit, key = workers_that_fit(pool, others, shape)
            if key and (found is None or fit < found.workers):
                found = Room(workers=int(fit), pool=pool, key=key, others=others, shape=shape)
        return found

    def forget(self, name: str) -> None:
        """Drop what was granted to cluster ``name`` (it stopped)."""
        self.claims.pop(name, None)


def counts(cluster: Cluster) -> bool:
    """Whether a cluster counts against quotas: active and not asked to stop."""
    return cluster.status.is_active and cluster.target == ClusterStatus.RUNNING


def refusal(pool: Pool, key: str, used: float, asked: float, what: str) -> str | None:
    """Why ``asked`` more on top of ``used`` breaks ``pool``'s limit ``key``; None if it fits."""
    limit = getattr(pool.quota, key)
    if limit is None or used + asked <= limit:
        return None
    return (
        f"quota of {pool.scope} exceeded: {key} is {show(key, limit)}, "
        f"{show(key, used)} in use, {what} asks {show(key, asked)} more"
    )


def workers_that_fit(pool: Pool, others: Usage, shape: Shape) -> tuple[float, str]:
    """How many workers one cluster of ``shape`` may have under ``pool`` when its other
    clusters hold ``others``; with the key that binds (``""`` if none does)."""
    limit: float = math.inf
    binding = ""
    quota = pool.quota

    def take(value: float, key: str) -> None:
        nonlocal limit, binding
        if value < limit:
            limit, binding = value, key

    if quota.max_workers is not None:
        take(quota.max_workers - others.workers, "max_workers")
    if quota.max_cores is not None and shape.worker_cores > 0:
        spare = quota.max_cores - others.cores - shape.scheduler_cores
        take(spare // shape.worker_cores, "max_cores")
    if quota.max_memory is not None and shape.worker_memory > 0:
        spare_memory = quota.max_memory - others.memory - shape.scheduler_memory
        take(spare_memory // shape.worker_memory, "max_memory")
    return max(0.0, limit), binding


def clamp_message(
    pool: Pool, key: str, others: Usage, shape: Shape, asked: int, granted: int
) -> str:
    """The part of a scale or adapt answer saying which quota lowered the count, with what
    is used (other clusters and this one's scheduler), what is asked and the limit."""
    limit = getattr(pool.quota, key)
    scheduler = shape.usage(0)
    used = others.get(key) + (0 if key == "max_workers" else scheduler.get(key))
    wanted = shape.usage(asked).get(key) - scheduler.get(key)
    return (
        f"the quota of {pool.scope} allows {granted}: {key} is {show(key, limit)}, "
        f"{show(key, used)} in use, {asked} workers ask {show(key, wanted)} more"
    )
