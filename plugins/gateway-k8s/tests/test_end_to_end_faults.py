"""Faults end to end on the fake API server and the simulated kubelet: the controller and the
gateway killed with SIGKILL in the middle of a scale and started again, every watch expired
(410 Gone) in the middle of a scale, RBAC refusals, and an image that cannot be pulled, each as
our client sees it.

Integration tests: real `gateway k8s controller` and `gateway serve` processes where a kill -9
is the point, real Dask schedulers and workers run by the kubelet.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define
from e2e_support import (
    BAD_IMAGE,
    BIN,
    NS,
    chart_rules,
    gateway_config,
    leftovers,
    stored,
    until,
    wait_for,
    without,
    worker_pods,
)
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s import crd
from gateway_k8s.controller import Controller

pytestmark = pytest.mark.integration
LEASE = "dask-gateway-controller"


@pytest.fixture
def kube(request: pytest.FixtureRequest, chart_roles: dict[str, Any]) -> Iterator[FakeKube]:
    """The fake under the chart's Roles (as conftest's `chart_kube`); parametrized with an
    (API group, resource, verb), that verb taken away. `kubelet` and `controller` (conftest)
    run against it."""
    rules = chart_rules(chart_roles)
    refusal = getattr(request, "param", None)
    if refusal is not None:
        rules = without(rules, *refusal)
    fake = FakeKube(crds=[crd.crd()], role=rules)
    with fake.running():
        yield fake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML text of a config dict (tables of strings, numbers, booleans and lists)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += [
                "",
                f"[{prefix}{json.dumps(key)}]",
                toml(value, f"{prefix}{json.dumps(key)}."),
            ]
    return "\n".join(lines)


@define(kw_only=True)
class Process:
    """A `gateway` command run as a process of its own, its output in ``log``."""

    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway_core", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts; every one still running is stopped at teardown."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def controller_process(kube: FakeKube, folder: Path, identity: str) -> Process:
    """`gateway k8s controller` against the fake: pod addresses, a short Lease (4 s) so a
    replacement takes over quickly."""
    config = folder / f"{identity}.toml"
    config.write_text(
        toml({"backend": {"kubernetes": {"server": kube.url, "namespace": NS, "api_qps": 0}}})
    )
    return Process(
        args=[
            "k8s",
            "controller",
            "--config",
            str(config),
            "--address-mode",
            "pod",
            "--identity",
            identity,
            "--lease-duration",
            "4",
            "--renew-period",
            "1",
        ],
        log=folder / f"{identity}.log",
    )


def lease_holder(kube: FakeKube) -> str:
    leases = stored(kube, "coordination.k8s.io", "v1", "leases")
    lease = next((x for x in leases if x["metadata"]["name"] == LEASE), None)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


@define(kw_only=True)
class GatewayProcess:
    """`gateway serve` with the kubernetes backend on a fixed port (a restart keeps its
    address, which the schedulers' heartbeats use)."""

    process: Process
    address: str

    def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.process.alive(), self.process.tail()
            assert time.monotonic() < deadline, "the gateway did not start\n" + self.process.tail()
            time.sleep(0.1)


def gateway_process(kube: FakeKube, folder: Path) -> GatewayProcess:
    port = free_port()
    config = gateway_config(kube, keep=True)
    config["proxy"] = {"address": f"127.0.0.1:{port}"}
    path = folder / "gateway.toml"
    path.write_text(toml(config))
    return GatewayProcess(
        process=Process(args=["serve", "--config", str(path)], log=folder / "gateway.log"),
        address=f"http://127.0.0.1:{port}",
    )


def added_workers(kube: FakeKube, resource: str) -> list[str]:
    """Every worker pod of ``resource`` ever created (the fake's retained watch history)."""
    with kube.store.lock:
        return [
            e.obj["metadata"]["name"]
            for e in kube.store.events
            if e.kind == "/pods"
            and e.type == "ADDED"
            and e.obj["metadata"]["name"].startswith(f"{resource}-worker-")
        ]


def square_sum(client: Any) -> int:
    return int(client.submit(sum, client.map(lambda x: x * x, range(10))).result())


async def test_a_controller_killed_mid_scale_is_replaced_and_the_scale_completes(
    kube: FakeKube,
    kubelet: Kubelet,
    make_gateway: Any,
    processes: list[Process],
    tmp_path: Path,
) -> None:
    """kill -9 of the leading controller while it creates worker pods (one created, the next
    in flight): its replacement takes the Lease over, creates only the missing pod."""
    first = controller_process(kube, tmp_path, "controller-1")
    second = controller_process(kube, tmp_path, "controller-2")
    processes += [first, second]
    first.start()
    await until(lambda: lease_holder(kube) == "controller-1", "controller-1 to lead", 60)
    gateway = await make_gateway(gateway_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"

    def session() -> dict[str, Any]:
        from gateway_client import BasicAuth, Gateway

        seen: dict[str, Any] = {}
        with Gateway(address, auth=BasicAuth("alice", "")) as gw:
            cluster = gw.new_cluster()
            resource = f"dask-{cluster.name}"
            seen["resource"] = resource
            with cluster.get_client(set_as_default=False) as client:
                cluster.scale(1)
                client.wait_for_workers(1, timeout=120)
                # Each worker pod create now takes 2 s at the API server.
                kube.delays[("create", "pods")] = 2.0
                cluster.scale(3)
                wait_for(lambda: len(worker_pods(kube, resource)) == 2, "a second worker pod", 120)
                first.kill()  # the third pod's create is in flight
                seen["at_kill"] = sorted(p["metadata"]["name"] for p in worker_pods(kube, resource))
                # The fake notices the dead client on its next look (every 20 ms).
                wait_for(lambda: kube.dropped, "the in-flight create to be dropped", 10)
                kube.delays.clear()
                seen["dropped"] = kube.dropped
                second.start()
                client.wait_for_workers(3, timeout=180)
                seen["workers"] = len(client.scheduler_info()["workers"])
                seen["total"] = square_sum(client)
                seen["pods"] = sorted(p["metadata"]["name"] for p in worker_pods(kube, resource))
                seen["added"] = sorted(added_workers(kube, resource))
            cluster.shutdown()
        return seen

    try:
        seen = await asyncio.to_thread(session)
    except BaseException:
        print(first.tail(), second.tail(), sep="\n----\n")
        raise
    assert len(seen["at_kill"]) == 2, seen  # killed mid-scale
    assert seen["dropped"] == 1, seen  # its last create never reached the store
    assert lease_holder(kube) == "controller-2"
    assert seen["workers"] == 3
    assert seen["total"] == 285
    # Exactly three worker pods, the two made before the kill among them; none made twice.
    assert len(seen["pods"]) == 3 and set(seen["at_kill"]) <= set(seen["pods"]), seen
    assert seen["added"] == seen["pods"], seen
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")


def added(kube: FakeKube, plural: str, resource: str) -> list[str]:
    """Names of every object of ``plural`` (pods, services, secrets) of the DaskCluster
    ``resource`` ever created (the fake's retained watch history)."""
    with kube.store.lock:
        return [
            e.obj["metadata"]["name"]
            for e in kube.store.events
            if e.kind == f"/{plural}"
            and e.type == "ADDED"
            and (e.obj["metadata"].get("labels") or {}).get("daskgateway.dev/cluster") == resource
        ]


async def test_a_cluster_created_while_no_controller_runs_starts_once_one_does(
    kube: FakeKube,
    kubelet: Kubelet,
    start_controller: Callable[[], Awaitable[Controller]],
    make_gateway: Any,
) -> None:
    """The gateway creates a DaskCluster while no controller runs (it died, or is being
    upgraded): nothing happens to it, nothing is lost; the controller started afterwards
    lists it and starts it, the client waiting in `new_cluster()` gets it, and every object
    of it is made once (no duplicate pods)."""
    gateway = await make_gateway(gateway_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    loop = asyncio.get_running_loop()
    controller_started = asyncio.Event()

    def session() -> dict[str, Any]:
        from gateway_client import BasicAuth, Gateway

        seen: dict[str, Any] = {}
        with Gateway(address, auth=BasicAuth("alice", "")) as gw:
            cluster = gw.new_cluster()  # returns only once a controller started it
            seen["started_after_controller"] = controller_started.is_set()
            seen["resource"] = f"dask-{cluster.name}"
            with cluster.get_client(set_as_default=False) as client:
                cluster.scale(2)
                client.wait_for_workers(2, timeout=120)
                seen["total"] = square_sum(client)
            cluster.shutdown()
        return seen

    running = loop.run_in_executor(None, session)
    resources = await until(
        lambda: stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL), "the DaskCluster", 60
    )
    [resource] = [r["metadata"]["name"] for r in resources]
    await asyncio.sleep(2.0)  # no controller: nothing is made for it, it is still there
    assert {k: v for k, v in leftovers(kube).items() if k != crd.PLURAL} == {}
    [cluster] = await gateway.backend.list_clusters()
    assert cluster.status.name == "PENDING", cluster
    controller_started.set()
    await start_controller()
    seen = await asyncio.wait_for(running, 240)
    assert seen["started_after_controller"] and seen["resource"] == resource, seen
    assert seen["total"] == 285
    # Each object made once: the Secret, the Service, the scheduler and two workers.
    assert len(added(kube, "secrets", resource)) == 1
    assert len(added(kube, "services", resource)) == 1
    pods = added(kube, "pods", resource)
    assert pods.count(f"{resource}-scheduler") == 1, pods
    assert len(pods) == 3, pods
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")


async def test_a_gateway_killed_mid_scale_restarts_and_the_client_reconnects(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    processes: list[Process],
    tmp_path: Path,
) -> None:
    """kill -9 of `gateway serve` while a scale runs; started again, it finds the cluster,
    the scale completes, and the same client object reconnects and computes."""
    served = gateway_process(kube, tmp_path)
    processes.append(served.process)
    served.start()

    def session() -> dict[str, Any]:
        from gateway_client import BasicAuth, Gateway

        seen: dict[str, Any] = {}
        with Gateway(served.address, auth=BasicAuth("alice", "")) as gw:
            cluster = gw.new_cluster()
            name = cluster.name
            resource = f"dask-{name}"
            with cluster.get_client(set_as_default=False) as client:
                cluster.scale(1)
                client.wait_for_workers(1, timeout=120)
            # Each worker pod create now takes 2 s at the API server: the kill lands mid-scale.
            kube.delays[("create", "pods")] = 2.0
            cluster.scale(3)
            wait_for(lambda: len(worker_pods(kube, resource)) > 1, "a new worker pod", 120)
            served.process.kill()
            seen["at_kill"] = len(worker_pods(kube, resource))
            kube.delays.clear()
            served.start()
            again = gw.connect(name)
            with again.get_client(set_as_default=False) as client:
                client.wait_for_workers(3, timeout=180)
                seen["workers"] = len(client.scheduler_info()["workers"])
                seen["total"] = square_sum(client)
            seen["listed"] = [(c.name, c.status.name) for c in gw.list_clusters()]
            seen["pods"] = len(worker_pods(kube, resource))
            seen["name"] = name
            again.shutdown()
        return seen

    try:
        seen = await asyncio.to_thread(session)
    except BaseException:
        print(served.process.tail())
        raise
    assert seen["at_kill"] < 3, seen  # killed mid-scale
    assert seen["workers"] == 3
    assert seen["total"] == 285
    assert seen["listed"] == [(seen["name"], "RUNNING")]
    assert seen["pods"] == 3
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")


def informer_versions(informer: Any) -> dict[str, str]:
    return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in informer.items()}


def store_versions(kube: FakeKube, group: str, version: str, plural: str) -> dict[str, str]:
    return {
        o["metadata"]["name"]: o["metadata"]["resourceVersion"]
        for o in stored(kube, group, version, plural)
    }


async def test_watches_expired_mid_scale_relist_and_miss_nothing(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    """Every watch ends with 410 Gone (history compacted) several times while pods are
    created and start: the informers relist, the scale completes, and their caches end equal
    to the store (no event lost)."""
    gateway = await make_gateway(gateway_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    informers = [*controller.informers, gateway.backend.clusters]
    relists_before: list[int] = []

    def session() -> dict[str, Any]:
        from gateway_client import BasicAuth, Gateway

        seen: dict[str, Any] = {"expired": 0}
        with Gateway(address, auth=BasicAuth("alice", "")) as gw:
            cluster = gw.new_cluster()
            resource = f"dask-{cluster.name}"
            seen["resource"] = resource
            with cluster.get_client(set_as_default=False) as client:
                cluster.scale(1)
                client.wait_for_workers(1, timeout=120)
                relists_before.extend(i.relists for i in informers)
                cluster.scale(3)
                wait_for(lambda: len(worker_pods(kube, resource)) > 1, "a new worker pod", 120)
                # Expire every watch while the new pods are created and start.
                deadline = time.monotonic() + 60
                while seen["expired"] < 4 or len(client.scheduler_info()["workers"]) < 3:
                    seen["expired"] += 1
                    kube.expire_watches()
                    time.sleep(0.5)
                    assert time.monotonic() < deadline, "the scale did not complete"
                client.wait_for_workers(3, timeout=120)
                seen["workers"] = len(client.scheduler_info()["workers"])
                seen["total"] = square_sum(client)
            seen["name"] = cluster.name
            cluster.close(shutdown=False)  # checked below, then stopped
        return seen

    seen = await asyncio.to_thread(session)
    assert seen["workers"] == 3 and seen["total"] == 285
    assert seen["expired"] >= 4
    for informer, before in zip(informers, relists_before, strict=True):
        assert informer.relists > before, informer.resource.plural
    resource = seen["resource"]

    def status_counts() -> Any:
        obj = controller.clusters.get(NS, resource) or {}
        return (obj.get("status") or {}).get("workers") == 3

    await until(status_counts, "the DaskCluster's status to count 3 workers")
    for informer, (group, version, plural) in (
        (controller.pods, ("", "v1", "pods")),
        (controller.services, ("", "v1", "services")),
        (controller.secrets, ("", "v1", "secrets")),
        (controller.clusters, (crd.GROUP, crd.VERSION, crd.PLURAL)),
        (gateway.backend.clusters, (crd.GROUP, crd.VERSION, crd.PLURAL)),
    ):
        await until(
            lambda i=informer, k=(group, version, plural): (
                informer_versions(i) == store_versions(kube, *k)
            ),
            f"the {plural} cache to equal the store",
            30,
        )
    alice = make_api_client(gateway, "alice")
    assert (await alice.delete(f"/api/v1/clusters/{seen['name']}")).status == 204
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")


# Each refusal: the API group, resource and verb taken away from the chart's Roles.
REFUSALS = [
    pytest.param(("", "pods", "create"), id="controller-create-pods"),
    pytest.param(("", "services", "create"), id="controller-create-services"),
    pytest.param(("", "secrets", "create"), id="controller-create-secrets"),
    pytest.param((crd.GROUP, crd.PLURAL, "create"), id="gateway-create-daskclusters"),
]


def new_cluster_error(address: str) -> tuple[Exception, float]:
    """What our client raises when asked for a new cluster, and how long that took."""
    from gateway_client import BasicAuth, Gateway

    started = time.monotonic()
    with Gateway(address, auth=BasicAuth("alice", "")) as gw:
        try:
            cluster = gw.new_cluster()
        except Exception as exc:  # noqa: BLE001 - the point: what the user gets
            return exc, time.monotonic() - started
        cluster.shutdown()
    raise AssertionError("the cluster started")


@pytest.mark.parametrize(
    ("kube", "refusal"),
    [pytest.param(p.values[0], p.values[0], id=p.id) for p in REFUSALS],
    indirect=["kube"],
)
async def test_an_rbac_refusal_is_a_clear_error_within_30_s(
    kube: FakeKube,
    refusal: tuple[str, str, str],
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    """A request the Roles do not grant fails the new cluster quickly, with the refused verb
    and resource in the API's answer and in the client's exception."""
    from gateway_client import GatewayClusterError, GatewayServerError

    _, resource, verb = refusal
    gateway = await make_gateway(gateway_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    error, took = await asyncio.to_thread(new_cluster_error, address)
    assert took < 30, (took, error)
    text = str(error)
    refused = f'cannot {verb} resource "{resource}"'  # the API server's own words
    assert refused in text, text
    alice = make_api_client(gateway, "alice")
    if resource == crd.PLURAL:  # the gateway's request: nothing was made
        assert isinstance(error, GatewayServerError), repr(error)
        assert "cannot create the cluster's resources" in text, text
        answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
        assert answer.status == 503 and refused in answer.body["error"], answer.body
        assert not leftovers(kube)
        return
    assert isinstance(error, GatewayClusterError), repr(error)
    ours = f"the controller may not {verb} {resource} in namespace {NS!r}"
    assert "failed to start" in text and ours in text, text
    [cluster] = await gateway.backend.list_clusters()
    body = (await alice.get(f"/api/v1/clusters/{cluster.name}")).body
    assert body["status"] == "FAILED", body
    reason = (await alice.get(f"/api/v2/clusters/{cluster.name}/reason")).body["reason"]
    assert ours in reason and refused in reason, reason
    await until(lambda: not leftovers(kube), "the failed cluster's objects to be deleted")


async def test_an_image_that_cannot_be_pulled_reaches_the_clients_error(
    kube: FakeKube, kubelet: Kubelet, controller: Controller, make_gateway: Any
) -> None:
    from gateway_client import GatewayClusterError

    gateway = await make_gateway(gateway_config(kube, image=BAD_IMAGE))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    error, took = await asyncio.to_thread(new_cluster_error, address)
    assert isinstance(error, GatewayClusterError), repr(error)
    text = str(error)
    assert "failed to start" in text and BAD_IMAGE in text and "ErrImagePull" in text, text
    assert took < 60, took
    await until(lambda: not leftovers(kube), "the failed cluster's objects to be deleted")
