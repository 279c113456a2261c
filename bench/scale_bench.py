"""Benchmark of one gateway holding thousands of clusters, side by side with the original.
Owns the run: the gateways, the simulated schedulers, the load, and bench/results/scale.{md,json}.
"""

# Systems, each a gateway process on loopback whose backend starts nothing:
#
# - ``ours-file``: ``gateway serve``, backend ``simulated`` (gateway_core.testing.simulated),
#   store in an SQLite file;
# - ``ours-pg``: the same on PostgreSQL (core/ci/start-postgres.sh; a database of its own);
# - ``original``: ``dask-gateway-server`` (PyPI), backend ``NullBackend``
#   (bench/scale_original_backend.py, a DBBackendBase that does nothing), SQLite file, its Go
#   proxy.
#
# A backend "start" is a line in a spool file (cluster name and token, or worker name). The
# ``schedulers`` process plays every scheduler: it reads the spools and sends the heartbeats
# (through the gateway's public address, with the cluster's token): the first makes the cluster
# RUNNING and asks for ``--workers`` workers, the next ones report the workers started since as
# active. It also answers the scale requests the gateways forward to a scheduler's API. The
# ``load`` process is the users: aiohttp, one session (cookie jar) per user.
#
# Per size (``--sizes``) and system, in one run: the store is filled offline to that many
# clusters, each with ``--workers`` RUNNING workers, by copying a template cluster created
# through the API at the start (same options, config and TLS credentials; new name, token,
# owner); 100 users own ``--own`` clusters each at every size, the rest belong to other users.
# Then: start the gateway on the populated store (until an authenticated listing answers);
# settle; idle CPU and RSS of the gateway process; the API load (list own clusters, get one,
# scale one, in turn) under ``--users`` concurrent users; creates by ``--creators`` concurrent
# creators, each new cluster taken to RUNNING with its workers; stop (clusters stay stored).
# Run ``python bench/scale_bench.py --help``.

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
PASSWORD = "bench-password"
TEMPLATE_USER = "template"
PG_SCRIPT = ROOT / "core" / "ci" / "start-postgres.sh"
PG_DEFAULT = "postgresql+psycopg://gateway:gateway@127.0.0.1:54329/gateway_test"
SYSTEMS = {
    "ours-file": "ours, SQLite file",
    "ours-pg": "ours, PostgreSQL",
    "original": "original, SQLite file",
}
DISTRIBUTIONS = (
    "gateway-core",
    "gateway-proxy",
    "dask-gateway-server",
    "aiohttp",
    "SQLAlchemy",
    "psycopg",
    "py-spy",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def read_from(path: str, offset: int) -> bytes:
    """What ``path`` holds from ``offset`` on (a spool: small reads, local file)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# ============================================================================================
# The schedulers (their own process): read the spools, heartbeat, answer forwarded scales
# ============================================================================================


COMM_PORTS = 64
"""Addresses the schedulers' stand-in answers forwarded scales on: clusters spread over them,
as real schedulers each have their own (a gateway may cap connections per address)."""


def comm_port(ports: list[int], cluster: str) -> int:
    """The stand-in's port that answers as cluster ``cluster``'s scheduler API."""
    return ports[zlib.crc32(cluster.encode()) % len(ports)]


class Schedulers:
    def __init__(self) -> None:
        self.targets: dict[str, dict[str, Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.comm_ports: list[int] = []

    async def run(self) -> None:
        import aiohttp
        from aiohttp import web

        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))
        self.sem = asyncio.Semaphore(32)
        app = web.Application()
        app.router.add_post("/api/comm", self.comm)
        app.router.add_post("/watch", self.watch)
        app.router.add_get("/stats", self.stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for _ in range(COMM_PORTS):
            comm = web.TCPSite(runner, LOOPBACK, 0)
            await comm.start()
            self.comm_ports.append(comm._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        print(self.port, flush=True)
        print(json.dumps(self.comm_ports), flush=True)
        tasks = [asyncio.create_task(self.tail_loop())]
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        with contextlib.suppress(Exception):
            loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
        await stop
        for task in tasks:
            task.cancel()
        await self.http.close()
        await runner.cleanup()

    async def comm(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        return web.json_response({})

    async def watch(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        if body["spool"] in self.targets:  # a restart: a new port
            self.targets[body["spool"]]["api"] = body["api"]
            return web.json_response({})
        self.targets[body["spool"]] = {
            "api": body["api"],
            "workers": int(body["workers"]),
            "offset": 0,
            "tokens": {},
            "locks": {},
            "known": collections.defaultdict(set),
            "new": collections.defaultdict(set),
            "registered": 0,
            "reported": 0,
            "errors": 0,
            "last_error": None,
        }
        return web.json_response({})

    async def stats(self, request: Any) -> Any:
        from aiohttp import web

        t = self.targets.get(request.query["spool"], {})
        keys = ("registered", "reported", "errors", "last_error")
        return web.json_response({k: t.get(k) for k in keys})

    async def tail_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            for spool, t in list(self.targets.items()):
                try:
                    data = read_from(spool, t["offset"])
                except FileNotFoundError:
                    continue
                end = data.rfind(b"\n") + 1
                t["offset"] += end
                for line in data[:end].splitlines():
                    rec = json.loads(line)
                    if "worker" in rec:
                        t["new"][rec["cluster"]].add(rec["worker"])
                    else:
                        t["tokens"][rec["cluster"]] = rec["token"]
                        self.spawn(self.beat(t, rec["cluster"], first=True))
                for name in list(t["new"]):
                    if name in t["tokens"]:
                        self.spawn(self.beat(t, name, first=False))

    def comm_port(self, name: str) -> int:
        return comm_port(self.comm_ports, name)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def beat(self, t: dict[str, Any], name: str, *, first: bool) -> None:
        # One heartbeat at a time per cluster, as from one scheduler: an older list of
        # workers arriving after a newer one would look like workers gone.
        lock = t["locks"].setdefault(name, asyncio.Lock())
        async with lock:
            await self._beat(t, name, first=first)

    async def _beat(self, t: dict[str, Any], name: str, *, first: bool) -> None:
        new = set() if first else t["new"].pop(name, set())
        if not first and not new:
            return
        # Every heartbeat lists every worker started so far, as a scheduler's does.
        t["known"][name] |= new
        workers = sorted(t["known"][name])
        msg = {
            "scheduler_address": "tls://127.0.0.1:9",
            "dashboard_address": "",
            "api_address": f"http://{LOOPBACK}:{self.comm_port(name)}",
            "count": t["workers"],
            "active_workers": workers,
            "closing_workers": [],
            "closed_workers": [],
        }
        url = f"{t['api']}/v1/clusters/{name}/heartbeat"
        headers = {"Authorization": f"token {t['tokens'][name]}"}
        async with self.sem:
            for attempt in range(5):
                try:
                    async with self.http.post(url, json=msg, headers=headers) as resp:
                        await resp.read()
                        if resp.status == 200:
                            break
                        error = f"HTTP {resp.status}"
                except Exception as exc:  # noqa: BLE001 - counted and retried
                    error = f"{type(exc).__name__}: {exc}"
                t["last_error"] = error
                await asyncio.sleep(0.2 * (attempt + 1))
            else:
                t["errors"] += 1
                return
        if first:
            t["registered"] += 1
        else:
            t["reported"] += len(new)


# ============================================================================================
# The users (their own process): the API load, and the creates
# ============================================================================================


async def api_load(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url = spec["url"]
    users: dict[str, list[str]] = spec["users"]
    names = sorted(users)
    ops = ("list", "get", "scale")
    lat: dict[str, list[float]] = {op: [] for op in ops}
    errors: collections.Counter[str] = collections.Counter()
    answered_by: collections.Counter[int] = collections.Counter()
    first_error: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    begin = loop.time() + spec["warmup"]
    end = begin + spec["duration"]
    conn = aiohttp.TCPConnector(limit=0)

    async def user(i: int) -> None:
        name = names[i % len(names)]
        own = users[name]
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(
            connector=conn, connector_owner=False, cookie_jar=jar
        ) as http:
            headers = {"Authorization": basic(name)}
            k = i
            while True:
                op = ops[k % 3]
                cluster = own[(k // 3) % len(own)]
                k += 1
                t0 = loop.time()
                if t0 >= end:
                    return
                try:
                    if op == "list":
                        req = http.get(f"{url}/api/v1/clusters/", headers=headers)
                    elif op == "get":
                        req = http.get(f"{url}/api/v1/clusters/{cluster}", headers=headers)
                    else:
                        req = http.post(
                            f"{url}/api/v1/clusters/{cluster}/scale",
                            json={"count": spec["scale_count"]},
                            headers=headers,
                        )
                    async with req as resp:
                        body = await resp.read()
                        ok = resp.status == 200
                except Exception as exc:  # noqa: BLE001 - counted
                    ok, body = False, f"{type(exc).__name__}: {exc}".encode()
                t1 = loop.time()
                answered_by[i] += 1
                if t0 >= begin and t1 <= end:
                    if ok:
                        lat[op].append(t1 - t0)
                    else:
                        errors[op] += 1
                        first_error.setdefault(op, body[:200].decode(errors="replace"))

    await asyncio.gather(*(user(i) for i in range(spec["concurrency"])))
    await conn.close()
    answered = sum(answered_by.values())
    allv = [v for op in ops for v in lat[op]]
    out: dict[str, Any] = {
        "requests": len(allv),
        "all_requests": answered,
        "req_per_s": len(allv) / spec["duration"],
        "p50_ms": (pct(allv, 0.5) or 0) * 1e3,
        "p99_ms": (pct(allv, 0.99) or 0) * 1e3,
        "errors": dict(errors),
        "first_error": first_error,
    }
    for op in ops:
        out[op] = {
            "n": len(lat[op]),
            "p50_ms": (pct(lat[op], 0.5) or 0) * 1e3,
            "p99_ms": (pct(lat[op], 0.99) or 0) * 1e3,
        }
    return out


async def creates(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url = spec["url"]
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + spec["max_seconds"]
    left = [spec["max_creates"]]
    lat: list[float] = []
    made: list[str] = []
    errors: list[str] = []
    conn = aiohttp.TCPConnector(limit=0)

    async def creator(i: int) -> None:
        name = f"creator{i:03d}"
        async with aiohttp.ClientSession(
            connector=conn, connector_owner=False, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as http:
            headers = {"Authorization": basic(name)}
            while left[0] > 0 and loop.time() < stop_at:
                left[0] -= 1
                t0 = loop.time()
                try:
                    async with http.post(
                        f"{url}/api/v1/clusters/", json={"cluster_options": {}}, headers=headers
                    ) as resp:
                        body = await resp.read()
                        if resp.status == 201:
                            made.append(json.loads(body)["name"])
                            lat.append(loop.time() - t0)
                        else:
                            errors.append(f"HTTP {resp.status}: {body[:200]!r}")
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(creator(i) for i in range(spec["creators"])))
    took = loop.time() - start
    await conn.close()
    return {
        "created": len(made),
        "seconds": took,
        "per_s": len(made) / took if took else 0.0,
        "p50_ms": (pct(lat, 0.5) or 0) * 1e3,
        "p99_ms": (pct(lat, 0.99) or 0) * 1e3,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def run_users(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the ``load`` role in a new process with ``spec``; its JSON answer."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--role", "load", "--spec", f.name],
            capture_output=True,
            text=True,
            timeout=spec.get("max_seconds", spec.get("duration", 0)) + 120,
        )
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"load process failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ============================================================================================
# The gateways
# ============================================================================================


class Gateway:
    """One system: its store, its config, its process."""

    def __init__(self, name: str, args: argparse.Namespace, tmp: Path, hub: Hub) -> None:
        self.name = name
        self.args = args
        self.dir = tmp / name
        self.dir.mkdir()
        self.hub = hub
        self.key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self.spool = self.dir / "spool.jsonl"
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.template = ""
        self.users: dict[str, list[str]] = {}
        self.total = 0
        self.target = 0
        if name == "ours-pg":
            self.url = args.pg_database
        else:
            self.url = f"sqlite:///{self.dir / 'store.sqlite'}"

    @property
    def public(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def write_config(self) -> list[str]:
        period = self.args.status_period
        if self.name == "original":
            path = self.dir / "dask_gateway_config.py"
            path.write_text(
                "c = get_config()  # noqa: F821\n"
                'c.DaskGateway.backend_class = "scale_original_backend.NullBackend"\n'
                f'c.DaskGateway.address = "{LOOPBACK}:0"\n'
                'c.DaskGateway.log_level = "WARN"\n'
                f'c.Proxy.address = "{LOOPBACK}:{self.port}"\n'
                f"c.SimpleAuthenticator.password = {PASSWORD!r}\n"
                f"c.NullBackend.db_url = {self.url!r}\n"
                f"c.NullBackend.db_encrypt_keys = [{self.key!r}]\n"
                "c.NullBackend.stop_clusters_on_shutdown = False\n"
                f"c.NullBackend.spool = {str(self.spool)!r}\n"
                f"c.NullBackend.cluster_status_period = {period}\n"
                f"c.NullBackend.worker_status_period = {period}\n"
                "c.NullBackend.cluster_heartbeat_timeout = 86400.0\n"
            )
            return [str(BIN / "dask-gateway-server"), "-f", str(path)]
        path = self.dir / "gateway.toml"
        path.write_text(
            'plugins = ["gateway_core.testing.hooks"]\n'
            "\n[gateway]\n"
            'backend = "simulated"\n'
            'authenticator = "simple"\n'
            f'address = "{LOOPBACK}:0"\n'
            'log_level = "WARNING"\n'
            f'db_url = "{self.url}"\n'
            f'db_encrypt_keys = ["{self.key}"]\n'
            "stop_clusters_on_shutdown = false\n"
            "\n[proxy]\n"
            f'address = "{LOOPBACK}:{self.port}"\n'
            "\n[auth.simple]\n"
            f'password = "{PASSWORD}"\n'
            "\n[backend.simulated]\n"
            f'spool = "{self.spool}"\n'
            f"cluster_status_period = {period}\n"
            f"worker_status_period = {period}\n"
            "cluster_heartbeat_timeout = 86400.0\n"
        )
        return [str(BIN / "gateway"), "serve", "--config", str(path)]

    def start(self) -> float:
        """Start the gateway; seconds until an authenticated listing answers 200."""
        self.port = free_port()
        argv = self.write_config()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        began = time.perf_counter()
        self.hub.watch(self)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        request = urllib.request.Request(
            f"{self.public}/api/v1/clusters/", headers={"Authorization": basic("u000")}
        )
        limit = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} at start-up:\n"
                    + tail(self.log)
                )
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - began
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > limit:
                raise RuntimeError(f"{self.name}: API not answering after 300 s")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    # ---------------------------------------------------------------------------------------
    # Filling the store offline (gateway stopped): copies of the template

    def owners(self, count: int) -> list[str]:
        """Owners for the next ``count`` clusters: the load users first, up to ``--own``
        clusters each, then other users (10 clusters each)."""
        out = []
        given = collections.Counter({u: len(names) for u, names in self.users.items()})
        for _ in range(count):
            for user in (f"u{i:03d}" for i in range(self.args.users)):
                self.users.setdefault(user, [])
                if given[user] < self.args.own:
                    given[user] += 1
                    break
            else:
                user = ""
            out.append(user)
        return out

    def fill(self, size: int) -> float:
        """Add copies of the template until the store holds ``size`` clusters; seconds taken."""
        began = time.perf_counter()
        self.target = size
        if self.name == "original":
            self._fill_original(size)
        else:
            self._fill_ours(size)
        return time.perf_counter() - began

    def _fill_ours(self, size: int) -> None:
        from cryptography.fernet import Fernet

        from gateway_core.store import clusters_table, workers_table

        self._copy_template(clusters_table, workers_table, "name", "cluster_name", Fernet)

    def _fill_original(self, size: int) -> None:
        from cryptography.fernet import Fernet
        from dask_gateway_server.backends import db_base

        self._copy_template(db_base.clusters, db_base.workers, "id", "cluster_id", Fernet)

    def _copy_template(
        self, clusters: Any, workers: Any, key: str, link: str, fernet_class: Any
    ) -> None:
        """Insert copies of the template's row and its workers' rows, in one transaction:
        a new name, owner and (encrypted) token each, every other column as the template's."""
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        fernet = fernet_class(self.key.encode())
        engine = sa.create_engine(self.url, poolclass=NullPool)
        with engine.begin() as conn:
            row = dict(
                conn.execute(clusters.select().where(clusters.c.name == self.template))
                .mappings()
                .one()
            )
            wrows = [
                dict(w)
                for w in conn.execute(
                    workers.select().where(workers.c[link] == row[key])
                ).mappings()
            ]
            have = conn.execute(sa.select(sa.func.count()).select_from(clusters)).scalar_one()
            count = int(have)
            owners = self.owners(self.target - count)
            batch_c: list[dict[str, Any]] = []
            batch_w: list[dict[str, Any]] = []
            for owner in owners:
                name = uuid.uuid4().hex
                if owner:
                    self.users[owner].append(name)
                else:
                    owner = f"other{count // 10:05d}"
                count += 1
                values = {
                    **row,
                    "name": name,
                    "username": owner,
                    "token": fernet.encrypt(uuid.uuid4().hex.encode()),
                    "start_time": int(time.time() * 1000),
                    # Its own scheduler API address, as the stand-in answers for it.
                    "api_address": f"http://{LOOPBACK}:{comm_port(self.hub.comm_ports, name)}",
                }
                if key == "id":  # the original: integer ids, given here to link the workers
                    values["id"] = None
                batch_c.append(values)
                for w in wrows:
                    batch_w.append({**w, "name": uuid.uuid4().hex, link: name})
            if key == "id":
                start = int(conn.execute(sa.select(sa.func.max(clusters.c.id))).scalar_one())
                by_name = {}
                for i, values in enumerate(batch_c, start + 1):
                    values["id"] = i
                    by_name[values["name"]] = i
                for w in batch_w:
                    w.pop("id", None)
                    w[link] = by_name[w[link]]
            if batch_c:
                conn.execute(clusters.insert(), batch_c)
            if batch_w:
                conn.execute(workers.insert(), batch_w)
            self.total = count
        engine.dispose()


class Hub:
    """The schedulers process, seen from the main process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "schedulers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.comm_ports: list[int] = json.loads(self.proc.stdout.readline())

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.port}{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def watch(self, gw: Gateway) -> None:
        self.call(
            "/watch",
            {"spool": str(gw.spool), "api": f"{gw.public}/api", "workers": gw.args.workers},
        )

    def stats(self, gw: Gateway) -> dict[str, Any]:
        from urllib.parse import quote

        return self.call(f"/stats?spool={quote(str(gw.spool))}")

    def wait(self, gw: Gateway, *, registered: int, reported: int, timeout: float) -> float:
        """Seconds until the hub counts that many clusters registered and workers reported."""
        began = time.perf_counter()
        while True:
            s = self.stats(gw)
            if s["registered"] >= registered and s["reported"] >= reported:
                return time.perf_counter() - began
            if time.perf_counter() - began > timeout:
                raise RuntimeError(f"{gw.name}: schedulers stuck at {s}; log:\n{tail(gw.log)}")
            time.sleep(0.02)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ============================================================================================
# Measuring
# ============================================================================================


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def settle(proc: psutil.Process, limit: float = 30.0) -> float:
    """Wait until the process uses under 5 % of a core over a second (at most ``limit`` s)."""
    began = time.perf_counter()
    while time.perf_counter() - began < limit:
        before = cpu_s(proc)
        time.sleep(1.0)
        if cpu_s(proc) - before < 0.05:
            break
    return time.perf_counter() - began


def make_template(gw: Gateway, hub: Hub, args: argparse.Namespace) -> None:
    """Create one cluster through the API, take it to RUNNING with its workers, remember it."""
    req = urllib.request.Request(
        f"{gw.public}/api/v1/clusters/",
        data=json.dumps({"cluster_options": {}}).encode(),
        headers={"Authorization": basic(TEMPLATE_USER), "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        gw.template = json.loads(resp.read())["name"]
    hub.wait(gw, registered=1, reported=args.workers, timeout=60)
    req = urllib.request.Request(
        f"{gw.public}/api/v1/clusters/{gw.template}",
        headers={"Authorization": basic(TEMPLATE_USER)},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        status = json.loads(resp.read())["status"]
    if status != "RUNNING":
        raise RuntimeError(f"{gw.name}: template cluster is {status}")
    time.sleep(0.5)  # the workers' RUNNING status written behind


def measure_size(gw: Gateway, hub: Hub, size: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"size": size}
    out["fill_s"] = gw.fill(size)
    out["clusters"] = gw.total
    out["workers"] = gw.total * args.workers
    print(f"  {gw.name} @ {size}: filled ({out['fill_s']:.1f} s)", flush=True)
    out["startup_s"] = gw.start()
    proc = gw.process()
    out["settle_s"] = settle(proc)
    before, t0 = cpu_s(proc), time.perf_counter()
    time.sleep(args.idle)
    idle_cpu, idle_s = cpu_s(proc) - before, time.perf_counter() - t0
    periods = idle_s / args.status_period
    out["idle_cpu_s"] = idle_cpu
    out["idle_s"] = idle_s
    out["cpu_us_per_cluster_period"] = idle_cpu / periods / gw.total * 1e6
    out["rss_mib"] = proc.memory_info().rss / 2**20
    out["loadavg"] = os.getloadavg()[0]
    print(
        f"  {gw.name} @ {size}: start-up {out['startup_s']:.1f} s, idle CPU "
        f"{out['cpu_us_per_cluster_period']:.2f} µs/cluster/period, RSS {out['rss_mib']:.0f} MiB",
        flush=True,
    )
    cpu0 = cpu_s(proc)
    out["api"] = run_users(
        {
            "mode": "api",
            "url": gw.public,
            "users": gw.users,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "duration": args.duration,
            "scale_count": args.workers,
        }
    )
    out["api"]["gateway_cpu_s"] = cpu_s(proc) - cpu0
    print(
        f"  {gw.name} @ {size}: API {out['api']['req_per_s']:.0f} req/s, p50 "
        f"{out['api']['p50_ms']:.1f} ms, p99 {out['api']['p99_ms']:.1f} ms, errors "
        f"{out['api']['errors']}",
        flush=True,
    )
    if args.profile and gw.name == "ours-file" and size == max(args.sizes):
        out["profile"] = profile(gw, args)
    s0 = hub.stats(gw)
    out["create"] = run_users(
        {
            "mode": "create",
            "url": gw.public,
            "creators": args.creators,
            "max_creates": args.creates,
            "max_seconds": args.create_seconds,
        }
    )
    made = out["create"]["created"]
    ready = hub.wait(
        gw,
        registered=s0["registered"] + made,
        reported=s0["reported"] + made * args.workers,
        timeout=300,
    )
    total = out["create"]["seconds"] + ready
    out["create"]["ready_s"] = total
    out["create"]["ready_per_s"] = made / total if total else 0.0
    gw.total += made
    print(
        f"  {gw.name} @ {size}: creates {out['create']['per_s']:.1f}/s "
        f"({made} in {out['create']['seconds']:.1f} s), with workers running "
        f"{out['create']['ready_per_s']:.1f}/s",
        flush=True,
    )
    gw.stop()
    return out


# ---------------------------------------------------------------------------------------------
# Where our time goes: py-spy on our gateway under the API load


def profile(gw: Gateway, args: argparse.Namespace) -> dict[str, Any]:
    spy = BIN / "py-spy"
    if not spy.exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    assert gw.proc is not None
    raw = gw.dir / "profile.txt"
    seconds = max(5, int(args.duration))
    spy_proc = subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(gw.proc.pid),
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            "--rate",
            "200",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    run_users(
        {
            "mode": "api",
            "url": gw.public,
            "users": gw.users,
            "concurrency": args.concurrency,
            "warmup": 0.0,
            "duration": float(seconds),
            "scale_count": args.workers,
        }
    )
    _, err = spy_proc.communicate(timeout=60)
    if not raw.exists():
        return {"error": (err or b"").decode(errors="replace")[-500:]}
    return summarize_profile(raw)


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [short_frame(f) for f in stack.split(";")]
        # py-spy puts the thread first; idle event-loop samples end in select/epoll.
        own[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    share = lambda c: [(f, round(100 * n / total, 1)) for f, n in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(incl)}


def short_frame(frame: str) -> str:
    """``function (path/to/module.py:123)`` → ``function (module.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for i, p in enumerate(parts):
        if p in ("gateway_core", "aiohttp", "sqlalchemy", "asyncio", "gateway_proxy", "json"):
            path = "/".join(parts[i:])
            break
    else:
        path = Path(path).name
    return f"{name} ({path})" if path else name


# ============================================================================================
# PostgreSQL
# ============================================================================================


def pg_database(tag: str) -> tuple[str | None, str]:
    """A new database on the test server for this run: (URL, "") or (None, why not)."""
    try:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool
    except ImportError as exc:
        return None, str(exc)
    base = os.environ.get("GATEWAY_TEST_POSTGRES_URL", PG_DEFAULT)
    if "GATEWAY_TEST_POSTGRES_URL" not in os.environ and PG_SCRIPT.exists():
        started = subprocess.run(["bash", str(PG_SCRIPT)], capture_output=True, text=True)
        if started.returncode != 0:
            return None, f"{PG_SCRIPT.name} failed: {started.stderr.strip()[-300:]}"
    name = f"scale_bench_{tag}"
    try:
        engine = sa.create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, f"cannot create a database on {base.split('@')[-1]}: {exc}"[:400]
    return base.rsplit("/", 1)[0] + "/" + name, ""


def pg_drop(url: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    base = os.environ.get("GATEWAY_TEST_POSTGRES_URL", PG_DEFAULT)
    name = url.rsplit("/", 1)[1]
    engine = sa.create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


# ============================================================================================
# Report
# ============================================================================================


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def get(report: dict[str, Any], system: str, size: int) -> dict[str, Any] | None:
    for row in report["systems"].get(system, {}).get("sizes", []):
        if row["size"] == size:
            return dict(row)
    return None


def cpu_per_request(api: dict[str, Any], settings: dict[str, Any]) -> float:
    """Milliseconds of gateway CPU per API request: the gateway's CPU time over the load
    (warm-up included) by the requests answered in it (estimated from the measured rate when
    the warm-up's requests were not counted). Unlike req/s and latency, it hardly moves with
    what else the machine runs."""
    total = api.get("all_requests") or api["req_per_s"] * (
        settings["warmup"] + settings["duration"]
    )
    return 1e3 * api["gateway_cpu_s"] / total if total else 0.0


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**NOT met**")


def goals(report: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    sizes = report["settings"]["sizes"]
    small, big = min(sizes), max(sizes)
    out: list[tuple[str, bool | None, str]] = []
    ours_big = get(report, "ours-file", big)
    orig_small = get(report, "original", small)
    orig_big = get(report, "original", big)
    if ours_big and orig_small:
        a, b = ours_big["api"]["p99_ms"], orig_small["api"]["p99_ms"]
        out.append(
            (
                f"our API p99 at {big:,} clusters no worse than the original's at {small:,}",
                a <= b,
                f"{a:.1f} ms vs {b:.1f} ms",
            )
        )
    if ours_big and orig_big:
        a, b = ours_big["api"]["req_per_s"], orig_big["api"]["req_per_s"]
        out.append(
            (
                f"our API req/s at {big:,} clusters ≥ 3x the original's",
                a >= 3 * b,
                f"{a:,.0f} vs {b:,.0f} req/s ({a / b:.2f}x)" if b else "original had 0 req/s",
            )
        )
    for system in ("ours-file", "ours-pg"):
        rows = [get(report, system, s) for s in sizes]
        rates = [r["create"]["per_s"] for r in rows if r]
        if rates:
            out.append(
                (
                    f"creates ≥ 300/s, {SYSTEMS[system]}",
                    min(rates) >= 300,
                    " / ".join(f"{x:.0f}/s" for x in rates) + " (per size)",
                )
            )
    small_row, big_row = get(report, "ours-file", small), ours_big
    if small_row and big_row:
        a, b = small_row["api"]["list"]["p50_ms"], big_row["api"]["list"]["p50_ms"]
        out.append(
            (
                "listing cost independent of other users' clusters (ours, own-cluster list "
                f"p50 at {big:,} within 1.25x of {small:,})",
                b <= 1.25 * a,
                f"{a:.1f} → {b:.1f} ms",
            )
        )
    return out


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    v = m["versions"]
    sizes = s["sizes"]
    lines = [
        "# Scale benchmark: one gateway holding thousands of clusters, side by side",
        "",
        f"`{report['command']}` — {m['date']}; {m['nproc']} CPUs ({m['cpu'] or 'unknown CPU'}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}; Python {m['python']}; gateway-core "
        f"{v['gateway-core']}, gateway-proxy {v['gateway-proxy']}, dask-gateway-server "
        f"{v['dask-gateway-server']}, SQLAlchemy {v['SQLAlchemy']}, psycopg {v['psycopg']}, "
        f"aiohttp {v['aiohttp']}. Whole run {report['seconds']:.0f} s; 1-minute load average "
        f"{min(report['loadavg']):.1f}-{max(report['loadavg']):.1f} at the measurements (the "
        "machine is shared with other work: figures from the same run compare, absolute "
        "numbers move with the load).",
        "",
        f"Each cluster has {s['workers']} RUNNING workers; {s['users']} users own {s['own']} "
        "clusters each at every size, the other clusters belong to other users (10 each). "
        f"Status checks every {s['status_period']:g} s on both gateways; heartbeat timeout "
        "one day (the schedulers are silent once their workers run, so idle means idle).",
        "",
        "| system | clusters | start-up (s) | RSS (MiB) | idle CPU (µs / cluster / period) | "
        "API req/s | API p50 (ms) | API p99 (ms) | gateway CPU per request (ms) | "
        "list p50 / p99 (ms) | get p50 / p99 (ms) | scale p50 / p99 (ms) | API errors | "
        "creates/s | created → workers running (/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for system in SYSTEMS:
            r = get(report, system, size)
            if r is None:
                continue
            a, c = r["api"], r["create"]
            errs = sum(a["errors"].values()) + c["errors"]
            lines.append(
                f"| {SYSTEMS[system]} | {r['clusters']:,} | {r['startup_s']:.1f} | "
                f"{r['rss_mib']:.0f} | {r['cpu_us_per_cluster_period']:.2f} | "
                f"{a['req_per_s']:,.0f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | "
                f"{cpu_per_request(a, s):.2f} | "
                f"{a['list']['p50_ms']:.1f} / {a['list']['p99_ms']:.1f} | "
                f"{a['get']['p50_ms']:.1f} / {a['get']['p99_ms']:.1f} | "
                f"{a['scale']['p50_ms']:.1f} / {a['scale']['p99_ms']:.1f} | {errs} | "
                f"{c['per_s']:.0f} | {c['ready_per_s']:.0f} |"
            )
    lines += ["", "## Goals of issue 15", ""]
    for text, ok, detail in goals(report):
        lines.append(f"- {text}: {verdict(ok)} ({detail})")
    lines += ["", "## Memory per cluster", ""]
    for system in SYSTEMS:
        rows = [get(report, system, size) for size in sizes]
        rows = [r for r in rows if r]
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            per = (b["rss_mib"] - a["rss_mib"]) * 2**20 / max(1, b["clusters"] - a["clusters"])
            lines.append(
                f"- {SYSTEMS[system]}: {per / 1024:.1f} KiB per cluster with its "
                f"{s['workers']} workers (RSS growth from {a['clusters']:,} to "
                f"{b['clusters']:,} clusters)"
            )
    problems = report.get("problems") or []
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    prof = report.get("profile")
    if prof:
        lines += [
            "",
            f"## Where our time goes at {max(sizes):,} clusters (py-spy, API load)",
            "",
        ]
        if "error" in prof:
            lines.append(f"Profile not taken: {prof['error']}")
        else:
            lines.append(
                f"{prof['samples']:,} samples of the `gateway serve` process (SQLite file store) "
                "under the same API load (its own run, after the measured one); share of the "
                "samples in which the process was busy (py-spy leaves idle samples out), "
                "functions by self time and by inclusive time (any thread)."
            )
            lines += ["", "| self % | function |", "|---|---|"]
            lines += [f"| {p} | `{f}` |" for f, p in prof["self"]]
            lines += ["", "| inclusive % | function |", "|---|---|"]
            lines += [f"| {p} | `{f}` |" for f, p in prof["inclusive"]]
    findings = report.get("findings")
    if findings:
        lines += ["", "## Findings", ""] + [f"- {f}" for f in findings]
    lines += [
        "",
        "## How it is measured",
        "",
        "Every gateway is its own process on loopback, reached through its own proxy (ours: "
        "the built-in `gateway-proxy`; the original: its Go proxy). Backends start nothing: "
        "ours is `simulated` (`gateway_core.testing.simulated`), the original's a "
        "`DBBackendBase` subclass whose six operations do nothing "
        "(`bench/scale_original_backend.py`); each start writes one line (name and token, or "
        "worker name) to a spool file. A separate *schedulers* process reads the spools and "
        "sends the heartbeats through the gateway's heartbeat route with the cluster's token "
        "(the first one makes the cluster RUNNING and sets its worker count; later ones list "
        "the started workers as active), and answers the scale requests a gateway forwards to "
        "a scheduler's API, on 64 addresses (each cluster's API address is one of them, as "
        "every real scheduler has its own: a gateway's connection limit per address then "
        "does not turn into one limit for all clusters). A separate *users* process "
        "(aiohttp, one session and cookie jar per user, Basic auth) makes the load.",
        "",
        "- *Filling*: one cluster is created through the API and taken to RUNNING with its "
        "workers (the template); with the gateway stopped, the store is filled to the size by "
        "copying it (new name, token and owner; same options, config, TLS credentials and "
        "workers), copying its rows in one transaction through each project's own table "
        "definitions (`gateway_core.store`; `dask_gateway_server.backends.db_base`), secrets "
        "encrypted with the run's key. Creating them through the API would take the original "
        "over 8 minutes at 10,000.",
        "- *gateway CPU per request*: our proxy runs inside the `gateway serve` process, so "
        "our figure includes proxying; the original's Go proxy is a process of its own, not "
        "counted.",
        "- *start-up*: the gateway process started on the populated store until an "
        "authenticated `GET /api/v1/clusters/` answers 200 through its proxy.",
        f"- *idle CPU*: after the gateway settles (under 5 % of a core for 1 s), its process "
        f"CPU time (user + system) over {s['idle']:g} s with no request at all, divided by the "
        "status periods in that time and by the clusters: the cost of the periodic checks "
        "(cluster, worker, timeouts) per cluster.",
        "- *RSS*: of the gateway process (not its proxy), after the idle period.",
        f"- *API*: {s['concurrency']} concurrent users in a closed loop, each in turn listing "
        "its own clusters (`GET /api/v1/clusters/`), getting one (`GET "
        "/api/v1/clusters/{name}`) and scaling one to its current count (`POST "
        f".../scale`, forwarded to the simulated scheduler's API); {s['warmup']:g} s warm-up, "
        f"then {s['duration']:g} s measured. Latency per request, percentiles over all "
        "requests of the window.",
        f"- *creates/s*: {s['creators']} creators (each its own user) posting new clusters "
        f"until {s['creates']:,} are made or {s['create_seconds']:g} s pass, counted when the "
        "POST answers 201. *created → workers running*: the same clusters until each is "
        f"RUNNING and its {s['workers']} workers are reported active (the schedulers process "
        "reacts to the spool within 50 ms).",
        "",
        "PostgreSQL is the project's test server (`core/ci/start-postgres.sh`: Debian's "
        "PostgreSQL 15 on loopback, durability off), a database of its own for the run.",
        "",
    ]
    return "\n".join(lines)


# ============================================================================================
# Main
# ============================================================================================


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "command": " ".join(["python", "bench/scale_bench.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "sizes",
                "workers",
                "users",
                "own",
                "concurrency",
                "warmup",
                "duration",
                "idle",
                "status_period",
                "creators",
                "creates",
                "create_seconds",
            )
        },
        "systems": {},
        "problems": [],
        "loadavg": [os.getloadavg()[0]],
    }
    began = time.perf_counter()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.pg_database = None
    if "ours-pg" in systems:
        args.pg_database, why = pg_database(f"{os.getpid()}_{int(time.time())}")
        if args.pg_database is None:
            report["problems"].append(f"ours on PostgreSQL not measured: {why}")
            systems.remove("ours-pg")
    hub = Hub()
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        gateways = {name: Gateway(name, args, Path(tmp), hub) for name in systems}
        try:
            for gw in gateways.values():
                print(f"- {SYSTEMS[gw.name]}: template cluster", flush=True)
                report["systems"][gw.name] = {"label": SYSTEMS[gw.name], "sizes": []}
                try:
                    report["systems"][gw.name]["empty_startup_s"] = gw.start()
                    make_template(gw, hub, args)
                finally:
                    gw.stop()
            for size in sorted(args.sizes):
                print(f"- {size:,} clusters", flush=True)
                for gw in gateways.values():
                    try:
                        row = measure_size(gw, hub, size, args)
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        report["problems"].append(f"{SYSTEMS[gw.name]} at {size:,}: {exc}")
                        print(f"  {gw.name} @ {size}: FAILED {exc}", flush=True)
                        gw.stop()
                        continue
                    report["loadavg"].append(row["loadavg"])
                    prof = row.pop("profile", None)
                    if prof is not None:
                        report["profile"] = prof
                    report["systems"][gw.name]["sizes"].append(row)
        finally:
            for gw in gateways.values():
                gw.stop()
            hub.close()
            if args.pg_database:
                with contextlib.suppress(Exception):
                    pg_drop(args.pg_database)
    report["seconds"] = time.perf_counter() - began
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="a small run (sizes 100 1000, short windows)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=10, help="workers per cluster (10)")
    parser.add_argument("--users", type=int, default=100, help="concurrent API users (100)")
    parser.add_argument("--own", type=int, default=10, help="clusters each user owns (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="API warm-up seconds (2)")
    parser.add_argument("--duration", type=float, default=10.0, help="API seconds measured (10)")
    parser.add_argument("--idle", type=float, default=15.0, help="idle CPU window, s (15)")
    parser.add_argument("--status-period", type=float, default=5.0, help="status checks, s (5)")
    parser.add_argument("--creators", type=int, default=50, help="concurrent creators (50)")
    parser.add_argument("--creates", type=int, default=2000, help="at most this many (2000)")
    parser.add_argument("--create-seconds", type=float, default=6.0, help="or this long (6)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--render", help="only write the Markdown again from this JSON report")
    parser.add_argument("--out", default=str(RESULTS / "scale"), help="results path, no suffix")
    args, unknown = parser.parse_known_args()
    if args.role == "schedulers":
        asyncio.run(Schedulers().run())
        return
    if args.role == "load":
        spec = json.loads(Path(args.spec).read_text())
        fn = api_load if spec["mode"] == "api" else creates
        print(json.dumps(asyncio.run(fn(spec))), flush=True)
        return
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["findings"] = FINDINGS
        Path(args.render).write_text(json.dumps(report, indent=2) + "\n")
        Path(args.render).with_suffix(".md").write_text(render(report))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups
    if unknown:
        print(f"scale_bench: ignoring arguments {' '.join(unknown)}", file=sys.stderr)
    if args.quick:
        args.sizes, args.duration, args.idle, args.warmup = [100, 1000], 5.0, 10.0, 1.0
        args.creates, args.create_seconds = 300, 4.0
        if args.out == str(RESULTS / "scale"):
            args.out = str(Path(tempfile.gettempdir()) / "scale-quick")
    args.concurrency = args.users
    report = run(args)
    report["findings"] = FINDINGS
    text = render(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(text)


# What the committed run and its profiles say, in words (kept with the code that made it;
# update after a new full run; ``--render`` rewrites the Markdown with them).
FINDINGS: list[str] = [
    "**The machine was quiet for this run** (1-minute load average 0.4-1.0), unlike the runs "
    "before it: the figures compare side by side, and the absolute ones are close to what this "
    "2-CPU machine can give with the load generator and the schedulers' stand-in on the same "
    "CPUs as the gateway.",
    "**Requests per second: 1.79x the original at 10,000 clusters, not 3x.** Our gateway "
    "spends less CPU per request than the original (0.23 against 0.28 ms, our figure "
    "including the embedded proxy), but at 4,278 req/s that is 0.98 of a CPU: our API is "
    "one event loop, and it is saturated. The original used 0.67 of a CPU for its 2,390 req/s "
    "(its p50 is 38 ms for 100 users). 3x (7,170 req/s) would need 0.14 ms per request on one "
    "CPU, or the API served on more than one CPU (several processes behind the proxy), on a "
    "machine where the load generator does not take the other CPU. Where the CPU goes is the "
    "py-spy table above: aiohttp's server machinery, the embedded proxy and the in-memory "
    "hop to the API lead; core's own handlers are a small part.",
    "**p99: our list and get answer in 6-10 ms (p99) at 10,000 clusters, the original's in 60-64 "
    "ms at 1,000; the all-requests p99 goal is still not met (121.8 against 91.4 ms)** "
    "because every third request of the load is a scale, forwarded to the cluster's "
    "scheduler (here the bench's stand-in process, one for all clusters, on the same two "
    "CPUs): our scales take 77-84 ms (p50), the original's 56-60 ms, and the overall p99 is "
    "the scales' tail. Since the run before this one the forwarded scales reuse kept "
    "connections to the schedulers (`ProcessBackend`, 4 per scheduler); what is left of "
    "their latency has not been taken apart yet (our higher request rate also queues more "
    "scales at the stand-in).",
    "**Creates: 330/s and 321/s on the SQLite file store (goal met); 151/s and 154/s on "
    "PostgreSQL in this table.** Since this run (wt-pg-creates, creates phase only, two runs a "
    "minute apart on the shared machine at load 1.2-2.0, before = main 115e281): 134 -> "
    "299-326/s at 1,000 clusters and 128 -> 292-371/s at 10,000, from four changes each "
    "measured A/B: the create's insert committed ahead of the workers' backlog "
    "(`Store.flush_ahead`; 95-168 -> 176-186/s), the replicas' fence checks asked meanwhile "
    "answered by one statement whatever the shard (197-228 -> 270-307/s), a connection pool "
    "as large as the threads using the store (225-260 -> 273-280/s), statements regrouped by "
    "kind keeping each row's order (14 -> 4 statements per batch; within the noise). After "
    "them the event loop holds the GIL 83 % of the time: one core of Python is the limit, "
    "and 300/s is at the edge of this machine's noise; the table needs a full rerun on a "
    "quiet machine to say it is met.",
    "**Forwarded scales in this table were capped by the bench, not the gateway**: every "
    "copied cluster kept the template's one scheduler API address, so our keep-alive limit "
    "of 4 connections per address held all scales of the run to 4 at a time. The stand-in "
    "now answers on 64 addresses and each copy gets its own; a short side-by-side run at "
    "1,000 clusters after the fix (loaded machine): our scale p50 53 ms (was 122 in the same "
    "conditions), the original's 85 ms, our all-requests p99 90 ms against its 145 ms. The "
    "p99 goal needs the full rerun.",
    "**Listing cost does not depend on other users' clusters**: the own-cluster listing's p50 "
    "is 3.5 ms at 1,000 and 3.2 ms at 10,000, so the owner index works through the API as it "
    "does in bench/results/listing.md.",
    "**Memory, start-up and idle cost**: 16.7 KiB (SQLite file) and 19.8 KiB (PostgreSQL) per "
    "cluster with its 10 workers against the original's 11.6; start-up on the populated store "
    "at 10,000 clusters 4.0 s and 4.2 s against its 4.3 s (1.9-2.2 s against 1.3 s at "
    "1,000); idle CPU 10-11 µs per cluster per status period on the SQLite file store against "
    "its 2.7-3.3 (we check every started worker's process each period, it checks only those "
    "not yet running).",
]


if __name__ == "__main__":
    main()
