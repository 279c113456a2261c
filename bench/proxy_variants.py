"""Alternative splice engines for gateway-proxy, to measure against the one it ships (not a test).

Owns engines the notes in ``NOTES-proxy.md`` compare: asyncio streams, protocols/transports,
``loop.sock_*`` coroutines, a plain ``os.splice`` engine, and the shipped readiness engine
(``shipped``: splice, batched) with splice off at several buffer sizes (``copy*``).
``python bench/proxy_variants.py --engine NAME -- <gateway proxy options>`` runs the standalone
proxy with ``Splicer.splice`` replaced; ``proxy_bench.py --engine NAME`` does that for every run
of our proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import socket
import sys
from typing import Any

from gateway_proxy import cli, tunnel
from gateway_proxy.tunnel import Splicer, Tunnel

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


class _TaskTunnel:
    """Closes both sockets when both copy tasks are done (the live-set contract of Tunnel)."""

    def __init__(self, splicer: Splicer, tasks: list[asyncio.Task[Any]]) -> None:
        self.splicer = splicer
        self.tasks = tasks

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.splicer.live.discard(self)  # type: ignore[arg-type]


def engine_streams(splicer: Splicer, a: socket.socket, b: socket.socket) -> Any:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(splicer.view.nbytes):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.transport.abort()

    async def run() -> None:
        ra, wa = await asyncio.open_connection(sock=a, limit=splicer.view.nbytes)
        rb, wb = await asyncio.open_connection(sock=b, limit=splicer.view.nbytes)
        await asyncio.gather(pipe(ra, wb), pipe(rb, wa))
        wa.close()
        wb.close()

    task = splicer.loop.create_task(run())
    holder = _TaskTunnel(splicer, [task])
    splicer.live.add(holder)  # type: ignore[arg-type]
    task.add_done_callback(lambda _: splicer.live.discard(holder))  # type: ignore[arg-type]
    return holder


def engine_sock(splicer: Splicer, a: socket.socket, b: socket.socket) -> Any:
    loop = splicer.loop
    size = splicer.view.nbytes

    async def pipe(src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(size)
        view = memoryview(buf)
        try:
            while n := await loop.sock_recv_into(src, buf):
                await loop.sock_sendall(dst, view[:n])
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def run() -> None:
        await asyncio.gather(pipe(a, b), pipe(b, a))
        a.close()
        b.close()

    task = loop.create_task(run())
    holder = _TaskTunnel(splicer, [task])
    splicer.live.add(holder)  # type: ignore[arg-type]
    task.add_done_callback(lambda _: splicer.live.discard(holder))  # type: ignore[arg-type]
    return holder


class _PipeProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _PipeProtocol | None = None
        self.eof = False
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()  # until the other side exists

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        if self.peer.transport is None:
            self.early.append(data)  # the other side is still being set up
            return
        self.peer.transport.write(data)

    def flush_early(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        for data in self.early:
            self.peer.transport.write(data)
        self.early.clear()

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None or self.peer.transport is None:
            return False
        if self.peer.eof:
            self.peer.transport.close()
            return False
        self.peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def engine_protocols(splicer: Splicer, a: socket.socket, b: socket.socket) -> Any:
    loop = splicer.loop

    async def run() -> None:
        pa, pb = _PipeProtocol(), _PipeProtocol()
        pa.peer, pb.peer = pb, pa
        ta, _ = await loop.connect_accepted_socket(lambda: pa, a)
        tb, _ = await loop.connect_accepted_socket(lambda: pb, b)
        for protocol, transport in ((pa, ta), (pb, tb)):
            protocol.flush_early()
            transport.set_write_buffer_limits(high=splicer.view.nbytes)
            transport.resume_reading()

    task = loop.create_task(run())
    holder = _TaskTunnel(splicer, [task])
    return holder


class _SpliceHalf:
    """One direction through a pipe: socket → pipe → socket, without copies to user space."""

    __slots__ = ("dst", "dst_sock", "eof", "pipe", "queued", "src", "tunnel")

    def __init__(self, tunnel: _SpliceTunnel, src: socket.socket, dst: socket.socket) -> None:
        self.tunnel = tunnel
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.pipe: tuple[int, int] | None = None
        self.queued = 0
        self.eof = False

    def readable(self) -> None:
        pool = self.tunnel.pool
        if self.pipe is None:
            self.pipe = pool.pop() if pool else _new_pipe()
        w = self.pipe[1]
        try:
            n = os.splice(self.src, w, PIPE_SIZE, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            self._release()
            return
        except OSError:
            self.tunnel.abort()
            return
        if n == 0:
            self.eof = True
            self._release()
            self.tunnel.loop.remove_reader(self.src)
            try:
                self.dst_sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.tunnel.maybe_close()
            return
        self.queued += n
        self._drain()

    def _drain(self) -> None:
        assert self.pipe is not None
        r, _ = self.pipe
        while self.queued:
            try:
                m = os.splice(
                    r, self.dst, self.queued, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
                )
            except BlockingIOError:
                loop = self.tunnel.loop
                loop.remove_reader(self.src)
                loop.add_writer(self.dst, self.writable)
                return
            except OSError:
                self.tunnel.abort()
                return
            self.queued -= m
        self._release()

    def writable(self) -> None:
        self._drain()
        if not self.queued and not self.tunnel.closed:
            loop = self.tunnel.loop
            loop.remove_writer(self.dst)
            loop.add_reader(self.src, self.readable)

    def _release(self) -> None:
        if self.pipe is not None and not self.queued:
            self.tunnel.pool.append(self.pipe)
            self.pipe = None


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return r, w


_PIPES: list[tuple[int, int]] = []


class _SpliceTunnel:
    def __init__(self, splicer: Splicer, a: socket.socket, b: socket.socket) -> None:
        self.splicer = splicer
        self.loop = splicer.loop
        self.pool = _PIPES
        self.a, self.b = a, b
        self.closed = False
        self.halves = (_SpliceHalf(self, a, b), _SpliceHalf(self, b, a))
        for half in self.halves:
            self.loop.add_reader(half.src, half.readable)

    def maybe_close(self) -> None:
        if all(h.eof for h in self.halves):
            self.abort()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for half in self.halves:
            self.loop.remove_reader(half.src)
            self.loop.remove_writer(half.src)
            if half.pipe is not None:
                os.close(half.pipe[0])
                os.close(half.pipe[1])
                half.pipe = None
        self.a.close()
        self.b.close()
        self.splicer.live.discard(self)  # type: ignore[arg-type]


def engine_splice(splicer: Splicer, a: socket.socket, b: socket.socket) -> Any:
    t = _SpliceTunnel(splicer, a, b)
    splicer.live.add(t)  # type: ignore[arg-type]
    return t


def _readiness_with(size: int, splice: bool) -> Any:
    def engine(splicer: Splicer, a: socket.socket, b: socket.socket) -> Tunnel:
        if splicer.view.nbytes != size:
            splicer.buffer = bytearray(size)
            splicer.view = memoryview(splicer.buffer)
        splicer.use_splice = splice
        t = Tunnel(splicer, a, b)
        splicer.live.add(t)
        return t

    return engine


ENGINES = {
    "shipped": _readiness_with(256 * 1024, True),
    "copy": _readiness_with(256 * 1024, False),
    "copy-64k": _readiness_with(64 * 1024, False),
    "copy-1m": _readiness_with(1024 * 1024, False),
    "streams": engine_streams,
    "sock": engine_sock,
    "protocols": engine_protocols,
    "splice": engine_splice,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    engine = ENGINES[args.engine]
    tunnel.Splicer.splice = lambda self, a, b: engine(self, a, b)  # type: ignore[method-assign]
    sys.argv = ["gateway-proxy", *rest]
    cli.main(rest)


if __name__ == "__main__":
    main()
