"""Parsing of a scheduler's heartbeat message (PROTOCOL.md).

Owns `Heartbeat`: the checked fields of one heartbeat, or a ValueError naming the bad field,
and the record changes a heartbeat implies (`Heartbeat.changes_for`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import define

if TYPE_CHECKING:
    from ..models import Cluster


@define(kw_only=True, frozen=True)
class Heartbeat:
    """A scheduler's heartbeat message (PROTOCOL.md), checked."""

    scheduler_address: str = ""
    dashboard_address: str = ""
    api_address: str = ""
    count: int | None = None
    group_counts: dict[str, int] | None = None
    """Workers wanted per named worker group (absent from agents that know no groups)."""
    active_workers: frozenset[str] = frozenset()
    closing_workers: frozenset[str] = frozenset()
    closed_workers: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, msg: Any) -> Heartbeat:
        """Build from the JSON message; raise ValueError naming the first bad field."""
        if not isinstance(msg, dict):
            raise ValueError("a heartbeat must be a JSON object")
        values: dict[str, Any] = {}
        for name in ("scheduler_address", "dashboard_address", "api_address"):
            value = msg.get(name) or ""
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            values[name] = value
        count = msg.get("count")
        if count is not None and (type(count) is not int or count < 0):
            raise ValueError("count must be a non-negative integer")
        values["count"] = count
        groups = msg.get("group_counts")
        if groups is not None:
            if not isinstance(groups, dict) or not all(
                isinstance(k, str) and type(v) is int and v >= 0 for k, v in groups.items()
            ):
                raise ValueError("group_counts must map group names to non-negative integers")
            values["group_counts"] = dict(groups)
        for name in ("active_workers", "closing_workers", "closed_workers"):
            names = msg.get(name) or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{name} must be a list of worker names")
            values[name] = frozenset(names)
        return cls(**values)

    def changes_for(self, cluster: Cluster) -> dict[str, Any]:
        """The fields of ``cluster``'s record this heartbeat changes: addresses, the wanted
        count, and the counts per named group (groups at 0 dropped, so a cluster that never
        used groups keeps ``{}``). Used by the owning replica and, on PostgreSQL, by a replica
        recording the heartbeat for its owner."""
        changes: dict[str, Any] = {}
        for field in ("scheduler_address", "dashboard_address", "api_address"):
            value = getattr(self, field)
            if value and value != getattr(cluster, field):
                changes[field] = value
        if self.count is not None and self.count != cluster.count:
            changes["count"] = self.count
        if self.group_counts is not None:
            group_counts = {g: n for g, n in self.group_counts.items() if n}
            if group_counts != cluster.group_counts:
                changes["group_counts"] = group_counts
        return changes
