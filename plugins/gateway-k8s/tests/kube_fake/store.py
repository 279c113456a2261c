"""The fake API server's object store: kinds, objects, etcd-like resourceVersions, the event
history (compacted after a window, so old resourceVersions get 410 Gone), watchers and GC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from attrs import define, field

Obj = dict[str, Any]


class ApiError(Exception):
    """An error the API server answers with a Status object."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


@define(kw_only=True)
class Kind:
    """One resource type the server serves."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: list[str] = field(factory=list)
    # Field labels a fieldSelector may use (metadata.name and metadata.namespace always).
    fields: frozenset[str] = frozenset()
    # A status subresource: the main resource ignores status writes, /status everything else.
    status_subresource: bool = False
    scale: dict[str, str] | None = None  # the CRD's scale subresource paths
    schema: dict[str, Any] | None = None  # the CRD's openAPIV3Schema
    unconditional_update: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        return f"{self.group}/{self.plural}"

    @property
    def qualified(self) -> str:
        """How error messages name the resource (`pods`, `daskclusters.daskgateway.dev`)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def field_labels(self) -> frozenset[str]:
        return self.fields | {"metadata.name", "metadata.namespace"}


def core_kinds() -> list[Kind]:
    pod_fields = frozenset({"status.phase", "spec.nodeName", "spec.restartPolicy"})
    return [
        Kind(
            group="",
            version="v1",
            plural="namespaces",
            kind="Namespace",
            namespaced=False,
            short_names=["ns"],
            fields=frozenset({"status.phase"}),
            status_subresource=True,
        ),
        Kind(
            group="",
            version="v1",
            plural="pods",
            kind="Pod",
            short_names=["po"],
            fields=pod_fields,
            status_subresource=True,
            unconditional_update=False,
        ),
        Kind(group="", version="v1", plural="secrets", kind="Secret", fields=frozenset({"type"})),
        Kind(
            group="",
            version="v1",
            plural="services",
            kind="Service",
            short_names=["svc"],
            status_subresource=True,
        ),
        Kind(group="", version="v1", plural="endpoints", kind="Endpoints", short_names=["ep"]),
        Kind(
            group="",
            version="v1",
            plural="events",
            kind="Event",
            short_names=["ev"],
            fields=frozenset(
                {
                    "involvedObject.name",
                    "involvedObject.kind",
                    "reason",
                    "type",
                    "involvedObject.uid",
                }
            ),
        ),
        Kind(group="coordination.k8s.io", version="v1", plural="leases", kind="Lease"),
        Kind(
            group="apiextensions.k8s.io",
            version="v1",
            plural="customresourcedefinitions",
            kind="CustomResourceDefinition",
            namespaced=False,
            short_names=["crd"],
        ),
    ]


def kind_of_crd(crd: Obj) -> Kind:
    """The served kind of a CRD's storage version."""
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    sub = version.get("subresources") or {}
    return Kind(
        group=spec["group"],
        version=version["name"],
        plural=spec["names"]["plural"],
        kind=spec["names"]["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        short_names=list(spec["names"].get("shortNames", [])),
        status_subresource="status" in sub,
        scale=sub.get("scale"),
        schema=(version.get("schema") or {}).get("openAPIV3Schema"),
    )


@define(kw_only=True)
class Event:
    rv: int
    at: float
    kind: str  # Kind.key
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    prev: Obj | None


@define(kw_only=True, eq=False)
class Watcher:
    kind: str
    namespace: str | None
    matches: Callable[[Obj], bool]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Obj] | None]

    def offer(self, event: Event) -> None:
        if event.kind != self.kind:
            return
        ns = event.obj["metadata"].get("namespace")
        if self.namespace is not None and ns != self.namespace:
            return
        now = self.matches(event.obj)
        before = event.prev is not None and self.matches(event.prev)
        if event.type == "DELETED":
            kind = "DELETED" if now else ""
        elif now and before:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif before:
            kind = "DELETED"  # no longer matches the selector
        else:
            kind = ""
        if kind:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, event.obj))


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
HEADLESS_LABEL = "service.kubernetes.io/headless"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a Service's (equality) selector matches these pod labels."""
    return all(labels.get(key) == value for key, value in selector.items())


@define(kw_only=True)
class Store:
    """Everything the API server holds; every method is safe from any thread."""

    history_seconds: float = 300.0
    kinds: dict[str, Kind] = field(factory=dict)  # by Kind.key
    objects: dict[tuple[str, str, str], Obj] = field(factory=dict)  # (kind, ns, name)
    events: list[Event] = field(factory=list)
    watchers: set[Watcher] = field(factory=set)
    rv: int = 1
    compacted_rv: int = 1  # watching from an older resourceVersion is 410 Gone
    lock: threading.RLock = field(factory=threading.RLock)
    next_ip: int = 1
    # Keep each selector Service's Endpoints in step with its pods, as the endpoints controller.
    endpoints_controller: bool = True
    # Pods a kubelet runs stay Terminating (deletionTimestamp) until it deletes them with grace
    # 0, as on a real cluster; off: every pod is removed at once.
    graceful_pod_deletion: bool = False

    def add_kind(self, kind: Kind) -> None:
        with self.lock:
            self.kinds[kind.key] = kind

    def find_kind(self, group: str, version: str, plural: str) -> Kind | None:
        kind = self.kinds.get(f"{group}/{plural}")
        return kind if kind is not None and kind.version == version else None

    # --- history -------------------------------------------------------------------------

    def _record(self, kind: Kind, type_: str, obj: Obj, prev: Obj | None) -> None:
        event = Event(
            rv=self.rv, at=time.monotonic(), kind=kind.key, type=type_, obj=obj, prev=prev
        )
        self.events.append(event)
        for watcher in list(self.watchers):
            watcher.offer(event)
        if self.endpoints_controller and kind.key in ("/pods", "/services"):
            self._sync_endpoints(kind, type_, obj, prev)
        cutoff = time.monotonic() - self.history_seconds
        while self.events and self.events[0].at < cutoff:
            self.compacted_rv = self.events.pop(0).rv

    def _sync_endpoints(self, kind: Kind, type_: str, obj: Obj, prev: Obj | None) -> None:
        """Keep the Endpoints of the Services a pod event concerns (those whose selector
        matches the pod before or after it) or of the Service itself, in step."""
        namespace = obj["metadata"].get("namespace", "")
        if kind.key == "/services":
            name = obj["metadata"]["name"]
            if type_ == "DELETED":
                if ("/endpoints", namespace, name) in self.objects:
                    self.delete(self.kinds["/endpoints"], namespace, name)
                return
            self._sync_service_endpoints(self.objects[("/services", namespace, name)])
            return
        touched = [obj["metadata"].get("labels") or {}]
        if prev is not None:
            touched.append(prev["metadata"].get("labels") or {})
        for (key, ns, _), service in list(self.objects.items()):
            if key != "/services" or ns != namespace:
                continue
            selector = (service.get("spec") or {}).get("selector")
            if selector and any(_selects(selector, labels) for labels in touched):
                self._sync_service_endpoints(service)

    def _sync_service_endpoints(self, service: Obj) -> None:
        """One Service's Endpoints: named after it, with its labels (and
        `service.kubernetes.io/headless` for a headless one), as the endpoints controller."""
        selector = (service.get("spec") or {}).get("selector")
        if not selector:
            return
        namespace = service["metadata"].get("namespace", "")
        endpoints = self.kinds["/endpoints"]
        ready: list[Obj] = []
        not_ready: list[Obj] = []
        for (key, ns, _), pod in self.objects.items():
            if key != "/pods" or ns != namespace:
                continue
            meta, status = pod["metadata"], pod.get("status") or {}
            if meta.get("deletionTimestamp") or not status.get("podIP"):
                continue
            if not _selects(selector, meta.get("labels") or {}):
                continue
            address = {
                "ip": status["podIP"],
                "targetRef": {
                    "kind": "Pod",
                    "name": meta["name"],
                    "namespace": namespace,
                    "uid": meta["uid"],
                },
            }
            is_ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            (ready if is_ready else not_ready).append(address)
        ports = []
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            entry = {
                "port": target if isinstance(target, int) else port["port"],
                "protocol": port.get("protocol", "TCP"),
            }
            if port.get("name"):
                entry["name"] = port["name"]
            ports.append(entry)
        subset: Obj = {}
        if ready:
            subset["addresses"] = sorted(ready, key=lambda a: a["ip"])
        if not_ready:
            subset["notReadyAddresses"] = sorted(not_ready, key=lambda a: a["ip"])
        subsets = [{**subset, "ports": ports}] if subset else []
        labels = dict(service["metadata"].get("labels") or {})
        if service["spec"].get("clusterIP") == "None":
            labels[HEADLESS_LABEL] = ""
        name = service["metadata"]["name"]
        current = self.objects.get(("/endpoints", namespace, name))
        if current is None:
            body: Obj = {"metadata": {"name": name}}
            if labels:
                body["metadata"]["labels"] = labels
            if subsets:
                body["subsets"] = subsets
            self.create(endpoints, namespace, body)
        elif (
            current.get("subsets", []) != subsets
            or (current["metadata"].get("labels") or {}) != labels
        ):
            new = copy.deepcopy(current)
            new["subsets"] = subsets
            if not subsets:
                del new["subsets"]
            new["metadata"]["labels"] = labels
            if not labels:
                del new["metadata"]["labels"]
            self.update(endpoints, namespace, name, new)

    def compact(self) -> None:
        """Forget every past event, as etcd's compaction does: watches from any earlier
        resourceVersion now get 410 Gone."""
        with self.lock:
            self.events.clear()
            self.compacted_rv = self.rv

    def expire_watches(self) -> int:
        """Compact, then end every open watch with an ERROR event carrying a 410 Expired
        Status, as a real API server does to a watcher its watch cache dropped: every watcher
        must relist (a watch from its last resourceVersion would be 410 too). The number of
        watches ended."""
        with self.lock:
            self.compact()
            gone = ApiError(
                410, "Expired", f"too old resource version: the history before {self.rv} is gone"
            ).status()
            for watcher in self.watchers:
                watcher.loop.call_soon_threadsafe(watcher.queue.put_nowait, ("ERROR", gone))
                watcher.loop.call_soon_threadsafe(watcher.queue.put_nowait, None)
            ended = len(self.watchers)
            self.watchers.clear()
            return ended

    def _bump(self, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    # --- reads ----------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects.get((kind.key, namespace, name))
            if obj is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'{kind.qualified} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural},
                )
            return copy.deepcopy(obj)

    def select(
        self, kind: Kind, namespace: str | None, matches: Callable[[Obj], bool]
    ) -> tuple[list[Obj], int]:
        with self.lock:
            items = [
                copy.deepcopy(obj)
                for (key, ns, _), obj in sorted(self.objects.items())
                if key == kind.key and (namespace is None or ns == namespace) and matches(obj)
            ]
            return items, self.rv

    def watch(
        self,
        kind: Kind,
        namespace: str | None,
        matches: Callable[[Obj], bool],
        since: int | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[Watcher, list[tuple[str, Obj]]]:
        """Register a watcher; also return the events it must first replay: every matching
        object as ADDED when `since` is None, else the history after `since` (410 if compacted)."""
        with self.lock:
            if since is not None and since < self.compacted_rv:
                raise ApiError(
                    410, "Expired", f"too old resource version: {since} ({self.compacted_rv})"
                )
            watcher = Watcher(
                kind=kind.key,
                namespace=namespace,
                matches=matches,
                loop=loop,
                queue=asyncio.Queue(),
            )
            replay: list[tuple[str, Obj]] = []
            if since is None:
                items, _ = self.select(kind, namespace, matches)
                replay = [("ADDED", item) for item in items]
            else:
                # Offer the retained history through the same filter as live events.
                for event in self.events:
                    if event.rv > since:
                        watcher.offer(event)
            self.watchers.add(watcher)
            return watcher, replay

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)

    # --- writes ---------------------------------------------------------------------------

    def create(self, kind: Kind, namespace: str, obj: Obj) -> Obj:
        with self.lock:
            meta = obj.setdefault("metadata", {})
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(
                        422,
                        "Invalid",
                        f"{kind.kind} is invalid: metadata.name: Required value: "
                        "name or generateName is required",
                    )
                while True:
                    suffix = "".join(random.choices(_NAME_CHARS, k=5))
                    name = meta["generateName"] + suffix
                    if (kind.key, namespace, name) not in self.objects:
                        break
                meta["name"] = name
            name = meta["name"]
            if (kind.key, namespace, name) in self.objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{kind.qualified} "{name}" already exists',
                    {"name": name, "group": kind.group, "kind": kind.plural},
                )
            if kind.namespaced:
                meta["namespace"] = namespace
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_iso()
            meta["generation"] = 1
            meta.pop("deletionTimestamp", None)
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            self._defaults(kind, obj)
            self._bump(obj)
            self.objects[(kind.key, namespace, name)] = obj
            self._record(kind, "ADDED", copy.deepcopy(obj), None)
            created = copy.deepcopy(obj)
            # The garbage collector also deletes a dependent created after all its owners were
            # gone (a controller acting on a stale cache); the create itself still succeeds.
            owners = {ref.get("uid") for ref in meta.get("ownerReferences", [])}
            if owners:
                live = {o["metadata"]["uid"] for o in self.objects.values()}
                if not owners & live:
                    with contextlib.suppress(ApiError):
                        self.delete(kind, namespace, name)
            return created

    def _defaults(self, kind: Kind, obj: Obj) -> None:
        if kind.key == "/pods":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif kind.key == "/namespaces":
            obj["status"] = {"phase": "Active"}
        elif kind.key == "/secrets":
            # stringData is write-only: merged into data (base64), as the API server does.
            strings = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {})
            for key, value in strings.items():
                data[key] = base64.b64encode(value.encode()).decode()
            obj.setdefault("type", "Opaque")
        elif kind.key == "/services":
            spec = obj.setdefault("spec", {})
            if not spec.get("clusterIP"):
                spec["clusterIP"] = f"10.96.{self.next_ip // 250}.{self.next_ip % 250 + 1}"
                self.next_ip += 1
            spec.setdefault("type", "ClusterIP")

    def update(self, kind: Kind, namespace: str, name: str, new: Obj, subresource: str = "") -> Obj:
        """Replace an object (the main resource, or its status)."""
        with self.lock:
            current = self.objects.get((kind.key, namespace, name))
            if current is None:
                self.get(kind, namespace, name)  # raises the 404
                raise AssertionError
            meta = new.setdefault("metadata", {})
            if meta.get("name", name) != name:
                raise ApiError(
                    400, "BadRequest", "the name of the object does not match the name on the URL"
                )
            given = meta.get("resourceVersion")
            if given is None and not kind.unconditional_update:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{kind.kind} "{name}" is invalid: metadata.resourceVersion: '
                    "Invalid value: 0x0: must be specified for an update",
                )
            if given is not None and given != current["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                    {"name": name, "group": kind.group, "kind": kind.plural},
                )
            if subresource == "status":
                result = copy.deepcopy(current)
                if "status" in new:
                    result["status"] = new["status"]
                else:
                    result.pop("status", None)
            else:
                result = copy.deepcopy(new)
                for key in (
                    "uid",
                    "creationTimestamp",
                    "namespace",
                    "name",
                    "generation",
                    "deletionTimestamp",
                ):
                    if key in current["metadata"]:
                        result["metadata"][key] = current["metadata"][key]
                result["apiVersion"], result["kind"] = kind.api_version, kind.kind
                if kind.status_subresource:
                    if "status" in current:
                        result["status"] = current["status"]
                    else:
                        result.pop("status", None)
                if kind.key == "/secrets":
                    self._defaults(kind, result)
                changed = {k: v for k, v in result.items() if k not in ("metadata", "status")}
                before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
                if changed != before:
                    result["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
            if result == current:
                return copy.deepcopy(current)  # no change: no new resourceVersion, no event
            self._bump(result)
            meta = result["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                del self.objects[(kind.key, namespace, name)]
                self._record(kind, "DELETED", copy.deepcopy(result), copy.deepcopy(current))
                self._collect_garbage(meta["uid"])
                return copy.deepcopy(result)
            self.objects[(kind.key, namespace, name)] = result
            self._record(kind, "MODIFIED", copy.deepcopy(result), copy.deepcopy(current))
            return copy.deepcopy(result)

    def delete(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        *,
        orphan: bool = False,
        grace: int | None = None,
    ) -> Obj:
        """Delete an object; `grace`: the request's gracePeriodSeconds (pods only)."""
        with self.lock:
            current = self.get(kind, namespace, name)
            meta = current["metadata"]
            if kind.key == "/pods" and self.graceful_pod_deletion:
                status = current.get("status") or {}
                if grace is None:
                    grace = current.get("spec", {}).get("terminationGracePeriodSeconds", 30)
                # A pod no kubelet took (no hostIP) or that ended goes at once, as on a real
                # cluster; otherwise it is Terminating until its kubelet deletes it with grace 0.
                running = status.get("hostIP") and status.get("phase") not in (
                    "Succeeded",
                    "Failed",
                )
                if running and grace > 0:
                    if not meta.get("deletionTimestamp"):
                        meta["deletionTimestamp"] = now_iso()
                        meta["deletionGracePeriodSeconds"] = grace
                        self._bump(current)
                        self.objects[(kind.key, namespace, name)] = current
                        self._record(kind, "MODIFIED", copy.deepcopy(current), None)
                    return copy.deepcopy(current)
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = now_iso()
                    self._bump(current)
                    self.objects[(kind.key, namespace, name)] = current
                    self._record(kind, "MODIFIED", copy.deepcopy(current), None)
                return copy.deepcopy(current)
            del self.objects[(kind.key, namespace, name)]
            self._bump(current)
            self._record(kind, "DELETED", copy.deepcopy(current), None)
            if kind.key == "/namespaces":  # its contents go with it (at once, here)
                for key in [
                    k for k in self.objects if k[1] == name and self.kinds[k[0]].namespaced
                ]:
                    if key in self.objects:
                        with contextlib.suppress(ApiError):
                            self.delete(self.kinds[key[0]], key[1], key[2], grace=0)
            if orphan:
                self._orphan(meta["uid"])
            else:
                self._collect_garbage(meta["uid"])
            return current

    def _dependents(self, uid: str) -> list[tuple[str, str, str]]:
        return [
            key
            for key, obj in self.objects.items()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))
        ]

    def _collect_garbage(self, uid: str) -> None:
        """Background propagation: dependents whose owners are all gone are deleted."""
        live = {obj["metadata"]["uid"] for obj in self.objects.values()}
        for key in self._dependents(uid):
            obj = self.objects.get(key)
            if obj is None:
                continue
            owners = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences", [])}
            if owners & live:
                continue
            kind = self.kinds[key[0]]
            try:
                self.delete(kind, key[1], key[2])
            except ApiError:
                pass

    def _orphan(self, uid: str) -> None:
        for key in self._dependents(uid):
            obj = copy.deepcopy(self.objects[key])
            refs = obj["metadata"]["ownerReferences"]
            kept = [r for r in refs if r.get("uid") != uid]
            if kept:
                obj["metadata"]["ownerReferences"] = kept
            else:  # an empty list is omitted, as the API server's JSON omits it
                del obj["metadata"]["ownerReferences"]
            self.update(self.kinds[key[0]], key[1], key[2], obj)

    def close_watches(self) -> None:
        with self.lock:
            for watcher in self.watchers:
                watcher.loop.call_soon_threadsafe(watcher.queue.put_nowait, None)
