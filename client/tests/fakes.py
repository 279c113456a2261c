"""Test doubles for the client's tests: a fake gateway, per-cluster certificates, an SNI splice.

Owns `LoopThread` (an event loop on its own thread, so blocking client calls can be tested),
`FakeGateway` (an aiohttp server with the PROTOCOL.md routes and canned clusters), `make_cert`
and `SNISplice` (a minimal TLS-SNI-routing TCP proxy, like the real proxy's scheduler side).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running on a daemon thread; ``run`` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def make_cert(name: str) -> tuple[str, str]:
    """A self-signed CA:TRUE certificate and key (PEM) for cluster ``name``, as the gateway
    makes them: SAN ``daskgateway-<name>``, for both server and client authentication.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"daskgateway-{name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"daskgateway-{name}")]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert_pem, key_pem


# -- the fake gateway ------------------------------------------------------------------------------

OPTIONS_SPEC: list[dict[str, Any]] = [
    {
        "field": "worker_cores",
        "label": "Worker Cores",
        "default": 1,
        "spec": {"type": "int", "min": 1, "max": 4},
    },
    {
        "field": "worker_memory",
        "label": "Worker Memory (GiB)",
        "default": 2.0,
        "spec": {"type": "float", "min": 1, "max": 8},
    },
    {"field": "image", "label": "Image", "default": "dask:latest", "spec": {"type": "string"}},
    {"field": "gpu", "label": "GPU", "default": False, "spec": {"type": "bool"}},
    {
        "field": "environment",
        "label": "Environment",
        "default": "basic",
        "spec": {"type": "select", "options": ["basic", "ml"]},
    },
    {"field": "env", "label": "Environment variables", "default": {}, "spec": {"type": "mapping"}},
]


@dataclass(kw_only=True)
class FakeCluster:
    """One canned cluster: its JSON fields plus how the fake drives its start."""

    name: str
    options: dict[str, Any]
    status: str = "PENDING"
    polls_until_done: int = 0
    outcome: str = "RUNNING"
    reason: str | None = None
    cert: str | None = None
    key: str | None = None
    start_time: int = field(default_factory=lambda: int(time.time() * 1000))
    stop_time: int | None = None
    max_workers: int = 10
    logs: dict[str, str] = field(default_factory=dict)
    """Component ("scheduler" or a worker name) → its log, for the v2 logs route."""
    owner: str = "alice"
    share_with_users: list[str] = field(default_factory=list)
    share_with_groups: list[str] = field(default_factory=list)
    group_counts: dict[str, int] = field(default_factory=lambda: {"default": 0})
    """Worker group → workers wanted; scale and adapt refuse a group not in it."""

    def to_json_v2(self) -> dict[str, Any]:
        """The v2 cluster JSON, as alice (the owner) or a sharee (another owner) sees it."""
        mine = self.owner == "alice"
        return {
            **self.to_json(),
            "owner": self.owner,
            "access": "owner" if mine else "sharee",
            "groups": {
                g: {"count": n, "pending": 0, "running": n, "stopping": 0}
                for g, n in self.group_counts.items()
            },
            "share_with_users": list(self.share_with_users) if mine else None,
            "share_with_groups": list(self.share_with_groups) if mine else None,
        }

    def to_json(self) -> dict[str, Any]:
        running = self.status == "RUNNING"
        return {
            "name": self.name,
            "dashboard_route": f"/clusters/{self.name}/status" if running else None,
            "status": self.status,
            "start_time": self.start_time,
            "stop_time": self.stop_time,
            "options": self.options,
            "tls_cert": self.cert if running else None,
            "tls_key": self.key if running else None,
        }


@dataclass(kw_only=True)
class Seen:
    """One request the fake answered."""

    method: str
    path: str
    query: str
    authorization: str | None
    cookie: str | None
    body: Any
    proxy_authorization: str | None = None
    host: str | None = None


class FakeGateway:
    """An aiohttp app speaking the gateway's v1 REST API over canned clusters.

    Users: ``alice``/``secret`` (Basic) and JupyterHub token ``hub-token``. A valid login sets a
    ``gateway-session`` cookie that later requests may use instead. Knobs: ``reason_route``
    (serve ``/api/v2/clusters/{name}/reason``), ``reason_in_json`` (put ``reason`` in the JSON;
    ``/api/v2/clusters/{name}/logs`` answers each cluster's ``logs``),
    ``new_cluster`` (defaults for created clusters), ``on_create`` (called with each new cluster).
    """

    def __init__(self) -> None:
        self.clusters: dict[str, FakeCluster] = {}
        self.seen: list[Seen] = []
        self.sessions: set[str] = set()
        self.reason_route = True
        self.reason_in_json = False
        self.new_cluster: dict[str, Any] = {"polls_until_done": 1, "outcome": "RUNNING"}
        self.on_create: Callable[[FakeCluster], Awaitable[None] | None] | None = None
        self.wait_delay = 0.0
        self.address = ""
        self._runner: web.AppRunner | None = None

    # -- plumbing --

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/api/health", self.health)
        r.add_get("/api/version", self.version)
        r.add_get("/api/v1/options", self.options)
        r.add_get("/api/v1/clusters/", self.list_clusters)
        r.add_post("/api/v1/clusters/", self.create)
        r.add_get("/api/v1/clusters/{name}", self.get_cluster)
        r.add_delete("/api/v1/clusters/{name}", self.delete)
        r.add_post("/api/v1/clusters/{name}/scale", self.scale)
        r.add_post("/api/v1/clusters/{name}/adapt", self.adapt)
        r.add_get("/api/v2/clusters/{name}/reason", self.reason)
        r.add_get("/api/v2/clusters/{name}/logs", self.logs)
        r.add_get("/api/v2/clusters", self.list_clusters)
        r.add_post("/api/v2/clusters", self.create)
        r.add_patch("/api/v2/clusters/{name}", self.patch)
        r.add_get("/api/v2/clusters/{name}", self.get_cluster_v2)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.address = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _user(self, request: web.Request) -> str | None:
        if request.cookies.get("gateway-session") in self.sessions:
            return "alice"
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme == "Basic":
            user, _, password = base64.b64decode(value).decode().partition(":")
            return user if (user, password) == ("alice", "secret") else None
        if scheme == "jupyterhub" and value == "hub-token":
            return "alice"
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.body_exists else None
        self.seen.append(
            Seen(
                method=request.method,
                path=request.path,
                query=request.query_string,
                authorization=request.headers.get("Authorization"),
                cookie=request.cookies.get("gateway-session"),
                body=body,
                proxy_authorization=request.headers.get("Proxy-Authorization"),
                host=request.headers.get("Host"),
            )
        )
        if request.path in ("/api/health", "/api/version"):
            return await handler(request)
        had_session = request.cookies.get("gateway-session") in self.sessions
        user = self._user(request)
        if user is None:
            return web.json_response(
                {"error": "authentication required"},
                status=401,
                headers={"WWW-Authenticate": "Basic"},
            )
        response = await handler(request)
        if not had_session:
            token = secrets.token_hex(8)
            self.sessions.add(token)
            response.set_cookie("gateway-session", token, path="/", httponly=True)
        return response

    def requests_to(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == path]

    def _cluster(self, request: web.Request) -> FakeCluster:
        name = request.match_info["name"]
        if name == "boom":
            raise web.HTTPInternalServerError(
                text='{"error": "database on fire"}', content_type="application/json"
            )
        if name == "not-yours":
            raise web.HTTPForbidden(
                text='{"error": "not your cluster"}', content_type="application/json"
            )
        try:
            return self.clusters[name]
        except KeyError:
            raise web.HTTPNotFound(
                text=f'{{"error": "Cluster {name} not found"}}', content_type="application/json"
            ) from None

    # -- routes --

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "pass"})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "9.9.9"})

    async def options(self, request: web.Request) -> web.Response:
        return web.json_response({"cluster_options": OPTIONS_SPEC})

    async def list_clusters(self, request: web.Request) -> web.Response:
        raw = request.query.get("status")
        if raw is None:
            wanted = {"PENDING", "RUNNING", "STOPPING"}
        else:
            wanted = {s.upper() for s in raw.split(",")}
            bad = wanted - {"PENDING", "RUNNING", "STOPPING", "STOPPED", "FAILED"}
            if bad:
                return web.json_response({"error": f"invalid status {sorted(bad)}"}, status=422)
        v2 = request.path.startswith("/api/v2/")
        return web.json_response(
            {
                n: c.to_json_v2() if v2 else self._json(c)
                for n, c in self.clusters.items()
                if c.status in wanted and (v2 or c.owner == "alice")
            }
        )

    async def create(self, request: web.Request) -> web.Response:
        body = await _body(request)
        options = dict(body.get("cluster_options") or {})
        allowed = {s["field"] for s in OPTIONS_SPEC}
        unknown = sorted(set(options) - allowed)
        if unknown:
            return web.json_response({"error": f"Unknown options {unknown}"}, status=422)
        cores = options.get("worker_cores", 1)
        if not isinstance(cores, int) or not 1 <= cores <= 4:
            return web.json_response({"error": "worker_cores must be between 1 and 4"}, status=422)
        name = secrets.token_hex(8)
        cluster = FakeCluster(name=name, options=options, **self.new_cluster)
        if request.path.startswith("/api/v2/"):
            cluster.share_with_users = list(body.get("share_with_users") or [])
            cluster.share_with_groups = list(body.get("share_with_groups") or [])
        self.clusters[name] = cluster
        if self.on_create is not None:
            result = self.on_create(cluster)
            if result is not None:
                await result
        return web.json_response({"name": cluster.name}, status=201)

    def _json(self, cluster: FakeCluster) -> dict[str, Any]:
        body = cluster.to_json()
        if self.reason_in_json and cluster.reason:
            body["reason"] = cluster.reason
        return body

    def _advance(self, cluster: FakeCluster) -> None:
        if cluster.status != "PENDING":
            return
        if cluster.polls_until_done > 0:
            cluster.polls_until_done -= 1
            return
        cluster.status = cluster.outcome
        if cluster.outcome == "RUNNING" and cluster.cert is None:
            cluster.cert, cluster.key = make_cert(cluster.name)
        if cluster.outcome in ("FAILED", "STOPPED"):
            cluster.stop_time = int(time.time() * 1000)

    async def get_cluster(self, request: web.Request) -> web.Response:
        cluster = self._cluster(request)
        if "wait" in request.query:
            if self.wait_delay:
                await asyncio.sleep(self.wait_delay)
            self._advance(cluster)
        return web.json_response(self._json(cluster))

    async def delete(self, request: web.Request) -> web.Response:
        cluster = self.clusters.get(request.match_info["name"])
        if cluster is not None and cluster.status in ("PENDING", "RUNNING"):
            cluster.status = "STOPPED"
            cluster.stop_time = int(time.time() * 1000)
        return web.Response(status=204)

    async def _resize(
        self, request: web.Request, wanted: int | None, group: Any = None
    ) -> web.Response:
        cluster = self._cluster(request)
        if cluster.status != "RUNNING":
            return web.json_response({"error": f"cluster is {cluster.status}"}, status=409)
        group = "default" if group is None else group
        if group not in cluster.group_counts:
            known = ", ".join(cluster.group_counts)
            return web.json_response(
                {"error": f"group: no worker group {group!r}; its groups are {known}"},
                status=422,
            )
        if wanted is not None:
            cluster.group_counts[group] = min(wanted, cluster.max_workers)
        if wanted is not None and wanted > cluster.max_workers:
            msg = (
                f"Scale request of {wanted} workers would exceed resource limits, "
                f"scaled to {cluster.max_workers} instead"
            )
            return web.json_response({"ok": False, "msg": msg})
        return web.json_response({"ok": True, "msg": None})

    async def scale(self, request: web.Request) -> web.Response:
        count = (await _body(request)).get("count")
        if not isinstance(count, int) or count < 0:
            return web.json_response({"error": "count must be a non-negative integer"}, status=422)
        return await self._resize(request, count, (await _body(request)).get("group"))

    async def adapt(self, request: web.Request) -> web.Response:
        body = await _body(request)
        return await self._resize(request, body.get("maximum"), body.get("group"))

    async def get_cluster_v2(self, request: web.Request) -> web.Response:
        return web.json_response(self._cluster(request).to_json_v2())

    async def patch(self, request: web.Request) -> web.Response:
        cluster = self._cluster(request)
        body = await _body(request)
        if cluster.owner != "alice":
            return web.json_response({"error": "only its owner may"}, status=403)
        for key in ("share_with_users", "share_with_groups"):
            if key in body:
                if not all(isinstance(n, str) and n for n in body[key] or []):
                    return web.json_response({"error": f"{key}: bad names"}, status=422)
                setattr(cluster, key, list(body[key] or []))
        return web.json_response(cluster.to_json_v2())

    async def reason(self, request: web.Request) -> web.Response:
        if not self.reason_route:
            raise web.HTTPNotFound(text='{"error": "Not Found"}', content_type="application/json")
        cluster = self._cluster(request)
        return web.json_response({"reason": cluster.reason})

    async def logs(self, request: web.Request) -> web.Response:
        cluster = self._cluster(request)
        wanted: list[str] = []
        for part in request.query.get("component", "all").split(","):
            if part in ("all", "scheduler"):
                wanted.append("scheduler")
            if part in ("all", "workers"):
                wanted.extend(c for c in cluster.logs if c != "scheduler")
            elif part != "scheduler":
                if part not in cluster.logs:
                    return web.json_response({"error": f"no log component {part!r}"}, status=404)
                wanted.append(part)
        tail = int(request.query.get("tail", "1000"))
        return web.json_response(
            {c: "\n".join(cluster.logs.get(c, "").splitlines()[-tail:]) for c in wanted}
        )


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (aiohttp keeps the body, so reading it again is free)."""
    if not request.body_exists:
        return {}
    data = await request.json()
    return data if isinstance(data, dict) else {}


# -- the SNI splice --------------------------------------------------------------------------------


def read_sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello (one record), or None."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:
            return None
        pos = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        pos += 1 + hello[pos]  # session id
        (suites,) = struct.unpack_from("!H", hello, pos)
        pos += 2 + suites
        pos += 1 + hello[pos]  # compression methods
        (ext_total,) = struct.unpack_from("!H", hello, pos)
        pos += 2
        end = pos + ext_total
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", hello, pos)
            pos += 4
            if ext_type == 0:  # server_name: list length, type, name length, name
                (name_len,) = struct.unpack_from("!H", hello, pos + 3)
                return hello[pos + 5 : pos + 5 + name_len].decode("ascii")
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


class SNISplice:
    """Accepts TCP, reads the ClientHello's SNI, splices the bytes to ``routes[sni]``."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, int]] = {}
        self.seen_sni: list[str | None] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(5)
            (length,) = struct.unpack_from("!H", header, 3)
            hello = header + await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        sni = read_sni(hello)
        self.seen_sni.append(sni)
        target = self.routes.get(sni or "")
        if target is None:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*target)
        up_writer.write(hello)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
