"""The gateway side alone (no controller, no kubelet) on the fake API server: what a cluster's
resources look like, and a clear error when RBAC refuses a request.

Unit tests: an in-process gateway and the in-process fake, no processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kube_fake import FakeKube

from gateway_k8s import crd, objects
from gateway_k8s.rbac import GATEWAY_RULES, role_rules

pytestmark = pytest.mark.unit
NS = "dask"


def config(kube: FakeKube, **cluster: Any) -> dict[str, Any]:
    return {
        "gateway": {"backend": "kubernetes"},
        "backend": {"kubernetes": {"server": kube.url, "namespace": NS, "api_qps": 0}},
        "cluster": {"image": "dask:test", **cluster},
    }


def stored(kube: FakeKube, group: str, version: str, plural: str) -> list[dict[str, Any]]:
    kind = kube.store.find_kind(group, version, plural)
    assert kind is not None
    items, _ = kube.store.select(kind, NS, lambda obj: True)
    return items


@pytest.fixture
def gateway_only() -> Iterator[FakeKube]:
    """A fake granting exactly the gateway's rules."""
    fake = FakeKube(crds=[crd.crd()], role=role_rules(GATEWAY_RULES))
    with fake.running():
        yield fake


async def test_a_new_cluster_is_a_resource_and_its_credentials_are_read_by_name(
    gateway_only: FakeKube, make_gateway: Any, make_api_client: Any
) -> None:
    kube = gateway_only
    gateway = await make_gateway(
        config(
            kube,
            worker_cores=2,
            worker_memory="3 GiB",
            node_selector={"pool": "dask"},
            tolerations=[{"key": "dask", "operator": "Exists", "effect": "NoSchedule"}],
            image_pull_secrets=[{"name": "registry"}],
            service_account="dask-runner",
        )
    )
    alice = make_api_client(gateway, "alice")
    answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
    assert answer.status == 201, answer.body
    name = answer.body["name"]
    [resource] = stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL)
    assert resource["metadata"]["name"] == f"dask-{name}"
    spec = resource["spec"]
    assert spec["user"] == "alice"
    assert spec["worker"]["replicas"] == 0
    assert spec["worker"]["resources"]["requests"] == {"cpu": "2", "memory": str(3 * 2**30)}
    assert spec["worker"]["nodeSelector"] == {"pool": "dask"}
    assert spec["scheduler"]["tolerations"][0]["key"] == "dask"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["serviceAccountName"] == "dask-runner"
    env = {e["name"]: e["value"] for e in spec["scheduler"]["env"]}
    assert env["DASK_GATEWAY_CLUSTER_NAME"] == name
    assert env["DASK_GATEWAY_API_URL"] == gateway.context.api_url
    assert "DASK_GATEWAY_API_TOKEN" not in env  # only in the Secret
    # The controller makes the credentials; until then the cluster has none.
    assert stored(kube, "", "v1", "secrets") == []
    cluster = await gateway.backend.get_cluster(name)
    assert cluster is not None and cluster.status.name == "PENDING" and cluster.token == ""
    secret = objects.credentials_secret(owner=resource, token="t" * 64, cert=b"CERT", key=b"KEY")
    kind = kube.store.find_kind("", "v1", "secrets")
    assert kind is not None
    kube.store.create(kind, NS, secret)
    cluster = await gateway.backend.get_cluster(name)
    assert cluster is not None
    assert (cluster.token, cluster.tls_cert, cluster.tls_key) == ("t" * 64, b"CERT", b"KEY")
    # Stop: the resource is deleted (its Secret goes with it), the API still answers.
    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    assert stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL) == []
    assert stored(kube, "", "v1", "secrets") == []
    body = (await alice.get(f"/api/v1/clusters/{name}")).body
    assert body["status"] == "STOPPED"


async def test_rbac_refusing_the_resource_is_a_clear_error(
    make_gateway: Any, make_api_client: Any
) -> None:
    rules = [
        r for r in GATEWAY_RULES if r["resources"] != [crd.PLURAL] or "create" not in r["verbs"]
    ]
    assert len(rules) == len(GATEWAY_RULES) - 1
    fake = FakeKube(crds=[crd.crd()], role=role_rules(rules))
    with fake.running():
        gateway = await make_gateway(config(fake))
        alice = make_api_client(gateway, "alice")
        answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
        assert answer.status == 503, answer.body
        message = answer.body["error"]
        assert "cannot create the cluster's resources" in message
        assert 'cannot create resource "daskclusters"' in message, message
        assert stored(fake, crd.GROUP, crd.VERSION, crd.PLURAL) == []
        await gateway.stop()
