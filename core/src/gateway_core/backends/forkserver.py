"""A warm launcher for Dask processes: one template process, with distributed already imported,
forks a child per launch instead of starting a new interpreter (which costs seconds of imports).

Owns `ForkServer` (the gateway's handle: start the template, ask it for a process, stop it) and
the template itself (``python -m gateway_core.backends.forkserver``, see `main` for the rules it
keeps so that a forked child is as good as a freshly started process).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import os
import pkgutil  # noqa: F401 - runpy.run_path imports it late, when a child may not read it
import runpy
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from .kit.processes import read_stat

log = logging.getLogger("gateway.backend.forkserver")

TEMPLATE_ENV: dict[str, str] = {
    # numpy (imported by distributed) would otherwise start a BLAS thread pool at import, and a
    # process with threads must not fork. distributed's nanny sets the same caps for its workers.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    # The template is shared by every user: no one's ~/.local packages in it.
    "PYTHONNOUSERSITE": "1",
}
"""Environment the template starts with, on top of what the gateway lets processes inherit."""

_HEADER = struct.Struct("!I")
_MAX_REQUEST = 16 * 1024 * 1024


class ForkServerError(Exception):
    """The fork server could not start, or could not launch a process."""


class LaunchRefused(ForkServerError):
    """The forked child could not become the requested process (bad directory, user, ...);
    the fork server itself is fine."""


# ============================================================================================
# The gateway's side
# ============================================================================================


class ForkServer:
    """A template process that forks Dask processes on request.

    ``await start()`` launches ``python -m gateway_core.backends.forkserver`` with ``env`` and
    waits until it imported ``preload`` and checked it can fork safely. ``await spawn(...)``
    returns the new process's ``(pid, start_ticks)``; the process runs in its own session
    (its pid is its process group) and is the template's child, not the gateway's: use
    ``/proc`` to watch it. ``await close()`` stops the template; launched processes live on.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        preload: Sequence[str] = (),
        python: str = sys.executable,
        start_timeout: float = 120.0,
        spawn_timeout: float = 30.0,
    ) -> None:
        self.env = {**env, **TEMPLATE_ENV}
        self.preload = list(preload)
        self.python = python
        self.start_timeout = start_timeout
        self.spawn_timeout = spawn_timeout
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._ctl is not None

    async def start(self) -> None:
        """Launch the template and wait until it is ready; raise ForkServerError otherwise."""
        if self._proc is not None:
            raise ForkServerError("the fork server was already started")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = self._launch_template(theirs.fileno())
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot run {self.python}: {exc}") from exc
        finally:
            theirs.close()
        self._ctl = ours
        try:
            answer = await asyncio.to_thread(self._read_ready, ours)
        except BaseException:
            await self.close()
            raise
        if "error" in answer:
            await self.close()
            raise ForkServerError(f"the fork server cannot fork safely: {answer['error']}")
        self.pid = self._proc.pid
        log.info("Fork server %d ready (preloaded %s)", self.pid, ", ".join(self.preload) or "-")

    def _launch_template(self, fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.python, "-m", "gateway_core.backends.forkserver", str(fd), *self.preload],
            pass_fds=[fd],
            env=self.env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _read_ready(self, ctl: socket.socket) -> dict[str, Any]:
        ctl.settimeout(self.start_timeout)
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = ctl.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ForkServerError(
                f"the fork server was not ready within {self.start_timeout:g} s"
            ) from None
        finally:
            ctl.settimeout(None)
        if not data:
            code = self._proc.wait(5) if self._proc is not None else None
            raise ForkServerError(f"the fork server exited at start (status {code})")
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise ForkServerError(f"the fork server answered {answer!r}")
        return answer

    async def spawn(
        self,
        *,
        argv: Sequence[str],
        module: str | None = None,
        path: str | None = None,
        env: Mapping[str, str],
        cwd: str,
        log_fd: int,
        uid: int | None = None,
        gid: int | None = None,
        groups: Sequence[int] | None = None,
    ) -> tuple[int, int]:
        """Fork a process that runs ``module`` (as ``python -m module``) or the script at
        ``path`` with ``sys.argv = argv``, in ``cwd`` with exactly ``env``, stdout and stderr
        to ``log_fd``, as ``uid``/``gid``/``groups`` when given. Returns (pid, start ticks).

        If the caller is cancelled, a process that still comes up is killed."""
        if (module is None) == (path is None):
            raise ValueError("give exactly one of module= or path=")
        request = {
            "argv": list(argv),
            "module": module,
            "path": path,
            "env": dict(env),
            "cwd": cwd,
            "uid": uid,
            "gid": gid,
            "groups": None if groups is None else list(groups),
        }
        # Duplicate the log descriptor: the caller may close its own as soon as we return.
        fd = os.dup(log_fd)
        task = asyncio.ensure_future(asyncio.to_thread(self._spawn, request, fd))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_kill_if_started)
            raise

    def _spawn(self, request: dict[str, Any], log_fd: int) -> tuple[int, int]:
        ctl = self._ctl
        try:
            if ctl is None or not self.alive:
                raise ForkServerError("the fork server is not running")
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with ours:
                try:
                    with self._lock:
                        socket.send_fds(ctl, [b"F"], [theirs.fileno()])
                except OSError as exc:
                    raise ForkServerError(f"the fork server is gone: {exc}") from exc
                finally:
                    theirs.close()
                ours.settimeout(self.spawn_timeout)
                payload = json.dumps(request).encode()
                socket.send_fds(ours, [_HEADER.pack(len(payload))], [log_fd])
                ours.sendall(payload)
                ours.shutdown(socket.SHUT_WR)
                reply = b""
                while True:
                    chunk = ours.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except TimeoutError:
            raise ForkServerError(
                f"no answer from the fork server within {self.spawn_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ForkServerError(f"talking to the fork server failed: {exc}") from exc
        finally:
            os.close(log_fd)
        if not reply:
            raise ForkServerError("the fork server closed the launch without an answer")
        try:
            answer = json.loads(reply)
            if "error" not in answer:
                return int(answer["pid"]), int(answer["start_ticks"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ForkServerError(f"unreadable answer from the fork server: {reply!r}") from exc
        if answer.get("child"):
            raise LaunchRefused(str(answer["error"]))
        raise ForkServerError(str(answer["error"]))

    async def close(self) -> None:
        """Stop the template (it exits when its control socket closes); launched processes,
        each in its own session, are not touched."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _kill_if_started(task: asyncio.Future[tuple[int, int]]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    pid, _ticks = task.result()
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    log.warning("Killed process %d: its launch was cancelled", pid)


# ============================================================================================
# The template's side (runs in ``python -m gateway_core.backends.forkserver``)
# ============================================================================================


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: only what Python knows
        return threading.active_count()


def _own_start_ticks() -> int:
    st = read_stat("self")
    if st is None:
        raise OSError("cannot read /proc/self/stat")
    return st.start_ticks


def _send_line(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_DUMPABLE = 4

_TEMPLATE_HANDLERS: list[tuple[logging.Logger, logging.Handler]] = []
"""Handlers distributed's import attached to loggers in the template (removed in children,
which configure logging again from their own config)."""


def main(argv: Sequence[str] | None = None) -> int:
    """The template: ``<control fd> [module to preload ...]``.

    It imports the modules, refuses to go on if that started a thread (forking a process with
    threads is unsafe; `TEMPLATE_ENV` caps the BLAS pools numpy would start), then forks one
    child per launch socket the gateway sends. The child, not the template, reads the request,
    so the template never holds any cluster's token or environment and a child of one user
    cannot find another's secrets in the memory it inherited. The child starts its own session,
    takes stdin from /dev/null and stdout/stderr from the request's descriptor, drops privileges
    (groups, gid, uid; dumpable again as after exec), enters its directory, closes every other
    inherited descriptor, replaces its environment, re-reads the Dask config (paths,
    environment, logging) and re-seeds numpy, answers with its pid, then runs the target as
    ``__main__``; when that returns, the interpreter exits as any process would.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    ctl = socket.socket(fileno=int(args[0]))
    # Children are reaped by the kernel; each child restores the default at once.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if sys.path and sys.path[0] in ("", os.getcwd()) and not sys.flags.safe_path:
        # As the ``dask`` console script has it: its own directory, never the cwd.
        sys.path[0] = os.path.dirname(os.path.abspath(sys.executable))
    problem = ""
    for name in args[1:]:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - reported to the gateway
            problem = f"importing {name} failed: {type(exc).__name__}: {exc}"
            break
    if not problem and _thread_count() > 1:
        problem = f"{_thread_count()} threads are running after the imports"
    if problem:
        _tell_gateway(ctl, {"error": problem})
        return 1
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            _TEMPLATE_HANDLERS.extend(
                (logger, h)
                for h in logger.handlers
                if type(h) is logging.StreamHandler and h.stream is sys.stderr
            )
    if not _tell_gateway(ctl, {"ready": True, "pid": os.getpid()}):
        return 0
    return _serve(ctl)


def _tell_gateway(ctl: socket.socket, msg: dict[str, Any]) -> bool:
    """Send ``msg`` on the control socket; False (quietly) when the gateway is already gone
    (killed while the template imported: nothing is left to serve, and no traceback)."""
    try:
        _send_line(ctl, msg)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def _serve(ctl: socket.socket) -> int:
    """Fork one child per launch socket received on ``ctl``; when the gateway is gone (end of
    file on ``ctl``, as after the gateway was killed), exit at once (`_leave`).

    In a child this never returns: the target runs, then SystemExit unwinds to the interpreter
    (so atexit handlers and thread joins happen as in a normal process)."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 16, 1)
        except OSError:
            _leave()
        if not msg:
            _leave()
        if not fds:
            continue
        conn_fd = fds[0]
        threads = _thread_count()
        if threads > 1:
            _answer_error(conn_fd, f"the fork server has {threads} threads; refusing to fork")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            _answer_error(conn_fd, f"fork failed: {exc}")
            continue
        if pid == 0:
            ctl.close()
            _child(conn_fd)  # raises SystemExit, never returns
        os.close(conn_fd)


def _leave() -> NoReturn:
    """End the template without the interpreter's teardown: the exit handlers its preloaded
    modules registered (multiprocessing's, distributed's, logging's) belong to the processes
    forked from it, not to it, and must not run with those processes in its process table.

    The children live on: each started a session of its own (no SIGHUP when the template goes,
    no shared process group to signal), none asked for a parent-death signal (a fork never
    inherits one), and their output goes to their own logs, never to a pipe of the template's.
    They are re-parented to init (or the nearest subreaper), which reaps them."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


def _answer_error(conn_fd: int, message: str) -> None:
    with socket.socket(fileno=conn_fd) as conn, contextlib.suppress(OSError):
        _send_line(conn, {"error": message})


def _child(conn_fd: int) -> None:
    conn = socket.socket(fileno=conn_fd)
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.settimeout(30)
        request, log_fd = _read_request(conn)
        _become(request, log_fd, keep=conn_fd)
        _send_line(conn, {"pid": os.getpid(), "start_ticks": _own_start_ticks()})
        conn.close()
    except BaseException as exc:  # noqa: BLE001 - the launcher gets the reason, we exit
        with contextlib.suppress(BaseException):
            _send_line(conn, {"error": f"{type(exc).__name__}: {exc}", "child": True})
        os._exit(1)
    sys.argv = list(request["argv"])
    if request["module"]:
        # Run it afresh as __main__ (its own imports are what the template has warm).
        sys.modules.pop(request["module"], None)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(request["path"], run_name="__main__")
    raise SystemExit(0)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("the launch request was cut short")
        data += chunk
    return data


def _read_request(conn: socket.socket) -> tuple[dict[str, Any], int]:
    head, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 1)
    if not fds:
        raise ValueError("the launch request carried no log file descriptor")
    head += _read_exactly(conn, _HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    if size > _MAX_REQUEST:
        raise ValueError(f"launch request of {size} bytes is too large")
    request = json.loads(_read_exactly(conn, size))
    if not isinstance(request, dict):
        raise ValueError("the launch request is not an object")
    return request, fds[0]


def _become(request: dict[str, Any], log_fd: int, *, keep: int) -> None:
    """Turn this fresh child into the requested process (everything but running it)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in {devnull, log_fd} - {0, 1, 2}:
        os.close(fd)
    uid, gid, groups = request.get("uid"), request.get("gid"), request.get("groups")
    if gid is not None:
        os.setgroups([int(g) for g in groups or []])
        os.setresgid(int(gid), int(gid), int(gid))
    if uid is not None:
        os.setresuid(int(uid), int(uid), int(uid))
        if os.getresuid() != (uid, uid, uid):
            raise PermissionError(f"could not become uid {uid}")
        # Changing credentials without exec leaves a process undumpable: its user could not
        # debug it or read its /proc files. exec would reset that; so do we.
        if _LIBC.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    os.chdir(request["cwd"])
    # Nothing of the template's may leak to the target (the control socket least of all).
    max_fd = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536
    os.closerange(3, keep)
    os.closerange(keep + 1, max(max_fd, keep + 2))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    _refresh_after_env()


def _refresh_after_env() -> None:
    """Re-read what the template's imports computed from its own environment (nothing here
    may import a module: the child may no longer be allowed to read the Python install)."""
    tempfile.tempdir = None
    dask_config = sys.modules.get("dask.config")
    if dask_config is not None:
        get_paths = getattr(dask_config, "_get_paths", None)
        if get_paths is not None:
            dask_config.paths[:] = get_paths()
        home_config = os.path.join(os.path.expanduser("~"), ".config", "dask")
        setattr(dask_config, "PATH", os.environ.get("DASK_CONFIG", home_config))  # noqa: B010
        dask_config.refresh()
        dist_config = sys.modules.get("distributed.config")
        if dist_config is not None:
            dask_config.rename(dist_config.deprecations)
            for logger, handler in _TEMPLATE_HANDLERS:
                logger.removeHandler(handler)
                logger.propagate = True
            dist_config.initialize_logging(dask_config.config)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # else every child would draw the template's numbers


if __name__ == "__main__":
    sys.exit(main())
