"""The TLS-SNI face: accept, read the ClientHello's server name, connect to its route, splice.

Owns the accept loop on a raw listening socket and the per-connection handshake: the hello is
read with MSG_PEEK (never consumed, so nothing has to be replayed and a connection handed to the
HTTP face is untouched), waiting for the rest with SO_RCVLOWAT; non-TLS bytes, unknown names and
oversize hellos are closed at once with one log line, silent clients after a timeout. On a
shared port it also sends plain HTTP, and TLS without a ``daskgateway-`` name, to the HTTP face.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

from .hello import HelloError, NotTLS, parse_client_hello
from .table import SNI_PREFIX, RouteTable, SniTarget
from .tunnel import Splicer

log = logging.getLogger("gateway.proxy")

HttpHandoff = Callable[[socket.socket, bool], None]
"""Give an accepted socket to the HTTP face; the flag says whether it starts with TLS."""

_HAS_RCVLOWAT = hasattr(socket, "SO_RCVLOWAT") and sys.platform.startswith("linux")
_REPOLL_DELAY = 0.005
_ACCEPT_BATCH = 128
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY (small Dask messages must not wait) and keep-alive on a stream socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


class Acceptor:
    """Accept connections on a listening socket with a readiness callback, in batches."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_socket: Callable[[socket.socket, tuple[str, int]], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.on_socket = on_socket
        self._resume: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    log.error("accept failed (%s); pausing accepts for 1 s", exc)
                    self.loop.remove_reader(self.sock.fileno())
                    self._resume = self.loop.call_later(1.0, self._restart)
                else:
                    log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            self.on_socket(conn, peer)

    def _restart(self) -> None:
        self._resume = None
        self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class SniFace:
    """Routes TLS connections by server name; optionally the front door of a shared port."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        table: RouteTable,
        splicer: Splicer,
        handshake_timeout: float,
        connect_timeout: float,
        max_hello_size: int,
        http_handoff: HttpHandoff | None = None,
        https: bool = False,
    ) -> None:
        self.loop = loop
        self.table = table
        self.splicer = splicer
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.max_hello_size = max_hello_size
        self.http_handoff = http_handoff
        """Set on a shared port: where plain HTTP (and HTTPS, when ``https``) goes."""
        self.https = https
        self.pending: set[_Handshake] = set()
        self.acceptors: list[Acceptor] = []
        self.counts = {"routed": 0, "refused": 0}

    def listen(self, sock: socket.socket) -> None:
        self.acceptors.append(Acceptor(self.loop, sock, self.accept))

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        tune(sock)
        self.pending.add(_Handshake(self, sock, peer))

    def refuse(self, peer: tuple[str, int] | None, why: str) -> None:
        self.counts["refused"] += 1
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.info("tls-sni: closed connection from %s: %s", where, why)

    def close(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        for handshake in list(self.pending):
            handshake.close()


class _Handshake:
    """A connection whose first bytes have not yet told where it goes."""

    __slots__ = ("__weakref__", "face", "fd", "lowat", "out", "peer", "sock", "timer")

    def __init__(self, face: SniFace, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.face = face
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.lowat = 1
        self.out: socket.socket | None = None
        loop = face.loop
        loop.add_reader(self.fd, self.readable)
        self.timer: asyncio.TimerHandle | None = loop.call_later(
            face.handshake_timeout, self.timed_out
        )

    # -- reading the hello --------------------------------------------------------------------

    def readable(self) -> None:
        face = self.face
        try:
            data = self.sock.recv(face.max_hello_size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(f"read failed: {exc.strerror}")
            return
        if not data:
            self.fail("closed before sending a ClientHello")
            return
        try:
            hello = parse_client_hello(data, max_size=face.max_hello_size)
        except NotTLS as exc:
            if face.http_handoff is not None and not face.https:
                self.hand_to_http(tls=False)
            else:
                self.fail(str(exc))
            return
        except HelloError as exc:
            self.fail(str(exc))
            return
        if not hello.complete:
            self.wait_for(hello.need)
            return
        sni = hello.sni
        if sni is None or not sni.startswith(SNI_PREFIX):
            if face.http_handoff is not None and face.https:
                self.hand_to_http(tls=True)
            else:
                self.fail(f"server name {sni!r} is not {SNI_PREFIX}<cluster>")
            return
        target = face.table.lookup_sni(sni)
        if target is None:
            self.fail(f"no route for server name {sni!r}")
            return
        self.connect(sni, target)

    def wait_for(self, need: int) -> None:
        """Sleep until ``need`` bytes are queued (or EOF), instead of waking per segment."""
        if _HAS_RCVLOWAT:
            if need != self.lowat:
                self.lowat = need
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
                except OSError:
                    pass
            return
        # Without SO_RCVLOWAT the socket stays readable: poll again a little later.
        loop = self.face.loop
        loop.remove_reader(self.fd)
        loop.call_later(_REPOLL_DELAY, self._repoll)

    def _repoll(self) -> None:
        if self.timer is not None and self.out is None:
            self.face.loop.add_reader(self.fd, self.readable)

    def _reset_lowat(self) -> None:
        if self.lowat != 1:
            self.lowat = 1
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass

    # -- outcomes --------------------------------------------------------------------------

    def _detach(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.face.loop.remove_reader(self.fd)
        self.face.pending.discard(self)

    def fail(self, why: str) -> None:
        self.face.refuse(self.peer, why)
        self.close()

    def close(self) -> None:
        self._detach()
        loop = self.face.loop
        if self.out is not None:
            loop.remove_writer(self.out.fileno())
            self.out.close()
            self.out = None
        self.sock.close()

    def timed_out(self) -> None:
        self.timer = None
        if self.out is None:
            self.fail(f"no ClientHello within {self.face.handshake_timeout:g} s")
        else:
            self.fail(f"connecting to {self.out_name()} timed out")

    def hand_to_http(self, *, tls: bool) -> None:
        handoff = self.face.http_handoff
        assert handoff is not None
        self._detach()
        self._reset_lowat()
        handoff(self.sock, tls)

    # -- connecting to the target ---------------------------------------------------------------

    def connect(self, sni: str, target: SniTarget) -> None:
        host, port, family = target
        face = self.face
        face.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = face.loop.call_later(face.connect_timeout, self.timed_out)
        if family == 0:
            task = face.loop.create_task(self._resolve_and_connect(host, port))
            task.add_done_callback(_log_task_error)
            return
        self._connect_ip(family, host, port)

    async def _resolve_and_connect(self, host: str, port: int) -> None:
        try:
            infos = await self.face.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            if self.timer is not None:
                self.fail(f"cannot resolve target {host}: {exc}")
            return
        if self.timer is None or not infos:  # timed out (and closed) meanwhile, or no address
            if self.timer is not None:
                self.fail(f"cannot resolve target {host}")
            return
        family, _, _, _, sockaddr = infos[0]
        self._connect_ip(family, str(sockaddr[0]), int(sockaddr[1]))

    def _connect_ip(self, family: int, host: str, port: int) -> None:
        try:
            out = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self.fail(f"cannot open a socket to the target: {exc}")
            return
        out.setblocking(False)
        tune(out)
        self.out = out
        err = out.connect_ex((host, port))
        if err == 0:
            self.connected()
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self.face.loop.add_writer(out.fileno(), self.connect_done)
        else:
            self.fail(f"target {host}:{port} refused: {errno.errorcode.get(err, err)}")

    def out_name(self) -> str:
        if self.out is None:
            return "?"
        try:
            host, port = self.out.getpeername()[:2]
        except OSError:
            return "the target"
        return f"{host}:{port}"

    def connect_done(self) -> None:
        out = self.out
        assert out is not None
        self.face.loop.remove_writer(out.fileno())
        err = out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(f"target refused: {errno.errorcode.get(err, err)} ({os.strerror(err)})")
            return
        self.connected()

    def connected(self) -> None:
        out = self.out
        assert out is not None
        self.out = None
        self._detach()
        self._reset_lowat()
        self.face.counts["routed"] += 1
        self.face.splicer.splice(self.sock, out)


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tls-sni: connect task failed", exc_info=task.exception())
