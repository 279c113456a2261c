"""What core hands to every backend, authenticator and proxy it builds.

Owns `GatewayContext`: the loaded config, the route table, the hook relay and event emission.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from attrs import define, field

from .routes import RouteTable

if TYPE_CHECKING:
    from .config import Config
    from .events import ClusterEvent

log = logging.getLogger("gateway.core")


@define(kw_only=True)
class GatewayContext:
    """Shared services of one running gateway. ``api_url`` is filled in once the API is bound."""

    config: Config
    hook: Any
    """The plugin manager's hook relay (``pm.hook``)."""
    routes: RouteTable = field(factory=RouteTable)
    api_url: str = ""
    """Base URL clusters use for the API, ending in ``/api``."""
    public_address: str = ""
    """``host:port`` of the proxy's public face (HTTP and, by default, TLS-SNI)."""
    prefix: str = ""
    """The proxy's path prefix (``[proxy] prefix``), e.g. ``/gateway``; empty for none."""
    _tasks: set[asyncio.Task[Any]] = field(factory=set, alias="_tasks")

    def emit(self, event: ClusterEvent) -> None:
        """Tell observer plugins about ``event``; never raises, never blocks the caller."""
        try:
            results = self.hook.gateway_cluster_event(event=event)
        except Exception:
            log.exception("gateway_cluster_event observer failed for %s", event.kind)
            return
        for result in results:
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(_guard(result, event.kind))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


async def _guard(awaitable: Any, kind: str) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("gateway_cluster_event observer failed for %s", kind)
