"""The Kubernetes API as asyncio sees it: blocking `kubernetes` client calls in a bounded thread
pool, a request rate limit, resource paths, and informers (list, then watch, relist on 410).

Owns `KubeClient`, `Resource` (the kinds we use), `Informer` and `KubeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes
from attrs import define, field
from kubernetes.client.exceptions import ApiException

from . import crd

log = logging.getLogger("gateway.k8s")

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class KubeError(Exception):
    """A request the API server refused: ``status`` (HTTP code), ``reason`` and ``message``
    from its Status object; ``verb`` and ``resource`` (``pods``, ``daskclusters/status``) of
    the request, when known, so a refusal can say what was refused."""

    def __init__(
        self, status: int, reason: str, message: str, *, verb: str = "", resource: str = ""
    ) -> None:
        super().__init__(f"{message} ({status} {reason})" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.verb = verb
        self.resource = resource


@define(kw_only=True, frozen=True)
class Resource:
    """A kind we read or write: its API group/version and plural."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


PODS = Resource(group="", version="v1", plural="pods")
SERVICES = Resource(group="", version="v1", plural="services")
SECRETS = Resource(group="", version="v1", plural="secrets")
EVENTS = Resource(group="", version="v1", plural="events")
LEASES = Resource(group="coordination.k8s.io", version="v1", plural="leases")
CLUSTERS = Resource(group=crd.GROUP, version=crd.VERSION, plural=crd.PLURAL)


def load_api_client(*, server: str = "", kubeconfig: str = "", context: str = "") -> Any:
    """A `kubernetes.client.ApiClient`: ``server`` alone (no credentials: a local test server),
    else ``kubeconfig`` (its ``context``), else the in-cluster service account, else
    ``~/.kube/config``."""
    if server:
        configuration = kubernetes.client.Configuration()
        configuration.host = server
        return kubernetes.client.ApiClient(configuration)
    if kubeconfig:
        return kubernetes.config.new_client_from_config(
            config_file=kubeconfig, context=context or None
        )
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config(context=context or None)
    return kubernetes.client.ApiClient()


@define(kw_only=True)
class RateLimiter:
    """A token bucket: ``qps`` requests a second on average, bursts of ``burst``."""

    qps: float
    burst: int
    _tokens: float = field(init=False, default=0.0)
    _stamp: float = field(init=False, factory=time.monotonic)
    _lock: asyncio.Lock = field(init=False, factory=asyncio.Lock)

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)

    async def acquire(self) -> None:
        if self.qps <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.qps)
                self._tokens = 1.0
                self._stamp = time.monotonic()
            self._tokens -= 1


class KubeClient:
    """Every API request of the gateway and the controller. The blocking client runs in a
    pool of ``threads`` threads (watches take one each while open), never on the event loop;
    requests are rate limited (``qps``, ``burst``; qps 0: no limit)."""

    def __init__(self, api_client: Any, *, threads: int = 8, qps: float = 0, burst: int = 50):
        self.api = api_client
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self.limiter = RateLimiter(qps=qps, burst=burst)
        self.requests = 0

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    # --- blocking ------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None,
        body: Any,
        content_type: str | None,
        timeout: float | None,
    ) -> Any:
        self.requests += 1
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        method, url, headers, body, post = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method,
            url,
            header_params=headers,
            body=body,
            post_params=post,
            _request_timeout=timeout,
        )
        if not 200 <= response.status < 300:
            raise _error(response, *_verb_and_resource(method, path, query))
        return response

    def _json(self, *args: Any) -> Any:
        response = self._call(*args)
        data = response.read()
        return json.loads(data) if data else None

    # --- async ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """One request, off the event loop; the answer's JSON. Raises `KubeError`."""
        await self.limiter.acquire()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool, self._json, method, path, query, body, content_type, timeout
        )

    async def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        try:
            return await self.request("GET", resource.path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, resource: Resource, namespace: str, body: Obj) -> Obj:
        return await self.request("POST", resource.path(namespace), body=body)

    async def replace(self, resource: Resource, namespace: str, name: str, body: Obj) -> Obj:
        return await self.request("PUT", resource.path(namespace, name), body=body)

    async def patch(
        self, resource: Resource, namespace: str, name: str, body: Any, *, sub: str = ""
    ) -> Obj:
        content = JSON_PATCH if isinstance(body, list) else MERGE_PATCH
        return await self.request(
            "PATCH", resource.path(namespace, name, sub), body=body, content_type=content
        )

    async def delete(
        self, resource: Resource, namespace: str, name: str, *, grace: int | None = None
    ) -> bool:
        """Delete; False when it was already gone."""
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        body["propagationPolicy"] = "Background"
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        try:
            await self.request("DELETE", resource.path(namespace, name), body=body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list(
        self, resource: Resource, namespace: str | None, *, labels: str = ""
    ) -> tuple[list[Obj], str]:
        answer = await self.request(
            "GET", resource.path(namespace), query={"labelSelector": labels or None}
        )
        return answer.get("items") or [], answer["metadata"].get("resourceVersion", "")


def _verb_and_resource(method: str, path: str, query: dict[str, Any] | None) -> tuple[str, str]:
    """The RBAC verb and resource of a request (``("create", "pods")``,
    ``("patch", "daskclusters/status")``), as the API server authorizes it."""
    parts = path.strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    if not rest:
        return method.lower(), ""
    named = len(rest) > 1
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    if method == "GET":
        if str((query or {}).get("watch", "")).lower() in ("true", "1"):
            return "watch", resource
        return ("get" if named else "list"), resource
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    verb = verbs.get(method, method.lower())
    if method == "DELETE" and not named:
        verb = "deletecollection"
    return verb, resource


def _error(response: Any, verb: str = "", resource: str = "") -> KubeError:
    data = response.read()
    reason, message = response.reason or "", ""
    with contextlib.suppress(ValueError, AttributeError):
        status = json.loads(data)
        reason = status.get("reason") or reason
        message = status.get("message") or ""
    return KubeError(response.status, reason, message, verb=verb, resource=resource)


def is_gone(exc: BaseException) -> bool:
    """True for a 410 Gone (the resourceVersion a watch asked for was compacted away)."""
    return (isinstance(exc, KubeError) and exc.status == 410) or (
        isinstance(exc, ApiException) and exc.status == 410
    )


Handler = Callable[[str, Obj], Awaitable[None] | None]


class Informer:
    """A cache of one kind (in one namespace, or all with ""), kept current by list then
    watch from the list's resourceVersion; a 410 Gone (compaction) relists. ``handler(type,
    obj)`` is called on the event loop for every change (ADDED, MODIFIED, DELETED; a relist
    reports what changed meanwhile). The watch runs in the client's pool, one thread.
    ``accept(namespace)``, when given, keeps only objects of the namespaces it accepts (the
    others are neither cached nor reported)."""

    watch_timeout = 60

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        *,
        namespace: str = "",
        labels: str = "",
        handler: Handler | None = None,
        accept: Callable[[str], bool] | None = None,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        self.client = client
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        """Seconds before a failed list or watch is tried again: ``backoff_base``, doubled at
        each failure in a row up to ``backoff_max`` (a 410 Gone relists at once)."""
        self.accept = accept
        self.resource = resource
        self.namespace = namespace
        self.labels = labels
        self.handler = handler
        self.cache: dict[tuple[str, str], Obj] = {}
        self.synced = asyncio.Event()
        self.relists = 0
        self.resource_version = ""
        """Where the next watch starts; empty: list first."""
        self.last_error = ""
        """Why the last list or watch failed (empty once one worked)."""
        self.refused: KubeError | None = None
        """The API server's 403 to this informer's list or watch while it lasts (a Role
        without the verb): logged at ERROR once, cleared (logged at INFO) once that verb
        works again. The controller's readiness and its clusters' reasons name it."""
        self.on_refused: Callable[[], None] | None = None
        """Called when a refusal starts (the controller then tells its clusters)."""
        self._task: asyncio.Task[None] | None = None
        self._response: Any = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer-{self.resource.plural}")

    async def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.response.shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.cache.get((namespace, name))

    def items(self) -> list[Obj]:
        return list(self.cache.values())

    def put(self, obj: Obj) -> None:
        """Record an object this process just wrote (ahead of its watch event), unless the
        cache already has a newer version."""
        key = _key(obj)
        old = self.cache.get(key)
        if old is None or _rv(old) < _rv(obj):
            self.cache[key] = obj

    def _accepts(self, obj: Obj) -> bool:
        return self.accept is None or self.accept(_key(obj)[0])

    async def _emit(self, type_: str, obj: Obj) -> None:
        if self.handler is None:
            return
        try:
            result = self.handler(type_, obj)
            if result is not None:
                await result
        except Exception:
            log.exception("Handling %s %s failed", type_, self.resource.plural)

    def _refusal(self, exc: KubeError) -> None:
        first = self.refused is None or (self.refused.verb, self.refused.resource) != (
            exc.verb,
            exc.resource,
        )
        self.refused = exc
        if first:  # once, not at every retry: the fix takes an administrator
            log.error(
                "The API server refuses to let this process %s %s: %s",
                exc.verb or "read",
                exc.resource or self.resource.plural,
                exc.message or exc,
            )
            if self.on_refused is not None:
                self.on_refused()

    def _granted(self, verb: str) -> None:
        """A ``verb`` request worked: a refusal of it is over."""
        if self.refused is not None and self.refused.verb == verb:
            log.info("%s %s is granted again", verb, self.refused.resource)
            self.refused = None

    async def _relist(self) -> str:
        items, version = await self.client.list(self.resource, self.namespace, labels=self.labels)
        self._granted("list")
        fresh = {_key(o): o for o in items if self._accepts(o)}
        for key, gone in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                await self._emit("DELETED", gone)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                await self._emit("ADDED", obj)
            elif _rv(old) != _rv(obj):
                await self._emit("MODIFIED", obj)
        self.synced.set()
        return version

    async def _run(self) -> None:
        delay = self.backoff_base
        while not self._stopping.is_set():
            try:
                if not self.resource_version:
                    self.resource_version = await self._relist()
                    self.relists += 1
                self.resource_version = await self._watch(self.resource_version)
                delay = self.backoff_base
                self.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a watch that fails is started again
                if self._stopping.is_set():
                    return
                self.resource_version = ""
                if is_gone(exc):
                    log.info("Watch of %s expired (410 Gone): relisting", self.resource.plural)
                    continue
                self.last_error = str(exc) or type(exc).__name__
                if isinstance(exc, KubeError) and exc.status == 403:
                    self._refusal(exc)
                else:
                    log.warning("Watch of %s failed: %s; retrying", self.resource.plural, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    async def _watch(self, version: str) -> str:
        """One watch request from ``version``; the last version seen when it ends."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        query = {
            "watch": "true",
            "resourceVersion": version,
            "timeoutSeconds": self.watch_timeout,
            "allowWatchBookmarks": "true",
            "labelSelector": self.labels or None,
        }

        def stream() -> None:
            try:
                response = self.client._call(
                    "GET", self.resource.path(self.namespace), query, None, None, None
                )
                self._response = response
                for line in kubernetes.watch.watch.iter_resp_lines(response.response):
                    loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
                    if self._stopping.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - handed to the loop
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                self._response = None
                loop.call_soon_threadsafe(queue.put_nowait, None)

        await self.client.limiter.acquire()
        future = loop.run_in_executor(self.client.pool, stream)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    self._granted("watch")
                    return version
                if isinstance(item, Exception):
                    if self._stopping.is_set():
                        return version
                    raise item
                self._granted("watch")
                type_, obj = item.get("type"), item.get("object") or {}
                if type_ == "ERROR":
                    raise KubeError(
                        int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", "")
                    )
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if type_ == "BOOKMARK" or not self._accepts(obj):
                    continue
                if type_ == "DELETED":
                    self.cache.pop(_key(obj), None)
                else:
                    self.cache[_key(obj)] = obj
                await self._emit(type_, obj)
        finally:
            if not future.done():
                response = self._response
                if response is not None:
                    with contextlib.suppress(Exception):
                        response.response.shutdown()


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _rv(obj: Obj) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
