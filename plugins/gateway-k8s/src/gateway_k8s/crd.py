"""The DaskCluster custom resource: its API group, names, OpenAPI v3 schema and the CRD object.

The one source of the CRD: `python -m gateway_k8s.crd > chart/crds/daskcluster.yaml` renders it.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

# Our own group, not the original gateway's `gateway.dask.org`: both CRDs can then live in one
# cluster (a site migrating, or the benchmark running the original controller beside ours on the
# same API server) without fighting over `daskclusters.gateway.dask.org`.
GROUP = "daskgateway.dev"
VERSION = "v1alpha1"
KIND = "DaskCluster"
PLURAL = "daskclusters"
SINGULAR = "daskcluster"
# `dgc` (dask-gateway cluster): not `dc`/`daskcluster`, which the Dask Kubernetes operator uses.
SHORT_NAMES = ["dgc"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"
DEFAULT_GROUP = "default"

Schema = dict[str, Any]

# A Kubernetes resource quantity ("500m", "2", "4Gi", 1): an int or a string of that form.
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[mkMGTPE]i?|Ki|n|u)?$"


def _string(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def _string_map(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {"type": "string"},
    }


def _quantity() -> Schema:
    return {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}


def _free_form(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "x-kubernetes-preserve-unknown-fields": True,
    }


def _resources() -> Schema:
    quantities = {"type": "object", "additionalProperties": _quantity()}
    return {
        "type": "object",
        "description": "Container resources, as in a pod's container (cpu, memory, ...).",
        "properties": {"requests": quantities, "limits": quantities},
    }


def _env() -> Schema:
    return {
        "type": "array",
        "description": "Environment variables of the container (name and value).",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": _string(minLength=1), "value": _string()},
        },
    }


def _tolerations() -> Schema:
    return {
        "type": "array",
        "description": "Pod tolerations, as in a pod spec.",
        "items": {
            "type": "object",
            "properties": {
                "key": _string(),
                "operator": _string(enum=["Exists", "Equal"]),
                "value": _string(),
                "effect": _string(enum=["", "NoSchedule", "PreferNoSchedule", "NoExecute"]),
                "tolerationSeconds": {"type": "integer"},
            },
        },
    }


def _pod_template(description: str) -> Schema:
    """What the scheduler's pod and each worker group's pods are made from."""
    return {
        "type": "object",
        "description": description,
        "properties": {
            "image": _string(description="Container image."),
            "imagePullPolicy": _string(enum=["Always", "IfNotPresent", "Never"]),
            "resources": _resources(),
            "env": _env(),
            "nodeSelector": _string_map("Node labels the pods must match."),
            "tolerations": _tolerations(),
            "labels": _string_map("Extra labels of the pods."),
            "annotations": _string_map("Extra annotations of the pods."),
            "extraPodConfig": _free_form("Merged into the pod spec (camelCase keys)."),
            "extraContainerConfig": _free_form("Merged into the container (camelCase keys)."),
        },
    }


def _worker_group(description: str) -> Schema:
    group = _pod_template(description)
    group["properties"]["replicas"] = {
        "type": "integer",
        "minimum": 0,
        "description": "How many workers of this group are wanted.",
    }
    group["properties"]["threads"] = {"type": "integer", "minimum": 1}
    return group


def spec_schema() -> Schema:
    return {
        "type": "object",
        "required": ["user"],
        "properties": {
            "user": _string(minLength=1, description="The gateway user owning the cluster."),
            "imagePullSecrets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": _string(minLength=1)},
                },
            },
            "serviceAccountName": _string(),
            "labels": _string_map(
                "Labels of every object made for the cluster (its Secret, Service and pods)."
            ),
            "annotations": _string_map(
                "Annotations of every object made for the cluster (its Secret, Service, pods)."
            ),
            "idleTimeoutSeconds": {"type": "number", "minimum": 0},
            "scheduler": _pod_template("The scheduler's pod."),
            "worker": _worker_group(
                f"The {DEFAULT_GROUP!r} worker group (what the scale subresource scales)."
            ),
            "workerGroups": {
                "type": "object",
                "description": "Named worker groups besides the default one.",
                "additionalProperties": _worker_group("A named worker group."),
            },
        },
    }


def status_schema() -> Schema:
    count = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "properties": {
            "phase": _string(enum=["Pending", "Running", "Stopping", "Stopped", "Failed"]),
            "reason": _string(description="Why the cluster failed or is pending, for users."),
            "schedulerAddress": _string(),
            "dashboardAddress": _string(),
            "observedGeneration": {"type": "integer"},
            "replicas": {**count, "description": "Worker pods of the default group."},
            "selector": _string(description="Label selector of the default group's pods."),
            "workers": {**count, "description": "Running workers, all groups."},
            "groups": {
                "type": "object",
                "description": "Worker counts per group (the default group included).",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"requested": count, "pending": count, "running": count},
                },
            },
            "conditions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": _string(minLength=1),
                        "status": _string(enum=["True", "False", "Unknown"]),
                        "reason": _string(),
                        "message": _string(),
                        "observedGeneration": {"type": "integer"},
                        "lastTransitionTime": _string(format="date-time"),
                    },
                },
            },
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) of DaskCluster, as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["dask"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A Dask cluster of the gateway.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": _string(),
                                "kind": _string(),
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.worker.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "User", "type": "string", "jsonPath": ".spec.user"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Workers", "type": "integer", "jsonPath": ".status.workers"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `python -m gateway_k8s.crd` from gateway_k8s/crd.py: do not edit.\n"


def render() -> str:
    """The CRD as the YAML document the Helm chart ships."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, default_flow_style=False)


if __name__ == "__main__":
    sys.stdout.write(render())
