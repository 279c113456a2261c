"""Fixtures of the gateway-k8s tests: the fake API server (tests/kube_fake) serving the
DaskCluster CRD, and `kubernetes` client objects talking to it.

There is no real Kubernetes here: every test runs against the fake.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
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
