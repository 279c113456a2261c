"""Tests of the in-memory connections (`gateway_proxy.memory`) on their own.

Owns a recording protocol and the checks that a pair of `MemoryTransport`s behaves for its
protocols as a TCP connection does: order, no delivery inside ``write``, paused reading, write
backpressure, end of file, close and reset.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway_proxy.memory import MemoryTransport, connect_in_memory

pytestmark = pytest.mark.unit


class Recorder(asyncio.Protocol):
    """Writes down every callback it gets, in order."""

    def __init__(self, *, keep_open_on_eof: bool = False) -> None:
        self.events: list[tuple[str, Any]] = []
        self.transport: MemoryTransport | None = None
        self.keep_open_on_eof = keep_open_on_eof
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport
        self.events.append(("made", None))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append(("pause_writing", None))

    def resume_writing(self) -> None:
        self.events.append(("resume_writing", None))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(exc)

    @property
    def data(self) -> bytes:
        return b"".join(d for kind, d in self.events if kind == "data")

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


async def turns(n: int = 3) -> None:
    """Let the event loop run a few rounds of callbacks."""
    for _ in range(n):
        await asyncio.sleep(0)


async def pair(**server_kwargs: Any) -> tuple[Recorder, Recorder]:
    client = Recorder()
    server = Recorder(**server_kwargs)
    transport, protocol = connect_in_memory(
        asyncio.get_running_loop(),
        client,
        lambda: server,
        client_extra={"peername": ("127.0.0.1", 8000)},
        server_extra={"peername": ("127.0.0.1", 50000)},
    )
    assert transport is client.transport and protocol is server
    return client, server


async def test_bytes_arrive_in_order_and_never_inside_write() -> None:
    client, server = await pair()
    assert client.kinds() == server.kinds() == ["made"]
    assert client.transport is not None and server.transport is not None
    client.transport.write(b"one ")
    client.transport.writelines([b"two ", bytearray(b"three ")])
    client.transport.write(memoryview(b"four"))
    assert server.kinds() == ["made"]  # delivered on a later turn of the loop, as by a socket
    assert client.transport.get_write_buffer_size() == len(b"one two three four")
    await turns()
    assert server.data == b"one two three four"
    assert client.transport.get_write_buffer_size() == 0
    server.transport.write(b"back")
    await turns()
    assert client.data == b"back"
    assert server.transport.get_extra_info("peername") == ("127.0.0.1", 50000)
    assert client.transport.get_extra_info("peername") == ("127.0.0.1", 8000)
    assert server.transport.get_extra_info("socket") is None
    assert client.transport.get_extra_info("missing", "default") == "default"


async def test_paused_reading_holds_the_bytes_until_resumed() -> None:
    client, server = await pair()
    assert client.transport is not None and server.transport is not None
    server.transport.pause_reading()
    assert not server.transport.is_reading()
    client.transport.write(b"held")
    client.transport.write_eof()
    await turns()
    assert server.kinds() == ["made"]
    server.transport.resume_reading()
    await turns()
    assert server.data == b"held"
    # The end of file comes after the data; the Recorder answers False to it: it closes.
    assert server.kinds() == ["made", "data", "eof", "lost"]


async def test_writer_is_paused_above_the_high_water_mark_and_resumed_below_the_low() -> None:
    client, server = await pair()
    assert client.transport is not None and server.transport is not None
    client.transport.set_write_buffer_limits(high=100)
    assert client.transport.get_write_buffer_limits() == (25, 100)
    server.transport.pause_reading()
    client.transport.write(b"x" * 60)
    assert "pause_writing" not in client.kinds()
    client.transport.write(b"x" * 60)
    assert client.kinds()[-1] == "pause_writing"
    client.transport.write(b"x" * 60)  # still accepted, as a socket transport buffers it
    assert client.kinds().count("pause_writing") == 1
    server.transport.resume_reading()
    await turns()
    assert client.kinds()[-1] == "resume_writing"
    assert len(server.data) == 180
    with pytest.raises(ValueError, match="must be >= low"):
        client.transport.set_write_buffer_limits(high=10, low=20)


async def test_write_eof_half_closes_and_the_other_side_may_still_answer() -> None:
    client, server = await pair(keep_open_on_eof=True)
    assert client.transport is not None and server.transport is not None
    assert client.transport.can_write_eof()
    client.transport.write(b"question")
    client.transport.write_eof()
    with pytest.raises(RuntimeError, match="after write_eof"):
        client.transport.write(b"more")
    await turns()
    assert server.kinds() == ["made", "data", "eof"]
    server.transport.write(b"answer")  # the server kept its end open: it can still answer
    await turns()
    assert client.data == b"answer"
    server.transport.close()
    await asyncio.wait_for(asyncio.gather(server.lost, client.lost), 5)
    # The server's close is the client's end of file; its Recorder answers False: it closes.
    assert client.kinds()[-2:] == ["eof", "lost"]


async def test_close_ends_this_side_and_gives_the_other_an_end_of_file() -> None:
    client, server = await pair()
    assert client.transport is not None and server.transport is not None
    client.transport.write(b"last words")
    client.transport.close()
    assert client.transport.is_closing()
    client.transport.write(b"dropped")  # after close: goes nowhere, as on a socket
    await asyncio.wait_for(asyncio.gather(client.lost, server.lost), 5)
    assert server.data == b"last words"
    assert server.kinds() == ["made", "data", "eof", "lost"]
    assert client.kinds() == ["made", "lost"]
    assert client.lost.result() is None and server.lost.result() is None
    server.transport.write(b"to nobody")  # a closed end accepts and drops


async def test_abort_resets_the_other_side() -> None:
    client, server = await pair()
    assert client.transport is not None and server.transport is not None
    server.transport.pause_reading()
    client.transport.write(b"never read")
    client.transport.abort()
    await asyncio.wait_for(asyncio.gather(client.lost, server.lost), 5)
    assert server.data == b""  # what waited is dropped, as with a reset
    assert server.kinds() == ["made", "lost"]
    assert isinstance(server.lost.result(), ConnectionResetError)
    assert client.lost.result() is None
    client.transport.abort()  # twice is harmless
    client.transport.close()
    await turns()
    assert client.kinds().count("lost") == 1


async def test_a_writer_paused_on_a_peer_that_closes_is_resumed() -> None:
    client, server = await pair()
    assert client.transport is not None and server.transport is not None
    client.transport.set_write_buffer_limits(high=10)
    server.transport.pause_reading()
    client.transport.write(b"y" * 20)
    assert client.kinds()[-1] == "pause_writing"
    server.transport.close()
    await asyncio.wait_for(client.lost, 5)
    assert "resume_writing" in client.kinds()  # nobody waits on a buffer that is gone
