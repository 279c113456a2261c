"""Tests of the fake API server (tests/kube_fake) driven by the official `kubernetes` client:
CRUD, generateName, 409s, list and watch from a resourceVersion, 410 after compaction,
selectors, patches, the CR's status and scale subresources, GC, RBAC 403s, schema 422s, shutdown.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kube_fake import FakeKube
from kubernetes.client.exceptions import ApiException

from gateway_k8s import crd

pytestmark = pytest.mark.unit
NS = "dask"
GROUP, VERSION, PLURAL = crd.GROUP, crd.VERSION, crd.PLURAL


def pod(name: str, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}, **meta},
        "spec": {"containers": [{"name": "main", "image": "python", "command": ["sleep"]}]},
    }


def cluster(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": name},
        "spec": {"user": "alice", "worker": {"replicas": replicas, "image": "daskdev/dask"}},
    }


def status_of(error: ApiException) -> dict[str, Any]:
    import json

    body = json.loads(error.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == error.status
    return body


def test_discovery_and_version(kube: FakeKube) -> None:
    client = kube.api_client()
    assert kubernetes.client.VersionApi(client).get_code().major == "1"
    groups = kubernetes.client.ApisApi(client).get_api_versions()
    assert GROUP in [g.name for g in groups.groups]
    assert "coordination.k8s.io" in [g.name for g in groups.groups]
    resources = kubernetes.client.CustomObjectsApi(client).get_api_resources(GROUP, VERSION)
    names = {r.name for r in resources.resources}
    assert names == {PLURAL, f"{PLURAL}/status", f"{PLURAL}/scale"}
    client.close()


def test_crud_of_each_core_kind(kube: FakeKube, core: Any) -> None:
    created = core.create_namespaced_pod(NS, pod("p1", {"app": "x"}))
    assert created.metadata.uid and created.metadata.namespace == NS
    assert created.status.phase == "Pending"
    secret = core.create_namespaced_secret(
        NS, {"metadata": {"name": "s1"}, "stringData": {"a": "b"}, "data": {"c": "ZA=="}}
    )
    assert secret.data == {"a": "Yg==", "c": "ZA=="}  # stringData merged into data
    assert secret.string_data is None
    service = core.create_namespaced_service(
        NS,
        {
            "metadata": {"name": "svc"},
            "spec": {"selector": {"app": "x"}, "ports": [{"port": 8786}]},
        },
    )
    assert service.spec.cluster_ip
    core.create_namespaced_endpoints(NS, {"metadata": {"name": "manual"}})
    core.create_namespaced_event(
        NS,
        {
            "metadata": {"generateName": "p1."},
            "involvedObject": {"kind": "Pod", "name": "p1"},
            "reason": "Started",
            "message": "hi",
            "type": "Normal",
        },
    )
    leases = kubernetes.client.CoordinationV1Api(kube.api_client())
    lease = leases.create_namespaced_lease(
        NS, {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}
    )
    lease.spec.holder_identity = "b"
    assert leases.replace_namespaced_lease("leader", NS, lease).spec.holder_identity == "b"
    assert core.read_namespaced_pod("p1", NS).metadata.name == "p1"
    assert [p.metadata.name for p in core.list_namespaced_pod(NS).items] == ["p1"]
    assert len(core.list_pod_for_all_namespaces().items) == 1
    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=p1").items
    assert events[0].metadata.name.startswith("p1.") and events[0].reason == "Started"
    core.delete_namespaced_pod("p1", NS)
    core.delete_namespaced_secret("s1", NS)
    core.delete_namespaced_service("svc", NS)
    core.delete_namespaced_endpoints("manual", NS)
    assert core.list_namespaced_endpoints(NS).items == []  # svc's went with it
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("p1", NS)
    assert missing.value.status == 404
    assert status_of(missing.value)["reason"] == "NotFound"


def test_generate_name_and_already_exists(core: Any) -> None:
    names = {
        core.create_namespaced_pod(NS, pod("", generateName="w-")).metadata.name for _ in range(5)
    }
    assert len(names) == 5 and all(n.startswith("w-") and len(n) == 7 for n in names)
    core.create_namespaced_pod(NS, pod("same"))
    with pytest.raises(ApiException) as duplicate:
        core.create_namespaced_pod(NS, pod("same"))
    assert duplicate.value.status == 409
    assert status_of(duplicate.value)["reason"] == "AlreadyExists"


def test_replace_with_stale_resource_version_conflicts(core: Any) -> None:
    first = core.create_namespaced_pod(NS, pod("p"))
    first.metadata.labels = {"v": "1"}
    second = core.replace_namespaced_pod("p", NS, first)
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    first.metadata.labels = {"v": "2"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_pod("p", NS, first)
    assert stale.value.status == 409
    assert status_of(stale.value)["reason"] == "Conflict"


def test_list_then_watch_from_resource_version(core: Any) -> None:
    core.create_namespaced_pod(NS, pod("before"))
    listed = core.list_namespaced_pod(NS)
    core.create_namespaced_pod(NS, pod("after"))
    core.patch_namespaced_pod("before", NS, {"metadata": {"labels": {"x": "y"}}})
    core.delete_namespaced_pod("after", NS)
    watch = kubernetes.watch.Watch()
    seen = [
        (e["type"], e["object"].metadata.name)
        for e in watch.stream(
            core.list_namespaced_pod,
            NS,
            timeout_seconds=1,
            resource_version=listed.metadata.resource_version,
        )
    ]
    assert seen == [("ADDED", "after"), ("MODIFIED", "before"), ("DELETED", "after")]
    # Without a resourceVersion: the current state as ADDED, then the timeout ends the watch.
    started = time.monotonic()
    current = [e["type"] for e in watch.stream(core.list_namespaced_pod, NS, timeout_seconds=1)]
    assert current == ["ADDED"] and time.monotonic() - started < 10


def test_watch_sees_live_events_and_go_style_booleans(kube: FakeKube, core: Any) -> None:
    import urllib.request

    seen: list[tuple[str, str]] = []

    def watch() -> None:
        for event in kubernetes.watch.Watch().stream(
            core.list_namespaced_pod, NS, timeout_seconds=3
        ):
            seen.append((event["type"], event["object"].metadata.name))

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.5)
    core.create_namespaced_pod(NS, pod("live"))
    thread.join(20)
    assert seen == [("ADDED", "live")]
    for flag in ("True", "true", "1"):
        url = f"{kube.url}/api/v1/namespaces/{NS}/pods?watch={flag}&timeoutSeconds=1"
        with urllib.request.urlopen(url, timeout=20) as response:
            assert b'"ADDED"' in response.read()


def test_410_after_compaction_then_relist(kube: FakeKube, core: Any) -> None:
    old = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, pod("a"))
    kube.compact()
    with pytest.raises(ApiException) as gone:
        # The Watch retries once on 410 by itself, from the same resourceVersion: still gone.
        list(
            kubernetes.watch.Watch().stream(
                core.list_namespaced_pod, NS, resource_version=old, timeout_seconds=1
            )
        )
    assert gone.value.status == 410
    relisted = core.list_namespaced_pod(NS)
    core.create_namespaced_pod(NS, pod("b"))
    names = [
        e["object"].metadata.name
        for e in kubernetes.watch.Watch().stream(
            core.list_namespaced_pod,
            NS,
            resource_version=relisted.metadata.resource_version,
            timeout_seconds=1,
        )
    ]
    assert names == ["b"]


def test_compaction_window_expires_old_history() -> None:
    fake = FakeKube(history_seconds=0.2)
    with fake.running():
        client = fake.api_client()
        core = kubernetes.client.CoreV1Api(client)
        old = core.list_namespaced_pod(NS).metadata.resource_version
        core.create_namespaced_pod(NS, pod("a"))
        time.sleep(0.5)
        core.create_namespaced_pod(NS, pod("b"))  # a write compacts the expired history
        with pytest.raises(ApiException) as gone:
            list(
                kubernetes.watch.Watch().stream(
                    core.list_namespaced_pod, NS, resource_version=old, timeout_seconds=1
                )
            )
        assert gone.value.status == 410
        client.close()


def test_label_and_field_selectors(core: Any) -> None:
    core.create_namespaced_pod(NS, pod("a", {"app": "dask", "role": "scheduler"}))
    core.create_namespaced_pod(NS, pod("b", {"app": "dask", "role": "worker"}))
    core.create_namespaced_pod(NS, pod("c", {"app": "other"}))
    core.create_namespaced_pod("elsewhere", pod("d", {"app": "dask"}))

    def names(**query: str) -> list[str]:
        return sorted(p.metadata.name for p in core.list_pod_for_all_namespaces(**query).items)

    assert names(label_selector="app=dask") == ["a", "b", "d"]
    assert names(label_selector="app==dask,role!=worker") == ["a", "d"]
    assert names(label_selector="role in (worker, scheduler)") == ["a", "b"]
    assert names(label_selector="app notin (dask)") == ["c"]
    assert names(label_selector="role") == ["a", "b"]
    assert names(label_selector="!role") == ["c", "d"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace=elsewhere") == ["d"]
    assert names(field_selector="status.phase=Pending,metadata.name!=a") == ["b", "c", "d"]
    with pytest.raises(ApiException) as bad:
        names(field_selector="spec.image=python")
    assert (
        bad.value.status == 400 and "field label not supported" in status_of(bad.value)["message"]
    )


def test_watch_with_selector_reports_leaving_as_deleted(core: Any) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, pod("a", {"role": "worker"}))
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"role": "retired"}}})
    seen = [
        e["type"]
        for e in kubernetes.watch.Watch().stream(
            core.list_namespaced_pod,
            NS,
            label_selector="role=worker",
            resource_version=start,
            timeout_seconds=1,
        )
    ]
    assert seen == ["ADDED", "DELETED"]


def test_merge_json_and_strategic_patches(core: Any, custom: Any) -> None:
    core.create_namespaced_pod(NS, pod("p", {"a": "1", "b": "2"}))
    # A dict body: the client sends a strategic merge patch (containers merge by name).
    patched = core.patch_namespaced_pod(
        "p",
        NS,
        {
            "metadata": {"labels": {"b": None, "c": "3"}},
            "spec": {"containers": [{"name": "main", "image": "python:3.11"}]},
        },
    )
    assert patched.metadata.labels == {"a": "1", "c": "3"}
    assert patched.spec.containers[0].command == ["sleep"]
    assert patched.spec.containers[0].image == "python:3.11"
    # A list body: a JSON patch.
    patched = core.patch_namespaced_pod(
        "p",
        NS,
        [
            {"op": "replace", "path": "/metadata/labels/a", "value": "9"},
            {"op": "remove", "path": "/metadata/labels/c"},
        ],
    )
    assert patched.metadata.labels == {"a": "9"}
    with pytest.raises(ApiException) as failing:
        core.patch_namespaced_pod("p", NS, [{"op": "test", "path": "/metadata/name", "value": "q"}])
    assert failing.value.status == 422
    # Custom objects: merge patch by default, and a merge patch replaces lists.
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, cluster("c"))
    obj = custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        "c",
        {"spec": {"worker": {"env": [{"name": "A", "value": "1"}]}}},
    )
    assert obj["spec"]["worker"] == {
        "replicas": 1,
        "image": "daskdev/dask",
        "env": [{"name": "A", "value": "1"}],
    }
    assert obj["metadata"]["generation"] == 2


def test_status_subresource_separates_spec_and_status(custom: Any) -> None:
    with_status = cluster("c")
    with_status["status"] = {"phase": "Running"}
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, with_status)
    assert "status" not in created  # status is written only through /status
    obj = custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        "c",
        {"spec": {"user": "mallory"}, "status": {"phase": "Running", "workers": 1}},
    )
    assert obj["status"] == {"phase": "Running", "workers": 1}
    assert obj["spec"]["user"] == "alice" and obj["metadata"]["generation"] == 1
    obj = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "c", {"spec": {"user": "bob"}, "status": {"phase": "Failed"}}
    )
    assert obj["spec"]["user"] == "bob" and obj["status"]["phase"] == "Running"
    assert obj["metadata"]["generation"] == 2


def test_scale_subresource(custom: Any) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, cluster("c", 2))
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "c", {"status": {"replicas": 1, "selector": "x=y"}}
    )
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "c")
    assert scale["kind"] == "Scale" and scale["spec"] == {"replicas": 2}
    assert scale["status"] == {"replicas": 1, "selector": "x=y"}
    scale = custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, NS, PLURAL, "c", {"spec": {"replicas": 5}}
    )
    assert scale["spec"]["replicas"] == 5
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c")
    assert obj["spec"]["worker"]["replicas"] == 5
    stale = dict(scale, spec={"replicas": 3})
    custom.replace_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "c", stale)
    with pytest.raises(ApiException) as conflict:
        custom.replace_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "c", stale)
    assert conflict.value.status == 409


def test_owner_references_garbage_collect_dependents(core: Any, custom: Any) -> None:
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, cluster("c"))
    ref = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "name": "c",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    core.create_namespaced_pod(NS, pod("sched", ownerReferences=[ref]))
    scheduler = core.read_namespaced_pod("sched", NS)
    pod_ref = {"apiVersion": "v1", "kind": "Pod", "name": "sched", "uid": scheduler.metadata.uid}
    core.create_namespaced_secret(NS, {"metadata": {"name": "creds", "ownerReferences": [ref]}})
    core.create_namespaced_pod(NS, pod("grandchild", ownerReferences=[pod_ref]))
    core.create_namespaced_pod(NS, pod("unrelated"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c")
    assert [p.metadata.name for p in core.list_namespaced_pod(NS).items] == ["unrelated"]
    assert core.list_namespaced_secret(NS).items == []


def test_a_dependent_created_after_its_owner_is_gone_is_collected(core: Any, custom: Any) -> None:
    """A controller acting on a stale cache may create a pod for a deleted owner: the create
    answers (as the API server's does), and the garbage collector then deletes the pod."""
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, cluster("c"))
    ref = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "name": "c",
        "uid": owner["metadata"]["uid"],
    }
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c")
    created = core.create_namespaced_pod(NS, pod("late", ownerReferences=[ref]))
    assert created.metadata.name == "late"
    core.create_namespaced_pod(NS, pod("ownerless"))
    assert [p.metadata.name for p in core.list_namespaced_pod(NS).items] == ["ownerless"]


def test_finalizers_delay_deletion(core: Any) -> None:
    core.create_namespaced_pod(NS, pod("p", finalizers=["daskgateway.dev/cleanup"]))
    core.delete_namespaced_pod("p", NS)
    terminating = core.read_namespaced_pod("p", NS)
    assert terminating.metadata.deletion_timestamp is not None
    core.patch_namespaced_pod("p", NS, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_pod("p", NS)
    assert gone.value.status == 404


def test_rbac_role_forbids_what_it_does_not_grant() -> None:
    role = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: gateway}
rules:
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch, create]
  - apiGroups: [daskgateway.dev]
    resources: [daskclusters, daskclusters/status]
    verbs: [get, patch]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    resourceNames: [leader]
    verbs: [get, update]
"""
    fake = FakeKube(crds=[crd.crd()], role=role)
    with fake.running():
        client = fake.api_client()
        core = kubernetes.client.CoreV1Api(client)
        custom = kubernetes.client.CustomObjectsApi(client)
        core.create_namespaced_pod(NS, pod("p"))
        assert core.list_namespaced_pod(NS).items
        for call in (
            lambda: core.delete_namespaced_pod("p", NS),
            lambda: core.list_namespaced_secret(NS),
            lambda: custom.create_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, cluster("c")
            ),
        ):
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403
            assert status_of(denied.value)["reason"] == "Forbidden"
        leases = kubernetes.client.CoordinationV1Api(client)
        fake.store.create(
            fake.store.kinds["coordination.k8s.io/leases"],
            NS,
            {"metadata": {"name": "leader"}, "spec": {}},
        )
        assert leases.read_namespaced_lease("leader", NS).metadata.name == "leader"
        for call in (
            lambda: leases.read_namespaced_lease("other", NS),
            lambda: leases.list_namespaced_lease(NS),
        ):
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403  # resourceNames grant only the named lease
        with pytest.raises(ApiException) as denied:
            core.delete_namespaced_pod("p", NS)
        assert status_of(denied.value)["message"] == (
            'pods "p" is forbidden: User "system:serviceaccount:default:gateway" cannot delete '
            'resource "pods" in API group "" in the namespace "dask"'
        )
        client.close()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"worker": {"replicas": 1}}, "spec.user"),
        ({"user": "a", "worker": {"replicas": -1}}, "spec.worker.replicas"),
        ({"user": "a", "worker": {"replicas": "two"}}, "spec.worker.replicas"),
        (
            {"user": "a", "scheduler": {"imagePullPolicy": "Sometimes"}},
            "spec.scheduler.imagePullPolicy",
        ),
        (
            {"user": "a", "workerGroups": {"gpu": {"resources": {"limits": {"cpu": "lots"}}}}},
            "spec.workerGroups.gpu.resources.limits.cpu",
        ),
        ({"user": "a", "typo": 1}, "spec.typo"),
    ],
)
def test_schema_violations_are_422(custom: Any, spec: dict[str, Any], field: str) -> None:
    body = cluster("c")
    body["spec"] = spec
    with pytest.raises(ApiException) as invalid:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    assert invalid.value.status == 422
    status = status_of(invalid.value)
    assert status["reason"] == "Invalid"
    assert field in [cause["field"] for cause in status["details"]["causes"]]


def test_valid_resource_with_groups_is_accepted_and_patches_are_validated(custom: Any) -> None:
    body = cluster("c")
    body["spec"]["workerGroups"] = {
        "gpu": {
            "replicas": 2,
            "resources": {"limits": {"cpu": 2, "memory": "4Gi"}},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        }
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    with pytest.raises(ApiException) as invalid:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "c", {"spec": {"workerGroups": {"gpu": {"replicas": -3}}}}
        )
    assert invalid.value.status == 422


def test_open_watches_end_when_the_server_stops() -> None:
    fake = FakeKube().start()
    client = fake.api_client()
    core = kubernetes.client.CoreV1Api(client)
    ended = threading.Event()

    def watch() -> None:
        # A timeout far away: the Watch then does not reconnect when its stream ends.
        for _ in kubernetes.watch.Watch().stream(
            core.list_namespaced_pod, NS, resource_version="1", timeout_seconds=600
        ):
            pass
        ended.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    fake.stop()
    assert ended.wait(20), "the watch did not end when the server stopped"
    assert time.monotonic() - started < 15
    client.close()


def test_crd_applied_through_the_api_is_served_and_enforced() -> None:
    fake = FakeKube()  # no CRD to start with
    with fake.running():
        client = fake.api_client()
        custom = kubernetes.client.CustomObjectsApi(client)
        with pytest.raises(ApiException) as unknown:
            custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
        assert unknown.value.status == 404
        extensions = kubernetes.client.ApiextensionsV1Api(client)
        extensions.create_custom_resource_definition(crd.crd())
        assert custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, cluster("c"))
        invalid = cluster("d")
        del invalid["spec"]["user"]
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, invalid)
        assert refused.value.status == 422
        client.close()


def test_bookmarks_when_allowed() -> None:
    fake = FakeKube(bookmark_interval=0.2)
    with fake.running():
        client = fake.api_client()
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespaced_pod(NS, pod("a"))
        watch = kubernetes.watch.Watch()
        types = [
            e["type"]
            for e in watch.stream(
                core.list_namespaced_pod, NS, allow_watch_bookmarks=True, timeout_seconds=1
            )
        ]
        assert types[0] == "ADDED" and "BOOKMARK" in types[1:]
        assert int(watch.resource_version) >= 2
        client.close()


def test_orphan_propagation_keeps_dependents(core: Any) -> None:
    owner = core.create_namespaced_secret(NS, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "Secret", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_pod(NS, pod("child", ownerReferences=[ref]))
    core.delete_namespaced_secret("owner", NS, propagation_policy="Orphan")
    assert core.read_namespaced_pod("child", NS).metadata.owner_references is None


def test_endpoints_follow_the_services_ready_pods(core: Any) -> None:
    core.create_namespaced_service(
        NS,
        {
            "metadata": {"name": "sched"},
            "spec": {
                "selector": {"app": "dask", "role": "scheduler"},
                "ports": [{"name": "tcp-comm", "port": 8786, "targetPort": 8786}],
            },
        },
    )
    assert core.read_namespaced_endpoints("sched", NS).subsets is None
    core.create_namespaced_pod(NS, pod("s", {"app": "dask", "role": "scheduler"}))
    core.create_namespaced_pod(NS, pod("w", {"app": "dask", "role": "worker"}))

    def set_status(name: str, ip: str, ready: bool) -> None:
        core.patch_namespaced_pod_status(
            name,
            NS,
            {"status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}},
        )

    set_status("w", "127.0.0.3", True)
    set_status("s", "127.0.0.2", False)
    (subset,) = core.read_namespaced_endpoints("sched", NS).subsets
    assert subset.addresses is None
    assert [a.ip for a in subset.not_ready_addresses] == ["127.0.0.2"]
    set_status("s", "127.0.0.2", True)
    (subset,) = core.read_namespaced_endpoints("sched", NS).subsets
    assert [(a.ip, a.target_ref.name) for a in subset.addresses] == [("127.0.0.2", "s")]
    assert [(p.name, p.port) for p in subset.ports] == [("tcp-comm", 8786)]
    core.delete_namespaced_pod("s", NS)
    assert core.read_namespaced_endpoints("sched", NS).subsets is None
    core.delete_namespaced_service("sched", NS)
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_endpoints("sched", NS)
    assert gone.value.status == 404


def test_delete_collection_by_label(core: Any) -> None:
    core.create_namespaced_pod(NS, pod("w1", {"role": "worker"}))
    core.create_namespaced_pod(NS, pod("w2", {"role": "worker"}))
    core.create_namespaced_pod(NS, pod("s", {"role": "scheduler"}))
    core.delete_collection_namespaced_pod(NS, label_selector="role=worker")
    assert [p.metadata.name for p in core.list_namespaced_pod(NS).items] == ["s"]


def test_namespaces_and_their_deletion(core: Any) -> None:
    created = core.create_namespace({"metadata": {"name": "user-alice"}})
    assert created.status.phase == "Active" and created.metadata.namespace is None
    assert "user-alice" in [n.metadata.name for n in core.list_namespace().items]
    core.create_namespaced_pod("user-alice", pod("p"))
    core.create_namespaced_pod(NS, pod("p"))
    core.delete_namespace("user-alice")
    assert core.list_namespaced_pod("user-alice").items == []
    assert len(core.list_namespaced_pod(NS).items) == 1


# --- pods/log ---------------------------------------------------------------------------------


def running_pod(
    kube: FakeKube, core: Any, tmp: Path, name: str, containers: list[str], output: bytes
) -> str:
    """A pod whose containers run (status written as a kubelet would), the first one's output
    ``output`` (a file in ``tmp``, registered as a kubelet registers it); its uid."""
    body = pod(name)
    body["spec"]["containers"] = [
        {"name": c, "image": "python", "command": ["sleep"]} for c in containers
    ]
    created = core.create_namespaced_pod(NS, body)
    running = [
        {
            "name": c,
            "image": "python",
            "imageID": "",
            "ready": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        }
        for c in containers
    ]
    core.patch_namespaced_pod_status(
        name, NS, {"status": {"phase": "Running", "containerStatuses": running}}
    )
    path = tmp / f"{name}.log"
    path.write_bytes(output)
    kube.container_logs[(created.metadata.uid, containers[0])] = path
    return str(created.metadata.uid)


def test_pod_log_tail_lines_and_limit_bytes(kube: FakeKube, core: Any, tmp_path: Path) -> None:
    output = b"".join(f"line {i}\n".encode() for i in range(1, 11))
    running_pod(kube, core, tmp_path, "one", ["main"], output)
    assert core.read_namespaced_pod_log("one", NS) == output.decode()
    assert core.read_namespaced_pod_log("one", NS, tail_lines=2) == "line 9\nline 10\n"
    assert core.read_namespaced_pod_log("one", NS, tail_lines=0) == ""
    # The real order: tail first, then the limit from the start of what is left.
    assert core.read_namespaced_pod_log("one", NS, tail_lines=2, limit_bytes=4) == "line"
    assert core.read_namespaced_pod_log("one", NS, limit_bytes=6) == "line 1"
    assert core.read_namespaced_pod_log("one", NS, container="main", tail_lines=1) == "line 10\n"
    # Plain text, not JSON.
    response = core.read_namespaced_pod_log("one", NS, tail_lines=1, _preload_content=False)
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.data == b"line 10\n"
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("one", NS, tail_lines=-1)
    assert caught.value.status == 422 and "tailLines" in status_of(caught.value)["message"]


def test_pod_log_errors(kube: FakeKube, core: Any, tmp_path: Path) -> None:
    running_pod(kube, core, tmp_path, "two", ["main", "sidecar"], b"hello\n")
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("two", NS)
    assert caught.value.status == 400
    assert status_of(caught.value)["message"] == (
        "a container name must be specified for pod two, choose one of: [main sidecar]"
    )
    assert core.read_namespaced_pod_log("two", NS, container="main") == "hello\n"
    # The sidecar runs but wrote nothing.
    assert core.read_namespaced_pod_log("two", NS, container="sidecar") == ""
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("two", NS, container="nope")
    assert caught.value.status == 400
    assert status_of(caught.value)["message"] == "container nope is not valid for pod two"
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("two", NS, container="main", previous=True)
    assert caught.value.status == 400
    assert "previous terminated container" in status_of(caught.value)["message"]
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("absent", NS)
    assert caught.value.status == 404
    assert status_of(caught.value)["reason"] == "NotFound"
    # A container that has not started has no log yet.
    core.create_namespaced_pod(NS, pod("pending"))
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("pending", NS)
    assert caught.value.status == 400
    assert status_of(caught.value)["message"] == (
        'container "main" in pod "pending" is waiting to start: ContainerCreating'
    )


def test_pod_log_rbac() -> None:
    fake = FakeKube(role=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "create"]}])
    with fake.running():
        client = fake.api_client()
        try:
            api = kubernetes.client.CoreV1Api(client)
            api.create_namespaced_pod(NS, pod("p"))
            with pytest.raises(ApiException) as caught:
                api.read_namespaced_pod_log("p", NS)
            assert caught.value.status == 403
            assert 'cannot get resource "pods/log"' in status_of(caught.value)["message"]
        finally:
            client.close()


def test_endpoints_carry_the_services_labels_and_follow_pod_label_changes(core: Any) -> None:
    labels = {"gateway.dask.org/instance": "i1", "app.kubernetes.io/component": "sched"}
    for name, role in (("a", "scheduler"), ("b", "worker")):
        core.create_namespaced_service(
            NS,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "clusterIP": "None" if name == "a" else "",
                    "selector": {"role": role},
                    "ports": [{"port": 8786}],
                },
            },
        )
    # As the endpoints controller: the Service's labels, and the headless mark on a headless one.
    listed = core.list_endpoints_for_all_namespaces(
        label_selector="gateway.dask.org/instance=i1"
    ).items
    assert sorted(e.metadata.name for e in listed) == ["a", "b"]
    a, b = (core.read_namespaced_endpoints(n, NS) for n in ("a", "b"))
    assert a.metadata.labels == {**labels, "service.kubernetes.io/headless": ""}
    assert b.metadata.labels == labels
    core.create_namespaced_pod(NS, pod("p", {"role": "scheduler"}))
    core.patch_namespaced_pod_status(
        "p",
        NS,
        {"status": {"podIP": "127.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}},
    )
    b_version = core.read_namespaced_endpoints("b", NS).metadata.resource_version
    assert [x.ip for x in core.read_namespaced_endpoints("a", NS).subsets[0].addresses] == [
        "127.0.0.9"
    ]
    # A pod event leaves the Endpoints of Services that do not select it alone.
    assert core.read_namespaced_endpoints("b", NS).metadata.resource_version == b_version
    # Relabelled: it leaves one Service's Endpoints and joins the other's.
    core.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"role": "worker"}}})
    assert core.read_namespaced_endpoints("a", NS).subsets is None
    assert [x.ip for x in core.read_namespaced_endpoints("b", NS).subsets[0].addresses] == [
        "127.0.0.9"
    ]
    core.patch_namespaced_service("a", NS, {"metadata": {"labels": {"extra": "1"}}})
    assert core.read_namespaced_endpoints("a", NS).metadata.labels["extra"] == "1"


def test_request_counts_by_user_agent_verb_and_resource(kube: FakeKube) -> None:
    client = kube.api_client()
    client.user_agent = "counting-test/1"
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    try:
        core.create_namespaced_pod(NS, pod("p"))
        core.read_namespaced_pod("p", NS)
        core.list_namespaced_pod(NS)
        core.patch_namespaced_pod_status("p", NS, {"status": {"phase": "Running"}})
        core.delete_namespaced_pod("p", NS)
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, cluster("c"))
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, "c", {"status": {"phase": "Pending"}}
        )
        unknown = urllib.request.Request(
            f"{kube.url}/apis/nothing.example/v1/things",
            headers={"User-Agent": "counting-test/1"},
        )
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(unknown, timeout=30)
    finally:
        client.close()
    counts = {
        (verb, resource): n
        for (agent, verb, resource), n in kube.request_counts().items()
        if agent == "counting-test/1"
    }
    assert counts == {
        ("create", "pods"): 1,
        ("get", "pods"): 1,
        ("list", "pods"): 1,
        ("patch", "pods/status"): 1,
        ("delete", "pods"): 1,
        ("create", f"{PLURAL}.{GROUP}"): 1,
        ("patch", f"{PLURAL}.{GROUP}/status"): 1,
        ("unknown", "/apis/nothing.example/v1/things"): 1,
    }
