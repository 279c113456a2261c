"""Per-user namespaces: the `namespace` template (from `[cluster]`, user options or a
plugin's `gateway_apply_options`) checked into a DNS-1123 label, the allowed namespaces, and
against the fake API server two users' clusters each in their own namespace (the DaskCluster,
its pods, Service and Secret), the gateway and the controller watching all namespaces.

Unit tests: in-process gateway and controller, a kubelet that starts no processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import helm_chart
import kubernetes
import pytest
import yaml
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_core.config import ConfigError, structure
from gateway_core.errors import InvalidRequest
from gateway_core.hookspecs import hookimpl
from gateway_k8s import crd, objects
from gateway_k8s.config import KubeBackendConfig, KubeClusterConfig, KubeControllerConfig
from gateway_k8s.controller import Controller
from gateway_k8s.kube import CLUSTERS, KubeClient, KubeError, load_api_client
from gateway_k8s.namespaces import NamespacePolicy, render, template_problems, username_label
from gateway_k8s.runner import make_controller

pytestmark = pytest.mark.unit
HOME = helm_chart.NS  # the release's namespace: the Lease's, and the clusters' by default
KUBELET_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "get", "delete"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


# --- templates and the policy ----------------------------------------------------------------


def test_templates_render_into_labels() -> None:
    assert render("dask-{username}", "alice") == "dask-alice"
    assert username_label("Alice.Smith@Example.org") == "alice-smith-example-org"
    assert render("{username}-dask", "Bob_2") == "bob-2-dask"
    assert render("shared", "anyone") == "shared"
    assert template_problems("namespace", "dask-{username}") == []
    assert template_problems("namespace", "") == []
    (problem,) = template_problems("namespace", "Dask-{username}")
    assert "'Dask-{username}' is not a namespace name" in problem
    (problem,) = template_problems("namespace", "dask-{user}")
    assert "{user} is not a field of a namespace template" in problem
    (problem,) = template_problems("namespace", "dask-{username:>10}")
    assert "{username:>10}" in problem
    with pytest.raises(InvalidRequest, match=r"'dask-\{username\}' for user '\.\.\.'"):
        render("dask-{username}", "...")
    long = "a" * 60
    with pytest.raises(InvalidRequest, match=rf"gives 'dask-{long}', which is not a namespace"):
        render("dask-{username}", long)


def test_the_policy_allows_the_default_and_the_patterns() -> None:
    policy = NamespacePolicy(default=HOME, allowed=("dask-*", "team-a"))
    assert policy.watch_namespace == ""
    assert policy.for_cluster("", "alice") == HOME
    assert policy.for_cluster("dask-{username}", "alice") == "dask-alice"
    assert policy.for_cluster("team-a", "alice") == "team-a"
    with pytest.raises(InvalidRequest) as caught:
        policy.for_cluster("kube-system", "alice")
    message = str(caught.value)
    assert "'kube-system' is not a namespace this gateway may run clusters in" in message
    assert "'dask', 'dask-*', 'team-a'" in message
    with pytest.raises(InvalidRequest, match=r"'team-alice' \(from 'team-\{username\}'\)"):
        policy.for_cluster("team-{username}", "alice")
    assert NamespacePolicy(default=HOME).watch_namespace == HOME


def test_config_checks_name_bad_values() -> None:
    with pytest.raises(ConfigError) as caught:
        structure({"namespaces": ["dask-*", "*", "Bad_NS"]}, KubeBackendConfig)
    problems = " ".join(caught.value.problems)
    assert "namespaces[1]: '*'" in problems and "namespaces[2]: 'Bad_NS'" in problems
    with pytest.raises(ConfigError) as caught:
        structure({"namespace": "dask-{who}"}, KubeClusterConfig)
    assert "{who} is not a field" in " ".join(caught.value.problems)
    ok = structure({"namespace": "dask-{username}"}, KubeClusterConfig)
    assert ok.namespace == "dask-{username}"


# --- two users, two namespaces, on the fake ---------------------------------------------------


def rbac_yaml(objects: list[dict[str, Any]]) -> str:
    """The rendered chart's Roles and ClusterRoles as the fake's RBAC (each Role in its own
    namespace only), plus a ClusterRole with what the simulated kubelet needs."""
    docs = [o for o in objects if o["kind"] in ("Role", "ClusterRole")]
    kubelet = {"kind": "ClusterRole", "metadata": {"name": "kubelet"}, "rules": KUBELET_RULES}
    return yaml.safe_dump_all([*docs, kubelet])


@pytest.fixture(scope="module")
def per_user_chart() -> list[dict[str, Any]]:
    """The chart rendered with perUserNamespaces.enabled (helm: fails under CI without it)."""
    return helm_chart.render(
        helm_chart.find_helm(),
        "--set",
        "perUserNamespaces.enabled=true",
        "--set-json",
        'perUserNamespaces.allowed=["dask-*","team-*"]',
    )


@pytest.fixture
def kube(per_user_chart: list[dict[str, Any]]) -> Iterator[FakeKube]:
    """The fake API server granting what the per-user chart's ClusterRoles (and its Lease
    Role, in the release's namespace) grant, and the kubelet's needs."""
    fake = FakeKube(crds=[crd.crd()], role=rbac_yaml(per_user_chart))
    with fake.running():
        yield fake


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False).running() as k:
        yield k


@pytest.fixture
async def controller(kube: FakeKube) -> AsyncIterator[Controller]:
    config = KubeControllerConfig(
        server=kube.url,
        namespace=HOME,
        namespaces=["dask-*", "team-*"],
        address_mode="pod",
        leader_election=False,
        api_qps=0,
    )
    made = await make_controller(config)
    stop = asyncio.Event()
    task = asyncio.create_task(made.run(stop=stop))
    yield made
    stop.set()
    await asyncio.wait_for(task, 20)
    made.client.close()


class TeamNamespace:
    """A site plugin: dave's clusters go to his team's namespace."""

    @hookimpl
    def gateway_apply_options(self, user: Any, options: Any, config: Any) -> Any:
        return {"namespace": "team-{username}"} if user.name == "dave" else None


def names_in(kube: FakeKube, namespace: str, group: str, plural: str) -> list[str]:
    kind = kube.store.find_kind(group, crd.VERSION if group else "v1", plural)
    assert kind is not None
    items, _ = kube.store.select(kind, namespace, lambda obj: True)
    return sorted(o["metadata"]["name"] for o in items)


async def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_each_users_cluster_runs_in_its_own_namespace(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    gateway = await make_gateway(
        {
            "gateway": {"backend": "kubernetes"},
            "backend": {
                "kubernetes": {
                    "server": kube.url,
                    "namespace": HOME,
                    "namespaces": ["dask-*", "team-*"],
                    "api_qps": 0,
                }
            },
            "cluster": {"image": "dask:test", "namespace": "dask-{username}"},
            "options": {"namespace": {"type": "string", "default": "dask-{username}"}},
        },
        plugins=[TeamNamespace()],
    )
    created: dict[str, str] = {}
    for user in ("alice", "bob", "dave"):
        api = make_api_client(gateway, user)
        answer = await api.post("/api/v1/clusters/", json={"cluster_options": {}})
        assert answer.status in (200, 201), answer.body
        created[user] = answer.body["name"]
    expected = {"alice": "dask-alice", "bob": "dask-bob", "dave": "team-dave"}
    for user, namespace in expected.items():
        resource = objects.resource_name(created[user])
        # The DaskCluster, and what the controller makes of it, in the user's namespace.
        assert names_in(kube, namespace, crd.GROUP, crd.PLURAL) == [resource]
        await until(
            lambda ns=namespace, r=resource: (
                objects.scheduler_name(r) in names_in(kube, ns, "", "pods")
            ),
            f"{user}'s scheduler pod in {namespace}",
        )
        assert names_in(kube, namespace, "", "services") == [resource]
        assert names_in(kube, namespace, "", "secrets") == [objects.secret_name(resource)]
    assert names_in(kube, HOME, crd.GROUP, crd.PLURAL) == []
    assert names_in(kube, HOME, "", "pods") == []
    # The gateway found each one's credentials in its namespace, and lists them all.
    for user in expected:
        cluster = await gateway.backend.get_cluster(created[user])
        assert cluster is not None and cluster.username == user and cluster.tls_cert
    every = await gateway.backend.list_clusters()
    assert sorted(c.name for c in every) == sorted(created.values())
    # A namespace not allowed, from the user's options: 422 naming it, nothing created.
    carol = make_api_client(gateway, "carol")
    answer = await carol.post(
        "/api/v1/clusters/", json={"cluster_options": {"namespace": "kube-system"}}
    )
    assert answer.status == 422, answer.body
    assert "'kube-system' is not a namespace this gateway may run clusters in" in str(answer.body)
    answer = await carol.post(
        "/api/v1/clusters/", json={"cluster_options": {"namespace": "Dask-{username}"}}
    )
    assert answer.status == 422 and "'Dask-{username}' is not a namespace name" in str(answer.body)
    assert names_in(kube, "kube-system", crd.GROUP, crd.PLURAL) == []
    assert len(await gateway.backend.list_clusters()) == 3
    # Stop deletes in the cluster's own namespace; the others stay.
    bob = make_api_client(gateway, "bob")
    await bob.delete(f"/api/v1/clusters/{created['bob']}")
    await until(lambda: not names_in(kube, "dask-bob", "", "pods"), "bob's pods to go")
    assert names_in(kube, "dask-alice", crd.GROUP, crd.PLURAL) == [
        objects.resource_name(created["alice"])
    ]


async def test_a_cluster_in_a_namespace_not_allowed_is_left_alone(
    kube: FakeKube, kubelet: Kubelet, controller: Controller
) -> None:
    """A DaskCluster made by hand in a namespace the controller is not configured for: it
    neither sees it nor creates anything there; one in an allowed namespace gets its pods."""
    api = kube.api_client()
    try:
        custom = kubernetes.client.CustomObjectsApi(api)
        for namespace in ("elsewhere", "dask-erin"):
            body = objects.cluster_resource(
                name="e" * 32,
                namespace=namespace,
                username="erin",
                config=KubeClusterConfig(),
                gateway_env={},
                options_json="{}",
                config_json="{}",
            )
            await asyncio.to_thread(
                custom.create_namespaced_custom_object,
                crd.GROUP,
                crd.VERSION,
                namespace,
                crd.PLURAL,
                body,
            )
    finally:
        api.close()
    await until(lambda: names_in(kube, "dask-erin", "", "pods"), "the allowed cluster's pod")
    assert names_in(kube, "elsewhere", "", "pods") == []
    assert names_in(kube, "elsewhere", "", "secrets") == []
    assert ("elsewhere", "dask-" + "e" * 32) not in controller.clusters.cache


async def test_the_default_charts_roles_do_not_reach_other_namespaces(
    chart_objects: list[dict[str, Any]],
) -> None:
    """Why per-user namespaces switch to ClusterRoles: the default chart's Roles grant in the
    release's namespace only, so listing across namespaces, or creating a DaskCluster in a
    user's namespace, is refused (the fake scopes each Role to its namespace)."""
    fake = FakeKube(crds=[crd.crd()], role=rbac_yaml(chart_objects))
    with fake.running():
        client = KubeClient(load_api_client(server=fake.url), threads=3)
        try:
            await client.list(CLUSTERS, HOME)  # in the release's namespace: granted
            with pytest.raises(KubeError) as denied:
                await client.list(CLUSTERS, None)
            assert denied.value.status == 403 and "at the cluster scope" in str(denied.value)
            body = objects.cluster_resource(
                name="f" * 32,
                namespace="dask-alice",
                username="alice",
                config=KubeClusterConfig(),
                gateway_env={},
                options_json="{}",
                config_json="{}",
            )
            with pytest.raises(KubeError) as denied:
                await client.create(CLUSTERS, "dask-alice", body)
            assert denied.value.status == 403
            assert 'in the namespace "dask-alice"' in str(denied.value)
        finally:
            client.close()
