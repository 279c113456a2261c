"""Tests of the TLS-SNI face on loopback: routing, refusals, timeouts, half-close, load.

Owns end-to-end checks with real TLS clients and servers (trustme certificates), raw sockets
for malformed input, and plain TCP targets where the test must see every byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import time

import pytest
from conftest import (
    LOOPBACK,
    client_context,
    client_hello,
    read_until_eof,
    server_context,
)

from gateway_proxy import Route
from gateway_proxy.addresses import split_address

pytestmark = pytest.mark.unit

AT_ONCE = 3.0
"""Seconds within which "closed at once" must happen: far below the 10 s handshake timeout
these proxies run with, and generous enough for a loaded CI machine."""


def sni(name: str, target: str) -> Route:
    return Route(kind="SNI", key=name, target=target)


async def tls_roundtrip(address: str, server_name: str, ca, payload: bytes = b"ping") -> bytes:
    host, port = split_address(address)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=client_context(ca), server_hostname=server_name
    )
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def expect_closed(address: str, data: bytes, timeout: float = 5.0) -> float:
    """Send ``data`` raw; return how long the proxy took to close the connection."""
    host, port = split_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    if data:
        writer.write(data)
    try:
        rest = await read_until_eof(reader, timeout)
    except ConnectionResetError:
        rest = b""
    writer.close()
    assert rest == b""
    return time.monotonic() - started


async def test_routes_by_server_name_to_the_right_cluster(ca, make_echo, make_proxy) -> None:
    one = await make_echo(server_context(ca, "daskgateway-one"))
    two = await make_echo(server_context(ca, "daskgateway-two"))
    proxy = await make_proxy([sni("one", one.target), sni("two", two.target)])
    assert await tls_roundtrip(proxy.tcp_address, "daskgateway-one", ca, b"a" * 1000) == b"a" * 1000
    assert await tls_roundtrip(proxy.tcp_address, "daskgateway-two", ca) == b"ping"
    assert (one.connections, two.connections) == (1, 1)


async def test_separate_tcp_port(ca, make_echo, make_proxy) -> None:
    echo = await make_echo(server_context(ca, "daskgateway-sep"))
    proxy = await make_proxy([sni("sep", echo.target)], tcp_address="auto")
    assert proxy.address != proxy.tcp_address
    assert await tls_roundtrip(proxy.tcp_address, "daskgateway-sep", ca) == b"ping"


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x01garbage", b"SSH-2.0-x\r\n"]
)
async def test_non_tls_bytes_are_closed_at_once(make_proxy, caplog, data: bytes) -> None:
    proxy = await make_proxy(tcp_address="auto")
    with caplog.at_level(logging.INFO, logger="gateway.proxy"):
        assert await expect_closed(proxy.tcp_address, data) < AT_ONCE
    assert len([r for r in caplog.records if "tls-sni: closed" in r.getMessage()]) == 1


async def test_unknown_server_name_is_closed_with_one_log_line(make_proxy, caplog) -> None:
    proxy = await make_proxy([sni("known", f"tls://{LOOPBACK}:9")])
    with caplog.at_level(logging.INFO, logger="gateway.proxy"):
        assert await expect_closed(proxy.tcp_address, client_hello("daskgateway-nope")) < AT_ONCE
    lines = [r.getMessage() for r in caplog.records if "tls-sni: closed" in r.getMessage()]
    assert len(lines) == 1 and "daskgateway-nope" in lines[0]


async def test_tls_without_the_prefix_is_closed_on_the_tcp_port(make_proxy) -> None:
    proxy = await make_proxy([sni("x", f"tls://{LOOPBACK}:9")], tcp_address="auto")
    assert await expect_closed(proxy.tcp_address, client_hello("x")) < AT_ONCE
    assert await expect_closed(proxy.tcp_address, client_hello(None)) < AT_ONCE


async def test_oversize_hello_is_closed(make_proxy) -> None:
    proxy = await make_proxy(max_hello_size=4096)
    # A handshake header announcing 1 MiB: refused once the header is in.
    header = b"\x16\x03\x01\x40\x00\x01\x10\x00\x00" + bytes(100)
    assert await expect_closed(proxy.tcp_address, header) < AT_ONCE
    # Records that keep coming without completing the hello: refused at the limit.
    host, port = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(host, port)
    hs = b"\x01\x00\x40\x00" + bytes(3000)
    for i in range(0, len(hs), 1000):
        chunk = hs[i : i + 1000]
        writer.write(b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk)
    writer.write(b"\x16\x03\x01\x03\xe8" + bytes(1000))
    try:
        rest = await read_until_eof(reader)
    except ConnectionResetError:  # closed with the peeked bytes unread: a reset
        rest = b""
    assert rest == b""
    writer.close()


async def test_silent_client_is_closed_after_the_handshake_timeout(make_proxy, caplog) -> None:
    proxy = await make_proxy(handshake_timeout=0.3)
    with caplog.at_level(logging.INFO, logger="gateway.proxy"):
        took = await expect_closed(proxy.tcp_address, b"", timeout=3.0)
    assert 0.25 < took < 5.0
    assert any("no ClientHello within" in r.getMessage() for r in caplog.records)


async def test_incomplete_hello_is_closed_after_the_handshake_timeout(make_proxy) -> None:
    proxy = await make_proxy(handshake_timeout=0.3)
    hello = client_hello("daskgateway-slow")
    took = await expect_closed(proxy.tcp_address, hello[: len(hello) // 2], timeout=3.0)
    assert 0.25 < took < 5.0


async def test_hello_trickled_byte_by_byte_is_routed(ca, make_echo, make_proxy) -> None:
    echo = await make_echo()
    proxy = await make_proxy([sni("slow", echo.target)])
    hello = client_hello("daskgateway-slow")
    host, port = split_address(proxy.tcp_address)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        for i in range(0, len(hello), 37):
            await loop.sock_sendall(sock, hello[i : i + 37])
            await asyncio.sleep(0.002)
        received = b""
        async with asyncio.timeout(5):
            while len(received) < len(hello):
                received += await loop.sock_recv(sock, 65536)
        assert received == hello  # the plain echo target got the hello intact
    finally:
        sock.close()


async def test_hello_fragmented_over_records_completes_a_real_handshake(
    ca, make_echo, make_proxy
) -> None:
    from test_hello import as_records, handshake_of

    echo = await make_echo(server_context(ca, "daskgateway-frag"))
    proxy = await make_proxy([sni("frag", echo.target)])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="daskgateway-frag")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    fragmented = as_records(handshake_of(outgoing.read()), [40, 1, 100])
    host, port = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(fragmented)
    async with asyncio.timeout(5):
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if data := outgoing.read():
                    writer.write(data)
                incoming.write(await reader.read(65536))
        if data := outgoing.read():
            writer.write(data)
        tls.write(b"through")
        writer.write(outgoing.read())
        got = b""
        while not got:
            incoming.write(await reader.read(65536))
            try:
                got = tls.read(100)
            except ssl.SSLWantReadError:
                continue
    assert got == b"through"
    writer.close()


async def test_target_refusing_closes_the_client(make_proxy, caplog) -> None:
    closed = socket.socket()
    closed.bind((LOOPBACK, 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    proxy = await make_proxy([sni("down", f"tls://{LOOPBACK}:{port}")])
    with caplog.at_level(logging.INFO, logger="gateway.proxy"):
        assert await expect_closed(proxy.tcp_address, client_hello("daskgateway-down")) < AT_ONCE
    assert any("refused" in r.getMessage() for r in caplog.records)


async def test_deleted_route_keeps_open_connections_and_refuses_new(
    ca, make_echo, make_proxy
) -> None:
    echo = await make_echo(server_context(ca, "daskgateway-gone"))
    route = sni("gone", echo.target)
    proxy = await make_proxy([route])
    host, port = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=client_context(ca), server_hostname="daskgateway-gone"
    )
    writer.write(b"before")
    assert await reader.readexactly(6) == b"before"
    proxy.delete(route)
    writer.write(b"after-delete")
    assert await reader.readexactly(12) == b"after-delete"
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await tls_roundtrip(proxy.tcp_address, "daskgateway-gone", ca)
    writer.write(b"still")
    assert await reader.readexactly(5) == b"still"
    writer.close()


async def test_half_close_is_passed_on_both_ways(make_proxy) -> None:
    """The client shuts down writing; the target sees EOF, answers, and closes."""
    received = asyncio.get_running_loop().create_future()

    async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        data = await reader.read()  # until EOF: only a half-close gets us past this
        received.set_result(data)
        writer.write(hashlib.sha256(data).digest() * 1000)
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(digest_after_eof, LOOPBACK, 0)
    port = target.sockets[0].getsockname()[1]
    proxy = await make_proxy([sni("half", f"tls://{LOOPBACK}:{port}")])
    sent = client_hello("daskgateway-half") + os.urandom(300_000)
    host, pport = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(host, pport)
    writer.write(sent)
    await writer.drain()
    writer.write_eof()
    answer = await read_until_eof(reader)
    assert await asyncio.wait_for(received, 5) == sent
    assert answer == hashlib.sha256(sent).digest() * 1000
    writer.close()
    target.close()
    await target.wait_closed()


@pytest.mark.parametrize("splice", [True, False])
async def test_bulk_both_ways_at_once(make_proxy, splice: bool) -> None:
    """Both directions full at once, copied or spliced: every byte arrives, in order."""
    up_blob, down_blob = os.urandom(6 * 1024 * 1024), os.urandom(6 * 1024 * 1024)
    got_up = asyncio.get_running_loop().create_future()

    async def both(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            writer.write(down_blob)
            await writer.drain()
            writer.write_eof()

        sending = asyncio.ensure_future(send())
        got_up.set_result(await reader.read())
        await sending
        writer.close()

    target = await asyncio.start_server(both, LOOPBACK, 0)
    port = target.sockets[0].getsockname()[1]
    proxy = await make_proxy([sni("bulk", f"tls://{LOOPBACK}:{port}")], splice=splice)
    hello = client_hello("daskgateway-bulk")
    host, pport = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(host, pport)

    async def upload() -> None:
        writer.write(hello + up_blob)
        await writer.drain()
        writer.write_eof()

    async with asyncio.timeout(30):
        _, down = await asyncio.gather(upload(), reader.read())
        assert await got_up == hello + up_blob
    assert down == down_blob
    splicer = proxy.splicer
    assert splicer is not None
    assert (splicer.spliced_reads > 0) is splice
    traffic = proxy.traffic()["tls_sni"]  # what core's gateway_proxy_* metrics read
    assert traffic["connections"] == 1
    assert len(up_blob) <= traffic["bytes_received"] <= len(hello + up_blob)
    assert traffic["bytes_sent"] == len(down_blob)
    writer.close()
    target.close()
    await target.wait_closed()


async def test_a_slow_reader_gets_every_byte(make_proxy) -> None:
    """Backpressure: the target writes far faster than the client reads."""
    blob = os.urandom(8 * 1024 * 1024)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.read(1)
        writer.write(blob)
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(flood, LOOPBACK, 0)
    port = target.sockets[0].getsockname()[1]
    proxy = await make_proxy([sni("flood", f"tls://{LOOPBACK}:{port}")])
    host, pport = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(host, pport, limit=1024)
    writer.write(client_hello("daskgateway-flood"))
    got = bytearray()
    async with asyncio.timeout(20):
        while chunk := await reader.read(4096):
            got += chunk
            if len(got) < 512 * 1024:
                await asyncio.sleep(0.001)
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
    writer.close()
    target.close()
    await target.wait_closed()


async def test_thousand_concurrent_connections_every_byte_checked(make_echo, make_proxy) -> None:
    echo = await make_echo()  # plain echo: the TLS layer is not what is tested here
    proxy = await make_proxy([sni(f"c{i}", echo.target) for i in range(10)], backlog=2048)
    host, port = split_address(proxy.tcp_address)
    hellos = [client_hello(f"daskgateway-c{i}") for i in range(10)]

    async def one(i: int) -> bool:
        payload = hellos[i % 10] + os.urandom(20_000 + i)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(payload)
            await writer.drain()
            echoed = await reader.readexactly(len(payload))
        finally:
            writer.close()
        return echoed == payload

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert all(results)
    assert echo.connections == 1000
    assert proxy.sni is not None and proxy.sni.counts["routed"] == 1000


async def test_stop_closes_spliced_and_handshaking_connections(ca, make_echo, make_proxy) -> None:
    echo = await make_echo(server_context(ca, "daskgateway-stop"))
    proxy = await make_proxy([sni("stop", echo.target)])
    host, port = split_address(proxy.tcp_address)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=client_context(ca), server_hostname="daskgateway-stop"
    )
    writer.write(b"x")
    await reader.readexactly(1)
    silent_reader, silent_writer = await asyncio.open_connection(host, port)
    await asyncio.sleep(0.05)
    await proxy.stop()
    assert await read_until_eof(silent_reader) == b""
    with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.close()
    silent_writer.close()
