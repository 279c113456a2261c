"""The built-in proxy as gateway-core sees it: a core `Proxy` living in the gateway process.

Owns `BuiltinProxy` (follows core's in-process `gateway_core.routes.RouteTable` by subscription,
applying each event to the proxy's own `RouteTable`) and
`BuiltinProxyConfig` (the `[proxy]` section with this proxy's extra keys). Imports gateway-core,
so only `gateway_proxy.hooks` imports this module, when core loads the plugin.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from attrs import define

from gateway_core.config import ProxyConfig
from gateway_core.proxies import Proxy

from .hello import DEFAULT_MAX_HELLO
from .server import ProxyServer
from .settings import ProxySettings
from .table import Route

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from gateway_core import routes as core_routes
    from gateway_core.context import GatewayContext

log = logging.getLogger("gateway.proxy")

LOG_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "critical": "CRITICAL",
}


@define(kw_only=True, frozen=True)
class BuiltinProxyConfig(ProxyConfig):
    """`[proxy]` for the built-in proxy: core's keys plus timeouts and limits."""

    handshake_timeout: float = 10.0
    """Seconds a client has to send its first bytes (the whole ClientHello on TLS)."""
    connect_timeout: float = 10.0
    """Seconds to connect to a route's target."""
    max_hello_size: int = DEFAULT_MAX_HELLO
    """Largest TLS ClientHello read before the connection is closed, in bytes."""
    upstream_idle_timeout: float = 30.0
    """Seconds an idle keep-alive connection to an HTTP target is kept for reuse."""
    client_idle_timeout: float = 300.0
    """Seconds an idle keep-alive HTTP client connection is kept open."""


def settings_from_config(config: ProxyConfig, *, api_target: str = "") -> ProxySettings:
    """`ProxySettings` for a `[proxy]` section (core's class or `BuiltinProxyConfig`)."""
    extra: dict[str, Any] = {}
    if isinstance(config, BuiltinProxyConfig):
        extra = {
            "handshake_timeout": config.handshake_timeout,
            "connect_timeout": config.connect_timeout,
            "max_hello_size": config.max_hello_size,
            "upstream_idle_timeout": config.upstream_idle_timeout,
            "client_idle_timeout": config.client_idle_timeout,
        }
    return ProxySettings(
        address=config.address,
        tcp_address=config.tcp_address,
        prefix=config.prefix,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        api_token=config.api_token,
        gateway_url=config.gateway_url,
        api_target=api_target,
        **extra,
    )


def apply_log_level(level: str) -> None:
    logging.getLogger("gateway.proxy").setLevel(LOG_LEVELS.get(level.lower(), "WARNING"))


class BuiltinProxy(Proxy):
    """The HTTP + TLS-SNI proxy, hosted in the gateway's event loop."""

    def __init__(
        self,
        *,
        config: ProxyConfig,
        routes: core_routes.RouteTable,
        api_target: str,
        context: GatewayContext | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, routes=routes, api_target=api_target, context=context)
        self.server = ProxyServer(settings_from_config(config, api_target=api_target))
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        apply_log_level(self.config.log_level)
        server = self.server
        # No await between the snapshot and the subscription: no event can slip in between.
        server.replace(Route.of(route) for route in self.routes.routes())
        self._unsubscribe = self.routes.subscribe(self._on_event)
        try:
            await server.start()
        except BaseException:
            self._unsubscribe()
            self._unsubscribe = None
            raise
        server.set_ready(True)

    def _on_event(self, event: core_routes.RouteEvent) -> None:
        try:
            route = Route.of(event.route)
            if event.type == "PUT":
                self.server.put(route)
            else:
                self.server.delete(route)
        except Exception:
            log.exception("could not apply route event %s", event)

    def serve_api_in_process(self, factory: Callable[[], asyncio.BaseProtocol] | None) -> bool:
        """Hand requests for the API to ``factory`` (the API server's protocol factory, in
        this event loop) over in-memory connections instead of loopback TCP."""
        self.server.serve_in_process(self.api_target, factory)
        return True

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.server.stop()

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def tcp_address(self) -> str:
        return self.server.tcp_address

    @property
    def ready(self) -> bool:
        return self.server.ready

    def traffic(self) -> dict[str, dict[str, int]]:
        """Connections and bytes per face (`ProxyServer.traffic`), read by core's
        ``gateway_proxy_*`` metrics (`gateway_core.metrics.ProxyTraffic`)."""
        return self.server.traffic()
