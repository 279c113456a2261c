"""Shared machinery of the interop tests: ports, deadlines, child processes, the user flow.

Owns the `harness` fixture (children that always die with their process groups, logs attached to
failed reports), the original package's locations, and `user_flow` (the dask-gateway client run).
"""

from __future__ import annotations

import faulthandler
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway_core.testing.processes import descendants, kill_tree, start_times

LOOPBACK = "127.0.0.1"
WATCHDOG = 150.0
"""Seconds after which every child of a test is killed, so whatever waits on them fails."""
LAST_RESORT = WATCHDOG + 30.0
"""Seconds after which the test process dumps its threads' tracebacks and exits."""
CHILDREN = pytest.StashKey[list["Child"]]()


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------


class Child:
    """One process in its own session (process group), its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], *, log: Path, env: dict[str, str], cwd: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._seen: dict[int, int] = {}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, limit: int = 8000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return "(no log)"
        prefix = "...\n" if len(data) > limit else ""
        return prefix + data[-limit:].decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a gateway then stops its clusters), then SIGKILL to the process group and to
        every descendant seen, those in sessions of their own included."""
        self._seen.update(start_times(descendants(self.proc.pid)))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                self._seen.update(start_times(descendants(self.proc.pid)))
                time.sleep(0.1)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._seen.update(start_times(descendants(self.proc.pid)))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        kill_tree(self._seen)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# ------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


def http_get(url: str, *, timeout: float = 10.0, headers: dict[str, str] | None = None) -> Response:
    """One GET; an HTTP error status is a `Response` too, a connection failure raises OSError."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Response(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(exc.code, exc.headers, exc.read())


# ------------------------------------------------------------------------------------------
# The harness
# ------------------------------------------------------------------------------------------


class Harness:
    """Ports, children and waits of one test; every wait has a deadline and fails at once,
    with the log, when a child has died."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.children: list[Child] = []
        self._ports: set[int] = set()
        self.expired = False
        self._watchdog = threading.Timer(WATCHDOG, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def port(self) -> int:
        """A free loopback port, distinct from the others this test took."""
        while True:
            with socket.socket() as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port not in self._ports:
                self._ports.add(port)
                return port

    @staticmethod
    def script(name: str) -> str:
        """A console script of the running environment (``gateway``, ``dask``, ...)."""
        path = Path(sys.executable).parent / name
        if not os.access(path, os.X_OK):
            pytest.fail(f"{name} is not installed beside {sys.executable}: run `nox -s interop`")
        return str(path)

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        """The environment minus gateway settings, this environment's scripts first on PATH."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GATEWAY_", "DASK_GATEWAY_", "DASK_DISTRIBUTED__"))
        }
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(extra)
        return env

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log = self.folder / f"{len(self.children)}-{name.split()[0]}.log"
        child = Child(name, argv, log=log, env=env or self.env(), cwd=cwd or self.folder)
        self.children.append(child)
        return child

    def check_children(self) -> None:
        if self.expired:
            pytest.fail(f"the watchdog killed every process after {WATCHDOG:.0f} s")
        for child in self.children:
            if not child.running():
                pytest.fail(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_text()}"
                )

    def wait_until(self, what: str, probe: Callable[[], Any], *, timeout: float = 30.0) -> Any:
        """Call ``probe`` until it returns something truthy (returned); OSError counts as no."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = probe()
            except OSError as exc:
                last = exc
            else:
                if last:
                    return last
            self.check_children()
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
            time.sleep(0.1)

    def wait_port(self, port: int, *, timeout: float = 30.0) -> None:
        def probe() -> bool:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return True

        self.wait_until(f"{LOOPBACK}:{port} to accept connections", probe, timeout=timeout)

    def wait_http(
        self,
        url: str,
        *,
        status: int = 200,
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
    ) -> Response:
        def probe() -> Response | None:
            resp = http_get(url, timeout=5, headers=headers)
            return resp if resp.status == status else None

        result: Response = self.wait_until(f"{status} from {url}", probe, timeout=timeout)
        return result

    def _expire(self) -> None:
        self.expired = True
        for child in self.children:
            child.kill()

    def close(self) -> None:
        self._watchdog.cancel()
        for child in reversed(self.children):
            child.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report carries the log of every process it started."""
    report = yield
    if report.failed:
        for child in item.stash.get(CHILDREN, []):
            report.sections.append(
                (f"log of {child.name}: {' '.join(child.argv)}", child.log_text())
            )
    return report


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    request.node.stash[CHILDREN] = h.children
    faulthandler.dump_traceback_later(LAST_RESORT, exit=True)
    try:
        yield h
    finally:
        faulthandler.cancel_dump_traceback_later()
        h.close()


# ------------------------------------------------------------------------------------------
# The original packages
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def original_server() -> ModuleType:
    """The original ``dask_gateway_server`` package (PyPI)."""
    try:
        import dask_gateway_server
    except ImportError:
        pytest.fail("the interop tests need dask-gateway-server from PyPI: run `nox -s interop`")
    return dask_gateway_server


@pytest.fixture(scope="session")
def go_proxy(original_server: ModuleType) -> Path:
    """The original Go proxy binary shipped inside the dask-gateway-server wheel."""
    binary = Path(original_server.__file__).parent / "proxy" / "dask-gateway-proxy"
    if not os.access(binary, os.X_OK):
        pytest.fail(
            f"the original Go proxy is not at {binary}: the dask-gateway-server wheel ships it "
            f"for x86_64 Linux (this machine: {platform.system()} {platform.machine()})"
        )
    return binary


@pytest.fixture(scope="session")
def dask_gateway() -> ModuleType:
    """The original client package (PyPI)."""
    try:
        import dask_gateway
    except ImportError:
        pytest.fail("the interop tests need dask-gateway from PyPI: run `nox -s interop`")
    return dask_gateway


# ------------------------------------------------------------------------------------------
# The user flow
# ------------------------------------------------------------------------------------------

UserFlow = Callable[..., str]


@pytest.fixture
def user_flow(harness: Harness, dask_gateway: ModuleType) -> UserFlow:
    """``user_flow(public=..., tcp=..., while_running=...)``: the original client's whole run
    through a proxy; returns the cluster's name once it is stopped and its routes are gone."""

    def run(*, public: str, tcp: str, while_running: Callable[[Any], None] | None = None) -> str:
        with dask_gateway.Gateway(
            public, proxy_address=tcp, auth=dask_gateway.BasicAuth("alice")
        ) as gateway:
            cluster = gateway.new_cluster()
            name = cluster.name
            try:
                # The scheduler is reached through the proxy's TLS-SNI face...
                assert cluster.scheduler_address == f"gateway://{tcp}/{name}"
                cluster.scale(1)
                client = cluster.get_client(set_as_default=False)
                try:
                    client.wait_for_workers(1, timeout=60)
                    assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
                finally:
                    client.close()
                # ... and the dashboard through its HTTP face.
                dashboard = cluster.dashboard_link
                assert dashboard == f"{public}/clusters/{name}/status"
                page = http_get(dashboard, timeout=30)
                assert page.status == 200, page
                assert page.headers.get("Content-Type", "").startswith("text/html"), page.headers
                assert b"<html" in page.body.lower() and b"bokeh" in page.body.lower(), page
                if while_running is not None:
                    while_running(cluster)
            finally:
                cluster.shutdown()
            harness.wait_until(
                f"cluster {name} to stop", lambda: not gateway.list_clusters(), timeout=30
            )
        # Its routes are deleted: the dashboard path falls to the default route, the gateway
        # API, which does not know it (a route left behind would answer 502: nothing listens).
        harness.wait_http(f"{public}/clusters/{name}/status", status=404, timeout=20)
        return name

    return run
