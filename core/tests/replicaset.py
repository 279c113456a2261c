"""Several `gateway serve` replicas as subprocesses on one PostgreSQL database, for the tests.

Owns `Replica` (one process: start, call its API, stop or kill), `ReplicaSet` (the replicas'
configs, a TCP load balancer in front of their APIs for the schedulers' heartbeats, and what
the database says: lease holders, each cluster's processes) and `replica_set`, which builds one
and kills what is left at the end. Used by test_replicas.py, test_chaos.py and compat tests.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from attrs import define, field

from gateway_core.backends.kit import ProcessRef, all_stats
from gateway_core.models import WorkerStatus
from gateway_core.reconciler.replicas import shard_lease, shard_of
from gateway_core.testing.processes import descendants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> float:
    """Seconds until ``check()`` held (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"timed out waiting until {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


@define(kw_only=True)
class Replica:
    """One `gateway serve` process (started by `start`, again after a kill); ``address`` is
    its proxy's public address, where its API and its clusters' routes are."""

    name: str
    folder: Path
    config: Path
    address: str
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(factory=dict)
    """Set in its environment at each `start` (e.g. a crash point for the next run only)."""
    user: str = "alice"
    """Whom `call` asks as by default."""

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def replica_id(self) -> str:
        """The id it takes by default: host name and proxy address."""
        return f"{socket.gethostname()}:127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until it answers its health check (its log is appended to)."""
        log = self.log.open("ab")
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway_core", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, "gateway did not start\n" + self.log_tail()
            time.sleep(0.1)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def call(self, method: str, path: str, body: Any = None, user: str | None = None) -> Any:
        """The API at ``/api<path>`` as ``user`` (simple auth; default `Replica.user`); raises
        HTTPError on >= 400."""
        user = self.user if user is None else user
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.address}/api{path}",
            data=data,
            method=method,
            headers={
                "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def status(self, name: str) -> str:
        return str(self.call("GET", f"/v1/clusters/{name}")["status"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit; its return code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@define(kw_only=True)
class ReplicaSet:
    """Replicas on one database, sharing one clusters directory, heartbeats through a
    load balancer; built by `replica_set`."""

    replicas: list[Replica]
    db_url: str
    folder: Path
    balancer: Balancer = field(repr=False)

    def by_id(self, replica_id: str) -> Replica | None:
        return next((r for r in self.replicas if r.replica_id == replica_id), None)

    def _query(self, statement: str, **params: Any) -> list[Any]:
        engine = sa.create_engine(self.db_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(statement), params))
        finally:
            engine.dispose()

    def holders(self) -> dict[str, str]:
        """Shard lease -> holder, for the unexpired shard leases."""
        rows = self._query(
            "SELECT name, holder FROM leases WHERE name LIKE 'shard:%' AND expires >= "
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        )
        return {name: holder for name, holder in rows}

    def owner(self, name: str) -> Replica | None:
        """The replica holding the shard of cluster ``name`` (None while nobody does)."""
        holder = self.holders().get(shard_lease(shard_of(name)))
        return None if holder is None else self.by_id(holder)

    def processes(self, name: str) -> dict[str, ProcessRef]:
        """``"scheduler"`` and each active worker -> its process, as the database has them."""
        found: dict[str, ProcessRef] = {}
        for (state,) in self._query("SELECT state FROM clusters WHERE name = :n", n=name):
            ref = ProcessRef.from_state(state)
            if ref is not None:
                found["scheduler"] = ref
        rows = self._query(
            "SELECT name, status, state FROM workers WHERE cluster_name = :n", n=name
        )
        for worker, status, state in rows:
            ref = ProcessRef.from_state(state)
            if WorkerStatus(status).is_active and ref is not None:
                found[worker] = ref
        return found

    def worker_states(self, name: str) -> dict[str, tuple[str, str]]:
        """Each worker of cluster ``name`` -> (status name, target name), as stored."""
        rows = self._query(
            "SELECT name, status, target FROM workers WHERE cluster_name = :n", n=name
        )
        return {w: (WorkerStatus(s).name, WorkerStatus(t).name) for w, s, t in rows}

    def rows(self) -> dict[str, tuple[str, int]]:
        """Every cluster row: name -> (status name, count)."""
        from gateway_core.models import ClusterStatus

        return {
            name: (ClusterStatus(status).name, count)
            for name, status, count in self._query("SELECT name, status, count FROM clusters")
        }


class Balancer(socketserver.ThreadingTCPServer):
    """A TCP load balancer in front of the replicas' API (what schedulers heartbeat to):
    each connection goes to the next replica that accepts it, in turn."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ports: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.ports = ports
        self.turn = 0

    def connect(self) -> socket.socket:
        for _ in range(len(self.ports)):
            self.turn = (self.turn + 1) % len(self.ports)
            try:
                return socket.create_connection(("127.0.0.1", self.ports[self.turn]), timeout=5)
            except OSError:
                continue
        raise OSError("no replica accepts connections")


class _Forward(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, Balancer)
        try:
            upstream = self.server.connect()
        except OSError:
            return
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
        back.start()
        pump(self.request, upstream)
        back.join(timeout=5)
        upstream.close()


CONFIG = """
[gateway]
backend = "unsafe-local"
db_url = "{db_url}"
db_encrypt_keys = ["{key}"]
stop_clusters_on_shutdown = false
api_url = "{api_url}"
lease_ttl = {lease_ttl}
replica_sync_period = {sync_period}

[proxy]
address = "127.0.0.1:{port}"

[backend.unsafe-local]
cluster_heartbeat_period = 1
# A heartbeat to a replica that is being killed or is starting gets no answer or a 503, and
# is retried a period later: the default timeout (two periods) would fail a cluster for one
# such beat. With the default 15 s period a failed beat is retried after 1 s, well within
# its 30 s timeout; five periods here leave the same room for a few.
cluster_heartbeat_timeout = 5
cluster_status_period = 2
worker_status_period = 2
clusters_directory = "{clusters}"
{backend_extra}

[cluster]
worker_memory = "512 MiB"
{cluster_extra}
"""


@contextmanager
def replica_set(
    folder: Path,
    db_url: str,
    names: tuple[str, ...] = ("a", "b"),
    *,
    lease_ttl: float = 3.0,
    sync_period: float = 0.5,
    backend_extra: str = "",
    cluster_extra: str = "",
) -> Iterator[ReplicaSet]:
    """Replicas called ``names`` (not started) on the database at ``db_url``, the unsafe-local
    backend with one clusters directory, the schedulers heartbeating through a load balancer;
    every replica still running at the end is killed."""
    key = base64.b64encode(os.urandom(32)).decode()
    ports = [free_port() for _ in names]
    balancer = Balancer(ports)
    threading.Thread(target=balancer.serve_forever, daemon=True).start()
    api_url = f"http://127.0.0.1:{balancer.server_address[1]}/api"
    replicas = []
    for name, port in zip(names, ports, strict=True):
        config = folder / f"{name}.toml"
        config.write_text(
            CONFIG.format(
                db_url=db_url,
                key=key,
                api_url=api_url,
                lease_ttl=lease_ttl,
                sync_period=sync_period,
                port=port,
                clusters=folder / "clusters",
                backend_extra=backend_extra,
                cluster_extra=cluster_extra,
            )
        )
        replicas.append(
            Replica(name=name, folder=folder, config=config, address=f"http://127.0.0.1:{port}")
        )
    made = ReplicaSet(replicas=replicas, db_url=db_url, folder=folder, balancer=balancer)
    try:
        yield made
    finally:
        for replica in replicas:
            if replica.alive():
                assert replica.proc is not None
                replica.proc.kill()
                replica.proc.wait()
        balancer.shutdown()
        balancer.server_close()


def cluster_processes(gateways: set[int]) -> set[int]:
    """Live processes below this one that are neither a gateway nor a gateway's child (its fork
    server): the schedulers and workers, whoever started them."""
    parents = {st.pid: st.ppid for st in all_stats()}
    return {
        pid
        for pid in descendants(reap=True)
        if pid not in gateways and parents.get(pid) not in gateways
    }


def processes_in(clusters_dir: Path) -> dict[str, set[int]]:
    """Live processes whose working directory is a cluster's directory under
    ``clusters_dir`` (schedulers, workers and their children, however started: cold, or
    forked by a fork server, whose command line and environment are the server's): the
    directory's name -> pids."""
    root = str(clusters_dir.resolve())
    found: dict[str, set[int]] = {}
    for st in all_stats():
        if st.state == "Z":
            continue
        try:
            cwd = os.readlink(f"/proc/{st.pid}/cwd")
        except OSError:
            continue
        if cwd.startswith(root + os.sep):
            found.setdefault(cwd[len(root) + 1 :].split(os.sep)[0], set()).add(st.pid)
    return found
