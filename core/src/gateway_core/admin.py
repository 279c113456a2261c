"""The admin view of the gateway: every user's clusters, and each user's usage against quotas.

Owns `require_admin`, `all_clusters`, `cluster_summary` and `usage_by_user`, used by the admin
API routes (`gateway_core.api.admin`) and the web UI's admin pages.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .errors import AccessDenied
from .manager import ClusterManager
from .models import Cluster, ClusterStatus, User
from .quotas import Shape

__all__ = ["all_clusters", "cluster_summary", "require_admin", "usage_by_user"]


def require_admin(manager: ClusterManager, user: User) -> None:
    """Refuse (`AccessDenied`, 403) unless ``user`` is an admin."""
    if not manager.is_admin(user):
        raise AccessDenied(f"user {user.name!r} is not an admin; the admin view is for admins")


async def all_clusters(
    manager: ClusterManager,
    user: User,
    *,
    username: str | None = None,
    statuses: Collection[ClusterStatus] | None = None,
) -> list[Cluster]:
    """Every user's clusters (only ``username``'s when given) whose status is in ``statuses``
    (the active statuses when None), oldest first; admins only."""
    require_admin(manager, user)
    manager.quotas.note(user)
    wanted = list(statuses) if statuses is not None else [s for s in ClusterStatus if s.is_active]
    clusters = await manager.backend.list_clusters(username=username, statuses=wanted)
    return sorted(clusters, key=lambda c: (c.start_time, c.name))


def cluster_summary(
    manager: ClusterManager, cluster: Cluster, *, prefix: str = ""
) -> dict[str, Any]:
    """The cluster's API JSON plus what an admin or the web UI shows: its user, why it failed
    or stopped, its workers by status and the cores and memory it holds."""
    out = cluster.to_json(prefix=prefix)
    workers: dict[str, int] = {}
    for worker in cluster.workers.values():
        workers[worker.status.name] = workers.get(worker.status.name, 0) + 1
    usage = (
        manager.quotas.cluster_usage(cluster, Shape.of(manager.typed_config(cluster)))
        if cluster.status.is_active
        else None
    )
    out.update(
        username=cluster.username,
        reason=cluster.reason,
        workers=workers,
        cores=usage.cores if usage is not None else 0,
        memory=usage.memory if usage is not None else 0,
    )
    return out


async def usage_by_user(manager: ClusterManager, user: User) -> dict[str, dict[str, Any]]:
    """Each user's quota usage and limits (`ClusterManager.quota`), user name → answer, for
    every user the quota book knows, every user named in ``[quotas.users]`` and every user
    with an active cluster; admins only."""
    require_admin(manager, user)
    manager.quotas.note(user)
    active = [s for s in ClusterStatus if s.is_active]
    names = set(manager.quotas.groups_of) | set(manager.quotas.config.users)
    names |= {c.username for c in await manager.backend.list_clusters(statuses=active)}
    return {name: await manager.quota(user, name) for name in sorted(names)}
