"""What core hands to every backend, authenticator and proxy it builds.

Owns `GatewayContext`: the loaded config, the route table, the typed hook caller, event
emission and the gateway's metrics.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from attrs import define, field

from .hookcaller import GatewayHooks
from .metrics import GatewayMetrics
from .routes import RouteTable

if TYPE_CHECKING:
    from .config import Config
    from .events import ClusterEvent

log = logging.getLogger("gateway.core")


def _hook_caller(value: GatewayHooks | None) -> GatewayHooks:
    if value is None:
        return GatewayHooks.without_plugins()
    if not isinstance(value, GatewayHooks):
        raise TypeError(
            f"GatewayContext.hook must be a GatewayHooks (GatewayHooks.from_plugin_manager(pm)) "
            f"or None, got {type(value).__name__}"
        )
    return value


@define(kw_only=True)
class GatewayContext:
    """Shared services of one running gateway. ``api_url`` is filled in once the API is bound."""

    config: Config
    hook: GatewayHooks = field(default=None, converter=_hook_caller)
    """The typed hook caller (`GatewayHooks.from_plugin_manager(pm)`); None (the default)
    means no plugins at all, for backends built outside a gateway."""
    routes: RouteTable = field(factory=RouteTable)
    api_url: str = ""
    """Base URL clusters use for the API, ending in ``/api``."""
    public_address: str = ""
    """``host:port`` of the proxy's public face (HTTP and, by default, TLS-SNI)."""
    prefix: str = ""
    """The proxy's path prefix (``[proxy] prefix``), e.g. ``/gateway``; empty for none."""
    metrics: GatewayMetrics = field(factory=GatewayMetrics)
    """This gateway's Prometheus metrics, in a registry of its own."""

    def emit(self, event: ClusterEvent) -> None:
        """Tell observer plugins about ``event``; never raises, never blocks the caller (see
        `GatewayHooks.gateway_cluster_event`)."""
        self.hook.gateway_cluster_event(event=event)
