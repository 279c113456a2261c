"""Unit tests of the ClientHello parser on real hellos from Python's ssl module.

Owns the record helpers (re-fragmenting a hello over several TLS records, inflating it with a
padding extension) and the checks: SNI found, every split point, limits, malformed input.
"""

from __future__ import annotations

import random

import pytest
from conftest import client_hello

from gateway_proxy.hello import (
    BadHello,
    HelloError,
    HelloTooLarge,
    NotTLS,
    parse_client_hello,
)

pytestmark = pytest.mark.unit


def handshake_of(records: bytes) -> bytes:
    """The handshake bytes carried by a run of TLS records."""
    out = bytearray()
    pos = 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        out += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def as_records(handshake: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """Fragment handshake bytes into records of the given payload sizes (last takes the rest)."""
    out = bytearray()
    pos = 0
    for size in [*sizes, len(handshake)]:
        chunk = handshake[pos : pos + size]
        if not chunk:
            break
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return bytes(out)


def inflate(records: bytes, extra: int) -> bytes:
    """The same hello with a padding extension (type 21) of ``extra`` bytes appended."""
    hs = handshake_of(records)
    body = bytearray(hs[4:])
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    padding = (21).to_bytes(2, "big") + extra.to_bytes(2, "big") + bytes(extra)
    body[pos : pos + 2] = (ext_len + len(padding)).to_bytes(2, "big")
    body += padding
    new_hs = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return as_records(new_hs, [16384] * (len(new_hs) // 16384))


@pytest.mark.parametrize("tls13", [True, False])
def test_real_hello_gives_its_server_name(tls13: bool) -> None:
    hello = client_hello("daskgateway-0123abcd", tls13=tls13)
    result = parse_client_hello(hello)
    assert result.complete
    assert result.sni == "daskgateway-0123abcd"
    assert result.size == len(hello)


def test_hello_without_server_name() -> None:
    result = parse_client_hello(client_hello(None))
    assert result.complete and result.sni is None


def test_every_prefix_asks_for_more_and_never_overshoots() -> None:
    hello = client_hello("daskgateway-split")
    for cut in range(len(hello)):
        result = parse_client_hello(hello[:cut])
        assert not result.complete, cut
        assert cut < result.need <= len(hello), (cut, result.need)
    assert parse_client_hello(hello).sni == "daskgateway-split"


def test_bytes_after_the_hello_are_ignored() -> None:
    hello = client_hello("daskgateway-x")
    result = parse_client_hello(hello + b"\x17\x03\x03\x00\x05hello")
    assert result.sni == "daskgateway-x" and result.size == len(hello)


@pytest.mark.parametrize("sizes", [[1], [3, 4], [1, 1, 1, 1, 1], [50, 7, 300], [100] * 10])
def test_hello_fragmented_over_records(sizes: list[int]) -> None:
    hs = handshake_of(client_hello("daskgateway-records"))
    records = as_records(hs, sizes)
    assert records.count(b"\x16\x03\x01") >= min(len(sizes) + 1, len(hs) // 100)
    result = parse_client_hello(records)
    assert result.complete and result.sni == "daskgateway-records"
    assert result.size == len(records)
    # ... and over segments too: every prefix is incomplete.
    for cut in range(0, len(records), 7):
        partial = parse_client_hello(records[:cut])
        assert not partial.complete and cut < partial.need <= len(records)


def test_large_hello_over_several_records_within_the_limit() -> None:
    big = inflate(client_hello("daskgateway-big"), 20000)
    assert len(big) > 20000 and big.count(b"\x16\x03\x01") >= 2
    result = parse_client_hello(big, max_size=32 * 1024)
    assert result.complete and result.sni == "daskgateway-big"


def test_oversize_hello_is_refused_as_soon_as_its_length_is_known() -> None:
    big = inflate(client_hello("daskgateway-big"), 20000)
    with pytest.raises(HelloTooLarge):
        parse_client_hello(big, max_size=16 * 1024)
    # The first record and the handshake header are enough to know.
    with pytest.raises(HelloTooLarge):
        parse_client_hello(big[:16], max_size=16 * 1024)
    # A record header announcing more than the limit is refused at once too.
    with pytest.raises(HelloTooLarge):
        parse_client_hello(b"\x16\x03\x01\x40\x00", max_size=1024)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x80\x2e\x01\x00\x02",  # SSLv2-style hello
        b"\x17\x03\x03\x00\x10",  # application data first
        b"\x16\x02\x00",  # not version 3
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ],
)
def test_non_tls_bytes(data: bytes) -> None:
    with pytest.raises(NotTLS):
        parse_client_hello(data)


def test_malformed_hellos() -> None:
    hs = handshake_of(client_hello("daskgateway-bad"))
    cases = {
        "zero-length record": b"\x16\x03\x01\x00\x00",
        "record over 2^14": b"\x16\x03\x01\x40\x01",
        "server hello": as_records(b"\x02" + hs[1:], []),
        "alert inside": as_records(hs, [10])[:15] + b"\x15\x03\x01\x00\x02\x02\x28",
        "body truncated inside": as_records(b"\x01" + (36).to_bytes(3, "big") + hs[4:40], []),
        "session id too long": as_records(
            hs[:4] + hs[4:38] + b"\x40" + bytes(64) + hs[39 + hs[38] :], []
        ),
    }
    for name, data in cases.items():
        with pytest.raises(HelloError):
            parse_client_hello(data)
            pytest.fail(name)


def test_lying_inner_lengths_are_bad_hellos() -> None:
    hs = bytearray(handshake_of(client_hello("daskgateway-lie")))
    # The extensions length claims more than the body holds.
    body = hs[4:]
    pos = 34 + 1 + body[34]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    body[pos : pos + 2] = b"\xff\xff"
    with pytest.raises(BadHello):
        parse_client_hello(as_records(hs[:4] + body, []))


def test_random_mutations_only_ever_raise_hello_errors() -> None:
    rng = random.Random(1234)
    hello = client_hello("daskgateway-fuzz")
    outcomes = {"ok": 0, "more": 0, "error": 0}
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(1, len(data))] if rng.random() < 0.3 else data
        try:
            result = parse_client_hello(bytes(data))
        except HelloError:
            outcomes["error"] += 1
        else:
            outcomes["ok" if result.complete else "more"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
