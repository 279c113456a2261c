"""Fixtures of the gateway-k8s tests: the fake API server (tests/kube_fake) serving the
DaskCluster CRD, `kubernetes` client objects talking to it, the Helm chart rendered once
per session (its Roles are the RBAC the end-to-end tests run under), and the end-to-end
tests' fake under those Roles, simulated kubelet and in-process controller.

There is no real Kubernetes here: every test runs against the fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from e2e_support import BAD_IMAGE, NS, chart_rules
from helm_chart import find_helm, render, roles
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s import crd
from gateway_k8s.config import KubeControllerConfig
from gateway_k8s.controller import Controller
from gateway_k8s.runner import make_controller


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    """A started fake API server serving the DaskCluster CRD; everything allowed."""
    fake = FakeKube(crds=[crd.crd()])
    with fake.running():
        yield fake


@pytest.fixture
def core(kube: FakeKube) -> Iterator[Any]:
    client = kube.api_client()
    yield kubernetes.client.CoreV1Api(client)
    client.close()


@pytest.fixture
def custom(kube: FakeKube) -> Iterator[Any]:
    client = kube.api_client()
    yield kubernetes.client.CustomObjectsApi(client)
    client.close()


@pytest.fixture(scope="session")
def chart_objects() -> list[dict[str, Any]]:
    """The chart rendered once per session with its default values (`helm template`); without
    helm, fails under CI and skips elsewhere, naming the install script."""
    return render(find_helm())


@pytest.fixture(scope="session")
def chart_roles(chart_objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The chart's rendered Roles (gateway, controller, controller-leader-election)."""
    return roles(chart_objects)


@pytest.fixture
def chart_kube(chart_roles: dict[str, dict[str, Any]]) -> Iterator[FakeKube]:
    """The fake API server granting only what the Helm chart's rendered Roles grant (the
    gateway's, the controller's and its leader election Role; plus the kubelet's needs): a
    request of the gateway or the controller beyond them fails the test. End-to-end modules
    make it their `kube`."""
    fake = FakeKube(crds=[crd.crd()], role=chart_rules(chart_roles))
    with fake.running():
        yield fake


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    """A kubelet running pods' commands as processes; the image `BAD_IMAGE` cannot be pulled."""
    with Kubelet(
        kube=kube, workdir=tmp_path / "kubelet", failing_images={BAD_IMAGE}
    ).running() as k:
        yield k


@pytest.fixture
async def start_controller(kube: FakeKube) -> AsyncIterator[Callable[[], Awaitable[Controller]]]:
    """``await start_controller()``: the controller in this process (its own informers and
    client), without a Lease, started when the test says (after a create, say); stopped at
    teardown."""
    running: list[tuple[Controller, asyncio.Event, asyncio.Task[None]]] = []

    async def start() -> Controller:
        config = KubeControllerConfig(
            server=kube.url,
            namespace=NS,
            address_mode="pod",
            leader_election=False,
            retire_grace=5.0,
            api_qps=0,
        )
        made = await make_controller(config)
        stop = asyncio.Event()
        running.append((made, stop, asyncio.create_task(made.run(stop=stop))))
        return made

    yield start
    for made, stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 20)
        made.client.close()


@pytest.fixture
async def controller(start_controller: Callable[[], Awaitable[Controller]]) -> Controller:
    """The controller in this process (its own informers and client), without a Lease."""
    return await start_controller()
