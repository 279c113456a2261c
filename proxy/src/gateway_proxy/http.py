"""The HTTP face: a streaming HTTP/1.1 reverse proxy over path routes, websockets included.

Owns the client protocol (httptools parser, keep-alive, pipelined requests answered in order),
the upstream protocol and its keep-alive pool, header rewriting (hop-by-hop, X-Forwarded-*),
the proxy's own answers (404, 502, readiness, health, all JSON) and the Upgrade tunnel.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import ssl
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import httptools

from .memory import connect_in_memory
from .settings import HEALTH_PATH, READY_PATH
from .table import HttpTarget, RouteTable

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_BUFFER_LIMIT = 256 * 1024
"""Request body bytes held while the upstream connection is being opened."""
_UPGRADE_LIMIT = 64 * 1024
_POOL_PER_TARGET = 64
_WRITE_HIGH = 512 * 1024
"""Bytes a transport may buffer before the other side stops reading (backpressure)."""

# Reasons the client side stops reading (a bit each).
_PAUSE_PIPELINE = 1
_PAUSE_UPSTREAM_FULL = 2
_PAUSE_BUFFERING = 4
_PAUSE_UPGRADE = 8

PoolKey = tuple[str, int, bool]
_READY = READY_PATH.encode()
_HEALTH = HEALTH_PATH.encode()


def _tune(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: a response head must not wait for the ACK of the one before."""
    transport.set_write_buffer_limits(high=_WRITE_HIGH)  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _reason(code: int) -> bytes:
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def _half_close(transport: asyncio.Transport | None, *, reading_done: bool) -> None:
    """The other side stopped sending: pass the FIN on, and close outright when this side's
    reading has ended too (or when the transport cannot half-close)."""
    if transport is None or transport.is_closing():
        return
    if transport.can_write_eof():
        transport.write_eof()
        if reading_done:
            transport.close()
    else:
        transport.close()


class HttpFace:
    """Serves HTTP (or HTTPS) on one or more listeners against a routing table."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        table: RouteTable,
        ssl_context: ssl.SSLContext | None,
        is_ready: Callable[[], bool],
        connect_timeout: float,
        handshake_timeout: float,
        upstream_idle_timeout: float,
        client_idle_timeout: float,
    ) -> None:
        self.loop = loop
        self.table = table
        self.ssl_context = ssl_context
        self.is_ready = is_ready
        self.handshake_timeout = handshake_timeout
        self.client_idle_timeout = client_idle_timeout
        self.pool = UpstreamPool(
            loop=loop, connect_timeout=connect_timeout, idle_timeout=upstream_idle_timeout
        )
        self.connections: set[ClientConn] = set()
        self.counts = {"connections": 0, "bytes_received": 0, "bytes_sent": 0}
        """Client connections accepted and bytes read from / written to clients, ever."""
        self.servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def listen(self, sock: socket.socket, *, backlog: int) -> None:
        """Serve on a listening socket of its own (HTTPS when an SSL context is set)."""
        tls = self.ssl_context is not None
        server = await self.loop.create_server(
            lambda: ClientConn(self, tls=tls),
            sock=sock,
            ssl=self.ssl_context,
            backlog=backlog,
            ssl_handshake_timeout=self.handshake_timeout if tls else None,
        )
        self.servers.append(server)

    def handoff(self, sock: socket.socket, tls: bool) -> None:
        """Take over a connection accepted (and peeked at) by the TLS-SNI face."""
        context = self.ssl_context if tls else None
        task = self.loop.create_task(self._adopt(sock, context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: ClientConn(self, tls=context is not None),
                sock,
                ssl=context,
                ssl_handshake_timeout=self.handshake_timeout if context else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("http: TLS handshake with a client failed: %s", exc)
            sock.close()

    def serve_in_process(
        self, target: str, factory: Callable[[], asyncio.BaseProtocol] | None
    ) -> None:
        """Reach the HTTP server at ``target`` (``http://host:port``) through ``factory``, its
        protocol factory in this event loop, instead of over TCP; None goes back to TCP.
        Connections already open (pooled) stay as they are."""
        parsed = HttpTarget.parse(target)
        if parsed.tls:
            raise ValueError(f"in-process target {target!r} must be http://, not https://")
        key = (parsed.host, parsed.port, False)
        if factory is None:
            self.pool.in_process.pop(key, None)
        else:
            self.pool.in_process[key] = factory

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
        self.pool.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()


class Exchange:
    """One request and its response."""

    __slots__ = (
        "attempts",
        "body_done",
        "body_sent",
        "buffered",
        "buffered_size",
        "chunked_in",
        "client",
        "connecting",
        "finished",
        "has_body",
        "headers",
        "keep_alive",
        "local",
        "method",
        "path",
        "query",
        "response_done",
        "response_started",
        "target",
        "tunnel_data",
        "upgrade",
        "upstream",
        "upstream_path",
        "version",
    )

    def __init__(self, client: ClientConn, method: bytes, url: bytes, headers: list) -> None:
        self.client = client
        self.method = method
        parsed = httptools.parse_url(url)
        self.path: bytes = parsed.path or b"/"
        self.query: bytes | None = parsed.query
        self.headers: list[tuple[bytes, bytes]] = headers
        self.version = b"1.1"
        self.keep_alive = True
        self.upgrade = False
        self.chunked_in = False
        self.has_body = False
        self.body_done = False
        self.buffered: list[bytes] = []
        self.buffered_size = 0
        self.body_sent = False
        self.upstream: UpstreamConn | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.target: HttpTarget | None = None
        self.upstream_path = b"/"
        self.local = False
        self.response_started = False
        self.response_done = False
        self.finished = False
        self.attempts = 0
        self.tunnel_data = bytearray()

    @property
    def head_only(self) -> bool:
        return self.method == b"HEAD"


class ClientConn(asyncio.Protocol):
    """One client connection of the HTTP face."""

    def __init__(self, face: HttpFace, *, tls: bool) -> None:
        self.face = face
        self.scheme = b"https" if tls else b"http"
        self.transport: asyncio.Transport | None = None
        self.peer_ip = b""
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Exchange] = collections.deque()
        self.current: Exchange | None = None
        self.paused = 0
        self.write_paused = False
        self.tunnel: UpstreamConn | None = None
        self.upgrading = False
        self.eof = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        _tune(transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]).encode() if peer else b""
        self.face.connections.add(self)
        self.face.counts["connections"] += 1
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.face.counts["bytes_received"] += len(data)
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.upgrading:
            self.queue[0].tunnel_data += data
            if len(self.queue[0].tunnel_data) > _UPGRADE_LIMIT:
                self._pause(_PAUSE_UPGRADE)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
            ex = self.current
            if ex is None or not ex.upgrade:
                self.bad_request("unexpected upgrade")
                return
            self.upgrading = True
            ex.tunnel_data += data[offset:]
            self._pause(_PAUSE_UPGRADE)
        except httptools.HttpParserError as exc:
            self.bad_request(str(exc))

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.tunnel is not None:
            self.tunnel.write_eof()
            # Keep sending what the upstream still has to say, unless it is done too.
            return None if self.tunnel.eof or self.scheme == b"https" else True
        if self.queue and self.scheme == b"http":
            return True  # a half-closed client may still wait for the answer
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.face.connections.discard(self)
        self._cancel_idle()
        if self.tunnel is not None:
            self.tunnel.detach()
            self.tunnel = None
        for ex in self.queue:
            self._drop_upstream(ex)
        self.queue.clear()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.tunnel or (self.queue[0].upstream if self.queue else None)
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.tunnel or (self.queue[0].upstream if self.queue else None)
        if up is not None:
            up.resume_reading()

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._cancel_idle()
        self._url = []
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        ex = Exchange(self, parser.get_method(), b"".join(self._url), self._headers)
        ex.version = parser.get_http_version().encode("ascii")
        ex.keep_alive = parser.should_keep_alive()
        ex.upgrade = parser.should_upgrade()
        for name, value in ex.headers:
            lname = name.lower()
            if lname == b"transfer-encoding" and b"chunked" in value.lower():
                ex.chunked_in = ex.has_body = True
            elif lname == b"content-length" and value.strip() not in (b"0", b""):
                ex.has_body = True
        self.current = ex
        self.queue.append(ex)
        if len(self.queue) == 1:
            self.start(ex)
        else:
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.current
        if ex is None or ex.local or ex.response_done:
            return
        up = ex.upstream
        if up is not None and ex.buffered_size == 0:
            up.send_body(ex, body)
            return
        ex.buffered.append(body)
        ex.buffered_size += len(body)
        if ex.buffered_size > _BUFFER_LIMIT:
            self._pause(_PAUSE_BUFFERING)

    def on_message_complete(self) -> None:
        ex = self.current
        if ex is None:
            return
        ex.body_done = True
        if ex.upstream is not None and ex.buffered_size == 0:
            ex.upstream.end_body(ex)
        self.maybe_finish(ex)

    # -- serving one exchange -----------------------------------------------------------------

    def start(self, ex: Exchange) -> None:
        path = ex.path
        if path in (_READY, _HEALTH):
            self._answer_internal(ex, path)
            return
        match = self.face.table.match_path(path.decode("latin-1"))
        if match is None:
            self.respond_local(ex, 404, "Not Found")
            return
        ex.target, upstream_path = match
        ex.upstream_path = upstream_path.encode("latin-1")
        self.attach_upstream(ex)

    def attach_upstream(self, ex: Exchange) -> None:
        target = ex.target
        assert target is not None
        ex.attempts += 1
        pool = self.face.pool
        key = (target.host, target.port, target.tls)
        conn = pool.take(key) or pool.connect_in_process(key)
        if conn is not None:
            conn.begin(ex)
            return
        ex.connecting = self.face.loop.create_task(self._connect(ex, target))

    async def _connect(self, ex: Exchange, target: HttpTarget) -> None:
        try:
            conn = await self.face.pool.connect(target)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            ex.connecting = None
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            log.info("http: target %s unreachable: %s", target.host_header.decode(), why)
            self.respond_local(ex, 502, f"cannot reach the route's target: {why}")
            return
        ex.connecting = None
        if self.transport is None or ex.finished or ex.response_done:
            self.face.pool.give(conn)
            return
        conn.begin(ex)

    def request_head(self, ex: Exchange) -> bytes:
        """The request line and headers to send upstream."""
        target = ex.target
        assert target is not None
        path = ex.upstream_path
        if ex.query is not None:
            path = path + b"?" + ex.query
        out = [ex.method, b" ", path, b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
        forwarded_for = b""
        has_proto = has_host = False
        host = b""
        upgrade_to = b""
        connection_tokens: set[bytes] = set()
        for name, value in ex.headers:
            if name.lower() == b"connection":
                connection_tokens.update(t.strip().lower() for t in value.split(b","))
        for name, value in ex.headers:
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in connection_tokens:
                if lname == b"upgrade":
                    upgrade_to = value
                continue
            if lname == b"host":
                host = value
                continue
            if lname == b"x-forwarded-for":
                forwarded_for = value
                continue
            if lname == b"x-forwarded-proto":
                has_proto = True
            elif lname == b"x-forwarded-host":
                has_host = True
            out += (name, b": ", value, b"\r\n")
        client_ip = self.peer_ip
        if forwarded_for:
            out += (b"X-Forwarded-For: ", forwarded_for, b", ", client_ip, b"\r\n")
        else:
            out += (b"X-Forwarded-For: ", client_ip, b"\r\n")
        if not has_proto:
            out += (b"X-Forwarded-Proto: ", self.scheme, b"\r\n")
        if not has_host and host:
            out += (b"X-Forwarded-Host: ", host, b"\r\n")
        if ex.chunked_in:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if ex.upgrade and upgrade_to:
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_to, b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def maybe_finish(self, ex: Exchange) -> None:
        if ex.finished or not ex.response_done or not ex.body_done:
            return
        ex.finished = True
        if not self.queue or self.queue[0] is not ex:  # pragma: no cover - defensive
            return
        self.queue.popleft()
        if self.current is ex:
            self.current = None
        transport = self.transport
        if transport is None:
            return
        if not ex.keep_alive or self.eof:
            transport.close()
            return
        self._resume(_PAUSE_BUFFERING | _PAUSE_UPSTREAM_FULL)
        if self.queue:
            if len(self.queue) == 1:
                self._resume(_PAUSE_PIPELINE)
            self.start(self.queue[0])
        else:
            self._arm_idle()

    # -- writing to the client ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.face.counts["bytes_sent"] += len(data)
            transport.write(data)

    def respond_local(self, ex: Exchange, status: int, error: str) -> None:
        self.respond_json(ex, status, {"error": error})

    def respond_json(self, ex: Exchange, status: int, payload: dict[str, Any]) -> None:
        """Answer ``ex`` from the proxy itself (the request body, if any, is dropped)."""
        if ex.response_started:
            # Too late for a status line: all the client can learn is that the answer broke.
            self.abort()
            return
        self._drop_upstream(ex)
        ex.local = True
        ex.buffered.clear()
        ex.buffered_size = 0
        body = json.dumps(payload).encode()
        keep = ex.keep_alive and not ex.upgrade
        ex.keep_alive = keep
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
            status,
            _reason(status),
            len(body),
        )
        head += b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n"
        ex.response_started = True
        self.write(head if ex.head_only else head + body)
        ex.response_done = True
        if self.upgrading:
            self.upgrading = False
            ex.body_done = True
        self.maybe_finish(ex)

    def _answer_internal(self, ex: Exchange, path: bytes) -> None:
        if path == _READY:
            if self.face.is_ready():
                self.respond_json(ex, 200, {"status": "ready", "routes": len(self.face.table)})
            else:
                self.respond_json(ex, 503, {"error": "routes not loaded yet"})
        else:
            self.respond_json(ex, 200, {"status": "pass"})

    def bad_request(self, why: str) -> None:
        log.info("http: bad request from %s: %s", self.peer_ip.decode(), why)
        transport = self.transport
        if transport is None:
            return
        if not any(ex.response_started for ex in self.queue):
            body = json.dumps({"error": f"bad request: {why}"}).encode()
            transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- flow control ---------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        was = self.paused
        self.paused &= ~reason
        if was and not self.paused and self.transport is not None:
            self.transport.resume_reading()

    def upstream_full(self, full: bool) -> None:
        if full:
            self._pause(_PAUSE_UPSTREAM_FULL)
        else:
            self._resume(_PAUSE_UPSTREAM_FULL)

    def flushed_buffer(self, ex: Exchange) -> None:
        """The upstream took the body held while connecting."""
        if ex.body_done and ex.upstream is not None:
            ex.upstream.end_body(ex)
        self._resume(_PAUSE_BUFFERING)

    def _drop_upstream(self, ex: Exchange) -> None:
        if ex.connecting is not None:
            ex.connecting.cancel()
            ex.connecting = None
        if ex.upstream is not None:
            ex.upstream.detach()
            ex.upstream = None

    # -- the upgrade tunnel -------------------------------------------------------------------

    def start_tunnel(self, up: UpstreamConn, ex: Exchange) -> None:
        self.tunnel = up
        self.upgrading = False
        if ex.tunnel_data:
            up.write(bytes(ex.tunnel_data))
            ex.tunnel_data.clear()
        self._resume(_PAUSE_UPGRADE | _PAUSE_PIPELINE | _PAUSE_BUFFERING)
        if self.write_paused:
            up.pause_reading()
        if self.eof:
            up.write_eof()

    def write_eof(self) -> None:
        _half_close(self.transport, reading_done=self.eof)

    # -- idle keep-alive ------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self.idle_timer = self.face.loop.call_later(self.face.client_idle_timeout, self._idle)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.queue and self.transport is not None:
            self.transport.close()


class UpstreamConn(asyncio.Protocol):
    """A connection to a route's target, reused across requests while it stays keep-alive."""

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.reused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.read_paused = False
        self.tunnel: ClientConn | None = None
        self.eof = False
        self.got_bytes = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked_out = False
        self.close_delimited = False
        self.interim = False
        self.switching = False
        self.raw_left = 0
        """Body bytes of the current response still to pass through without parsing."""
        self.raw_keep_alive = False

    # -- request side ---------------------------------------------------------------------------

    def begin(self, ex: Exchange) -> None:
        client = ex.client
        self.ex = ex
        ex.upstream = self
        self.got_bytes = False
        self.status = 0
        self.headers = []
        self.chunked_out = self.close_delimited = self.interim = self.switching = False
        self.raw_left = 0
        if self.read_paused and not client.write_paused:
            self.resume_reading()
        elif client.write_paused:
            self.pause_reading()
        head = client.request_head(ex)
        transport = self.transport
        assert transport is not None
        if ex.buffered:
            data = b"".join(ex.buffered)
            ex.buffered.clear()
            ex.buffered_size = 0
            transport.write(head)
            self.send_body(ex, data)
            client.flushed_buffer(ex)
        else:
            transport.write(head)
            if ex.body_done:
                self.end_body(ex)

    def send_body(self, ex: Exchange, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or not data:
            return
        ex.body_sent = True
        if ex.chunked_in:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            transport.write(data)

    def end_body(self, ex: Exchange) -> None:
        transport = self.transport
        if ex.chunked_in and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def write_eof(self) -> None:
        _half_close(self.transport, reading_done=self.eof)

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        _tune(transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        ex = self.ex
        if ex is None:
            self.close()  # an idle keep-alive connection must not talk
            return
        self.got_bytes = True
        if self.raw_left:
            self._pass_body(ex, data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
            if self.switching and self.ex is not None:
                self._open_tunnel(self.ex, data[offset:])
            else:
                self._broken("upgrade without 101")
        except httptools.HttpParserError as exc:
            self._broken(f"bad response: {exc}")

    def _pass_body(self, ex: Exchange, data: bytes) -> None:
        """Forward Content-Length body bytes as they are, without the parser (one copy less)."""
        left = self.raw_left
        if len(data) <= left:
            self.raw_left = left - len(data)
            ex.client.write(data)
            rest = b""
        else:
            self.raw_left = 0
            ex.client.write(data[:left])
            rest = data[left:]
        if self.raw_left == 0:
            # The parser was left waiting for the body it never saw: start a fresh one.
            self.parser = httptools.HttpResponseParser(self)
            self._finish_response(reusable=self.raw_keep_alive)
            if rest:
                self.data_received(rest)  # nothing is expected: this closes the connection

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.tunnel is not None:
            self.tunnel.write_eof()
            return None if self.tunnel.eof or self.key[2] else True
        ex = self.ex
        if ex is not None and self.close_delimited and ex.response_started:
            self._finish_response(reusable=False)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_idle()
        self.pool.forget(self)
        transport, self.transport = self.transport, None
        del transport
        if self.tunnel is not None:
            client, self.tunnel = self.tunnel, None
            client.write_eof()
            if client.transport is not None:
                client.transport.close()
            return
        ex = self.ex
        if ex is None:
            return
        if self.close_delimited and ex.response_started and not ex.response_done:
            self._finish_response(reusable=False)
            return
        if ex.response_done:
            return
        self.ex = None
        ex.upstream = None
        if not ex.response_started:
            if self.reused and not self.got_bytes and not ex.body_sent and ex.attempts < 3:
                # A kept-alive connection the target had closed meanwhile: try a fresh one.
                ex.client.attach_upstream(ex)
                return
            ex.client.respond_local(ex, 502, "the route's target closed the connection")
        else:
            ex.client.abort()  # the answer is cut short: tell the client the only way we can

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel._pause(_PAUSE_UPSTREAM_FULL)
        elif self.ex is not None:
            self.ex.client.upstream_full(True)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel._resume(_PAUSE_UPSTREAM_FULL)
        elif self.ex is not None:
            self.ex.client.upstream_full(False)

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            return
        client = ex.client
        code = self.parser.get_status_code()
        self.status = code
        reason = self.reason or _reason(code)
        out = [b"HTTP/1.1 %d %s\r\n" % (code, reason)]
        content_length = -1
        chunked = False
        upgrade_to = b""
        connection_tokens: set[bytes] = set()
        for name, value in self.headers:
            if name.lower() == b"connection":
                connection_tokens.update(t.strip().lower() for t in value.split(b","))
        for name, value in self.headers:
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in connection_tokens:
                if lname == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif lname == b"upgrade":
                    upgrade_to = value
                continue
            if lname == b"content-length":
                content_length = int(value) if value.strip().isdigit() else 0
            elif lname == b"location" and ex.target is not None:
                value = ex.target.public_location(value)
            out += (name, b": ", value, b"\r\n")
        if 100 <= code < 200 and code != 101:
            self.interim = True
            out.append(b"\r\n")
            client.write(b"".join(out))
            return
        if code == 101:
            if not ex.upgrade:
                self._broken("101 to a request that asked for no upgrade")
                return
            self.switching = True
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_to, b"\r\n\r\n")
            ex.response_started = True
            client.write(b"".join(out))
            return
        no_body = ex.head_only or code in (204, 304)
        keep = ex.keep_alive and not ex.upgrade
        if not no_body and content_length < 0:
            if ex.version == b"1.1":
                self.chunked_out = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False  # an HTTP/1.0 client learns the end of the body from the close
            self.close_delimited = not chunked
        ex.keep_alive = keep
        if keep:
            if ex.version != b"1.1":
                out.append(b"Connection: keep-alive\r\n")
        else:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        ex.response_started = True
        client.write(b"".join(out))
        if ex.head_only:
            # llhttp would wait for the Content-Length bytes a HEAD answer never has.
            self._finish_response(reusable=False)
        elif not no_body and content_length > 0:
            # What this chunk holds of the body goes through on_body; later chunks bypass the
            # parser in data_received until the length is reached.
            self.raw_left = content_length
            self.raw_keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None or not body:
            return
        if self.raw_left:
            self.raw_left -= len(body)
        if self.chunked_out:
            ex.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            ex.client.write(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.switching or self.ex is None:
            return
        self._finish_response(reusable=self.parser.should_keep_alive())

    # -- endings --------------------------------------------------------------------------------

    def _finish_response(self, *, reusable: bool) -> None:
        ex = self.ex
        if ex is None:
            return
        self.ex = None
        ex.upstream = None
        if self.chunked_out:
            ex.client.write(b"0\r\n\r\n")
        ex.response_done = True
        if reusable and ex.body_done and not self.eof and self.transport is not None:
            self.pool.give(self)
        else:
            self.close()
        ex.client.maybe_finish(ex)

    def _open_tunnel(self, ex: Exchange, extra: bytes) -> None:
        client = ex.client
        self.ex = None
        ex.upstream = None
        self.tunnel = client
        if extra:
            client.write(extra)
        # The exchange is over for the HTTP machinery; both sides now carry raw bytes.
        ex.response_done = ex.body_done = ex.finished = True
        if client.queue and client.queue[0] is ex:
            client.queue.popleft()
        client.current = None
        client.start_tunnel(self, ex)

    def _broken(self, why: str) -> None:
        ex = self.ex
        log.info("http: target %s: %s", self.key[0], why)
        self.ex = None
        self.close()
        if ex is not None:
            ex.upstream = None
            ex.client.respond_local(ex, 502, f"the route's target sent a bad answer: {why}")

    def detach(self) -> None:
        """The client gave up on its exchange: drop it and this connection with it."""
        self.ex = None
        if self.tunnel is not None:
            self.tunnel = None
        self.close()

    def close(self) -> None:
        self._cancel_idle()
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None


class UpstreamPool:
    """Idle keep-alive connections to HTTP targets, most recently used first."""

    def __init__(
        self, *, loop: asyncio.AbstractEventLoop, connect_timeout: float, idle_timeout: float
    ) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.idle: dict[PoolKey, list[UpstreamConn]] = {}
        self.in_process: dict[PoolKey, Callable[[], asyncio.BaseProtocol]] = {}
        """Targets served by a server in this event loop: its protocol factory (a connection
        to it is a `gateway_proxy.memory` pair, no socket)."""
        self._in_process_count = 0
        self._client_tls: ssl.SSLContext | None = None

    def connect_in_process(self, key: PoolKey) -> UpstreamConn | None:
        """A new in-memory connection to ``key`` if a server in this event loop serves it."""
        factory = self.in_process.get(key)
        if factory is None:
            return None
        conn = UpstreamConn(self, key)
        # No port on the proxy's side: a connection number in the ephemeral range stands in
        # for one, so that the server can tell its connections apart as over TCP.
        self._in_process_count += 1
        local = (key[0], 49152 + self._in_process_count % 16384)
        remote = (key[0], key[1])
        connect_in_memory(
            self.loop,
            conn,
            factory,
            client_extra={"peername": remote, "sockname": local},
            server_extra={"peername": local, "sockname": remote},
        )
        return conn

    async def connect(self, target: HttpTarget) -> UpstreamConn:
        key = (target.host, target.port, target.tls)
        context = None
        if target.tls:
            if self._client_tls is None:
                self._client_tls = ssl.create_default_context()
            context = self._client_tls
        _, protocol = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConn(self, key), target.host, target.port, ssl=context
            ),
            self.connect_timeout,
        )
        return protocol

    def take(self, key: PoolKey) -> UpstreamConn | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            conn._cancel_idle()
            if conn.transport is not None and not conn.transport.is_closing() and not conn.eof:
                conn.reused = True
                return conn
        return None

    def give(self, conn: UpstreamConn) -> None:
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= _POOL_PER_TARGET:
            conns.pop(0).close()
        conn.resume_reading()
        conn.idle_timer = self.loop.call_later(self.idle_timeout, conn.close)
        conns.append(conn)

    def forget(self, conn: UpstreamConn) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close(self) -> None:
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn.close()
        self.idle.clear()
