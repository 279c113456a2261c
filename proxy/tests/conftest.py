"""Shared fixtures of gateway-proxy's tests: certificates, targets, proxies, ClientHellos.

Owns the event loops every async test runs on (asyncio and uvloop), the trustme CA, TLS and
plain echo targets on loopback, the `make_proxy` factory, and `client_hello`, which makes real
ClientHellos with Python's ssl module over memory BIOs.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme

from gateway_proxy import ProxyServer, ProxySettings, Route

LOOPBACK = "127.0.0.1"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on both loops: the standalone proxy prefers uvloop."""
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def client_hello(server_hostname: str | None, *, tls13: bool = True) -> bytes:
    """The first flight of a real TLS client (Python's ssl, OpenSSL underneath)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if not tls13:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class EchoTarget:
    """A loopback server echoing every byte; TLS when given a context. Counts connections."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> EchoTarget:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def target(self) -> str:
        return f"tls://{LOOPBACK}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()


@pytest.fixture
async def make_echo() -> AsyncIterator[Callable[..., Awaitable[EchoTarget]]]:
    started: list[EchoTarget] = []

    async def factory(context: ssl.SSLContext | None = None) -> EchoTarget:
        target = await EchoTarget(context).start()
        started.append(target)
        return target

    yield factory
    for target in started:
        await target.stop()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[ProxyServer]]]:
    """``await make_proxy(routes=[...], **settings)``: a started proxy on loopback, ready."""
    started: list[ProxyServer] = []

    async def factory(
        routes: list[Route] | None = None, *, ready: bool = True, **settings: Any
    ) -> ProxyServer:
        settings.setdefault("address", f"{LOOPBACK}:0")
        if settings.get("tcp_address") == "auto":
            settings["tcp_address"] = f"{LOOPBACK}:0"
        server = ProxyServer(ProxySettings(**settings))
        for route in routes or []:
            server.put(route)
        await server.start()
        if ready:
            server.set_ready(True)
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.stop()


async def read_until_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()
