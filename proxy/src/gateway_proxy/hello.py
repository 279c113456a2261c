"""Reading the server name (SNI) from a TLS ClientHello without decrypting anything.

Owns the incremental ClientHello parser the TLS-SNI face runs on peeked bytes: record
reassembly (a hello split over TCP segments or TLS records), size limits and malformed input.
"""

from __future__ import annotations

from attrs import define

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXTENSION_SERVER_NAME = 0x0000
NAME_TYPE_HOST_NAME = 0x00
MAX_RECORD_PAYLOAD = 1 << 14
"""RFC 8446 5.1: a plaintext record carries at most 2^14 bytes."""
DEFAULT_MAX_HELLO = 32 * 1024
"""Bytes (records and their headers) the proxy reads at most before giving up on a hello."""


class HelloError(Exception):
    """The bytes are not a ClientHello the proxy can route."""


class NotTLS(HelloError):
    """The first bytes are not a TLS handshake record (plain HTTP, SSLv2, garbage)."""


class BadHello(HelloError):
    """A TLS handshake record that does not hold a well-formed ClientHello."""


class HelloTooLarge(HelloError):
    """The ClientHello (with its record headers) is larger than the limit."""


@define(kw_only=True, frozen=True, slots=True)
class Hello:
    """The outcome of parsing what has arrived so far.

    ``complete`` false: wait until at least ``need`` bytes in total have arrived, then parse
    again from the start. ``complete`` true: ``sni`` is the first host name of the server_name
    extension (None without one) and ``size`` the bytes of the records that held the hello.
    """

    complete: bool
    need: int = 0
    sni: str | None = None
    size: int = 0


def parse_client_hello(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_HELLO
) -> Hello:
    """Parse the ClientHello at the start of ``data`` (all bytes the client sent so far).

    Raises `NotTLS` when the very first record is not a TLS handshake record, `BadHello` for a
    malformed hello, `HelloTooLarge` when completing it would take more than ``max_size`` bytes.
    """
    buf = bytes(data)
    total = len(buf)
    handshake = bytearray()
    pos = 0
    while True:
        available = total - pos
        if available >= 1 and buf[pos] != RECORD_HANDSHAKE:
            if pos == 0:
                raise NotTLS(f"first byte 0x{buf[0]:02x} is not a TLS handshake record")
            raise BadHello(f"record type 0x{buf[pos]:02x} inside a ClientHello")
        if available >= 2 and buf[pos + 1] != 3:
            if pos == 0:
                raise NotTLS(f"record version major {buf[1]} is not TLS")
            raise BadHello(f"record version major {buf[pos + 1]} inside a ClientHello")
        if available < 5:
            return _incomplete(pos + 5 + _still_missing(handshake), max_size)
        length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if length == 0 or length > MAX_RECORD_PAYLOAD:
            raise BadHello(f"handshake record of {length} bytes")
        end = pos + 5 + length
        if end > max_size:
            raise HelloTooLarge(f"ClientHello needs more than {max_size} bytes")
        if total < end:
            return _incomplete(end, max_size)
        handshake += buf[pos + 5 : end]
        pos = end
        if len(handshake) >= 4:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise BadHello(f"handshake message type {handshake[0]} is not a ClientHello")
            body_len = int.from_bytes(handshake[1:4], "big")
            if 4 + body_len > max_size:
                raise HelloTooLarge(f"ClientHello of {body_len} bytes exceeds {max_size}")
            if len(handshake) >= 4 + body_len:
                body = bytes(handshake[4 : 4 + body_len])
                return Hello(complete=True, sni=_server_name(body), size=pos)


def _still_missing(handshake: bytearray) -> int:
    """Handshake bytes still to come, when known (every further record carries at least one)."""
    if len(handshake) < 4:
        return 0
    return max(0, 4 + int.from_bytes(handshake[1:4], "big") - len(handshake))


def _incomplete(need: int, max_size: int) -> Hello:
    if need > max_size:
        raise HelloTooLarge(f"ClientHello needs more than {max_size} bytes")
    return Hello(complete=False, need=need)


class _Reader:
    """Bounds-checked big-endian reads over one ClientHello body."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise BadHello(f"ClientHello truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes: int, what: str) -> _Reader:
        n = self.uint(len_bytes, what)
        if self.pos + n > self.end:
            raise BadHello(f"ClientHello {what} overruns its container")
        sub = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub

    @property
    def remaining(self) -> int:
        return self.end - self.pos


def _server_name(body: bytes) -> str | None:
    r = _Reader(body)
    r.take(2, "legacy_version")
    r.take(32, "random")
    session_id = r.vector(1, "session id")
    if session_id.remaining > 32:
        raise BadHello("session id longer than 32 bytes")
    suites = r.vector(2, "cipher suites")
    if suites.remaining == 0 or suites.remaining % 2:
        raise BadHello("cipher suite list is empty or odd-sized")
    if r.vector(1, "compression methods").remaining == 0:
        raise BadHello("compression method list is empty")
    if r.remaining == 0:
        return None  # a hello without extensions (TLS 1.0 style)
    extensions = r.vector(2, "extensions")
    if r.remaining:
        raise BadHello("bytes after the extensions")
    sni: str | None = None
    while extensions.remaining:
        ext_type = extensions.uint(2, "extension type")
        ext = extensions.vector(2, "extension")
        if ext_type != EXTENSION_SERVER_NAME:
            continue
        if sni is not None:
            raise BadHello("two server_name extensions")
        names = ext.vector(2, "server name list")
        while names.remaining:
            name_type = names.uint(1, "server name type")
            name = names.vector(2, "server name")
            raw = name.take(name.remaining, "server name")
            if name_type == NAME_TYPE_HOST_NAME and sni is None:
                sni = _host_name(raw)
    return sni


def _host_name(raw: bytes) -> str:
    if not raw or len(raw) > 255:
        raise BadHello(f"server name of {len(raw)} bytes")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadHello("server name is not ASCII") from None
    if not name.isprintable() or " " in name:
        raise BadHello("server name holds control characters or spaces")
    return name
