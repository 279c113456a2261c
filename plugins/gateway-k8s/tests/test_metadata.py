"""Labels and annotations on every object of a cluster: the cluster's `common_labels` and
`common_annotations`, our `app.kubernetes.io/*` labels and the cluster's, component's and
user's, on its DaskCluster, Secret, Service, scheduler pod and the worker pods of every group;
and bad keys or values refused naming them.

Unit tests: the gateway and the controller in this process, a kubelet that starts no processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import NS, stored, until
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_core.config import ConfigError
from gateway_k8s import crd, objects
from gateway_k8s.config import KubeClusterConfig
from gateway_k8s.controller import Controller
from gateway_k8s.kube import CLUSTERS

pytestmark = pytest.mark.unit

COMMON_LABELS = {"team": "climate", "example.org/cost-centre": "cc-42"}
COMMON_ANNOTATIONS = {"example.org/contact": "climate@example.org (on call)"}
USER = "alice@example.org"


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False).running() as k:
        yield k


def cluster_objects(kube: FakeKube, resource: str) -> list[dict[str, Any]]:
    """The DaskCluster ``resource`` and every object it owns, from the store."""
    found = [
        o
        for o in stored(kube, crd.GROUP, crd.VERSION, crd.PLURAL)
        if o["metadata"]["name"] == resource
    ]
    for plural in ("pods", "services", "secrets"):
        found += [
            o
            for o in stored(kube, "", "v1", plural)
            if any(r["name"] == resource for r in o["metadata"].get("ownerReferences") or [])
        ]
    return found


async def test_every_object_of_a_cluster_carries_its_labels_and_annotations(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    gateway = await make_gateway(
        {
            "gateway": {"backend": "kubernetes"},
            "backend": {"kubernetes": {"server": kube.url, "namespace": NS, "api_qps": 0}},
            "cluster": {
                "image": "dask:test",
                "common_labels": COMMON_LABELS,
                "common_annotations": COMMON_ANNOTATIONS,
                "scheduler_extra_pod_labels": {"role": "brain"},
                "worker_extra_pod_annotations": {"example.org/note": "default group"},
                "worker_groups": {
                    "gpu": {"backend": {"worker_extra_pod_labels": {"accelerator": "a100"}}}
                },
                "enabled_worker_groups": ["gpu"],
            },
        }
    )
    alice = make_api_client(gateway, USER)
    answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
    assert answer.status == 201, answer.body
    resource = objects.resource_name(answer.body["name"])
    # Both groups get a worker (as the scheduler's heartbeat would ask).
    await controller.client.patch(
        CLUSTERS,
        NS,
        resource,
        {"spec": {"worker": {"replicas": 1}, "workerGroups": {"gpu": {"replicas": 1}}}},
    )

    def made() -> list[dict[str, Any]] | None:
        found = cluster_objects(kube, resource)
        kinds = sorted(
            (o["kind"], (o["metadata"].get("labels") or {}).get(objects.LABEL_GROUP, ""))
            for o in found
        )
        want = [
            ("DaskCluster", ""),
            ("Pod", ""),
            ("Pod", "default"),
            ("Pod", "gpu"),
            ("Secret", ""),
            ("Service", ""),
        ]
        return found if kinds == want else None

    found = await until(made, "the cluster's Secret, Service, scheduler and two workers")
    for obj in found:
        meta = obj["metadata"]
        what = f"{obj['kind']} {meta['name']}"
        labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        for key, value in COMMON_LABELS.items():
            assert labels.get(key) == value, (what, labels)
        for key, value in COMMON_ANNOTATIONS.items():
            assert notes.get(key) == value, (what, notes)
        assert labels[objects.LABEL_APP] == "dask-gateway", what
        assert labels[objects.LABEL_MANAGED] == "dask-gateway-k8s", what
        assert labels[objects.LABEL_CLUSTER] == resource, what
        assert labels[objects.LABEL_USER] == "alice-example.org", what
        assert notes[objects.ANNOTATION_USER] == USER, what
        component = labels[objects.LABEL_APP_COMPONENT]
        expected = {
            "DaskCluster": "cluster",
            "Secret": "credentials",
            "Service": "scheduler",
        }.get(obj["kind"])
        if obj["kind"] == "Pod":
            expected = labels[objects.LABEL_COMPONENT]
            assert expected in ("scheduler", "worker"), what
            # The pod's own extras sit beside the cluster's.
            own = {
                "scheduler": ("role", "brain"),
                "default": ("example.org/note", "default group"),
                "gpu": ("accelerator", "a100"),
            }[labels.get(objects.LABEL_GROUP, "scheduler")]
            assert own[1] in (labels.get(own[0]), notes.get(own[0])), (what, labels, notes)
        assert component == expected, (what, labels)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"common_labels": {"team": "has space"}},
            "common_labels.team: 'has space' is not a label value",
        ),
        (
            {"common_labels": {"bad key!": "x"}},
            "common_labels: 'bad key!' is not a label or annotation key",
        ),
        (
            {"common_annotations": {"app.kubernetes.io/name": "mine"}},
            "common_annotations: 'app.kubernetes.io/name' is the plugin's own",
        ),
        (
            {"common_labels": {"daskgateway.dev/cluster": "x"}},
            "common_labels: 'daskgateway.dev/cluster' is the plugin's own",
        ),
    ],
)
def test_bad_labels_and_annotations_are_refused_naming_them(
    settings: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        KubeClusterConfig(**settings)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_a_user_name_becomes_a_label_value() -> None:
    assert objects.user_label("alice") == "alice"
    assert objects.user_label("Alice Smith@EXAMPLE.org") == "Alice-Smith-EXAMPLE.org"
    assert objects.user_label("-" + "x" * 80) == "x" * 62
    assert objects.user_label("@@@") == ""
