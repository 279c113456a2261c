"""Fixtures of the gateway-k8s tests: the fake API server (tests/kube_fake) serving the
DaskCluster CRD, `kubernetes` client objects talking to it, and the Helm chart rendered once
per session (its Roles are the RBAC the end-to-end tests run under).

There is no real Kubernetes here: every test runs against the fake.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from helm_chart import find_helm, render, roles
from kube_fake import FakeKube

from gateway_k8s import crd


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
