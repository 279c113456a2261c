"""The controller: turns DaskCluster resources into a scheduler pod and Service and worker pods,
and reports their state in the resources' status.

Owns `WorkQueue` (de-duplicating, with per-key backoff), `Expectations` (creates and deletes
not yet seen by the cache), `LeaderElector` (a coordination.k8s.io Lease), `failure_reason`
and `Controller` (informers, parallel reconcilers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from gateway_core.models import new_token
from gateway_core.tls import new_cluster_credentials

from . import crd, objects
from .config import KubeControllerConfig
from .kube import CLUSTERS, EVENTS, LEASES, PODS, SECRETS, SERVICES, Informer, KubeClient, KubeError

log = logging.getLogger("gateway.k8s.controller")

Obj = dict[str, Any]
Key = tuple[str, str]


# --------------------------------------------------------------------------------------------
# Work queue


class WorkQueue:
    """Keys to reconcile. A key added while queued is queued once; a key added while a
    reconciler holds it is queued again when that reconciler is `done` (never two reconcilers
    on one key). `retry` re-adds after an exponential backoff per key, `forget` resets it."""

    def __init__(self, *, base_delay: float = 0.05, max_delay: float = 30.0) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: Key) -> None:
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: Key, delay: float) -> None:
        """Add ``key`` in ``delay`` seconds (an earlier pending timer wins)."""
        timer = self._timers.get(key)
        loop = asyncio.get_running_loop()
        if timer is not None and timer.when() <= loop.time() + delay:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: Key) -> float:
        """Re-add after this key's next backoff delay; the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self.base_delay * 2**failures, self.max_delay)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        self._failures.pop(key, None)

    async def get(self) -> Key:
        key = await self._queue.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Key) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


# --------------------------------------------------------------------------------------------
# Expectations


class Expectations:
    """Pods this controller created or deleted that its cache has not shown yet, per cluster,
    so a lagging cache never makes it create (or delete) twice. An expectation not observed
    within ``timeout`` seconds is dropped (the watch lost it; the cache is trusted again)."""

    def __init__(self, *, timeout: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.timeout = timeout
        self.clock = clock
        self._creates: dict[Key, dict[str, tuple[str, float]]] = {}
        self._deletes: dict[Key, dict[str, float]] = {}

    def expect_create(self, key: Key, name: str, group: str) -> None:
        self._creates.setdefault(key, {})[name] = (group, self.clock())

    def expect_delete(self, key: Key, name: str) -> None:
        self._deletes.setdefault(key, {})[name] = self.clock()

    def created(self, key: Key, name: str) -> None:
        self._creates.get(key, {}).pop(name, None)

    def deleted(self, key: Key, name: str) -> None:
        self._creates.get(key, {}).pop(name, None)
        self._deletes.get(key, {}).pop(name, None)

    def _expire(self, key: Key) -> None:
        horizon = self.clock() - self.timeout
        creates = self._creates.get(key, {})
        for name in [n for n, (_, t) in creates.items() if t < horizon]:
            del creates[name]
        deletes = self._deletes.get(key, {})
        for name in [n for n, t in deletes.items() if t < horizon]:
            del deletes[name]

    def pending_creates(self, key: Key, group: str | None = None) -> set[str]:
        self._expire(key)
        return {
            n for n, (g, _) in self._creates.get(key, {}).items() if group is None or g == group
        }

    def pending_deletes(self, key: Key) -> set[str]:
        self._expire(key)
        return set(self._deletes.get(key, {}))

    def satisfied(self, key: Key) -> bool:
        return not self.pending_creates(key) and not self.pending_deletes(key)

    def forget(self, key: Key) -> None:
        self._creates.pop(key, None)
        self._deletes.pop(key, None)


# --------------------------------------------------------------------------------------------
# Leader election


def _micro_time(moment: float | None = None) -> str:
    return datetime.fromtimestamp(moment or time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Holds a coordination.k8s.io Lease while this replica leads. A Lease held by another is
    taken only after its record stayed unchanged for its ``leaseDurationSeconds`` as observed
    here (no trust in other clocks); writes carry the resourceVersion, so of two replicas
    racing for it one gets 409 and stays a follower."""

    def __init__(self, client: KubeClient, config: KubeControllerConfig, identity: str) -> None:
        self.client = client
        self.config = config
        self.identity = identity
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self._observed: tuple[Any, ...] = ()
        self._observed_at = 0.0
        self._renewed_at = 0.0

    async def _try(self) -> bool:
        c = self.config
        lease_ns = c.lease_namespace or c.namespace
        now = _micro_time()
        lease = await self.client.get(LEASES, lease_ns, c.lease_name)
        duration = max(1, round(c.lease_duration))
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": c.lease_name, "namespace": lease_ns},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            try:
                await self.client.create(LEASES, lease_ns, body)
            except KubeError as exc:
                if exc.status == 409:
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()
        if holder and holder != self.identity:
            held_for = spec.get("leaseDurationSeconds") or duration
            if time.monotonic() - self._observed_at < held_for:
                return False
        new_spec = dict(spec)
        new_spec.update(holderIdentity=self.identity, leaseDurationSeconds=duration, renewTime=now)
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec
        try:
            await self.client.replace(LEASES, lease_ns, c.lease_name, lease)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def run(self) -> None:
        """Campaign, then renew, until cancelled; sets `lost` when leadership is lost."""
        while True:
            try:
                ok = await self._try()
            except Exception as exc:  # noqa: BLE001 - any failure is a missed renewal
                log.warning("Lease %s: %s", self.config.lease_name, exc)
                ok = False
            if ok:
                self._renewed_at = time.monotonic()
                if not self.leading.is_set():
                    log.info("%s leads (Lease %s)", self.identity, self.config.lease_name)
                    self.leading.set()
            elif (
                self.leading.is_set()
                and time.monotonic() - self._renewed_at > self.config.lease_duration * 2 / 3
            ):
                # Not renewed: stop acting before another replica may take over.
                log.warning("%s lost the Lease %s", self.identity, self.config.lease_name)
                self.lost.set()
                return
            await asyncio.sleep(self.config.renew_period)


# --------------------------------------------------------------------------------------------
# Reasons


PULL_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def failure_reason(pod: Obj, *, what: str) -> tuple[str, str] | None:
    """(``Failed`` or ``Pending``, why) from a pod's phase, container states and conditions:
    None when nothing is wrong. ``what`` names the pod for users ("the scheduler")."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason in PULL_ERRORS:
            image = container.get("image", "")
            message = waiting.get("message") or ""
            return "Failed", f"{what}'s image {image!r} cannot be pulled: {reason}" + (
                f": {message}" if message else ""
            )
        if reason in CONFIG_ERRORS:
            return (
                "Failed",
                f"{what}'s container cannot start: {reason}: {waiting.get('message', '')}",
            )
        terminated = state.get("terminated") or {}
        if terminated and status.get("phase") in ("Failed", "Succeeded"):
            code = terminated.get("exitCode")
            why = terminated.get("reason") or "Error"
            if why == "OOMKilled":
                return (
                    "Failed",
                    f"{what} was killed for using more memory than its limit "
                    f"(OOMKilled, exit code {code})",
                )
            if status.get("phase") == "Failed":
                text = terminated.get("message") or ""
                return "Failed", f"{what} exited: {why} (exit code {code})" + (
                    f": {text}" if text else ""
                )
            return "Failed", f"{what} exited (exit code {code})"
    if status.get("phase") == "Failed":
        return (
            "Failed",
            f"{what} failed: {status.get('reason') or status.get('message') or 'unknown'}",
        )
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            why = condition.get("message") or condition.get("reason")
            return "Pending", f"{what} cannot be scheduled: {why}"
    return None


def _ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


STABLE_SECONDS = 10.0
"""A worker running this long has started well (containers without probes are Ready at once,
so readiness says nothing): the failures before it are no longer "in a row"."""


def _running_for(pod: Obj, seconds: float) -> bool:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        started = ((container.get("state") or {}).get("running") or {}).get("startedAt")
        if started:
            try:
                moment = datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            except ValueError:
                return False
            return time.time() - moment.timestamp() >= seconds
    return False


def _ended(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _age(pod: Obj) -> float:
    """Seconds since the pod was created (whole seconds, as the API gives them); infinite
    when it has no readable creationTimestamp."""
    try:
        moment = datetime.strptime(_created(pod), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return float("inf")
    return time.time() - moment.timestamp()


def _created(pod: Obj) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


# --------------------------------------------------------------------------------------------
# The controller


class Controller:
    """Informers on DaskClusters and the pods, Services and Secrets labelled as ours; while
    leading, ``parallelism`` reconcilers take cluster keys from the work queue."""

    resync_period = 5.0
    """Seconds before a cluster that is not settled (pending, scaling) is looked at again."""

    batch_period = 0.5
    """Seconds a cluster waits after an event of one of its pods, Services or Secrets before it
    is reconciled: its pods change in bursts (its workers start together), and one reconcile
    (and at most one status write) then covers the whole burst, as the Job controller batches
    its pod updates. Events of the DaskCluster itself, and pod events that show trouble (a
    deleted or ended pod, a failure reason), are acted on at once."""

    warnings_after = 2.0
    """Seconds a scheduler pod that is not ready has existed before its Warning events are
    listed for the pending reason (one list per resync after that, none on its first events)."""

    def __init__(self, *, config: KubeControllerConfig, client: KubeClient) -> None:
        self.config = config
        self.client = client
        # One namespace, or all of them (one watch per kind) keeping the allowed ones: see
        # gateway_k8s.namespaces. Pods, Services and Secrets go in their cluster's namespace.
        policy = config.policy
        shared: dict[str, Any] = {
            "namespace": policy.watch_namespace,
            "accept": policy.allows,
            "backoff_base": config.api_backoff_base,
            "backoff_max": config.api_backoff_max,
        }
        self.clusters = Informer(client, CLUSTERS, handler=self._on_cluster, **shared)
        ours = {**shared, "labels": objects.SELECTOR}
        self.pods = Informer(client, PODS, handler=self._on_pod, **ours)
        self.services = Informer(client, SERVICES, handler=self._on_child, **ours)
        self.secrets = Informer(client, SECRETS, handler=self._on_child, **ours)
        self.queue = WorkQueue(
            base_delay=config.queue_backoff_base, max_delay=config.queue_backoff_max
        )
        self.expectations = Expectations(timeout=config.expectations_timeout)
        identity = config.identity or f"{socket.gethostname()}-{os.getpid()}"
        self.elector = LeaderElector(client, config, identity)
        self.reconciles = 0
        self.health_port = 0
        """The port `/healthz` and `/readyz` are served on (``health_address``), once bound."""
        self._reported: dict[Key, str] = {}
        """The refusal last logged per cluster (each logged at ERROR once, not per retry)."""
        for informer in (self.pods, self.services, self.secrets):
            informer.on_refused = self._requeue_all
        self._excess_since: dict[tuple[Key, str], float] = {}
        self._retire_asked: dict[tuple[Key, str], int] = {}
        self._failures: dict[Key, int] = {}
        """Worker pods of a cluster that failed since one last ran `STABLE_SECONDS`."""
        self._failures_seen: dict[Key, set[str]] = {}
        self._last_failure: dict[Key, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self.status_refused: KubeError | None = None
        """The 403 to the last status write while it lasts (no cluster's status, reason
        included, can be recorded): logged at ERROR once, named by `problems`."""

    @property
    def informers(self) -> list[Informer]:
        return [self.clusters, self.pods, self.services, self.secrets]

    def _requeue_all(self) -> None:
        """Every cluster looked at again (a cache they depend on is refused: they get told)."""
        for obj in self.clusters.items():
            self.queue.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))

    def problems(self) -> list[str]:
        """Why this controller cannot do its work, for its readiness and its operator: each
        refused list, watch or status write by verb and resource, each cache not synced yet.
        Empty: ready."""
        out: list[str] = []
        refusals = [i.refused for i in self.informers] + [self.status_refused]
        for refusal in refusals:
            if refusal is not None:
                out.append(_refusal_text(refusal))
        for informer in self.informers:
            if not informer.synced.is_set() and informer.refused is None:
                out.append(f"{informer.resource.plural} not listed yet")
        return out

    # --- events --------------------------------------------------------------------------

    def _on_cluster(self, type_: str, obj: Obj) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if type_ == "DELETED":
            self.expectations.forget(key)
            for memory in (
                self._failures,
                self._failures_seen,
                self._last_failure,
                self._reported,
            ):
                memory.pop(key, None)
        self.queue.add(key)

    def _owner_key(self, obj: Obj) -> Key | None:
        meta = obj.get("metadata") or {}
        resource = (meta.get("labels") or {}).get(objects.LABEL_CLUSTER)
        return (meta.get("namespace", ""), resource) if resource else None

    def _on_pod(self, type_: str, obj: Obj) -> None:
        key = self._owner_key(obj)
        if key is None:
            return
        name = obj["metadata"]["name"]
        if type_ == "DELETED":
            self.expectations.deleted(key, name)
        else:
            self.expectations.created(key, name)
        if type_ == "DELETED" or _ended(obj) or failure_reason(obj, what="") is not None:
            self.queue.add(key)  # trouble is acted on at once; progress waits for its batch
        else:
            self.queue.add_after(key, self.batch_period)

    def _on_child(self, type_: str, obj: Obj) -> None:
        key = self._owner_key(obj)
        if key is not None:
            self.queue.add_after(key, self.batch_period)

    # --- running -------------------------------------------------------------------------

    async def run(self, *, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or cancelled, or leadership is lost)."""
        stop = stop or asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        tasks: list[asyncio.Task[Any]] = []
        health: web.AppRunner | None = None
        try:
            if self.config.health_address:
                health = await self._serve_health(self.config.health_address)
            for informer in self.informers:
                informer.start()
            # Without its clusters nothing can be done; a cache of their pods, Services or
            # Secrets that may not be read (403) leaves the clusters to be told why.
            await self.clusters.synced.wait()
            for informer in self.informers:
                while not informer.synced.is_set() and informer.refused is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(informer.synced.wait(), 0.2)
            if self.config.leader_election:
                tasks.append(asyncio.create_task(self.elector.run(), name="leader-election"))
                waiter = asyncio.create_task(self.elector.leading.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if stop.is_set():
                    return
            for obj in self.clusters.items():
                self._on_cluster("ADDED", obj)
            for i in range(self.config.parallelism):
                tasks.append(asyncio.create_task(self._worker(), name=f"reconciler-{i}"))
            ends = [asyncio.create_task(stop.wait())]
            if self.config.leader_election:
                ends.append(asyncio.create_task(self.elector.lost.wait()))
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for end in ends:
                end.cancel()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.queue.close()
            for informer in self.informers:
                await informer.stop()
            await self._session.close()
            if health is not None:
                await health.cleanup()

    async def _serve_health(self, address: str) -> web.AppRunner:
        """``GET /healthz`` (the event loop answers) and ``GET /readyz`` (200 when every
        cache is synced and nothing is refused; else 503 with `problems`, one a line)."""

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(request: web.Request) -> web.Response:
            problems = self.problems()
            if not problems:
                return web.Response(text="ok\n")
            return web.Response(status=503, text="".join(f"{p}\n" for p in problems))

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = address.rpartition(":")
        site = web.TCPSite(runner, host or None, int(port))
        await site.start()
        self.health_port = int(runner.addresses[0][1])
        log.info("Health on %s: /healthz, /readyz", address)
        return runner

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                again = await self.reconcile(key)
            except KubeError as exc:
                if exc.status == 403 and await self._refused(key, exc):
                    self.queue.forget(key)
                else:
                    delay = self.queue.retry(key)
                    # A refusal was logged at ERROR once already (`_refused`, `_write_status`).
                    level = logging.DEBUG if exc.status == 403 else logging.WARNING
                    log.log(
                        level, "Reconciling %s/%s failed (retry in %.1f s): %s", *key, delay, exc
                    )
            except Exception as exc:  # noqa: BLE001 - retried with backoff
                delay = self.queue.retry(key)
                log.warning("Reconciling %s/%s failed (retry in %.1f s): %s", *key, delay, exc)
            else:
                self.queue.forget(key)
                self._reported.pop(key, None)
                if again is not None:
                    self.queue.add_after(key, again)
            finally:
                self.queue.done(key)

    async def _refused(self, key: Key, exc: KubeError) -> bool:
        """The API server refused a request (403: RBAC, a quota, a PodSecurity admission):
        say so in the cluster's ``status.reason``, naming the verb and resource. A cluster
        that is not running yet fails at once (True: not retried): it cannot start, its
        user is waiting, and a fix (a Role, a quota) takes an administrator. A running
        cluster keeps running (its scheduler holds the user's work) with the reason shown,
        and is retried with backoff (False), so a fixed Role or a freed quota heals it."""
        namespace, resource = key
        what = f"{exc.verb} {exc.resource}".strip() or "make a request"
        reason = f"the controller may not {what} in namespace {namespace!r}: {exc.message}"
        if self._reported.get(key) != reason:
            self._reported[key] = reason
            log.error("Cluster %s/%s: %s", namespace, resource, reason)
        owner = self.clusters.get(namespace, resource)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return True
        status = dict(owner.get("status") or {})
        running = status.get("phase") == "Running"
        status.update(reason=reason if running else f"cannot start: {reason}")
        if not running:
            status["phase"] = "Failed"
        try:
            await self._write_status(owner, status)
        except KubeError as error:
            if error.status != 403:  # a refused status write is logged once, for all
                log.error("Cannot record why cluster %s/%s is stuck: %s", *key, error)
            return False
        if running:
            return False
        with contextlib.suppress(KubeError):
            pods = [
                p
                for p in self.pods.items()
                if (p["metadata"].get("labels") or {}).get(objects.LABEL_CLUSTER) == resource
                and p["metadata"]["namespace"] == namespace
            ]
            await self._delete_pods(key, pods)
        return True

    # --- reconciling ---------------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        """Bring one cluster's pods to its spec and its status to its pods; seconds until it
        should be looked at again (None: on the next event)."""
        self.reconciles += 1
        namespace, resource = key
        owner = self.clusters.get(namespace, resource)
        for informer in (self.pods, self.services, self.secrets):
            if informer.refused is not None and owner is not None:
                # Its cache cannot be trusted (or was never filled): acting on it could make
                # pods twice. The refusal is the cluster's reason instead (see `_refused`).
                raise informer.refused
        pods = [
            p
            for p in self.pods.items()
            if (p["metadata"].get("labels") or {}).get(objects.LABEL_CLUSTER) == resource
            and p["metadata"]["namespace"] == namespace
        ]
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return None  # the garbage collector removes its pods
        status = owner.get("status") or {}
        if status.get("phase") in ("Failed", "Stopped"):
            await self._delete_pods(key, pods)
            return None
        if self.secrets.get(namespace, objects.secret_name(resource)) is None:
            started = status.get("phase") == "Running" or any(
                p["metadata"]["name"] == objects.scheduler_name(resource) for p in pods
            )
            if started:
                # New credentials would not match those its scheduler and the gateway hold.
                # (Also the moment the garbage collector deletes the Secret of a DaskCluster
                # just deleted, before this cache hears of that: nothing must be made then.)
                await self._write_status(
                    owner,
                    {
                        **status,
                        "reason": "the cluster's credentials Secret was deleted; new workers "
                        "cannot start (stop the cluster and start a new one)",
                    },
                )
                return self.resync_period
            await self._create_credentials(owner)
        if self.services.get(namespace, resource) is None:
            try:
                created = await self.client.create(
                    SERVICES, namespace, objects.scheduler_service(owner)
                )
                self.services.put(created)
            except KubeError as exc:
                if exc.status != 409:
                    raise
        scheduler_pod = objects.scheduler_name(resource)
        scheduler = next((p for p in pods if p["metadata"]["name"] == scheduler_pod), None)
        new_status: Obj = {
            "phase": "Pending",
            "observedGeneration": owner["metadata"].get("generation", 0),
        }
        again: float | None = None
        if scheduler is None and status.get("phase") == "Running":
            # Its scheduler held the cluster's state (tasks, data): a new one would not.
            new_status.update(phase="Failed", reason="the scheduler's pod was deleted")
            await self._write_status(owner, new_status)
            await self._delete_pods(key, pods)
            return None
        if scheduler is None:
            if scheduler_pod not in self.expectations.pending_creates(key):
                self.expectations.expect_create(key, scheduler_pod, "")
                try:
                    await self.client.create(PODS, namespace, objects.scheduler_pod(owner))
                except KubeError as exc:
                    self.expectations.created(key, scheduler_pod)
                    if exc.status != 409:
                        raise
            new_status["reason"] = "waiting for the scheduler pod"
        else:
            found = failure_reason(scheduler, what="the scheduler")
            if found is not None and found[0] == "Failed":
                new_status.update(phase="Failed", reason=found[1])
                await self._write_status(owner, new_status)
                await self._delete_pods(key, pods)
                return None
            if found is not None:
                new_status["reason"] = found[1]
            if _ready(scheduler):
                address, dashboard = self._addresses(owner, scheduler)
                new_status.update(
                    phase="Running", schedulerAddress=address, dashboardAddress=dashboard
                )
                new_status.pop("reason", None)
                again = await self._reconcile_workers(key, owner, scheduler, pods, new_status)
                if new_status["phase"] == "Failed":
                    await self._write_status(owner, new_status)
                    await self._delete_pods(key, pods)
                    return None
            else:
                if "reason" not in new_status:
                    # A pod just made has no warnings yet: its events are listed once it has
                    # waited `warnings_after` (the resync comes back to it), not on every event.
                    warning = (
                        await self._last_warning(namespace, scheduler_pod)
                        if _age(scheduler) >= self.warnings_after
                        else ""
                    )
                    new_status["reason"] = (
                        f"the scheduler is starting; last warning: {warning}"
                        if warning
                        else "the scheduler is starting"
                    )
                again = self.resync_period
        await self._write_status(owner, new_status)
        return again

    async def _create_credentials(self, owner: Obj) -> None:
        """The cluster's token and its own TLS key and certificate, in a Secret the
        DaskCluster owns (the gateway reads it by name; the pods mount it)."""
        resource = owner["metadata"]["name"]
        cert, key = await asyncio.to_thread(new_cluster_credentials, objects.cluster_name(resource))
        secret = objects.credentials_secret(owner=owner, token=new_token(), cert=cert, key=key)
        try:
            created = await self.client.create(SECRETS, owner["metadata"]["namespace"], secret)
        except KubeError as exc:
            if exc.status != 409:  # 409: made already, by this controller before a restart
                raise
            fetched = await self.client.get(
                SECRETS, owner["metadata"]["namespace"], objects.secret_name(resource)
            )
            if fetched is None:
                raise
            created = fetched
        self.secrets.put(created)

    async def _last_warning(self, namespace: str, pod: str) -> str:
        """The newest Warning event of ``pod`` ("reason: message"), "" if none: what a pod
        stuck before its container runs (a volume that cannot be mounted) has to say."""
        try:
            answer = await self.client.request(
                "GET",
                EVENTS.path(namespace),
                query={"fieldSelector": f"involvedObject.name={pod},type=Warning"},
            )
        except KubeError as exc:
            if exc.status != 403:
                raise
            # Only a diagnostic: a Role without it must not fail the cluster.
            log.warning("Cannot read the events of pod %s/%s: %s", namespace, pod, exc)
            return ""
        items = sorted(
            answer.get("items") or [],
            key=lambda e: (
                e.get("lastTimestamp") or e.get("eventTime") or "",
                int(e["metadata"].get("resourceVersion") or 0),
            ),
        )
        if not items:
            return ""
        last = items[-1]
        return f"{last.get('reason', '')}: {last.get('message', '')}".strip(": ")

    def _addresses(self, owner: Obj, scheduler: Obj) -> tuple[str, str]:
        if self.config.address_mode == "pod":
            host = scheduler["status"]["podIP"]
        else:
            meta = owner["metadata"]
            host = f"{meta['name']}.{meta['namespace']}.svc.{self.config.cluster_domain}"
        return (
            f"tls://{host}:{objects.SCHEDULER_PORT}",
            f"http://{host}:{objects.DASHBOARD_PORT}",
        )

    async def _reconcile_workers(
        self, key: Key, owner: Obj, scheduler: Obj, pods: list[Obj], status: Obj
    ) -> float | None:
        namespace, resource = key
        address = status["schedulerAddress"]
        deleting = self.expectations.pending_deletes(key)
        groups_status: Obj = {}
        total_running = 0
        again: float | None = None
        for group, template in objects.groups_of(owner).items():
            wanted = int(template.get("replicas") or 0)
            mine = [
                p
                for p in pods
                if (p["metadata"].get("labels") or {}).get(objects.LABEL_COMPONENT) == "worker"
                and (p["metadata"].get("labels") or {}).get(objects.LABEL_GROUP) == group
            ]
            ended = [p for p in mine if _ended(p)]
            for pod in ended:
                name = pod["metadata"]["name"]
                failed = (pod.get("status") or {}).get("phase") == "Failed"
                if failed and name not in self._failures_seen.setdefault(key, set()):
                    self._failures_seen[key].add(name)
                    self._failures[key] = self._failures.get(key, 0) + 1
                    found = failure_reason(pod, what=f"worker {name}")
                    self._last_failure[key] = found[1] if found else f"worker {name} failed"
                await self._delete_pod(key, pod)
            limit = self.config.worker_failure_limit
            if limit and self._failures.get(key, 0) >= limit:
                return self._give_up(key, status, limit)
            live = [
                p
                for p in mine
                if not _ended(p)
                and not p["metadata"].get("deletionTimestamp")
                and p["metadata"]["name"] not in deleting
            ]
            unseen = self.expectations.pending_creates(key, group) - {
                p["metadata"]["name"] for p in mine
            }
            count = len(live) + len(unseen)
            running = [p for p in live if _ready(p)]
            if any(_running_for(p, STABLE_SECONDS) for p in running):
                self._failures.pop(key, None)
            for pod in live:
                if _ready(pod) or "reason" in status:
                    continue
                found = failure_reason(pod, what=f"worker {pod['metadata']['name']}")
                if found is not None:
                    # The cluster runs on; the user sees why workers do not come.
                    status["reason"] = f"group {group}: {found[1]}"
            total_running += len(running)
            groups_status[group] = {
                "requested": wanted,
                "pending": count - len(running),
                "running": len(running),
            }
            slot = (key, group)
            if count < wanted:
                self._excess_since.pop(slot, None)
                for _ in range(wanted - count):
                    name = objects.worker_pod_name(resource, group)
                    self.expectations.expect_create(key, name, group)
                    try:
                        await self.client.create(
                            PODS,
                            namespace,
                            objects.worker_pod(
                                owner, group=group, name=name, scheduler_address=address
                            ),
                        )
                    except Exception:
                        self.expectations.created(key, name)
                        raise
            elif count > wanted:
                excess = count - wanted
                # Workers not started yet hold no task: they go first, newest first.
                idle = sorted((p for p in live if not _ready(p)), key=_created, reverse=True)[
                    :excess
                ]
                for pod in idle:
                    await self._delete_pod(key, pod)
                excess -= len(idle)
                if excess > 0:
                    again = 1.0
                    await self._retire(key, group, owner, scheduler, running, wanted, excess)
            else:
                self._excess_since.pop(slot, None)
                self._retire_asked.pop(slot, None)
            if any(not _ready(p) for p in live) or unseen:
                again = again or self.resync_period
        default = groups_status.get(crd.DEFAULT_GROUP, {})
        status.update(
            groups=groups_status,
            workers=total_running,
            replicas=default.get("running", 0) + default.get("pending", 0),
            selector=(
                f"{objects.LABEL_CLUSTER}={resource},{objects.LABEL_COMPONENT}=worker,"
                f"{objects.LABEL_GROUP}={crd.DEFAULT_GROUP}"
            ),
        )
        return again

    def _give_up(self, key: Key, status: Obj, limit: int) -> float | None:
        status.update(
            phase="Failed",
            reason=f"{limit} workers failed in a row; the last: {self._last_failure.get(key)}",
        )
        return None

    async def _retire(
        self,
        key: Key,
        group: str,
        owner: Obj,
        scheduler: Obj,
        running: list[Obj],
        wanted: int,
        excess: int,
    ) -> None:
        """Excess running workers leave through the scheduler, which moves their data and
        closes them (their pods then end and are deleted). The scheduler's own agent usually
        does it already (its target is ``replicas``); after ``retire_grace`` the controller
        asks it, and after ``retire_timeout`` deletes the newest pods."""
        slot = (key, group)
        now = time.monotonic()
        since = self._excess_since.setdefault(slot, now)
        if now - since >= self.config.retire_timeout:
            for pod in sorted(running, key=_created, reverse=True)[:excess]:
                log.warning("Deleting worker %s: not retired in time", pod["metadata"]["name"])
                await self._delete_pod(key, pod)
            return
        if now - since < self.config.retire_grace:
            return
        if self._retire_asked.get(slot) == wanted:
            return
        secret = self.secrets.get(key[0], objects.secret_name(key[1])) or {}
        token = objects.secret_value(secret, objects.TOKEN_KEY).decode()
        url = f"http://{scheduler['status']['podIP']}:{objects.API_PORT}/api/comm"
        assert self._session is not None
        op: dict[str, Any] = {"op": "scale", "count": wanted}
        if group != crd.DEFAULT_GROUP:
            op["group"] = group  # the agent's scale message names a named group as the API does
        try:
            async with self._session.post(
                url,
                json=op,
                headers={"Authorization": f"token {token}"},
            ) as resp:
                if resp.status < 400:
                    self._retire_asked[slot] = wanted
                else:
                    log.warning("Scheduler of %s refused to scale: HTTP %d", key[1], resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("Cannot reach the scheduler of %s to retire workers: %s", key[1], exc)

    async def _delete_pod(self, key: Key, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        if name in self.expectations.pending_deletes(key) or pod["metadata"].get(
            "deletionTimestamp"
        ):
            return
        self.expectations.expect_delete(key, name)
        try:
            await self.client.delete(PODS, key[0], name)
        except Exception:
            self.expectations.deleted(key, name)
            raise

    async def _delete_pods(self, key: Key, pods: list[Obj]) -> None:
        for pod in pods:
            await self._delete_pod(key, pod)

    async def _write_status(self, owner: Obj, status: Obj) -> None:
        current = owner.get("status") or {}
        if all(current.get(k) == v for k, v in status.items()) and not (
            "reason" in current and "reason" not in status
        ):
            return
        patch = dict(status)
        if "reason" not in patch and "reason" in current:
            patch["reason"] = None
        meta = owner["metadata"]
        try:
            updated = await self.client.patch(
                CLUSTERS, meta["namespace"], meta["name"], {"status": patch}, sub="status"
            )
        except KubeError as exc:
            if exc.status == 403:
                if self.status_refused is None:  # once: every cluster meets it
                    log.error("No cluster's status can be recorded: %s", _refusal_text(exc))
                self.status_refused = exc
            raise
        if self.status_refused is not None:
            log.info("Status writes are granted again")
            self.status_refused = None
        self.clusters.put(updated)


def _refusal_text(exc: KubeError) -> str:
    """``may not watch pods: <the API server's words>``."""
    what = f"{exc.verb} {exc.resource}".strip() or "make a request"
    return f"may not {what}: {exc.message or exc}"
