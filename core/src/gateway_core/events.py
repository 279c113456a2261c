"""Events about clusters that core emits to observer plugins.

Owns `ClusterEvent`, the record passed to the `gateway_cluster_event` hook.
"""

from __future__ import annotations

from typing import Any, Literal

from attrs import define, field

from .models import now_ms

EventKind = Literal[
    "created",
    "running",
    "scaled",
    "adapted",
    "stopping",
    "stopped",
    "failed",
    "worker_running",
    "worker_stopped",
    "worker_failed",
    "lifetime_warning",
    "shared",
]


@define(kw_only=True, frozen=True)
class ClusterEvent:
    """One thing that happened to a cluster, after it was stored."""

    kind: EventKind
    cluster_name: str
    username: str
    time: int = field(factory=now_ms)
    detail: dict[str, Any] = field(factory=dict)
    """Kind-specific facts: ``{"count": 3}`` for scaled, ``{"reason": ...}`` for failed,
    ``{"max_lifetime": 28800.0, "stop_time": <ms>}`` for lifetime_warning (the cluster will be
    stopped at ``stop_time`` for reaching its ``max_lifetime``), ``{"shared_users": [...],
    "shared_groups": [...], "by": <user>}`` for shared (whom it is shared with now), ..."""
