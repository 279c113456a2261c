"""Refused reads and status writes reach the operator and the user: the fake grants what the
chart's rendered Roles grant minus one verb (`watch pods`, `list secrets`, `patch
daskclusters/status`, the gateway's `get secrets`); the controller's `/readyz` and its log
(at ERROR, once) name the verb and resource, and a cluster that cannot proceed gets a reason
naming them.

Unit tests: the controller and the gateway in this process, a kubelet that starts no processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from e2e_support import NS, chart_rules, stored, until, without
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s import crd, objects
from gateway_k8s.config import KubeControllerConfig
from gateway_k8s.controller import Controller
from gateway_k8s.kube import CLUSTERS, KubeClient, load_api_client
from gateway_k8s.runner import make_controller

pytestmark = pytest.mark.unit


@pytest.fixture
def kube(request: pytest.FixtureRequest, chart_roles: dict[str, Any]) -> Iterator[FakeKube]:
    """The fake under the chart's Roles with one (API group, resource, verb) taken away."""
    rules = without(chart_rules(chart_roles), *request.param)
    fake = FakeKube(crds=[crd.crd()], role=rules)
    with fake.running():
        yield fake


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False).running() as k:
        yield k


@pytest.fixture
async def client(kube: FakeKube) -> AsyncIterator[KubeClient]:
    """A client of the test itself; the fake's one identity has the Roles' grants only, so
    what the test writes the Roles must allow too (creating DaskClusters: the gateway's)."""
    made = KubeClient(load_api_client(server=kube.url), threads=3)
    yield made
    made.close()


@pytest.fixture
async def controller(kube: FakeKube) -> AsyncIterator[Controller]:
    config = KubeControllerConfig(
        server=kube.url,
        namespace=NS,
        address_mode="pod",
        leader_election=False,
        api_qps=0,
        health_address="127.0.0.1:0",
    )
    made = await make_controller(config)
    stop = asyncio.Event()
    task = asyncio.create_task(made.run(stop=stop))
    await until(lambda: made.health_port, "the health server")
    yield made
    stop.set()
    await asyncio.wait_for(task, 20)
    made.client.close()


async def readyz(controller: Controller) -> tuple[int, str]:
    url = f"http://127.0.0.1:{controller.health_port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


def cluster_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": name, "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice", "worker": {"replicas": 1}},
    }


def status_of(kube: FakeKube, name: str) -> dict[str, Any]:
    """The DaskCluster's status, read from the store (the Roles grant no `get`)."""
    for obj in stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL):
        if obj["metadata"]["name"] == name:
            return dict(obj.get("status") or {})
    return {}


def errors_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """ERROR records naming ``text``, since the controller started (the fixtures' setup)."""
    records = caplog.get_records("setup") + caplog.get_records("call")
    messages = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    return [m for m in messages if text in m]


WATCH_PODS = ("", "pods", "watch")
LIST_SECRETS = ("", "secrets", "list")
PATCH_STATUS = (crd.GROUP, f"{crd.PLURAL}/status", "patch")


@pytest.mark.parametrize(
    ("kube", "words"),
    [
        pytest.param(WATCH_PODS, ("watch pods", 'cannot watch resource "pods"'), id="watch-pods"),
        pytest.param(
            LIST_SECRETS, ("list secrets", 'cannot list resource "secrets"'), id="list-secrets"
        ),
    ],
    indirect=["kube"],
)
async def test_a_refused_list_or_watch_is_named_by_readiness_the_log_and_the_clusters(
    kube: FakeKube,
    words: tuple[str, str],
    kubelet: Kubelet,
    client: KubeClient,
    controller: Controller,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache the controller may not fill (or keep current) stops it from acting on the
    clusters: `/readyz` answers 503 naming the verb and resource, the log says so at ERROR
    once (not at every retry), and a new cluster fails at once with a reason naming them
    instead of waiting for ever; nothing is created for it. Once granted, readiness heals."""
    ours, theirs = words
    caplog.set_level(logging.INFO, logger="gateway")
    _, text = await until(
        lambda: _when(readyz(controller), lambda r: r[0] == 503 and ours in r[1]),
        f"/readyz to name {ours}",
    )
    assert theirs in text, text
    await client.create(CLUSTERS, NS, cluster_body("dask-r1"))

    def failed() -> dict[str, Any] | None:
        current = status_of(kube, "dask-r1")
        return current if current.get("phase") == "Failed" else None

    final = await until(failed, "the cluster to fail naming the refusal", timeout=30)
    reason = final["reason"]
    assert reason.startswith("cannot start: the controller may not " + ours), reason
    assert f"in namespace {NS!r}" in reason and theirs in reason, reason
    assert not [e for e in kube.store.events if e.kind == "/pods" and e.type == "ADDED"], (
        "no pod may be made from a cache that cannot be trusted"
    )
    # The informer retries (relisting) many times over; the log says it once.
    await asyncio.sleep(3)
    assert len(errors_naming(caplog, f"refuses to let this process {ours}")) == 1, caplog.text
    kube.role = None  # granted again
    await until(
        lambda: _when(readyz(controller), lambda r: r[0] == 200),
        "/readyz to heal once granted",
        timeout=30,
    )
    assert f"{ours} is granted again" in caplog.text, caplog.text


@pytest.mark.parametrize("kube", [PATCH_STATUS], indirect=True, ids=["patch-status"])
async def test_a_refused_status_write_is_named_by_readiness_and_logged_once(
    kube: FakeKube,
    kubelet: Kubelet,
    client: KubeClient,
    controller: Controller,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without `patch daskclusters/status` no cluster's status (reason included) can be
    recorded: `/readyz` names the refusal, logged at ERROR once for two clusters and their
    retries; once granted, both clusters get their status and readiness heals."""
    caplog.set_level(logging.INFO, logger="gateway")
    # Ready once its caches are synced (nothing refused yet: no status was written).
    await until(lambda: _when(readyz(controller), lambda r: r[0] == 200), "/readyz to pass")
    for name in ("dask-s1", "dask-s2"):
        await client.create(CLUSTERS, NS, cluster_body(name))
    _, text = await until(
        lambda: _when(readyz(controller), lambda r: r[0] == 503),
        "/readyz to fail",
        timeout=30,
    )
    assert "may not patch daskclusters/status" in text, text
    assert 'cannot patch resource "daskclusters/status"' in text, text
    await asyncio.sleep(3)  # retries with backoff meanwhile
    assert len(errors_naming(caplog, "No cluster's status can be recorded")) == 1, caplog.text
    kube.role = None

    def both_running() -> bool:
        return all(status_of(kube, n).get("phase") == "Running" for n in ("dask-s1", "dask-s2"))

    await until(both_running, "both clusters to run once granted", timeout=45)
    assert (await readyz(controller))[0] == 200


async def _when(answer: Any, check: Any) -> Any:
    value = await answer
    return value if check(value) else None


# --------------------------------------------------------------------------------------------
# The gateway's reads


def gateway_config(kube: FakeKube) -> dict[str, Any]:
    return {
        "gateway": {"backend": "kubernetes"},
        "backend": {"kubernetes": {"server": kube.url, "namespace": NS, "api_qps": 0}},
        "cluster": {"image": "dask:test"},
    }


GET_SECRETS = ("", "secrets", "get")
WATCH_CLUSTERS = (crd.GROUP, crd.PLURAL, "watch")
LIST_CLUSTERS = (crd.GROUP, crd.PLURAL, "list")


@pytest.mark.parametrize("kube", [GET_SECRETS], indirect=True, ids=["get-secrets"])
async def test_a_refused_secret_read_fails_the_new_cluster_naming_it(
    kube: FakeKube,
    make_gateway: Any,
    make_api_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway may not read a cluster's credentials Secret: without its token the cluster
    cannot be used, so a new one fails at once with a reason naming the verb, resource and
    namespace (not a 500, not a wait for ever); the health lists the refusal, logged once."""
    gateway = await make_gateway(gateway_config(kube))
    alice = make_api_client(gateway, "alice")
    names = []
    for _ in range(2):
        answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
        assert answer.status == 201, answer.body
        names.append(answer.body["name"])
    for name in names:
        body = (
            await until(
                lambda n=name: _when(
                    alice.get(f"/api/v1/clusters/{n}"),
                    lambda a: a.body.get("status") == "FAILED",
                ),
                "the cluster to fail",
            )
        ).body
        reason = (await alice.get(f"/api/v2/clusters/{name}/reason")).body["reason"]
        expected = f"cannot start: the gateway may not get secrets in namespace {NS!r}"
        assert reason.startswith(expected), reason
        assert 'cannot get resource "secrets"' in reason, (body, reason)
    listed = await alice.get("/api/v1/clusters/")
    assert listed.status == 200, listed.body
    health = await alice.get("/api/health")
    assert health.status == 200, health.body  # the other clusters' traffic is not affected
    [refusal] = health.body["refused"]
    assert "may not get secrets" in refusal, health.body
    assert len(errors_naming(caplog, "may not get secrets")) == 1, caplog.text
    assert stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL) == []  # failed: deleted


@pytest.mark.parametrize("kube", [WATCH_CLUSTERS], indirect=True, ids=["watch-daskclusters"])
async def test_a_refused_watch_fails_the_gateways_health_naming_it(
    kube: FakeKube, make_gateway: Any, make_api_client: Any
) -> None:
    gateway = await make_gateway(gateway_config(kube))
    alice = make_api_client(gateway, "alice")
    health = await until(
        lambda: _when(alice.get("/api/health"), lambda a: a.status == 503),
        "the health to fail",
        timeout=30,
    )
    reason = health.body["reason"]
    assert reason.startswith("the gateway may not watch daskclusters:"), health.body
    assert 'cannot watch resource "daskclusters"' in reason, health.body
    kube.role = None
    await until(
        lambda: _when(alice.get("/api/health"), lambda a: a.status == 200),
        "the health to pass once granted",
        timeout=30,
    )


@pytest.mark.parametrize("kube", [LIST_CLUSTERS], indirect=True, ids=["list-daskclusters"])
async def test_a_refused_list_stops_the_gateway_from_starting_at_once(
    kube: FakeKube, make_gateway: Any
) -> None:
    from gateway_core.errors import BackendUnavailable

    started = asyncio.get_running_loop().time()
    with pytest.raises(BackendUnavailable) as caught:
        await make_gateway(gateway_config(kube))
    assert asyncio.get_running_loop().time() - started < 20  # not the 30 s timeout
    text = str(caught.value)
    assert f"the gateway may not list daskclusters in namespace {NS!r}" in text, text
    assert 'cannot list resource "daskclusters"' in text, text


@pytest.mark.parametrize("kube", [PATCH_STATUS], indirect=True, ids=["patch-status"])
async def test_a_cluster_whose_status_no_controller_may_write_tells_its_user(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    """The controller's status writes are refused, so nothing it knows reaches the
    DaskCluster: after `controller_timeout` the gateway gives the pending cluster a reason
    naming the likely cause (no controller, or `patch daskclusters/status` refused); once the
    status may be written the cluster runs and the reason goes."""
    config = gateway_config(kube)
    config["backend"]["kubernetes"]["controller_timeout"] = 2
    gateway = await make_gateway(config)
    alice = make_api_client(gateway, "alice")
    answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
    assert answer.status == 201, answer.body
    name = answer.body["name"]

    async def reason() -> str:
        return str((await alice.get(f"/api/v2/clusters/{name}/reason")).body.get("reason") or "")

    text = await until(
        lambda: _when(reason(), lambda r: "patch daskclusters/status" in r),
        "the reason to name the status write",
        timeout=30,
    )
    assert text.startswith("no controller has recorded this cluster's status in "), text
    assert f"in namespace {NS!r}" in text, text
    assert (await alice.get(f"/api/v1/clusters/{name}")).body["status"] == "PENDING"
    kube.role = None  # granted: the controller's retries write the status

    def written() -> bool:
        return bool(status_of(kube, objects.resource_name(name)).get("phase"))

    await until(written, "the status to be written once granted", timeout=45)
    assert "no controller" not in await reason()
