"""The proxy routes of one cluster: put while it runs, deleted when it stops.

Owns `ClusterRoutes`: the PATH route (``{prefix}/clusters/<name>`` to the dashboard) and the SNI
route (``<name>`` to the scheduler) of a cluster, in the gateway's `RouteTable`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..routes import Route

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..models import Cluster


class ClusterRoutes:
    """Puts and deletes the routes of clusters in ``context.routes``."""

    def __init__(self, *, context: GatewayContext) -> None:
        self.context = context

    def path(self, cluster: Cluster) -> str:
        """The public path of the cluster's dashboard."""
        return f"{self.context.prefix}/clusters/{cluster.name}"

    def put(self, cluster: Cluster) -> None:
        """Route to whatever addresses the cluster has reported (unchanged routes stay quiet)."""
        routes = self.context.routes
        if cluster.dashboard_address:
            routes.put(Route(kind="PATH", key=self.path(cluster), target=cluster.dashboard_address))
        if cluster.scheduler_address:
            routes.put(Route(kind="SNI", key=cluster.name, target=cluster.scheduler_address))

    def delete(self, cluster: Cluster) -> None:
        self.context.routes.delete("PATH", self.path(cluster))
        self.context.routes.delete("SNI", cluster.name)
