"""A cluster's logs on Kubernetes: the end of its scheduler's and workers' container output,
read from `pods/log` with the official client in the client's thread pool.

Owns `PodLogs` (one container's end, bounded by lines and bytes), `cluster_logs` (the backend's
answer per component) and `WorkerNames` (the workers each scheduler reported, which core needs
to name worker logs; a worker's name is its pod's name).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from gateway_core.backends.base import SCHEDULER_COMPONENT
from gateway_core.backends.kit.files import last_lines
from gateway_core.errors import BackendUnavailable
from gateway_core.models import Worker, WorkerStatus
from gateway_core.reconciler.heartbeat import Heartbeat

from . import objects
from .kube import KubeClient

CONTAINER = "dask"
"""The container of every scheduler and worker pod (`objects`)."""

FETCH_FACTOR = 4
"""A request may bring this many times the bytes kept, so that the end is usually in the
first answer (the API server applies ``tailLines`` first, then ``limitBytes`` from the start
of what is left, so an answer cut by the limit lacks the end)."""

MAX_TRIES = 4
"""Requests for one log at most: each retry asks for fewer lines."""

READERS = 4
"""Logs read at once for one request."""

STOPPED_WORKERS_KEPT = 100
"""Workers that stopped remembered per cluster (their pods are gone, but core may name them)."""


class PodLogs:
    """Reads the end of a container's output; each request runs in ``client``'s pool, after
    its rate limiter."""

    def __init__(self, client: KubeClient, *, timeout: float = 30.0) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client.api)
        self.timeout = timeout

    def _read(self, namespace: str, pod: str, lines: int, limit: int) -> bytes:
        self.client.requests += 1
        # Not preloaded: the urllib3 response, bytes as they came (the client's own decoding
        # would fail on a log cut inside a UTF-8 character).
        response: Any = self.core.read_namespaced_pod_log(
            pod,
            namespace,
            container=CONTAINER,
            tail_lines=lines,
            limit_bytes=limit,
            _preload_content=False,
            _request_timeout=self.timeout,
        )
        try:
            return bytes(response.data)
        finally:
            response.release_conn()

    async def _fetch(self, namespace: str, pod: str, lines: int, limit: int) -> bytes:
        await self.client.limiter.acquire()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.client.pool, self._read, namespace, pod, lines, limit
        )

    async def tail(self, namespace: str, pod: str, *, lines: int, max_bytes: int) -> str:
        """The last ``lines`` lines of the container's output, from at most its last
        ``max_bytes`` bytes. Raises `ApiException` (the server's answer) and urllib3's errors
        (the server cannot be reached)."""
        if lines <= 0:
            return ""
        limit = max(1, max_bytes) * FETCH_FACTOR
        want = lines
        data = b""
        for _ in range(MAX_TRIES):
            data = await self._fetch(namespace, pod, want, limit)
            if len(data) < limit or want == 1:
                break
            # Cut by the limit: the end is missing. Ask for as many lines as fit the bytes
            # kept, judging by the lines that came (halving at least).
            seen = max(1, data.count(b"\n"))
            want = max(1, min(want // 2, seen * max_bytes // limit))
        cut = len(data) > max_bytes
        text = data[-max_bytes:].decode("utf-8", errors="replace")
        return last_lines(text, lines, cut=cut)


def _message(exc: ApiException) -> str:
    try:
        status = json.loads(exc.body or b"{}")
    except ValueError:
        status = {}
    message = status.get("message") if isinstance(status, dict) else None
    return str(message or exc.reason or exc.status)


async def cluster_logs(
    reader: PodLogs,
    *,
    namespace: str,
    resource: str,
    components: Sequence[str],
    tail: int,
    max_bytes: int,
) -> dict[str, str]:
    """Component -> the end of its pod's log, for the DaskCluster ``resource`` in
    ``namespace``: the scheduler's pod, or the worker pod of that name (only pods named after
    the cluster: worker names come from its scheduler, which runs the user's code). A log that
    cannot be had is a message in parentheses; a refused request (403) or an API server that
    cannot be reached raises `BackendUnavailable`."""
    readers = asyncio.Semaphore(READERS)

    async def read(component: str) -> str:
        if component == SCHEDULER_COMPONENT:
            pod = objects.scheduler_name(resource)
        elif component.startswith(f"{resource}-"):
            pod = component
        else:
            return "(no log: this worker has no pod of this cluster)"
        try:
            async with readers:
                return await reader.tail(namespace, pod, lines=tail, max_bytes=max_bytes)
        except ApiException as exc:
            if exc.status == 404:
                return (
                    f"(no log: pod {namespace}/{pod} does not exist; a worker's pod is deleted "
                    "once it stopped, all pods once the cluster stopped)"
                )
            if exc.status == 403:
                raise BackendUnavailable(
                    f"cannot read the log of pod {namespace}/{pod}: {_message(exc)}"
                ) from None
            return f"(no log: {_message(exc)})"
        except urllib3.exceptions.HTTPError as exc:
            raise BackendUnavailable(
                f"cannot read the log of pod {namespace}/{pod}: {exc}"
            ) from None

    texts = await asyncio.gather(*(read(c) for c in components))
    return dict(zip(components, texts, strict=True))


class WorkerNames:
    """The workers each cluster's scheduler reported in its heartbeats (running, closing,
    closed), in memory: core names worker logs from `Cluster.workers`. A restarted gateway
    knows a cluster's workers again from its next heartbeat."""

    def __init__(self) -> None:
        self._clusters: dict[str, dict[str, Worker]] = {}

    def record(self, cluster: str, beat: Heartbeat) -> None:
        known = self._clusters.setdefault(cluster, {})
        now = int(time.time() * 1000)
        for name in beat.active_workers | beat.closing_workers:
            worker = known.get(name)
            if worker is None:
                known[name] = Worker(
                    name=name, cluster_name=cluster, status=WorkerStatus.RUNNING, start_time=now
                )
        for name in beat.closed_workers:
            worker = known.get(name)
            if worker is None:
                worker = known[name] = Worker(name=name, cluster_name=cluster, start_time=now)
            if worker.status.is_active:
                worker.status = worker.target = WorkerStatus.STOPPED
                worker.stop_time = now
        stopped = sorted(
            (w for w in known.values() if not w.status.is_active), key=lambda w: w.start_time
        )
        for worker in stopped[: max(0, len(stopped) - STOPPED_WORKERS_KEPT)]:
            del known[worker.name]

    def of(self, cluster: str) -> dict[str, Worker]:
        return dict(self._clusters.get(cluster, {}))

    def forget(self, cluster: str) -> None:
        self._clusters.pop(cluster, None)
