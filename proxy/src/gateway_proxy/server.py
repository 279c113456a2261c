"""One proxy server: the HTTP face and the TLS-SNI face over one routing table, one or two ports.

Owns `ProxyServer`: binding the listeners (a shared port is demultiplexed by the TLS-SNI face),
the TLS context for HTTPS, applying route changes, readiness, and an orderly stop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterable

from .addresses import join_address, split_address
from .http import HttpFace
from .settings import ProxySettings
from .table import Route, RouteTable
from .tcp import SniFace
from .tunnel import Splicer

log = logging.getLogger("gateway.proxy")


def _bind(address: str, backlog: int) -> socket.socket:
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    sock.setblocking(False)
    return sock


def _show(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return join_address(host, port)


class ProxyServer:
    """The proxy: call `start`, feed it routes (`put`, `delete`, `replace`), `stop` it."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.table = RouteTable()
        self._ready = False
        self._address = ""
        self._tcp_address = ""
        self.http: HttpFace | None = None
        self.sni: SniFace | None = None
        self.splicer: Splicer | None = None
        if settings.api_target:
            self.table.set_static_path(settings.prefix + "/", settings.api_target)

    # -- routes -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the routes are loaded (set by whoever feeds them)."""
        return self._ready

    def set_ready(self, ready: bool = True) -> None:
        if ready and not self._ready:
            log.info("proxy ready: %d routes loaded", len(self.table))
        self._ready = ready

    def put(self, route: Route) -> None:
        try:
            self.table.put(route)
        except ValueError as exc:
            log.warning("ignoring route %s %s: %s", route.kind, route.key, exc)
            return
        log.info("route added: %s %s -> %s", route.kind, route.key, route.target)

    def delete(self, route: Route) -> None:
        self.table.delete(route)
        log.info("route removed: %s %s", route.kind, route.key)

    def replace(self, routes: Iterable[Route]) -> None:
        for route, why in self.table.replace(routes):
            log.warning("ignoring route %s %s: %s", route.kind, route.key, why)
        log.info("routing table replaced: %d routes", len(self.table))

    # -- lifecycle ----------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert, key = self.settings.tls_cert, self.settings.tls_key
        try:
            context.load_cert_chain(cert, key or None)
        except OSError as exc:  # ssl names neither file: say which pair failed
            if exc.filename is None:
                exc.filename = cert if not key or key == cert else f"{cert} / {key}"
            raise
        context.set_alpn_protocols(["http/1.1"])
        return context

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        context = self._ssl_context()
        self.splicer = Splicer(loop, buffer_size=settings.buffer_size, use_splice=settings.splice)
        self.http = HttpFace(
            loop=loop,
            table=self.table,
            ssl_context=context,
            is_ready=lambda: self._ready,
            connect_timeout=settings.connect_timeout,
            handshake_timeout=settings.handshake_timeout,
            upstream_idle_timeout=settings.upstream_idle_timeout,
            client_idle_timeout=settings.client_idle_timeout,
        )
        shared = settings.shared_port
        self.sni = SniFace(
            loop=loop,
            table=self.table,
            splicer=self.splicer,
            handshake_timeout=settings.handshake_timeout,
            connect_timeout=settings.connect_timeout,
            max_hello_size=settings.max_hello_size,
            http_handoff=self.http.handoff if shared else None,
            https=context is not None,
        )
        http_sock = _bind(settings.address, settings.backlog)
        try:
            if shared:
                self.sni.listen(http_sock)
                self._address = self._tcp_address = _show(http_sock)
            else:
                tcp_sock = _bind(settings.tcp_address, settings.backlog)
                self.sni.listen(tcp_sock)
                await self.http.listen(http_sock, backlog=settings.backlog)
                self._address, self._tcp_address = _show(http_sock), _show(tcp_sock)
        except BaseException:
            http_sock.close()
            self.sni.close()
            raise
        scheme = "https" if context else "http"
        log.info("HTTP face at %s://%s%s", scheme, self._address, settings.prefix or "/")
        log.info("TLS-SNI face at %s", self._tcp_address)

    def serve_in_process(
        self, target: str, factory: Callable[[], asyncio.BaseProtocol] | None
    ) -> None:
        """Send the HTTP face's requests for ``target`` (``http://host:port``) to ``factory``,
        the protocol factory of that server in this event loop, in memory; None: back to TCP
        (and nothing before `start`, when there is no HTTP face yet)."""
        if self.http is None:
            if factory is None:
                return
            raise RuntimeError("the proxy is not started")
        self.http.serve_in_process(target, factory)

    async def stop(self) -> None:
        """Close the listeners and every connection (spliced, handshaking, HTTP)."""
        if self.sni is not None:
            self.sni.close()
        if self.splicer is not None:
            self.splicer.close_all()
        if self.http is not None:
            await self.http.close()
        self._ready = False

    def traffic(self) -> dict[str, dict[str, int]]:
        """Per face, since start: client connections (``connections``: accepted by the HTTP
        face, spliced to a target by the TLS-SNI face), ``open`` ones, and bytes
        ``bytes_received`` from and ``bytes_sent`` to clients. Empty before `start`."""
        out: dict[str, dict[str, int]] = {}
        if self.http is not None:
            out["http"] = {**self.http.counts, "open": len(self.http.connections)}
        if self.sni is not None and self.splicer is not None:
            out["tls_sni"] = {
                "connections": self.sni.counts["routed"],
                "open": len(self.splicer.live),
                "bytes_received": self.splicer.bytes_forward,
                "bytes_sent": self.splicer.bytes_backward,
            }
        return out

    @property
    def address(self) -> str:
        """``host:port`` of the HTTP face (the real port when 0 was asked for)."""
        return self._address

    @property
    def tcp_address(self) -> str:
        """``host:port`` of the TLS-SNI face (the HTTP one on a shared port)."""
        return self._tcp_address
