"""Splicing two connected sockets together, byte for byte, both ways, on the event loop.

Owns `Splicer` (the shared read buffer, the pool of kernel pipes, the live tunnels) and
`Tunnel`: readiness callbacks on raw non-blocking sockets, backpressure by not reading while a
write is pending, half-close (EOF one way shuts down writing the other way), close once both
ways are done. On Linux the bytes move with ``os.splice`` through a pipe taken from a small
pool only while bytes are in flight, so they never enter user space; elsewhere (or if splice
fails) they are copied through one buffer shared by every tunnel. bench/NOTES-proxy.md has the
measurements behind this.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

log = logging.getLogger("gateway.proxy")

_RETRY = (BlockingIOError, InterruptedError)
_HAS_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if _HAS_SPLICE else 0
_F_SETPIPE_SZ = 1031  # Linux fcntl
PIPE_SIZE = 1024 * 1024
"""Bytes one spliced read may move (the size asked of each pipe; Linux's default maximum).
A pipe's pages are allocated only while bytes sit in it."""
SPLICE_BATCH = 4
"""Spliced reads per wake-up at most, while each one fills a pipe."""
POOL_MAX = 16
"""Idle pipes kept for reuse; a pipe is held by a direction only while it has bytes queued."""


class Splicer:
    """The tunnels of one server: a small pool of pipes for splicing, and one read buffer
    shared by all for copying (reads are forwarded at once, so one buffer is enough)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        buffer_size: int = 256 * 1024,
        use_splice: bool = True,
    ) -> None:
        self.loop = loop
        self.buffer = bytearray(buffer_size)
        self.view = memoryview(self.buffer)
        self.live: set[Tunnel] = set()
        self.use_splice = use_splice and _HAS_SPLICE
        self.pipes: list[tuple[int, int]] = []
        self.spliced_reads = 0
        """How many reads went through a pipe (for tests and debugging)."""
        self.bytes_forward = 0
        """Bytes read from the first socket of each tunnel (the client) to relay, ever."""
        self.bytes_backward = 0
        """Bytes read from the second socket of each tunnel (the target) to relay, ever."""

    def splice(self, a: socket.socket, b: socket.socket) -> Tunnel:
        """Start forwarding between two connected non-blocking sockets; the tunnel owns them."""
        tunnel = Tunnel(self, a, b)
        self.live.add(tunnel)
        return tunnel

    def close_all(self) -> None:
        for tunnel in list(self.live):
            tunnel.abort()
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes.clear()

    # -- the pipe pool --------------------------------------------------------------------------

    def take_pipe(self) -> tuple[int, int] | None:
        if self.pipes:
            return self.pipes.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot open a pipe for splicing (%s); copying instead", exc)
            return None
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default pipe size works, in smaller steps
        return r, w

    def give_pipe(self, pipe: tuple[int, int]) -> None:
        """Return an empty pipe to the pool."""
        if len(self.pipes) < POOL_MAX:
            self.pipes.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def disable_splice(self, why: OSError) -> None:
        if self.use_splice:
            log.warning("os.splice is not usable here (%s); copying instead", why)
        self.use_splice = False


class _Half:
    """One direction of a tunnel: read ``src``, write ``dst``."""

    __slots__ = (
        "dst",
        "dst_fd",
        "eof",
        "is_forward",
        "pending",
        "pipe",
        "queued",
        "splicing",
        "src",
        "src_fd",
        "tunnel",
    )

    def __init__(
        self, tunnel: Tunnel, src: socket.socket, dst: socket.socket, *, is_forward: bool
    ) -> None:
        self.tunnel = tunnel
        self.is_forward = is_forward
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pending: bytes | None = None
        """Copied bytes the destination did not take yet."""
        self.pipe: tuple[int, int] | None = None
        """The pipe holding ``queued`` spliced bytes the destination did not take yet."""
        self.queued = 0
        self.splicing = tunnel.splicer.use_splice
        self.eof = False

    # -- reading ------------------------------------------------------------------------------

    def readable(self) -> None:
        if self.splicing:
            self._splice_read()
            return
        tunnel = self.tunnel
        splicer = tunnel.splicer
        try:
            n = self.src.recv_into(splicer.buffer)
        except _RETRY:
            return
        except OSError:
            tunnel.abort()
            return
        if n == 0:
            self._end()
            return
        self._count(n)
        try:
            sent = self.dst.send(splicer.view[:n])
        except _RETRY:
            sent = 0
        except OSError:
            tunnel.abort()
            return
        if sent < n:
            # The peer reads slower than this side writes: hold the rest, stop reading.
            self.pending = splicer.view[sent:n].tobytes()
            self._wait_writable()

    def _splice_read(self) -> None:
        tunnel = self.tunnel
        splicer = tunnel.splicer
        pipe = splicer.take_pipe()
        if pipe is None:
            self.splicing = False
            return
        # Several pipefuls per wake-up while the source keeps them full: fewer trips through
        # the event loop, which matters most when the CPUs are contended.
        for _ in range(SPLICE_BATCH):
            try:
                n = os.splice(self.src_fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except _RETRY:
                splicer.give_pipe(pipe)
                return
            except OSError as exc:
                splicer.give_pipe(pipe)
                if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    splicer.disable_splice(exc)
                    self.splicing = False
                else:
                    tunnel.abort()
                return
            if n == 0:
                splicer.give_pipe(pipe)
                self._end()
                return
            splicer.spliced_reads += 1
            self._count(n)
            self.pipe = pipe
            self.queued = n
            if not self._drain_pipe():
                return  # the destination is full: wait for it, holding the pipe
            if n < PIPE_SIZE:
                return
            pipe = splicer.take_pipe()
            if pipe is None:
                return
        splicer.give_pipe(pipe)

    def _count(self, n: int) -> None:
        if self.is_forward:
            self.tunnel.splicer.bytes_forward += n
        else:
            self.tunnel.splicer.bytes_backward += n

    def _end(self) -> None:
        self.eof = True
        self.tunnel.splicer.loop.remove_reader(self.src_fd)
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.tunnel.maybe_close()

    # -- writing --------------------------------------------------------------------------------

    def _drain_pipe(self) -> bool:
        """Move queued bytes from the pipe to ``dst``; False if ``dst`` is full for now."""
        pipe = self.pipe
        assert pipe is not None
        while self.queued:
            try:
                moved = os.splice(pipe[0], self.dst_fd, self.queued, flags=_SPLICE_FLAGS)
            except _RETRY:
                self._wait_writable()
                return False
            except OSError:
                self.tunnel.abort()
                return False
            self.queued -= moved
        self.pipe = None
        self.tunnel.splicer.give_pipe(pipe)
        return True

    def _wait_writable(self) -> None:
        loop = self.tunnel.splicer.loop
        loop.remove_reader(self.src_fd)
        loop.add_writer(self.dst_fd, self.writable)

    def writable(self) -> None:
        tunnel = self.tunnel
        if tunnel.closed:  # pragma: no cover - a stale callback
            return
        if self.pipe is not None:
            if not self._drain_pipe():
                return
        elif self.pending is not None:
            try:
                sent = self.dst.send(self.pending)
            except _RETRY:
                return
            except OSError:
                tunnel.abort()
                return
            if sent < len(self.pending):
                self.pending = self.pending[sent:]
                return
            self.pending = None
        if tunnel.closed:
            return
        loop = tunnel.splicer.loop
        loop.remove_writer(self.dst_fd)
        loop.add_reader(self.src_fd, self.readable)

    def release(self) -> None:
        self.pending = None
        if self.pipe is not None:  # bytes still inside: the pipe cannot be reused
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class Tunnel:
    """Two sockets spliced together until both directions have ended."""

    __slots__ = ("__weakref__", "a", "b", "backward", "closed", "forward", "splicer")

    def __init__(self, splicer: Splicer, a: socket.socket, b: socket.socket) -> None:
        self.splicer = splicer
        self.a = a
        self.b = b
        self.forward = _Half(self, a, b, is_forward=True)
        self.backward = _Half(self, b, a, is_forward=False)
        self.closed = False
        loop = splicer.loop
        loop.add_reader(self.forward.src_fd, self.forward.readable)
        loop.add_reader(self.backward.src_fd, self.backward.readable)

    def maybe_close(self) -> None:
        if self.forward.eof and self.backward.eof:
            self.abort()

    def abort(self) -> None:
        """Stop both directions and close both sockets."""
        if self.closed:
            return
        self.closed = True
        loop = self.splicer.loop
        for fd in (self.forward.src_fd, self.backward.src_fd):
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        self.forward.release()
        self.backward.release()
        self.a.close()
        self.b.close()
        self.splicer.live.discard(self)
