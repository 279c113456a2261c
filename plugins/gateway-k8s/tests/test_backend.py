"""The gateway side alone (no controller, no kubelet) on the fake API server: what a cluster's
resources look like, and a clear error when RBAC refuses a request.

Unit tests: an in-process gateway and the in-process fake, no processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kube_fake import FakeKube

from gateway_core.config import ConfigError, structure
from gateway_k8s import crd, objects
from gateway_k8s.config import KubeClusterConfig
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


GROUPS: dict[str, Any] = {
    "gpu": {
        "worker_cores": 4,
        "worker_memory": "16 GiB",
        "environment": {"DASK_DISTRIBUTED__WORKER__RESOURCES__GPU": "1"},
        "backend": {
            "image": "dask:gpu",
            "image_pull_policy": "Always",
            "worker_cores_limit": 6,
            "node_selector": {"accelerator": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "worker_extra_pod_config": {"priorityClassName": "gpu"},
            "worker_extra_container_config": {"workingDir": "/gpu"},
            "worker_extra_pod_labels": {"kind": "gpu"},
        },
    },
    "highmem": {"worker_memory": "64 GiB", "worker_threads": 2},
    "unused": {"worker_cores": 2},
}


def group_config(kube: FakeKube) -> dict[str, Any]:
    return config(
        kube,
        worker_cores=1,
        worker_memory="2 GiB",
        environment={"SITE": "lab"},
        node_selector={"pool": "dask"},
        worker_extra_pod_labels={"team": "a"},
        worker_groups=GROUPS,
        enabled_worker_groups=["gpu", "highmem"],
    )


async def test_named_worker_groups_become_pod_templates_of_the_resource(
    gateway_only: FakeKube, make_gateway: Any, make_api_client: Any
) -> None:
    kube = gateway_only
    gateway = await make_gateway(group_config(kube))
    alice = make_api_client(gateway, "alice")
    answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
    assert answer.status == 201, answer.body
    name = answer.body["name"]
    [resource] = stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL)
    spec = resource["spec"]
    # The enabled groups only, each with its own settings over [cluster]'s.
    assert sorted(spec["workerGroups"]) == ["gpu", "highmem"]
    gpu, highmem, default = (
        spec["workerGroups"]["gpu"],
        spec["workerGroups"]["highmem"],
        spec["worker"],
    )
    assert default["image"] == "dask:test" and "imagePullPolicy" not in default
    assert default["resources"]["requests"] == {"cpu": "1", "memory": str(2 * 2**30)}
    assert gpu["image"] == "dask:gpu" and gpu["imagePullPolicy"] == "Always"
    assert gpu["replicas"] == 0 and gpu["threads"] == 4
    assert gpu["resources"] == {
        "requests": {"cpu": "4", "memory": str(16 * 2**30)},
        "limits": {"cpu": "6", "memory": str(16 * 2**30)},
    }
    # Mappings of [cluster] are merged with the group's, the rest replaced.
    assert gpu["nodeSelector"] == {"pool": "dask", "accelerator": "a100"}
    assert gpu["labels"] == {"team": "a", "kind": "gpu"}
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert gpu["extraPodConfig"] == {"priorityClassName": "gpu"}
    assert gpu["extraContainerConfig"]["workingDir"] == "/gpu"
    env = {e["name"]: e["value"] for e in gpu["env"]}
    assert env["SITE"] == "lab" and env["DASK_GATEWAY_CLUSTER_NAME"] == name
    assert env["DASK_DISTRIBUTED__WORKER__RESOURCES__GPU"] == "1"
    default_env = {e["name"]: e["value"] for e in default["env"]}
    assert "DASK_DISTRIBUTED__WORKER__RESOURCES__GPU" not in default_env
    assert highmem["image"] == "dask:test" and highmem["threads"] == 2
    assert highmem["resources"]["requests"] == {"cpu": "1", "memory": str(64 * 2**30)}
    assert highmem["nodeSelector"] == {"pool": "dask"}
    # What the controller makes of the gpu template: a pod the agent knows as a gpu worker.
    pod_name = objects.worker_pod_name(resource["metadata"]["name"], "gpu")
    assert pod_name.startswith(f"{name}-gpu-")
    resource["metadata"]["uid"] = "uid-1"
    pod = objects.worker_pod(
        resource, group="gpu", name=pod_name, scheduler_address="tls://10.0.0.1:8786"
    )
    container = pod["spec"]["containers"][0]
    assert container["image"] == "dask:gpu" and container["workingDir"] == "/gpu"
    assert container["args"][container["args"].index("--nthreads") + 1] == "4"
    assert container["args"][container["args"].index("--memory-limit") + 1] == str(16 * 2**30)
    assert pod["spec"]["priorityClassName"] == "gpu"
    assert pod["spec"]["nodeSelector"] == {"pool": "dask", "accelerator": "a100"}
    assert pod["metadata"]["labels"][objects.LABEL_GROUP] == "gpu"
    assert pod["metadata"]["labels"]["kind"] == "gpu"
    # Before any scale, the v2 API reports every enabled group with nothing wanted.
    body = (await alice.get(f"/api/v2/clusters/{name}")).body
    assert list(body["groups"]) == ["default", "gpu", "highmem"]
    assert body["groups"]["gpu"] == {"count": 0, "pending": 0, "running": 0, "stopping": 0}


async def test_group_targets_reach_the_groups_replicas_and_their_counts_the_api(
    gateway_only: FakeKube, make_gateway: Any, make_api_client: Any
) -> None:
    kube = gateway_only
    gateway = await make_gateway(group_config(kube))
    alice = make_api_client(gateway, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    kind = kube.store.find_kind(crd.GROUP, crd.VERSION, crd.PLURAL)
    secrets_kind = kube.store.find_kind("", "v1", "secrets")
    assert kind is not None and secrets_kind is not None
    resource = kube.store.get(kind, NS, f"dask-{name}")
    secret = objects.credentials_secret(owner=resource, token="t" * 64, cert=b"C", key=b"K")
    kube.store.create(secrets_kind, NS, secret)
    token = {"Authorization": "token " + "t" * 64}

    async def beat(msg: dict[str, Any]) -> None:
        answer = await alice.post(f"/api/v1/clusters/{name}/heartbeat", json=msg, headers=token)
        assert answer.status == 200, answer.body

    def spec() -> dict[str, Any]:
        return dict(kube.store.get(kind, NS, f"dask-{name}")["spec"])

    await beat({"count": 1, "group_counts": {"gpu": 2}})
    assert spec()["worker"]["replicas"] == 1
    assert spec()["workerGroups"]["gpu"]["replicas"] == 2
    assert spec()["workerGroups"]["highmem"]["replicas"] == 0
    # A group the agent no longer lists wants none; a group the cluster lacks is ignored.
    await beat({"count": 1, "group_counts": {"highmem": 1, "nope": 3}})
    assert spec()["workerGroups"]["gpu"]["replicas"] == 0
    assert spec()["workerGroups"]["highmem"]["replicas"] == 1
    assert "nope" not in spec()["workerGroups"]
    # An agent that knows no groups leaves the named groups alone.
    await beat({"count": 3})
    assert spec()["worker"]["replicas"] == 3
    assert spec()["workerGroups"]["highmem"]["replicas"] == 1
    # The controller's counts per group (status.groups) are the v2 API's.
    obj = kube.store.get(kind, NS, f"dask-{name}")
    obj["status"] = {
        "phase": "Pending",
        "groups": {
            "default": {"requested": 3, "pending": 1, "running": 2},
            "highmem": {"requested": 1, "pending": 0, "running": 2},
        },
    }
    kube.store.update(kind, NS, f"dask-{name}", obj, subresource="status")

    async def groups() -> Any:
        body = (await alice.get(f"/api/v2/clusters/{name}")).body
        return body["groups"] if body["groups"]["default"]["running"] else None

    deadline = asyncio.get_running_loop().time() + 30
    found = await groups()
    while found is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        found = await groups()
    assert found == {
        "default": {"count": 3, "pending": 1, "running": 2, "stopping": 0},
        "gpu": {"count": 0, "pending": 0, "running": 0, "stopping": 0},
        "highmem": {"count": 1, "pending": 0, "running": 1, "stopping": 1},
    }
    await alice.delete(f"/api/v1/clusters/{name}")


@pytest.mark.parametrize(
    ("backend", "problem"),
    [
        (
            {"scheduler_cores": 4},
            "worker_groups.gpu.backend.scheduler_cores: not a per-group setting on Kubernetes "
            "(a scheduler setting; a group has workers only)",
        ),
        (
            {"service_account": "gpu-runner"},
            "worker_groups.gpu.backend.service_account: not a per-group setting on Kubernetes "
            "(it applies to every pod of the cluster",
        ),
        (
            {"idle_timeout": 60},
            "worker_groups.gpu.backend.idle_timeout: not a per-group setting on Kubernetes",
        ),
        ({"no_such_key": 1}, "worker_groups.gpu.backend.no_such_key: not a cluster setting"),
        (
            {"image_pull_policy": "Sometimes"},
            "worker_groups.gpu.image_pull_policy: 'Sometimes' is not one of",
        ),
        (
            {"tolerations": [{"key": "x", "operator": "Maybe"}]},
            "worker_groups.gpu.tolerations[0].operator: must be Equal or Exists",
        ),
        ({"node_selector": "gpu"}, "worker_groups.gpu.node_selector"),
    ],
)
async def test_bad_group_extras_are_refused_naming_the_key_and_nothing_is_lost(
    gateway_only: FakeKube, make_gateway: Any, make_api_client: Any, backend: Any, problem: str
) -> None:
    kube = gateway_only
    first = await make_gateway(
        {**config(kube), "gateway": {"backend": "kubernetes", "stop_clusters_on_shutdown": False}}
    )
    alice = make_api_client(first, "alice")
    assert (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).status == 201
    await first.stop()
    bad = config(kube, worker_groups={"gpu": {"backend": backend}})
    with pytest.raises(ConfigError) as raised:
        await make_gateway(bad)
    assert any(p.startswith(f"cluster.{problem}") for p in raised.value.problems), (
        raised.value.problems
    )
    # The running cluster's resource is untouched.
    assert len(stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL)) == 1


@pytest.mark.parametrize(
    ("cluster", "problem"),
    [
        # A group with more cores than [cluster] inherits the cluster's lower limit.
        (
            {"worker_cores_limit": 2, "worker_groups": {"big": {"worker_cores": 8}}},
            "cluster.worker_groups.big.worker_cores_limit: 2 is below worker_cores 8",
        ),
        (
            {"worker_memory": "4 GiB", "worker_memory_limit": "2 GiB"},
            f"cluster.worker_memory_limit: {2 * 2**30} is below worker_memory {4 * 2**30}",
        ),
    ],
)
def test_a_limit_below_its_request_is_refused(cluster: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        structure({"image": "dask:test", **cluster}, KubeClusterConfig, path="cluster")
    assert any(p.startswith(problem) for p in raised.value.problems), raised.value.problems


async def test_an_option_that_breaks_a_group_is_refused_and_nothing_is_created(
    gateway_only: FakeKube, make_gateway: Any, make_api_client: Any
) -> None:
    kube = gateway_only
    settings = config(kube, worker_groups={"big": {"worker_cores": 8}})
    settings["options"] = {"worker_cores_limit": {"type": "int", "default": 0, "min": 0}}
    gateway = await make_gateway(settings)
    alice = make_api_client(gateway, "alice")
    # 2 cores would do for the default group, not for the 8-core group that inherits it.
    answer = await alice.post(
        "/api/v1/clusters/", json={"cluster_options": {"worker_cores_limit": 2}}
    )
    assert answer.status == 422, answer.body
    assert "worker_groups.big.worker_cores_limit: 2 is below worker_cores 8" in str(answer.body)
    assert stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL) == []
    answer = await alice.post(
        "/api/v1/clusters/", json={"cluster_options": {"worker_cores_limit": 8}}
    )
    assert answer.status == 201, answer.body
    [resource] = stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL)
    big = resource["spec"]["workerGroups"]["big"]["resources"]
    assert big["requests"]["cpu"] == "8" and big["limits"]["cpu"] == "8"
