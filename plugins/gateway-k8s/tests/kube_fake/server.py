"""The fake Kubernetes API server's HTTP side (aiohttp, in a thread of its own): discovery, the
REST verbs, list and watch, patches, subresources (pods' logs too), RBAC and schema checks,
Status errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from attrs import define, field

from . import patch as patches
from . import rbac, schema, selectors
from .store import ApiError, Kind, Obj, Store, core_kinds, kind_of_crd

TRUE = {"true", "1", "True", "TRUE", "yes"}
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


def _flag(value: str | None) -> bool:
    """Go-style booleans: `true`, `True`, `1`."""
    return value is not None and value in TRUE


@define(kw_only=True)
class Request:
    group: str
    version: str
    namespace: str | None
    kind: Kind
    name: str | None
    subresource: str


@define(kw_only=True)
class FakeKube:
    """A fake API server on 127.0.0.1 (a random port), started and stopped from any thread.

    `crds`: CustomResourceDefinitions served from the start (more can be POSTed);
    `role`: a Role (dict, YAML text or rules list) whose rules every request must satisfy
    (None: everything allowed; a Role naming its namespace grants there only, see
    `rbac.scoped_rules_of`); `user`: the name 403 messages give; `history_seconds`: how long
    watch history is kept before compaction; `bookmark_interval`: BOOKMARK period for watches
    that allow them; `graceful_pod_deletion`: running pods stay Terminating until their kubelet
    deletes them (with a kubelet only).
    """

    crds: list[Obj] = field(factory=list)
    role: Any = None
    user: str = "system:serviceaccount:default:gateway"
    history_seconds: float = 300.0
    graceful_pod_deletion: bool = False
    bookmark_interval: float = 1.0
    delays: dict[tuple[str, str], float] = field(factory=dict)
    """Seconds to hold requests of a (verb, resource), e.g. ``("create", "pods")``, before
    serving them; a request whose client goes away meanwhile is dropped unserved (counted in
    `dropped`): a fault test can kill a client with a request in flight. Changeable live."""
    commit_abandoned: bool = False
    """Serve a held request even when its client went away meanwhile (still counted in
    `dropped`), as a real API server may commit a write whose client died after sending it.
    Changeable live."""
    holding: int = field(init=False, default=0)
    """Requests being held (`delays`) right now."""
    dropped: int = field(init=False, default=0)
    store: Store = field(init=False)
    url: str = field(init=False, default="")
    requests: int = field(init=False, default=0)
    _counts: collections.Counter[tuple[str, str, str]] = field(
        init=False, factory=collections.Counter
    )
    _counts_lock: threading.Lock = field(init=False, factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)
    _thread: threading.Thread | None = field(init=False, default=None)
    _runner: web.AppRunner | None = field(init=False, default=None)
    _closing: bool = field(init=False, default=False)
    container_logs: dict[tuple[str, str], Path] = field(init=False, factory=dict)
    """(pod uid, container name) -> the file a kubelet writes the container's output to."""

    def __attrs_post_init__(self) -> None:
        self.store = Store(
            history_seconds=self.history_seconds,
            graceful_pod_deletion=self.graceful_pod_deletion,
        )
        for kind in core_kinds():
            self.store.add_kind(kind)
        crd_kind = self.store.kinds["apiextensions.k8s.io/customresourcedefinitions"]
        for crd in self.crds:
            self.store.create(crd_kind, "", copy.deepcopy(crd))
            self.store.add_kind(kind_of_crd(crd))

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> FakeKube:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="kube-fake", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fake API server did not start within 30 s")
        return self

    async def _serve(self) -> None:
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        """Stop serving; open watches end (their streams close cleanly)."""
        if self._loop is None or self._thread is None:
            return
        self._closing = True
        self.store.close_watches()

        async def shutdown() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        self._loop = self._thread = None

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeKube]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this server."""
        import kubernetes

        config = kubernetes.client.Configuration()
        config.host = self.url
        return kubernetes.client.ApiClient(config)

    def compact(self) -> None:
        self.store.compact()

    def expire_watches(self) -> int:
        """Compact and end every open watch with a 410 Expired ERROR event (see
        `Store.expire_watches`); the number of watches ended."""
        return self.store.expire_watches()

    def request_counts(self) -> dict[tuple[str, str, str], int]:
        """Requests so far by (User-Agent, verb, resource): the verb as RBAC names it (get,
        list, watch, create, update, patch, delete, deletecollection; `discovery` for the
        discovery paths, `unknown` for a path nothing serves), the resource as `pods`,
        `daskclusters.daskgateway.dev/status`, the path for discovery; a snapshot."""
        with self._counts_lock:
            return dict(self._counts)

    def _count(self, request: web.Request, verb: str, resource: str) -> None:
        agent = request.headers.get("User-Agent", "")
        with self._counts_lock:
            self._counts[(agent, verb, resource)] += 1

    # --- HTTP -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        try:
            discovery = self._discovery(request.path)
            if discovery is not None:
                self._count(request, "discovery", request.path)
                return web.json_response(discovery)
            try:
                req = self._route(request.path)
                verb = self._verb(request, req)
            except ApiError:
                self._count(request, "unknown", request.path)
                raise
            resource = req.kind.plural + (f"/{req.subresource}" if req.subresource else "")
            self._count(
                request,
                verb,
                req.kind.qualified + (f"/{req.subresource}" if req.subresource else ""),
            )
            if self.role is not None and not rbac.allows(
                rbac.scoped_rules_of(self.role),
                verb=verb,
                group=req.group,
                resource=resource,
                name=req.name,
                namespace=req.namespace,
            ):
                raise self._forbidden(req, verb, resource)
            delay = self.delays.get((verb, resource))
            if delay:
                self.holding += 1
                try:
                    served = await self._held(request, delay)
                finally:
                    self.holding -= 1
                if not served:
                    self.dropped += 1
                    if not self.commit_abandoned:
                        return web.Response(status=503)  # nobody reads it: the client is gone
            if verb == "watch":
                return await self._watch(request, req)
            if req.subresource == "log":
                if verb != "get":
                    raise ApiError(
                        405,
                        "MethodNotAllowed",
                        "the server does not allow this method on the requested resource",
                    )
                text = await asyncio.to_thread(self._pod_log, request, req)
                return web.Response(body=text, content_type="text/plain", charset="utf-8")
            body = await self._dispatch(request, req, verb)
            status = 201 if verb == "create" else 200
            return web.json_response(body, status=status)
        except ApiError as error:
            return web.json_response(error.status(), status=error.code)
        except Exception as error:  # a bug of the fake: a Status, and the traceback logged
            logging.getLogger(__name__).exception("the fake API server failed")
            failure = ApiError(500, "InternalError", f"the fake API server failed: {error!r}")
            return web.json_response(failure.status(), status=500)

    @staticmethod
    async def _held(request: web.Request, seconds: float) -> bool:
        """Hold ``request`` for ``seconds``; False if its client went away meanwhile."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(0.02)
            transport = request.transport
            if transport is None or transport.is_closing():
                return False
        return True

    def _forbidden(self, req: Request, verb: str, resource: str) -> ApiError:
        where = f' in the namespace "{req.namespace}"' if req.namespace else " at the cluster scope"
        named = f' "{req.name}"' if req.name else ""
        details: Obj = {"kind": req.kind.plural, "group": req.group}
        if req.name:
            details["name"] = req.name
        return ApiError(
            403,
            "Forbidden",
            f'{req.kind.qualified}{named} is forbidden: User "{self.user}" cannot {verb} '
            f'resource "{resource}" in API group "{req.group}"{where}',
            details,
        )

    def _discovery(self, path: str) -> Obj | None:
        path = path.rstrip("/")
        kinds = list(self.store.kinds.values())
        if path == "/version":
            return {
                "major": "1",
                "minor": "31",
                "gitVersion": "v1.31.0-fake",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.22.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
                ],
            }
        if path == "/apis":
            groups: dict[str, str] = {k.group: k.version for k in kinds if k.group}
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                    }
                    for g, v in sorted(groups.items())
                ],
            }
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"] and len(parts) == 2:
            group, version = "", "v1"
        elif parts[0] == "apis" and len(parts) == 3:
            group, version = parts[1], parts[2]
        else:
            return None
        resources = []
        for k in kinds:
            if k.group != group or k.version != version:
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append(
                {
                    "name": k.plural,
                    "singularName": "",
                    "namespaced": k.namespaced,
                    "kind": k.kind,
                    "verbs": verbs,
                    "shortNames": k.short_names,
                }
            )
            if k.status_subresource:
                resources.append(
                    {
                        "name": f"{k.plural}/status",
                        "singularName": "",
                        "namespaced": k.namespaced,
                        "kind": k.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
            if k.scale:
                resources.append(
                    {
                        "name": f"{k.plural}/scale",
                        "singularName": "",
                        "namespaced": k.namespaced,
                        "kind": "Scale",
                        "group": "autoscaling",
                        "version": "v1",
                        "verbs": ["get", "patch", "update"],
                    }
                )
        if not resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _route(self, path: str) -> Request:
        parts = path.strip("/").split("/")
        not_found = ApiError(404, "NotFound", "the server could not find the requested resource")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise not_found
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        kind = self.store.find_kind(group, version, rest[0])
        if kind is None or len(rest) > 3:
            raise not_found
        if kind.namespaced is False:
            namespace = None
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if sub and not (
            (sub == "status" and kind.status_subresource)
            or (sub == "scale" and kind.scale)
            or (sub == "log" and kind.key == "/pods")
        ):
            raise not_found
        return Request(
            group=group, version=version, namespace=namespace, kind=kind, name=name, subresource=sub
        )

    def _verb(self, request: web.Request, req: Request) -> str:
        method = request.method
        if method == "GET":
            if req.name:
                return "get"
            return "watch" if _flag(request.query.get("watch")) else "list"
        if method == "POST" and not req.name:
            return "create"
        if method == "PUT" and req.name:
            return "update"
        if method == "PATCH" and req.name:
            return "patch"
        if method == "DELETE":
            return "delete" if req.name else "deletecollection"
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )

    def _matcher(self, request: web.Request, kind: Kind) -> Any:
        try:
            labels = selectors.label_selector(request.query.get("labelSelector"))
            fields = selectors.field_selector(
                request.query.get("fieldSelector"), kind.field_labels()
            )
        except selectors.SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from error

        def matches(obj: Obj) -> bool:
            return labels(obj["metadata"].get("labels") or {}) and fields(obj)

        return matches

    async def _json(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read() or b"null")
        except ValueError as error:
            raise ApiError(400, "BadRequest", f"the body is not JSON: {error}") from error

    async def _dispatch(self, request: web.Request, req: Request, verb: str) -> Obj:
        store, kind, ns = self.store, req.kind, req.namespace or ""
        if verb == "list":
            items, rv = store.select(kind, req.namespace, self._matcher(request, kind))
            return {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
        assert req.name is not None or verb in ("create", "deletecollection")
        if verb == "get":
            obj = store.get(kind, ns, req.name or "")
            return self._to_scale(kind, obj) if req.subresource == "scale" else obj
        if verb in ("delete", "deletecollection"):
            options = await self._json(request) if request.can_read_body else None
            policy = (options or {}).get("propagationPolicy") or request.query.get(
                "propagationPolicy"
            )
            raw_grace = (options or {}).get("gracePeriodSeconds")
            if raw_grace is None:
                raw_grace = request.query.get("gracePeriodSeconds")
            grace = None if raw_grace is None else int(raw_grace)
            if verb == "delete":
                return store.delete(
                    kind, ns, req.name or "", orphan=policy == "Orphan", grace=grace
                )
            items, rv = store.select(kind, req.namespace, self._matcher(request, kind))
            deleted = []
            for item in items:
                meta = item["metadata"]
                with contextlib.suppress(ApiError):  # gone meanwhile (garbage collected)
                    deleted.append(
                        store.delete(
                            kind,
                            meta.get("namespace", ""),
                            meta["name"],
                            orphan=policy == "Orphan",
                            grace=grace,
                        )
                    )
            return {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(store.rv)},
                "items": deleted,
            }
        body = await self._json(request)
        if verb == "create":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body of a create must be an object")
            given_ns = (body.get("metadata") or {}).get("namespace")
            if kind.namespaced and given_ns and given_ns != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not "
                    "match the namespace sent on the request",
                )
            if kind.status_subresource and kind.group:
                body.pop("status", None)  # custom resources: status only through /status
            self._validate(kind, body)
            if kind.key == "apiextensions.k8s.io/customresourcedefinitions":
                created = store.create(kind, ns, body)
                store.add_kind(kind_of_crd(body))
                return created
            return store.create(kind, ns, body)
        name = req.name or ""
        current = store.get(kind, ns, name)
        if verb == "patch":
            base = self._to_scale(kind, current) if req.subresource == "scale" else current
            new = self._apply_patch(request, kind, base, body)
            # No await between the read and the write: a patch naming no resourceVersion keeps
            # the one just read, so it applies unconditionally; one naming a resourceVersion
            # is a precondition on it.
            new.setdefault("metadata", {})
        else:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body of an update must be an object")
            new = body
        if req.subresource == "scale":
            return self._from_scale(kind, current, new)
        if req.subresource != "status":
            self._validate(
                kind,
                {**new, "status": current.get("status")} if kind.status_subresource else new,
                name,
            )
        else:
            self._validate(kind, {**current, "status": new.get("status")}, name)
        return store.update(kind, ns, name, new, req.subresource)

    def _apply_patch(self, request: web.Request, kind: Kind, base: Obj, body: Any) -> Obj:
        content_type = request.content_type
        try:
            if content_type == MERGE:
                return patches.merge_patch(base, body)
            if content_type == JSON_PATCH:
                return patches.json_patch(base, body)
            if content_type == STRATEGIC:
                if kind.group not in ("", "coordination.k8s.io"):
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - "
                        f"accepted media types include: {JSON_PATCH}, {MERGE}",
                    )
                return patches.strategic_merge_patch(base, body)
        except patches.PatchError as error:
            raise ApiError(422, "Invalid", str(error)) from error
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media "
            f"types include: {JSON_PATCH}, {MERGE}, {STRATEGIC}",
        )

    def _validate(self, kind: Kind, obj: Obj, name: str | None = None) -> None:
        if kind.schema is not None:
            obj = {k: v for k, v in obj.items() if not (k == "status" and v is None)}
            causes = schema.validate(obj, kind.schema)
        elif kind.key == "/pods":
            containers = (obj.get("spec") or {}).get("containers")
            causes = [] if containers else [("spec.containers", "Required value")]
        else:
            return
        if causes:
            name = name or (obj.get("metadata") or {}).get("name", "")
            listing = ", ".join(f"{f}: {m}" for f, m in causes)
            raise ApiError(
                422,
                "Invalid",
                f'{kind.kind}{"." + kind.group if kind.group else ""} "{name}" is invalid: '
                f"{listing}",
                {
                    "name": name,
                    "group": kind.group,
                    "kind": kind.kind,
                    "causes": [
                        {"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes
                    ],
                },
            )

    # --- pods/log -------------------------------------------------------------------------

    @staticmethod
    def _count_param(request: web.Request, name: str) -> int | None:
        raw = request.query.get(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0 or (name == "limitBytes" and value == 0):
            least = 1 if name == "limitBytes" else 0
            raise ApiError(
                422,
                "Invalid",
                f'PodLogOptions "" is invalid: {name}: Invalid value: {raw!r}: must be '
                f"greater than or equal to {least}",
            )
        return value

    def _pod_log(self, request: web.Request, req: Request) -> bytes:
        """What the kubelet has of a container's output: the last ``tailLines`` lines, then at
        most ``limitBytes`` bytes from their start (the real order: tail first, then the
        limit). The errors are the real server's: 404 for a missing pod, 400 for a pod with
        several containers and none named, a container it does not have, a container not
        started yet, or ``previous`` (this kubelet never restarts a container)."""
        pod = self.store.get(req.kind, req.namespace or "", req.name or "")
        name = pod["metadata"]["name"]
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        container = request.query.get("container") or ""
        tail = self._count_param(request, "tailLines")
        limit = self._count_param(request, "limitBytes")
        if not container:
            if len(containers) != 1:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(containers)}]",
                )
            container = containers[0]
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if _flag(request.query.get("previous")):
            raise ApiError(
                400,
                "BadRequest",
                f'previous terminated container "{container}" in pod "{name}" not found',
            )
        statuses = {s["name"]: s for s in (pod.get("status") or {}).get("containerStatuses") or []}
        state = (statuses.get(container) or {}).get("state") or {}
        if not state.get("running") and not state.get("terminated"):
            why = (state.get("waiting") or {}).get("reason") or "ContainerCreating"
            raise ApiError(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: {why}',
            )
        path = self.container_logs.get((pod["metadata"]["uid"], container))
        data = b""
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                data = path.read_bytes()
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        if limit is not None:
            data = data[:limit]
        return data

    # --- scale subresource ----------------------------------------------------------------

    @staticmethod
    def _path(obj: Obj, path: str) -> Any:
        value: Any = obj
        for key in path.strip(".").split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def _to_scale(self, kind: Kind, obj: Obj) -> Obj:
        assert kind.scale is not None
        meta = obj["metadata"]
        status: Obj = {"replicas": self._path(obj, kind.scale["statusReplicasPath"]) or 0}
        if kind.scale.get("labelSelectorPath"):
            selector = self._path(obj, kind.scale["labelSelectorPath"])
            if selector:
                status["selector"] = selector
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": self._path(obj, kind.scale["specReplicasPath"]) or 0},
            "status": status,
        }

    def _from_scale(self, kind: Kind, current: Obj, scale: Obj) -> Obj:
        assert kind.scale is not None
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{current["metadata"]["name"]}" '
                f"is invalid: spec.replicas: Invalid value: {replicas}: must be "
                "greater than or equal to 0",
            )
        new = copy.deepcopy(current)
        node = new
        keys = kind.scale["specReplicasPath"].strip(".").split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = replicas
        given = (scale.get("metadata") or {}).get("resourceVersion")
        if given is None:
            del new["metadata"]["resourceVersion"]
        else:
            new["metadata"]["resourceVersion"] = given
        updated = self.store.update(
            kind, current["metadata"].get("namespace", ""), current["metadata"]["name"], new
        )
        return self._to_scale(kind, updated)

    # --- watch ----------------------------------------------------------------------------

    async def _watch(self, request: web.Request, req: Request) -> web.StreamResponse:
        kind = req.kind
        matches = self._matcher(request, kind)
        if req.name:  # ?fieldSelector=metadata.name=... is how clients watch one object
            raise ApiError(405, "MethodNotAllowed", "watch a list, with a field selector")
        raw_rv = request.query.get("resourceVersion") or ""
        try:
            since = None if raw_rv in ("", "0") else int(raw_rv)
        except ValueError as error:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {raw_rv!r}") from error
        timeout = request.query.get("timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout) if timeout else None
        bookmarks = _flag(request.query.get("allowWatchBookmarks"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            watcher, replay = self.store.watch(kind, req.namespace, matches, since, loop)
        except ApiError as error:  # 410 arrives as an ERROR event, as the real server sends it
            await response.write(self._line("ERROR", error.status()))
            await response.write_eof()
            return response
        try:
            for type_, obj in replay:
                await response.write(self._line(type_, obj))
            while not self._closing:
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks:
                        mark = {
                            "kind": kind.kind,
                            "apiVersion": kind.api_version,
                            "metadata": {"resourceVersion": str(self.store.rv)},
                        }
                        await response.write(self._line("BOOKMARK", mark))
                    continue
                if item is None:
                    break
                await response.write(self._line(*item))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    @staticmethod
    def _line(type_: str, obj: Obj) -> bytes:
        return json.dumps({"type": type_, "object": obj}).encode() + b"\n"
