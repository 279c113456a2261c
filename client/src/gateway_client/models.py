"""What the gateway tells the client about a cluster, as Python objects.

Owns `ClusterStatus`, `ClusterReport` (parsed from the `<cluster>` JSON of PROTOCOL.md) and
`cluster_security`, the distributed `Security` built from a cluster's TLS credentials.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from distributed.security import Security

__all__ = ["ClusterReport", "ClusterStatus", "cluster_security"]


class ClusterStatus(enum.IntEnum):
    """Where a cluster is in its life, as the gateway reports it."""

    PENDING = 1
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5

    @classmethod
    def parse(cls, value: ClusterStatus | str) -> ClusterStatus:
        """A status from itself or its name in any case (``"running"``)."""
        if isinstance(value, cls):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"{value!r} is not a cluster status; use one of {names}") from None

    @property
    def is_active(self) -> bool:
        return self in (ClusterStatus.PENDING, ClusterStatus.RUNNING, ClusterStatus.STOPPING)


def cluster_security(*, tls_cert: str, tls_key: str) -> Security:
    """The client's TLS settings for a cluster: its certificate is both the CA and our identity.

    distributed keeps the PEM text in memory and writes it to a private temporary directory
    only while it builds each SSL context.
    """
    return Security(
        require_encryption=True,
        tls_ca_file=tls_cert,
        tls_client_cert=tls_cert,
        tls_client_key=tls_key,
    )


def _names(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


def _groups(value: Any) -> dict[str, dict[str, int]] | None:
    if not isinstance(value, dict):
        return None
    return {
        str(name): {str(k): int(v) for k, v in counts.items() if isinstance(v, int)}
        for name, counts in value.items()
        if isinstance(counts, dict)
    }


def _from_ms(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000)


@dataclass(kw_only=True, frozen=True)
class ClusterReport:
    """One cluster as the gateway reported it at one moment.

    ``scheduler_address`` (``gateway://proxy-host:port/<name>``) is set only while running,
    like ``dashboard_link``; ``tls_cert``/``tls_key`` too.

    Reports from the gateway's v2 routes (``Gateway.list_clusters(shared=True)``,
    ``Gateway.share_cluster``) also say who owns the cluster (``owner``), what you are to it
    (``access``: ``"owner"``, ``"admin"`` or ``"sharee"``) and, for its owner and admins, whom
    it is shared with (``share_with_users``, ``share_with_groups``); otherwise these are None.
    """

    name: str
    status: ClusterStatus
    options: dict[str, Any] = field(default_factory=dict)
    scheduler_address: str | None = None
    dashboard_link: str | None = None
    start_time: datetime | None = None
    stop_time: datetime | None = None
    tls_cert: str | None = field(default=None, repr=False)
    tls_key: str | None = field(default=None, repr=False)
    owner: str | None = None
    access: str | None = None
    share_with_users: tuple[str, ...] | None = None
    share_with_groups: tuple[str, ...] | None = None
    groups: dict[str, dict[str, int]] | None = None
    """v2 reports: per worker group, the workers wanted (``count``) and the active ones by
    status (``pending``, ``running``, ``stopping``); None in v1 reports."""

    @classmethod
    def from_json(
        cls, msg: dict[str, Any], *, public_address: str, proxy_address: str
    ) -> ClusterReport:
        """Parse a `<cluster>` object; keys this client does not know are ignored."""
        name = msg["name"]
        status = ClusterStatus.parse(msg["status"])
        running = status == ClusterStatus.RUNNING
        route = msg.get("dashboard_route")
        return cls(
            name=name,
            status=status,
            options=dict(msg.get("options") or {}),
            scheduler_address=f"{proxy_address}/{name}" if running else None,
            dashboard_link=f"{public_address}{route}" if route else None,
            start_time=_from_ms(msg.get("start_time")),
            stop_time=_from_ms(msg.get("stop_time")),
            tls_cert=msg.get("tls_cert"),
            tls_key=msg.get("tls_key"),
            owner=msg.get("owner"),
            access=msg.get("access"),
            share_with_users=_names(msg.get("share_with_users")),
            share_with_groups=_names(msg.get("share_with_groups")),
            groups=_groups(msg.get("groups")),
        )

    @property
    def security(self) -> Security | None:
        """The TLS settings to reach this cluster, or None when the report has no credentials."""
        if not self.tls_cert or not self.tls_key:
            return None
        return cluster_security(tls_cert=self.tls_cert, tls_key=self.tls_key)

    def __repr__(self) -> str:
        return f"ClusterReport<name={self.name}, status={self.status.name}>"
