"""The Kubernetes objects of one Dask cluster: names, labels, the DaskCluster the gateway writes,
its credentials Secret, and the scheduler pod, Service and worker pods the controller makes.

Owns every name, label and fixed port both sides agree on; pure functions, no API calls.
"""

from __future__ import annotations

import base64
import copy
import re
import secrets
from typing import Any

from . import crd
from .config import KubeClusterConfig

Obj = dict[str, Any]

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
API_PORT = 8788
"""Fixed ports: every scheduler pod has an address of its own."""

CREDENTIALS_MOUNT = "/etc/dask-gateway"
TOKEN_KEY, CERT_KEY, PRIVATE_KEY = "token", "dask.crt", "dask.pem"

LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_APP_COMPONENT = "app.kubernetes.io/component"
LABEL_CLUSTER = "daskgateway.dev/cluster"
LABEL_COMPONENT = "daskgateway.dev/component"
LABEL_GROUP = "daskgateway.dev/worker-group"
LABEL_USER = "daskgateway.dev/user"
"""The owner's name made a label value (`user_label`); the exact name is `ANNOTATION_USER`."""
ANNOTATION_USER = "daskgateway.dev/user"
APP = "dask-gateway"
MANAGED_BY = "dask-gateway-k8s"
ANNOTATION_OPTIONS = "daskgateway.dev/options"
ANNOTATION_CONFIG = "daskgateway.dev/config"
ANNOTATION_SHARING = "daskgateway.dev/sharing"
ANNOTATION_REGISTERED = "daskgateway.dev/registered"
"""Set by the gateway at the scheduler's first heartbeat: the cluster is RUNNING from then."""
SELECTOR = f"{LABEL_MANAGED}={MANAGED_BY}"


def resource_name(cluster_name: str) -> str:
    """The DaskCluster of gateway cluster ``cluster_name`` (32 hex digits): a DNS label that
    starts with a letter, as Service names must."""
    return f"dask-{cluster_name}"


def cluster_name(resource: str) -> str:
    return resource.removeprefix("dask-")


def secret_name(resource: str) -> str:
    return f"{resource}-credentials"


def scheduler_name(resource: str) -> str:
    return f"{resource}-scheduler"


def worker_pod_name(resource: str, group: str) -> str:
    """A new worker pod's name, which is also its Dask worker name: the default group's
    ``<resource>-worker-<hex>``; a named group's ``<cluster>-<group>-<hex>``, the worker names
    of every backend, from which the scheduler's agent reads the worker's group (to it, a name
    not of that form is a default group worker)."""
    if group == crd.DEFAULT_GROUP:
        return f"{resource}-worker-{secrets.token_hex(3)}"
    return f"{cluster_name(resource)}-{group}-{secrets.token_hex(5)}"


_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]+")


def user_label(username: str) -> str:
    """``username`` as a label value: each run of characters a label value may not hold made
    one ``-``, at most 63 characters, starting and ending with a letter or digit
    (``alice@example.org`` -> ``alice-example.org``)."""
    return _NOT_LABEL.sub("-", username)[:63].strip("-._")


def labels(
    resource: str, component: str, group: str = "", *, owner: Obj | None = None
) -> dict[str, str]:
    """Our labels of an object of cluster ``resource``: the ``app.kubernetes.io`` ones, the
    cluster, the component, the worker group, and (from ``owner``, its DaskCluster) the
    user; after the cluster's own `spec.labels`, which may not override them."""
    out: dict[str, str] = {}
    spec = (owner or {}).get("spec") or {}
    out.update(spec.get("labels") or {})
    out.update(
        {
            LABEL_APP: APP,
            LABEL_MANAGED: MANAGED_BY,
            LABEL_APP_COMPONENT: component,
            LABEL_CLUSTER: resource,
            LABEL_COMPONENT: component,
        }
    )
    if group:
        out[LABEL_GROUP] = group
    if spec.get("user"):
        out[LABEL_USER] = user_label(str(spec["user"]))
    return out


def object_annotations(owner: Obj, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The annotations of an object made for ``owner``: the cluster's `spec.annotations`,
    then ``extra`` (a pod template's), then the user's exact name."""
    spec = owner.get("spec") or {}
    out = {**(spec.get("annotations") or {}), **(extra or {})}
    if spec.get("user"):
        out[ANNOTATION_USER] = str(spec["user"])
    return out


def owner_reference(owner: Obj) -> Obj:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --------------------------------------------------------------------------------------------
# What the gateway writes


def _cpu(value: float) -> str:
    return f"{value:g}"


def _resources(cores: float, memory: int, cores_limit: float, memory_limit: int) -> Obj:
    return {
        "requests": {"cpu": _cpu(cores), "memory": str(int(memory))},
        "limits": {"cpu": _cpu(cores_limit or cores), "memory": str(int(memory_limit or memory))},
    }


def _env(values: dict[str, str]) -> list[Obj]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _worker_template(config: KubeClusterConfig, gateway_env: dict[str, str]) -> Obj:
    """The pod template of one worker group, from ``config`` as its workers see it (the
    cluster's config for the default group, ``config.for_group(name)`` for a named one)."""
    template: Obj = {
        "image": config.image,
        "env": _env(_environment(config, gateway_env)),
        "replicas": 0,
        "threads": config.threads,
        "resources": _resources(
            config.worker_cores,
            config.worker_memory,
            config.worker_cores_limit,
            config.worker_memory_limit,
        ),
        "labels": dict(config.worker_extra_pod_labels),
        "annotations": dict(config.worker_extra_pod_annotations),
        "extraPodConfig": copy.deepcopy(config.worker_extra_pod_config),
        "extraContainerConfig": {
            "command": list(config.worker_cmd),
            **copy.deepcopy(config.worker_extra_container_config),
        },
    }
    _placement(template, config)
    return template


def _environment(config: KubeClusterConfig, gateway_env: dict[str, str]) -> dict[str, str]:
    """``[cluster] environment`` (a group's merged over it), then how to reach the gateway."""
    env = {str(k): str(v) for k, v in config.environment.items()}
    env.update(gateway_env)
    return env


def _placement(template: Obj, config: KubeClusterConfig) -> None:
    if config.image_pull_policy:
        template["imagePullPolicy"] = config.image_pull_policy
    if config.node_selector:
        template["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        template["tolerations"] = copy.deepcopy(config.tolerations)


def cluster_resource(
    *,
    name: str,
    namespace: str,
    username: str,
    config: KubeClusterConfig,
    gateway_env: dict[str, str],
    options_json: str,
    config_json: str,
) -> Obj:
    """The DaskCluster for a new gateway cluster: the scheduler and default worker group from
    ``config``, a `spec.workerGroups` entry for each named group the cluster may scale (its
    workers' config: `KubeClusterConfig.for_group`), every pod's environment ``[cluster]
    environment`` (a group's merged over it) and ``gateway_env`` (how to reach the gateway)."""
    scheduler: Obj = {
        "image": config.image,
        "env": _env(_environment(config, gateway_env)),
        "resources": _resources(
            config.scheduler_cores,
            config.scheduler_memory,
            config.scheduler_cores_limit,
            config.scheduler_memory_limit,
        ),
        "labels": dict(config.scheduler_extra_pod_labels),
        "annotations": dict(config.scheduler_extra_pod_annotations),
        "extraPodConfig": copy.deepcopy(config.scheduler_extra_pod_config),
        "extraContainerConfig": {
            "command": list(config.scheduler_cmd),
            **copy.deepcopy(config.scheduler_extra_container_config),
        },
    }
    _placement(scheduler, config)
    spec: Obj = {
        "user": username,
        "scheduler": scheduler,
        "worker": _worker_template(config, gateway_env),
    }
    groups: Obj = {}
    for group in config.group_names()[1:]:
        group_config = config.for_group(group)
        assert isinstance(group_config, KubeClusterConfig)
        groups[group] = _worker_template(group_config, gateway_env)
    if groups:
        spec["workerGroups"] = groups
    if config.common_labels:
        spec["labels"] = dict(config.common_labels)
    if config.common_annotations:
        spec["annotations"] = dict(config.common_annotations)
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = copy.deepcopy(config.image_pull_secrets)
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    if config.idle_timeout:
        spec["idleTimeoutSeconds"] = config.idle_timeout
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {
            "name": resource_name(name),
            "namespace": namespace,
            "labels": {
                **config.common_labels,
                LABEL_APP: APP,
                LABEL_MANAGED: MANAGED_BY,
                LABEL_APP_COMPONENT: "cluster",
                LABEL_CLUSTER: resource_name(name),
                LABEL_USER: user_label(username),
            },
            "annotations": {
                **config.common_annotations,
                ANNOTATION_USER: username,
                ANNOTATION_OPTIONS: options_json,
                ANNOTATION_CONFIG: config_json,
            },
        },
        "spec": spec,
    }


def credentials_secret(*, owner: Obj, token: str, cert: bytes, key: bytes) -> Obj:
    """The Secret holding a cluster's token, certificate and key, owned by its DaskCluster."""
    resource = owner["metadata"]["name"]

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(resource),
            "namespace": owner["metadata"]["namespace"],
            "labels": labels(resource, "credentials", owner=owner),
            "annotations": object_annotations(owner),
            "ownerReferences": [owner_reference(owner)],
        },
        "data": {TOKEN_KEY: b64(token.encode()), CERT_KEY: b64(cert), PRIVATE_KEY: b64(key)},
    }


def secret_value(secret: Obj, key: str) -> bytes:
    return base64.b64decode((secret.get("data") or {}).get(key, ""))


# --------------------------------------------------------------------------------------------
# What the controller makes


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_FACTORS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def memory_bytes(quantity: Any) -> int:
    """Bytes of a memory quantity (``2147483648``, ``"2Gi"``, ``"512M"``); 0 if unknown."""
    match = _QUANTITY.match(str(quantity).strip())
    if not match or match.group(2) not in _FACTORS:
        return 0
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def deep_merge(base: Obj, extra: Obj) -> Obj:
    """``extra`` merged into a copy of ``base``: mappings recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _credentials_env(role: str) -> list[Obj]:
    cert = f"{CREDENTIALS_MOUNT}/{CERT_KEY}"
    key = f"{CREDENTIALS_MOUNT}/{PRIVATE_KEY}"
    values = {
        "DASK_GATEWAY_API_TOKEN": f"{CREDENTIALS_MOUNT}/{TOKEN_KEY}",
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": cert,
        f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__CERT": cert,
        f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__KEY": key,
    }
    return _env(values)


def _pod(
    *,
    owner: Obj,
    name: str,
    component: str,
    group: str,
    template: Obj,
    args: list[str],
    default_command: list[str],
    ports: list[Obj],
    extra_env: list[Obj],
) -> Obj:
    resource = owner["metadata"]["name"]
    spec = owner["spec"]
    container: Obj = {
        "name": "dask",
        "image": template.get("image") or "daskgateway/dask-gateway:latest",
        "command": list(default_command),
        "args": args,
        "env": [*extra_env, *(template.get("env") or []), *_credentials_env(component)],
        "ports": ports,
        "resources": template.get("resources") or {},
        "volumeMounts": [{"name": "credentials", "mountPath": CREDENTIALS_MOUNT, "readOnly": True}],
        # A process that exits with an error leaves the end of its output in the container's
        # `state.terminated.message`, which the controller puts in the cluster's reason.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if template.get("imagePullPolicy"):
        container["imagePullPolicy"] = template["imagePullPolicy"]
    container = deep_merge(container, template.get("extraContainerConfig") or {})
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [{"name": "credentials", "secret": {"secretName": secret_name(resource)}}],
    }
    if template.get("nodeSelector"):
        pod_spec["nodeSelector"] = template["nodeSelector"]
    if template.get("tolerations"):
        pod_spec["tolerations"] = template["tolerations"]
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = spec["imagePullSecrets"]
    if spec.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = spec["serviceAccountName"]
    pod_spec = deep_merge(pod_spec, template.get("extraPodConfig") or {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": owner["metadata"]["namespace"],
            "labels": {
                **(spec.get("labels") or {}),
                **(template.get("labels") or {}),
                **labels(resource, component, group, owner=owner),
            },
            "annotations": object_annotations(owner, template.get("annotations") or {}),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": pod_spec,
    }


def scheduler_pod(owner: Obj) -> Obj:
    """The scheduler: TLS on `SCHEDULER_PORT` of the pod's IP, the dashboard and the gateway
    agent's API beside it."""
    spec = owner["spec"]
    host = "$(DASK_GATEWAY_POD_IP)"
    args = [
        "--protocol",
        "tls",
        "--host",
        host,
        "--port",
        str(SCHEDULER_PORT),
        "--dashboard-address",
        f"{host}:{DASHBOARD_PORT}",
        "--preload",
        "gateway_client.agent",
        "--dg-api-address",
        f"{host}:{API_PORT}",
    ]
    if spec.get("idleTimeoutSeconds"):
        args += ["--dg-idle-timeout", f"{spec['idleTimeoutSeconds']:g}"]
    pod_ip = {
        "name": "DASK_GATEWAY_POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    pod = _pod(
        owner=owner,
        name=scheduler_name(owner["metadata"]["name"]),
        component="scheduler",
        group="",
        template=spec.get("scheduler") or {},
        args=args,
        default_command=["dask", "scheduler"],
        ports=[
            {"name": "tcp-comm", "containerPort": SCHEDULER_PORT},
            {"name": "http-dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "http-api", "containerPort": API_PORT},
        ],
        extra_env=[pod_ip],
    )
    container = pod["spec"]["containers"][0]
    container.setdefault(
        "readinessProbe",
        {"tcpSocket": {"port": SCHEDULER_PORT}, "periodSeconds": 2, "failureThreshold": 1},
    )
    return pod


def worker_pod(owner: Obj, *, group: str, name: str, scheduler_address: str) -> Obj:
    """One worker of ``group``, named ``name`` (its pod's name is its Dask worker name)."""
    spec = owner["spec"]
    template = (
        spec.get("worker") if group == crd.DEFAULT_GROUP else spec["workerGroups"][group]
    ) or {}
    resources = template.get("resources") or {}
    memory = memory_bytes((resources.get("limits") or {}).get("memory", "")) or memory_bytes(
        (resources.get("requests") or {}).get("memory", "")
    )
    host = "$(DASK_GATEWAY_POD_IP)"
    args = [
        scheduler_address,
        "--host",
        host,
        "--dashboard-address",
        f"{host}:0",
        "--name",
        name,
        "--nthreads",
        str(template.get("threads") or 1),
    ]
    if memory:
        args += ["--memory-limit", str(memory)]
    pod_ip = {
        "name": "DASK_GATEWAY_POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    return _pod(
        owner=owner,
        name=name,
        component="worker",
        group=group,
        template=template,
        args=args,
        default_command=["dask", "worker"],
        ports=[],
        extra_env=[pod_ip],
    )


def scheduler_service(owner: Obj) -> Obj:
    resource = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": resource,
            "namespace": owner["metadata"]["namespace"],
            "labels": labels(resource, "scheduler", owner=owner),
            "annotations": object_annotations(owner),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "selector": {LABEL_CLUSTER: resource, LABEL_COMPONENT: "scheduler"},
            "ports": [
                {"name": "tcp-comm", "port": SCHEDULER_PORT, "targetPort": SCHEDULER_PORT},
                {"name": "http-dashboard", "port": DASHBOARD_PORT, "targetPort": DASHBOARD_PORT},
                {"name": "http-api", "port": API_PORT, "targetPort": API_PORT},
            ],
        },
    }


def groups_of(owner: Obj) -> dict[str, Obj]:
    """The worker groups of a DaskCluster: the default one and the named ones."""
    spec = owner.get("spec") or {}
    return {crd.DEFAULT_GROUP: spec.get("worker") or {}, **(spec.get("workerGroups") or {})}
