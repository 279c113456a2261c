"""Quotas across all of a user's clusters: what is in use, what fits, and why not.

Owns `Usage` (clusters, workers, cores, memory of a set of clusters), `Shape` (what one cluster
takes), `Pool` (a quota with the clusters it covers) and `QuotaBook`, which the cluster manager
asks before creating, scaling or adapting a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from attrs import define, field

from .config import QUOTA_KEYS, ClusterConfig, Quota, QuotasConfig
from .models import DEFAULT_GROUP, Cluster, ClusterStatus, User, WorkerStatus
from .units import format_memory


@define(kw_only=True, frozen=True)
class Shape:
    """What one cluster takes: its scheduler, and each of its workers (of the default group;
    ``groups``: the cores and memory of one worker of each named group).

    ``held_*`` is what the cluster's other worker groups hold while one group is scaled
    (`for_group`): counted with the scheduler, as what the scaled group cannot have."""

    scheduler_cores: float
    scheduler_memory: int
    worker_cores: float
    worker_memory: int
    groups: Mapping[str, tuple[float, int]] = field(factory=dict)
    held_workers: int = 0
    held_cores: float = 0.0
    held_memory: int = 0

    @classmethod
    def of(cls, config: ClusterConfig) -> Shape:
        return cls(
            scheduler_cores=config.scheduler_cores,
            scheduler_memory=int(config.scheduler_memory),
            worker_cores=config.worker_cores,
            worker_memory=int(config.worker_memory),
            groups={
                name: (
                    group.worker_cores or config.worker_cores,
                    int(group.worker_memory or config.worker_memory),
                )
                for name, group in config.worker_groups.items()
            },
        )

    def size_of(self, group: str) -> tuple[float, int]:
        """Cores and memory of one worker of ``group`` (an unknown group: the default's)."""
        return self.groups.get(group, (self.worker_cores, self.worker_memory))

    def usage(self, workers: int) -> Usage:
        """One cluster of this shape with ``workers`` workers (besides what it holds)."""
        return Usage(
            clusters=1,
            workers=self.held_workers + workers,
            cores=self.scheduler_cores + self.held_cores + workers * self.worker_cores,
            memory=self.scheduler_memory + self.held_memory + workers * self.worker_memory,
        )

    def cluster_usage(self, per_group: Mapping[str, int], extra: int = 0) -> Usage:
        """The cluster with ``per_group`` workers (group → count), each of its group's size;
        ``extra`` workers more (granted, not yet reported) of its largest size."""
        total = self.usage(0)
        for group, n in per_group.items():
            cores, memory = self.size_of(group)
            total = total + Usage(workers=n, cores=n * cores, memory=n * memory)
        if extra:
            cores = max(c for c, _ in [self.size_of(DEFAULT_GROUP), *self.groups.values()])
            memory = max(m for _, m in [self.size_of(DEFAULT_GROUP), *self.groups.values()])
            total = total + Usage(workers=extra, cores=extra * cores, memory=extra * memory)
        return total

    def for_group(self, group: str, per_group: Mapping[str, int]) -> Shape:
        """This shape as seen when scaling ``group``: the workers of the other groups of
        ``per_group`` held, one worker of ``group``'s size."""
        held = Usage()
        for other, n in per_group.items():
            if other != group:
                cores, memory = self.size_of(other)
                held = held + Usage(workers=n, cores=n * cores, memory=n * memory)
        cores, memory = self.size_of(group)
        return attrs.evolve(
            self,
            worker_cores=cores,
            worker_memory=memory,
            held_workers=held.workers,
            held_cores=held.cores,
            held_memory=held.memory,
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

    def group_workers(self, cluster: Cluster) -> dict[str, int]:
        """Workers a cluster holds or is about to, per worker group: the more of what its
        scheduler wants and its active workers."""
        active: dict[str, int] = {}
        for w in cluster.workers.values():
            if w.status.is_active and w.target == WorkerStatus.RUNNING:
                active[w.group] = active.get(w.group, 0) + 1
        groups = {DEFAULT_GROUP, *cluster.group_counts, *active}
        return {g: max(cluster.count_of(g), active.get(g, 0)) for g in sorted(groups)}

    def workers_of(self, cluster: Cluster) -> int:
        """Workers a cluster holds or is about to: those of `group_workers`, or what the
        gateway last granted it when that is more."""
        return max(sum(self.group_workers(cluster).values()), self.claims.get(cluster.name, 0))

    def cluster_usage(self, cluster: Cluster, shape: Shape) -> Usage:
        """What ``cluster`` holds: each group's workers at their own size, and what was granted
        beyond them (not yet reported) at its largest size."""
        per_group = self.group_workers(cluster)
        extra = max(0, self.claims.get(cluster.name, 0) - sum(per_group.values()))
        return shape.cluster_usage(per_group, extra)

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
            total = total + self.cluster_usage(cluster, shapes[cluster.name])
        return total

    def room(
        self,
        cluster: Cluster,
        clusters: Iterable[Cluster],
        shapes: Mapping[str, Shape],
        group: str = DEFAULT_GROUP,
    ) -> Room | None:
        """The most workers of ``group`` ``cluster`` may have under every quota covering its
        user (the tightest wins), its other groups' workers counted as held; None when no
        quota limits workers, cores or memory."""
        found: Room | None = None
        listed = list(clusters)
        shape = shapes[cluster.name].for_group(group, self.group_workers(cluster))
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

    held = shape.usage(0)  # the scheduler, and the cluster's other groups' workers
    if quota.max_workers is not None:
        take(quota.max_workers - others.workers - held.workers, "max_workers")
    if quota.max_cores is not None and shape.worker_cores > 0:
        spare = quota.max_cores - others.cores - held.cores
        take(spare // shape.worker_cores, "max_cores")
    if quota.max_memory is not None and shape.worker_memory > 0:
        spare_memory = quota.max_memory - others.memory - held.memory
        take(spare_memory // shape.worker_memory, "max_memory")
    return max(0.0, limit), binding


def clamp_message(
    pool: Pool, key: str, others: Usage, shape: Shape, asked: int, granted: int
) -> str:
    """The part of a scale or adapt answer saying which quota lowered the count, with what
    is used (other clusters and this one's scheduler), what is asked and the limit."""
    limit = getattr(pool.quota, key)
    scheduler = shape.usage(0)  # with what the cluster's other groups hold
    used = others.get(key) + scheduler.get(key)
    wanted = shape.usage(asked).get(key) - scheduler.get(key)
    return (
        f"the quota of {pool.scope} allows {granted}: {key} is {show(key, limit)}, "
        f"{show(key, used)} in use, {asked} workers ask {show(key, wanted)} more"
    )
