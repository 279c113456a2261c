"""Tests of the gateway-core glue: the plugin's hooks and the embedded proxy's route subscription.

Owns checks that core's plugin manager finds ``builtin`` through the entry point, that the
``gateway proxy`` command is registered, that `BuiltinProxy` follows a live `RouteTable`, and
that a whole gateway serves its API through the proxy.
"""

from __future__ import annotations

import asyncio

import aiohttp
import click
import pytest
from click.testing import CliRunner
from conftest import LOOPBACK, client_context, server_context

from gateway_core.config import ProxyConfig
from gateway_core.plugins import Registry, make_plugin_manager
from gateway_core.routes import Route, RouteTable
from gateway_proxy.addresses import split_address
from gateway_proxy.embedded import BuiltinProxy, BuiltinProxyConfig
from gateway_proxy.memory import MemoryTransport

pytestmark = pytest.mark.unit


def test_core_finds_the_builtin_proxy_through_the_entry_point() -> None:
    pm = make_plugin_manager(disabled=[])
    spec = Registry.from_plugin_manager(pm).proxy("builtin")
    assert spec.proxy is BuiltinProxy
    assert spec.config is BuiltinProxyConfig
    assert spec.plugin == "proxy"


def test_the_proxy_command_is_registered() -> None:
    pm = make_plugin_manager(disabled=[])
    cli = click.Group("gateway")
    pm.hook.gateway_register_commands(cli=cli)
    result = CliRunner().invoke(cli, ["proxy", "--help"])
    assert result.exit_code == 0
    for option in (
        "--address",
        "--tcp-address",
        "--prefix",
        "--gateway-url",
        "--api-token",
        "GATEWAY_PROXY_TOKEN",
        "--tls-cert",
        "--tls-key",
        "--log-level",
    ):
        assert option in result.output
    missing = CliRunner().invoke(cli, ["proxy"], env={"GATEWAY_PROXY_TOKEN": ""})
    assert missing.exit_code == 2 and "--gateway-url" in missing.output


async def test_embedded_proxy_follows_the_route_table(ca, make_echo) -> None:
    routes = RouteTable(max_events=10)
    one = await make_echo(server_context(ca, "daskgateway-one"))
    routes.put(Route(kind="SNI", key="one", target=one.target))
    proxy = BuiltinProxy(
        config=BuiltinProxyConfig(address=f"{LOOPBACK}:0", handshake_timeout=1.0),
        routes=routes,
        api_target=f"http://{LOOPBACK}:9",
    )
    await proxy.start()
    try:
        assert proxy.ready and proxy.address == proxy.tcp_address
        host, port = split_address(proxy.address)

        async def roundtrip(name: str) -> bytes:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_context(ca), server_hostname=name
            )
            writer.write(b"hi")
            try:
                return await asyncio.wait_for(reader.readexactly(2), 5)
            finally:
                writer.close()

        assert await roundtrip("daskgateway-one") == b"hi"
        two = await make_echo(server_context(ca, "daskgateway-two"))
        routes.put(Route(kind="SNI", key="two", target=two.target))
        assert await roundtrip("daskgateway-two") == b"hi"
        routes.delete("SNI", "one")
        with pytest.raises((OSError, asyncio.IncompleteReadError)):
            await roundtrip("daskgateway-one")
        # A bad route from core is logged and skipped, never raised into the table's writer.
        routes.put(Route(kind="SNI", key="bad", target="nonsense"))
        assert proxy.server.table.lookup_sni("daskgateway-bad") is None
    finally:
        await proxy.stop()
    routes.put(Route(kind="SNI", key="three", target=one.target))  # unsubscribed: no error
    assert proxy.server.table.lookup_sni("daskgateway-three") is None


async def test_core_proxy_config_without_extras_is_accepted() -> None:
    proxy = BuiltinProxy(
        config=ProxyConfig(address=f"{LOOPBACK}:0", prefix="/gw"),
        routes=RouteTable(),
        api_target=f"http://{LOOPBACK}:9",
    )
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{proxy.address}/gw/api/health") as resp:
                assert resp.status == 502  # the default route exists; nothing listens there
            async with session.get(f"http://{proxy.address}/other") as resp:
                assert resp.status == 404
    finally:
        await proxy.stop()


async def test_a_gateway_serves_its_api_through_the_builtin_proxy(make_gateway) -> None:
    gateway = await make_gateway({"proxy": {"prefix": "/gw"}})
    assert isinstance(gateway.proxy, BuiltinProxy)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{gateway.public_address}/gw/api/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "pass"
        async with session.get(f"http://{gateway.public_address}/gw/api/version") as resp:
            assert resp.status == 200
        # The proxy reached the API in memory: every connection the API server has is one.
        server = gateway._runner.server if gateway._runner else None
        assert server is not None and server.connections
        assert all(isinstance(h.transport, MemoryTransport) for h in server.connections)
        # The API's own port still answers over TCP (for whoever is given it).
        async with session.get(f"http://{gateway.api_address}/api/health") as resp:
            assert resp.status == 200
        assert not all(isinstance(h.transport, MemoryTransport) for h in server.connections)


async def test_withdrawn_in_process_api_is_reached_over_tcp_again(make_gateway) -> None:
    """`serve_api_in_process(None)` (the gateway's first step when it stops) sends the API's
    requests to its port again: never to an API app being torn down."""
    gateway = await make_gateway()
    proxy = gateway.proxy
    assert isinstance(proxy, BuiltinProxy) and proxy.server.http is not None
    pool = proxy.server.http.pool
    assert pool.in_process
    proxy.serve_api_in_process(None)
    assert not pool.in_process
    url = f"http://{gateway.public_address}/api/health"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200  # over TCP, to the API's own port
    proxy.serve_api_in_process(gateway._runner.server if gateway._runner else None)
    assert pool.in_process
    await gateway.stop()
    assert not pool.in_process
