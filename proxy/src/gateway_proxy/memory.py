"""In-process connections: two asyncio transports joined in memory, with no socket between them.

Owns `connect_in_memory` (a connected pair of protocols) and `MemoryTransport`, one end of such
a pair; the HTTP face uses them to reach an HTTP server in its own event loop (the gateway's
API, when the proxy is embedded in the gateway) without a loopback TCP connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

HIGH_WATER = 64 * 1024
"""Default bytes one end may have waiting at the other before its writer is paused."""


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory connection, behaving as a TCP transport does for its protocol.

    What one end writes reaches the other end's protocol in order, on a later turn of the
    event loop (never from inside `write`, so protocols see the same call order as over a
    socket). While an end's reading is paused the data waits there, and once more than the
    writer's high-water mark waits the writer's protocol gets ``pause_writing`` (then
    ``resume_writing`` at the low-water mark). `write_eof` gives the other end
    ``eof_received`` after the data; `close` ends this end (``connection_lost(None)``) and
    gives the other end an end of file, as a peer's FIN does; `abort` drops what waits and
    the other end loses its connection with `ConnectionResetError`, as on a reset.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.BaseProtocol,
        extra: Mapping[str, Any],
    ) -> None:
        super().__init__(dict(extra))
        self._loop = loop
        # A stream protocol (data_received, eof_received), as a TCP transport is given.
        self._protocol = cast(asyncio.Protocol, protocol)
        self._peer: MemoryTransport | None = None
        self._inbox: deque[bytes] = deque()
        self._inbox_size = 0
        self._eof_in = False
        """The peer ended its writing: ``eof_received`` is due once the inbox is empty."""
        self._eof_given = False
        self._reset_in = False
        """The peer aborted: this end is lost with `ConnectionResetError`."""
        self._reading_paused = False
        self._scheduled = False
        self._closing = False
        self._lost = False
        self._eof_out = False
        self._writer_paused = False
        self._high = HIGH_WATER
        self._low = HIGH_WATER // 4

    # -- asyncio.BaseTransport --------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._inbox.clear()
        self._inbox_size = 0
        peer, self._peer = self._peer, None
        if peer is not None:
            peer._peer = None
            peer._eof_in = True
            peer._schedule()
            if peer._writer_paused:  # nothing waits here any more
                peer._writer_paused = False
                self._loop.call_soon(peer._protocol.resume_writing)
        self._loop.call_soon(self._lose, None)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    # -- asyncio.ReadTransport --------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._schedule()

    # -- asyncio.WriteTransport -------------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        """Bytes written by this end that the other end's protocol has not been given yet."""
        peer = self._peer
        return peer._inbox_size if peer is not None else 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_out:
            raise RuntimeError("Cannot call write() after write_eof()")
        peer = self._peer
        if self._closing or peer is None or not data:
            return  # as after a peer's close: the bytes go nowhere
        chunk = bytes(data)
        peer._inbox.append(chunk)
        peer._inbox_size += len(chunk)
        peer._schedule()
        if not self._writer_paused and peer._inbox_size > self._high:
            self._writer_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if self._eof_out or self._closing:
            return
        self._eof_out = True
        peer = self._peer
        if peer is not None:
            peer._eof_in = True
            peer._schedule()

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        if self._lost:
            return
        peer, self._peer = self._peer, None
        self._closing = True
        self._inbox.clear()
        self._inbox_size = 0
        if peer is not None and not peer._closing:
            peer._peer = None
            peer._closing = True
            peer._reset_in = True
            peer._inbox.clear()
            peer._inbox_size = 0
            peer._loop.call_soon(peer._lose, ConnectionResetError("connection reset by peer"))
        self._loop.call_soon(self._lose, None)

    # -- delivery ---------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled and not self._reading_paused and not self._lost:
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        protocol = self._protocol
        while self._inbox and not self._reading_paused and not self._closing:
            chunk = self._inbox.popleft()
            self._inbox_size -= len(chunk)
            self._relieve_writer()
            protocol.data_received(chunk)
        if self._closing or self._reading_paused or self._inbox:
            return
        if self._eof_in and not self._eof_given:
            self._eof_given = True
            keep_open = protocol.eof_received()
            if not keep_open:
                self.close()

    def _relieve_writer(self) -> None:
        """Resume the peer's writing once what waits here fell to its low-water mark."""
        peer = self._peer
        if peer is not None and peer._writer_paused and self._inbox_size <= peer._low:
            peer._writer_paused = False
            peer._protocol.resume_writing()

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._protocol.connection_lost(exc)


def connect_in_memory(
    loop: asyncio.AbstractEventLoop,
    client: asyncio.BaseProtocol,
    server_factory: Callable[[], asyncio.BaseProtocol],
    *,
    client_extra: Mapping[str, Any] | None = None,
    server_extra: Mapping[str, Any] | None = None,
) -> tuple[MemoryTransport, asyncio.BaseProtocol]:
    """Connect ``client`` to a new protocol from ``server_factory``, in memory.

    Both protocols get ``connection_made`` before this returns, the client's first; the
    ``*_extra`` mappings are what each end's ``get_extra_info`` answers (``peername``,
    ``sockname``; ``socket`` and ``sslcontext`` are None). Returns the client's transport and
    the server's protocol.
    """
    base = {"socket": None, "sslcontext": None}
    client_end = MemoryTransport(loop, client, {**base, **(client_extra or {})})
    server = server_factory()
    server_end = MemoryTransport(loop, server, {**base, **(server_extra or {})})
    client_end._peer, server_end._peer = server_end, client_end
    client.connection_made(client_end)
    server.connection_made(server_end)
    return client_end, server
