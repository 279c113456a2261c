"""Tests of the HTTP face on loopback: routing, errors, streaming, websockets, headers, TLS.

Owns aiohttp upstream apps that report what they received, a raw-socket HTTP helper for what
aiohttp's client hides (keep-alive, pipelining, HTTP/1.0), and the checks against them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httptools
import pytest
from aiohttp import web
from conftest import LOOPBACK, client_context, client_hello, server_context

from gateway_proxy import ProxyServer, Route
from gateway_proxy.addresses import split_address

pytestmark = pytest.mark.unit


def path_route(path: str, target: str) -> Route:
    return Route(kind="PATH", key=path, target=target)


def info_app(
    name: str, *, max_size: int = 1 << 20, extra: list[web.RouteDef] | None = None
) -> web.Application:
    """Answers every request with what it saw (``extra`` routes first)."""

    async def info(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        payload = {
            "name": name,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": dict(request.headers),
            "body_sha": hashlib.sha256(body).hexdigest(),
            "body_len": len(body),
            "peer_port": request.transport.get_extra_info("peername")[1],
        }
        return web.json_response(payload)

    app = web.Application(client_max_size=max_size)
    app.add_routes(extra or [])
    app.router.add_route("*", "/{tail:.*}", info)
    return app


@pytest.fixture(params=["tcp", "in-process"])
def upstream_mode(request: pytest.FixtureRequest) -> str:
    """Every test with an upstream app runs twice: the app on a loopback port, and the app in
    the proxy's event loop reached in memory (`ProxyServer.serve_in_process`, as the gateway
    serves its API to the embedded proxy) behind a URL where nothing listens."""
    return str(request.param)


@pytest.fixture
def in_process_apps() -> dict[str, Callable[[], asyncio.BaseProtocol]]:
    """Target URL → protocol factory of the apps `serve_app` runs in process."""
    return {}


@pytest.fixture
async def serve_app(
    upstream_mode: str, in_process_apps: dict[str, Callable[[], asyncio.BaseProtocol]]
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def factory(app: web.Application, **kwargs: Any) -> str:
        runner = web.AppRunner(app, access_log=None, **kwargs)
        await runner.setup()
        runners.append(runner)
        if upstream_mode == "in-process":
            assert runner.server is not None
            # A port nothing listens on: a request that went over TCP would get a 502.
            url = f"http://{LOOPBACK}:{closed_port()}"
            in_process_apps[url] = runner.server
            return url
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://{LOOPBACK}:{port}"

    yield factory
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def make_proxy(
    make_proxy: Callable[..., Awaitable[ProxyServer]],
    in_process_apps: dict[str, Callable[[], asyncio.BaseProtocol]],
) -> Callable[..., Awaitable[ProxyServer]]:
    """conftest's `make_proxy`, serving the apps `serve_app` runs in process in memory."""

    async def factory(*args: Any, **kwargs: Any) -> ProxyServer:
        proxy = await make_proxy(*args, **kwargs)
        for url, protocol_factory in in_process_apps.items():
            proxy.serve_in_process(url, protocol_factory)
        return proxy

    return factory


def closed_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


async def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


class RawResponses:
    """Parses the responses arriving on one raw connection."""

    def __init__(self, head_requests: int = 0) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self._current = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current["status"] = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body

    def on_message_complete(self) -> None:
        self.done.append(self._current)


async def raw_requests(address: str, data: bytes, count: int) -> list[dict[str, Any]]:
    host, port = split_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    responses = RawResponses()
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            while len(responses.done) < count:
                chunk = await reader.read(65536)
                assert chunk, f"connection closed after {len(responses.done)} responses"
                responses.parser.feed_data(chunk)
    finally:
        writer.close()
    return responses.done


async def test_longest_segment_prefix_wins_and_is_replaced(serve_app, make_proxy) -> None:
    api, a, ab = [await serve_app(info_app(n)) for n in ("api", "a", "ab")]
    proxy = await make_proxy(
        [path_route("/clusters/a", a), path_route("/clusters/a/b/", ab)], api_target=api
    )
    base = f"http://{proxy.address}"
    cases = {
        "/clusters/a/status": ("a", "/status"),
        "/clusters/a": ("a", "/"),
        "/clusters/a/": ("a", "/"),
        "/clusters/a/b": ("ab", "/"),
        "/clusters/a/b/c/d": ("ab", "/c/d"),
        "/clusters/ab/x": ("api", "/clusters/ab/x"),  # whole segments only
        "/api/v1/clusters": ("api", "/api/v1/clusters"),
        "/": ("api", "/"),
    }
    for path, (name, upstream_path) in cases.items():
        status, body = await get_json(base + path + "?q=1&r=two")
        assert status == 200, path
        assert (body["name"], body["path"], body["query"]) == (name, upstream_path, "q=1&r=two")


async def test_target_path_is_kept(serve_app, make_proxy) -> None:
    up = await serve_app(info_app("up"))
    proxy = await make_proxy([path_route("/clusters/x", up + "/base/")])
    status, body = await get_json(f"http://{proxy.address}/clusters/x/status")
    assert (status, body["path"]) == (200, "/base/status")


async def test_redirect_from_a_cluster_stays_inside_its_route(serve_app, make_proxy) -> None:
    """A Dask scheduler answers its root with ``301 Location: /status``; through the proxy
    that must point at the cluster's own ``/clusters/<name>/status``, not the gateway's."""

    async def root(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/status")

    async def status(request: web.Request) -> web.StreamResponse:
        return web.Response(text="the dashboard")

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_get("/status", status)
    up = await serve_app(app)
    proxy = await make_proxy([path_route("/clusters/abc", up)])
    async with aiohttp.ClientSession() as session:
        url = f"http://{proxy.address}/clusters/abc"
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 301
            assert resp.headers["Location"] == "/clusters/abc/status"
        async with session.get(url) as resp:  # followed by the client, as a browser would
            assert (resp.status, await resp.text()) == (200, "the dashboard")
            assert resp.url.path == "/clusters/abc/status"


async def test_no_route_is_404_json(serve_app, make_proxy) -> None:
    api = await serve_app(info_app("api"))
    proxy = await make_proxy(api_target=api, prefix="/gateway")
    status, body = await get_json(f"http://{proxy.address}/elsewhere/api")
    assert (status, body) == (404, {"error": "Not Found"})
    status, body = await get_json(f"http://{proxy.address}/gatewayx")
    assert status == 404


async def test_target_down_is_502_json(make_proxy) -> None:
    proxy = await make_proxy([path_route("/clusters/down", f"http://{LOOPBACK}:9")])
    status, body = await get_json(f"http://{proxy.address}/clusters/down/status")
    assert status == 502
    assert set(body) == {"error"} and "cannot reach" in body["error"]


async def test_target_closing_without_an_answer_is_502(make_proxy) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await make_proxy([path_route("/x", f"http://{LOOPBACK}:{port}")])
    status, body = await get_json(f"http://{proxy.address}/x")
    assert status == 502 and "error" in body
    server.close()
    await server.wait_closed()


async def test_prefix_routes_the_api_and_answers_readiness_outside_it(
    serve_app, make_proxy
) -> None:
    api, cluster = await serve_app(info_app("api")), await serve_app(info_app("cluster"))
    proxy = await make_proxy(
        [path_route("/gateway/clusters/c1", cluster)], api_target=api, prefix="/gateway/"
    )
    base = f"http://{proxy.address}"
    assert (await get_json(base + "/gateway/api/health"))[1]["path"] == "/api/health"
    assert (await get_json(base + "/gateway/clusters/c1/status"))[1]["name"] == "cluster"
    assert (await get_json(base + "/api/health"))[0] == 404
    assert (await get_json(base + "/_gateway-proxy/ready"))[0] == 200


async def test_readiness_only_once_ready(serve_app, make_proxy) -> None:
    proxy = await make_proxy(ready=False)
    base = f"http://{proxy.address}"
    status, body = await get_json(base + "/_gateway-proxy/ready")
    assert status == 503 and "error" in body
    assert (await get_json(base + "/_gateway-proxy/health"))[0] == 200
    proxy.set_ready(True)
    assert (await get_json(base + "/_gateway-proxy/ready"))[0] == 200


async def test_forwarded_headers(serve_app, make_proxy) -> None:
    up = await serve_app(info_app("up"))
    proxy = await make_proxy([path_route("/x", up)])
    url = f"http://{proxy.address}/x"
    _, body = await get_json(url, headers={"X-Forwarded-For": "10.1.2.3"})
    headers = body["headers"]
    assert headers["X-Forwarded-For"] == f"10.1.2.3, {LOOPBACK}"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == proxy.address
    assert headers["Host"] == up.removeprefix("http://")
    _, body = await get_json(url, headers={"Connection": "keep-alive, X-Secret", "X-Secret": "1"})
    assert "X-Secret" not in body["headers"]  # named in Connection: hop-by-hop


async def test_streaming_request_and_response_bodies(serve_app, make_proxy) -> None:
    """Neither body is buffered whole: each side sees the first chunk before the last is sent."""
    first_chunk_in = asyncio.Event()
    first_chunk_out = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        got = await request.content.readexactly(5)
        assert got == b"part1"
        first_chunk_in.set()
        rest = await request.content.read()
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"out-1;")
        await asyncio.wait_for(first_chunk_out.wait(), 5)
        await response.write(b"out-2;" + rest)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/stream", stream)
    up = await serve_app(app)
    proxy = await make_proxy([path_route("/s", up)])

    async def body() -> AsyncIterator[bytes]:
        yield b"part1"
        await asyncio.wait_for(first_chunk_in.wait(), 5)
        yield b"part2"

    url = f"http://{proxy.address}/s/stream"
    async with aiohttp.ClientSession() as session, session.post(url, data=body()) as resp:
        assert await resp.content.readexactly(6) == b"out-1;"
        first_chunk_out.set()
        assert await resp.read() == b"out-2;part2"
    traffic = proxy.traffic()["http"]  # what core's gateway_proxy_* metrics read
    assert traffic["connections"] == 1
    assert traffic["bytes_received"] > len(b"part1part2")  # the head, then the body
    assert traffic["bytes_sent"] > len(b"out-1;out-2;part2")


async def test_large_bodies_both_ways(serve_app, make_proxy) -> None:
    blob = os.urandom(6 * 1024 * 1024)

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=blob)

    app = info_app("up", max_size=len(blob) + 1, extra=[web.get("/blob", download)])
    up = await serve_app(app)
    proxy = await make_proxy([path_route("/u", up)])
    async with aiohttp.ClientSession() as session:
        async with session.put(f"http://{proxy.address}/u/upload", data=blob) as resp:
            info = await resp.json()
        async with session.get(f"http://{proxy.address}/u/blob") as resp:
            down = await resp.read()
    assert info["body_len"] == len(blob)
    assert info["body_sha"] == hashlib.sha256(blob).hexdigest()
    assert down == blob


async def test_keep_alive_across_a_large_body(serve_app, make_proxy) -> None:
    """A big Content-Length body passes through unparsed; both connections stay usable."""
    blob = os.urandom(3 * 1024 * 1024 + 17)

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=blob)

    up = await serve_app(info_app("up", extra=[web.get("/blob", download)]))
    proxy = await make_proxy([path_route("/u", up)])
    request = b"GET /u/%s HTTP/1.1\r\nHost: p\r\n\r\n"
    responses = await raw_requests(
        proxy.address, request % b"info" + request % b"blob" + request % b"info", 3
    )
    assert responses[1]["body"] == blob
    first, last = (json.loads(responses[i]["body"]) for i in (0, 2))
    assert first["peer_port"] == last["peer_port"]  # the same upstream connection


async def test_websocket_through_the_proxy(serve_app, make_proxy) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/status/ws", ws_echo)
    up = await serve_app(app)
    proxy = await make_proxy([path_route("/clusters/w", up)])
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://{proxy.address}/clusters/w/status/ws") as ws:
            for i in range(20):
                await ws.send_str(f"m{i}")
                assert (await ws.receive(timeout=5)).data == f"m{i}".join(["echo:", ""])
            big = os.urandom(300_000)
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=5)).data == big[::-1]
            await ws.close()
        # The same client connection pool is still good for plain requests afterwards.
        async with session.get(f"http://{proxy.address}/_gateway-proxy/health") as resp:
            assert resp.status == 200


async def test_websocket_refused_by_the_target_is_relayed(serve_app, make_proxy) -> None:
    up = await serve_app(info_app("plain"))
    proxy = await make_proxy([path_route("/p", up)])
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(f"http://{proxy.address}/p/ws")
    assert err.value.status == 200


async def test_keep_alive_and_pipelining_on_one_connection(serve_app, make_proxy) -> None:
    up = await serve_app(info_app("up"))
    proxy = await make_proxy([path_route("/k", up)])
    request = b"GET /k/%d HTTP/1.1\r\nHost: proxy\r\n\r\n"
    pipelined = b"".join(request % i for i in range(5))
    responses = await raw_requests(proxy.address, pipelined, 5)
    paths = [json.loads(r["body"])["path"] for r in responses]
    assert paths == [f"/{i}" for i in range(5)]
    # The upstream connection was kept alive and reused for all of them.
    assert len({json.loads(r["body"])["peer_port"] for r in responses}) == 1


async def test_http10_head_204_and_chunked_answers(serve_app, make_proxy) -> None:
    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(3):
            await response.write(b"piece%d;" % i)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/none", no_content)
    app.router.add_get("/chunks", chunked)
    up = await serve_app(app)
    proxy = await make_proxy([path_route("/h", up)])
    responses = await raw_requests(
        proxy.address,
        b"GET /h/none HTTP/1.1\r\nHost: p\r\n\r\nGET /h/chunks HTTP/1.1\r\nHost: p\r\n\r\n",
        2,
    )
    assert responses[0]["status"] == 204 and responses[0]["body"] == b""
    assert responses[1]["body"] == b"piece0;piece1;piece2;"
    assert responses[1]["headers"]["transfer-encoding"] == "chunked"
    host, port = split_address(proxy.address)
    # HEAD: headers only, and the connection stays usable for the next request.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"HEAD /h/chunks HTTP/1.1\r\nHost: p\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET /h/none HTTP/1.1\r\nHost: p\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204 ")
    writer.close()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /h/chunks HTTP/1.0\r\n\r\n")
    async with asyncio.timeout(5):
        raw = await reader.read()  # an HTTP/1.0 answer without length ends with the close
    writer.close()
    assert raw.endswith(b"\r\n\r\npiece0;piece1;piece2;")
    assert b"transfer-encoding" not in raw.lower()


async def test_expect_100_continue(serve_app, make_proxy) -> None:
    up = await serve_app(info_app("up"))
    proxy = await make_proxy([path_route("/e", up)])
    url = f"http://{proxy.address}/e/x"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=b"y" * 5000, expect100=True) as resp,
    ):
        body = await resp.json()
    assert body["body_len"] == 5000


async def test_stale_pooled_connection_is_retried(serve_app, make_proxy) -> None:
    up = await serve_app(info_app("up"), keepalive_timeout=0.1)
    proxy = await make_proxy([path_route("/r", up)])
    url = f"http://{proxy.address}/r/x"
    first = await get_json(url)
    await asyncio.sleep(0.3)  # the target closes the idle kept-alive connection
    second = await get_json(url)
    assert first[0] == second[0] == 200


async def test_https_termination_on_a_shared_port(ca, tmp_path, serve_app, make_echo, make_proxy):
    cert = ca.issue_cert("localhost", LOOPBACK)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    up = await serve_app(info_app("up"))
    echo = await make_echo(server_context(ca, "daskgateway-c"))
    proxy = await make_proxy(
        [path_route("/x", up), Route(kind="SNI", key="c", target=echo.target)],
        tls_cert=str(cert_file),
        tls_key=str(key_file),
    )
    context = client_context(ca)
    status, body = await get_json(f"https://{proxy.address}/x/y", ssl=context)
    assert status == 200
    assert body["headers"]["X-Forwarded-Proto"] == "https"
    # The same port still passes daskgateway- TLS through untouched to the cluster.
    host, port = split_address(proxy.address)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname="daskgateway-c"
    )
    writer.write(b"scheduler")
    assert await reader.readexactly(9) == b"scheduler"
    writer.close()
    # Plain HTTP to the HTTPS port is closed.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        rest = b""
    assert rest == b""
    writer.close()


async def test_https_on_its_own_port(ca, tmp_path, serve_app, make_proxy) -> None:
    cert = ca.issue_cert(LOOPBACK)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    up = await serve_app(info_app("up"))
    proxy = await make_proxy(
        [path_route("/x", up)], tls_cert=str(cert_file), tls_key=str(key_file), tcp_address="auto"
    )
    status, body = await get_json(f"https://{proxy.address}/x/z", ssl=client_context(ca))
    assert status == 200 and body["headers"]["X-Forwarded-Proto"] == "https"


async def test_plain_http_and_tls_share_the_default_port(ca, serve_app, make_echo, make_proxy):
    up = await serve_app(info_app("up"))
    echo = await make_echo(server_context(ca, "daskgateway-s"))
    proxy = await make_proxy([path_route("/x", up), Route(kind="SNI", key="s", target=echo.target)])
    assert proxy.address == proxy.tcp_address
    assert (await get_json(f"http://{proxy.address}/x"))[0] == 200
    host, port = split_address(proxy.address)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=client_context(ca), server_hostname="daskgateway-s"
    )
    writer.write(b"abc")
    assert await reader.readexactly(3) == b"abc"
    writer.close()
    # TLS that is not for a cluster, with no HTTPS configured: closed.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(client_hello("example.org"))
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        rest = b""
    assert rest == b""
    writer.close()


async def test_bad_request_is_400_and_closed(make_proxy) -> None:
    proxy = await make_proxy()
    host, port = split_address(proxy.address)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n")
    async with asyncio.timeout(5):
        raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400 ") and b'"error"' in raw


async def test_ssl_module_is_used_for_https_targets_only(make_proxy) -> None:
    proxy = await make_proxy([path_route("/s", f"https://{LOOPBACK}:9/")])
    status, body = await get_json(f"http://{proxy.address}/s/")
    assert status == 502 and "error" in body
    assert isinstance(proxy.http.pool._client_tls, ssl.SSLContext)  # type: ignore[union-attr]
