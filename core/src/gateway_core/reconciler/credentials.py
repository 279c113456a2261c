"""The TLS credentials of a cluster, made once just before its scheduler is first started.

Owns `issue_credentials` and `has_credentials`: a cluster with credentials has had its start
operation begun, which is how a restarted gateway tells "started" from "never started".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..tls import new_cluster_credentials

if TYPE_CHECKING:
    from ..models import Cluster
    from ..store import Store


def issue_credentials(store: Store, cluster: Cluster) -> None:
    """Give ``cluster`` a new key and self-signed certificate and store them.

    The write is queued like every store change; the caller flushes before acting on it.
    """
    cert, key = new_cluster_credentials(cluster.name)
    store.update_cluster(cluster, tls_cert=cert, tls_key=key)


def has_credentials(cluster: Cluster) -> bool:
    """True once `issue_credentials` ran for ``cluster`` (in this process or before a restart)."""
    return bool(cluster.tls_cert)
