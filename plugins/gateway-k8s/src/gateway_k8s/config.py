"""The settings of the Kubernetes backend: `[backend.kubernetes]`, `[cluster]` and the controller.

Owns `KubeBackendConfig`, `KubeClusterConfig` (seed 000's `KubeClusterConfig` names where they
mean the same) and `KubeControllerConfig`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from attrs import define, field, fields

from gateway_core.config import (
    GROUP_FORBIDDEN_BACKEND_KEYS,
    GROUP_OWN_KEYS,
    BackendConfig,
    ClusterConfig,
    Memory,
)

from .namespaces import NamespacePolicy, pattern_problems, template_problems

IMAGE_PULL_POLICIES = ("", "Always", "IfNotPresent", "Never")
# A DNS-1123 label, what namespaces must be.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


GROUP_BACKEND_KEYS = (
    "image",
    "image_pull_policy",
    "worker_cores_limit",
    "worker_memory_limit",
    "worker_extra_container_config",
    "worker_extra_pod_config",
    "worker_extra_pod_labels",
    "worker_extra_pod_annotations",
    "node_selector",
    "tolerations",
)
"""The `[cluster]` settings a worker group's ``backend`` table may set on Kubernetes: what
shapes one worker pod (the other cluster settings are the scheduler's, or the whole
cluster's)."""


def _namespace_problem(key: str, value: str) -> list[str]:
    if value and (len(value) > 63 or not _NAMESPACE.match(value)):
        return [f"{key}: {value!r} is not a namespace name (lower-case letters, digits, '-')"]
    return []


_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
RESERVED_PREFIXES = ("app.kubernetes.io/", "daskgateway.dev/")
"""Label and annotation keys the plugin sets itself (selectors depend on them)."""


def _metadata_problems(key: str, entries: dict[str, str], *, values: bool = False) -> list[str]:
    """Keys (and, for labels, values) Kubernetes would refuse, and keys of ours."""
    problems: list[str] = []
    for name, value in entries.items():
        prefix, _, base = str(name).rpartition("/")
        if not _LABEL_NAME.match(base) or (prefix and not _LABEL_PREFIX.match(prefix)):
            problems.append(
                f"{key}: {name!r} is not a label or annotation key ([prefix/]name, the name "
                "at most 63 letters, digits, '-', '_', '.')"
            )
        elif name.startswith(RESERVED_PREFIXES):
            problems.append(
                f"{key}: {name!r} is the plugin's own (keys under "
                f"{', '.join(RESERVED_PREFIXES)} are set by it)"
            )
        if not isinstance(value, str):
            problems.append(f"{key}.{name}: must be a string, got {value!r}")
        elif values and value and not _LABEL_NAME.match(value):
            problems.append(
                f"{key}.{name}: {value!r} is not a label value (at most 63 letters, digits, "
                "'-', '_', '.', starting and ending with a letter or digit)"
            )
    return problems


@define(kw_only=True, frozen=True)
class ApiSettings(BackendConfig):
    """How to reach the API server, shared by the gateway and the controller."""

    server: str = ""
    """API server URL used without credentials (a local test server, `kubectl proxy`); empty:
    ``kubeconfig``, else the in-cluster service account, else ``~/.kube/config``."""
    kubeconfig: str = ""
    """Path of a kubeconfig file."""
    context: str = ""
    """Context of the kubeconfig; empty: its current context."""
    namespace: str = "default"
    """Namespace of the DaskCluster resources (and their pods, Services and Secrets) whose
    `[cluster] namespace` is empty."""
    namespaces: list[str] = field(factory=list)
    """More namespaces clusters may run in: names, or patterns with ``*`` (``dask-*``), that
    a cluster's ``namespace`` (a template such as ``dask-{username}``) must give. Not empty:
    the gateway and the controller watch all namespaces (ClusterRoles) and keep what is in
    these."""
    api_threads: int = 8
    """Threads running blocking client calls (each open watch holds one)."""
    api_qps: float = 50.0
    """Average API requests per second; 0: no limit."""
    api_burst: int = 100
    """Requests allowed at once above ``api_qps``."""

    def check(self) -> list[str]:
        problems = _namespace_problem("namespace", self.namespace)
        if not self.namespace:
            problems.append("namespace: must not be empty")
        problems += pattern_problems("namespaces", self.namespaces)
        if self.api_threads < 3:
            problems.append(f"api_threads: must be at least 3, got {self.api_threads}")
        if self.api_qps < 0:
            problems.append("api_qps: must not be negative")
        if self.api_burst < 1:
            problems.append("api_burst: must be at least 1")
        return problems

    @property
    def policy(self) -> NamespacePolicy:
        return NamespacePolicy(default=self.namespace, allowed=tuple(self.namespaces))


@define(kw_only=True, frozen=True)
class KubeBackendConfig(ApiSettings):
    """`[backend.kubernetes]`: where the gateway finds the API server and its clusters."""

    cluster_heartbeat_period: int = 15
    """Seconds between scheduler heartbeats."""
    stopped_retention: float = 600.0
    """Seconds the gateway still answers for a stopped or failed cluster (in memory: its
    resource is deleted at once)."""
    controller_timeout: float = 30.0
    """Seconds after which a DaskCluster no controller has written any status to gets a
    reason saying so (no controller runs, or it may not patch ``daskclusters/status``); it
    stays pending, and starts once a controller can act."""

    def check(self) -> list[str]:
        problems: list[str] = []
        if self.cluster_heartbeat_period < 1:
            problems.append("cluster_heartbeat_period: must be at least 1")
        if not self.controller_timeout > 0:
            problems.append(
                f"controller_timeout: must be more than 0 seconds, got {self.controller_timeout:g}"
            )
        return problems


@define(kw_only=True, frozen=True)
class KubeClusterConfig(ClusterConfig):
    """Per-cluster Kubernetes settings: in `[cluster]`, changeable by user options."""

    merged_keys: ClassVar[frozenset[str]] = ClusterConfig.merged_keys | {
        "scheduler_extra_pod_labels",
        "scheduler_extra_pod_annotations",
        "worker_extra_pod_labels",
        "worker_extra_pod_annotations",
        "node_selector",
        "common_labels",
        "common_annotations",
    }

    image: str = "daskgateway/dask-gateway:latest"
    """Container image of schedulers and workers."""
    image_pull_policy: str = ""
    """``Always``, ``IfNotPresent`` or ``Never``; empty: the cluster's default."""
    image_pull_secrets: list[dict[str, str]] = field(factory=list)
    """Secrets to pull the image with: ``[{"name": "my-registry"}]``."""
    namespace: str = ""
    """Namespace of the cluster, or a template naming ``{username}`` (``dask-{username}``:
    the user's name made a DNS label); empty: the backend's. It must be the backend's
    namespace or one of its ``namespaces``."""
    scheduler_cores_limit: float = 0.0
    """CPU limit of the scheduler; 0: ``scheduler_cores``."""
    scheduler_memory_limit: Memory = Memory(0)
    """Memory limit of the scheduler; 0: ``scheduler_memory``."""
    worker_cores_limit: float = 0.0
    """CPU limit of each worker; 0: ``worker_cores``."""
    worker_memory_limit: Memory = Memory(0)
    """Memory limit of each worker; 0: ``worker_memory``."""
    scheduler_extra_container_config: dict[str, Any] = field(factory=dict)
    """Merged into the scheduler's container (camelCase keys, as in a pod manifest)."""
    scheduler_extra_pod_config: dict[str, Any] = field(factory=dict)
    """Merged into the scheduler's pod spec."""
    worker_extra_container_config: dict[str, Any] = field(factory=dict)
    """Merged into each worker's container."""
    worker_extra_pod_config: dict[str, Any] = field(factory=dict)
    """Merged into each worker's pod spec."""
    scheduler_extra_pod_labels: dict[str, str] = field(factory=dict)
    """Extra labels of the scheduler's pod (merged with those an option adds)."""
    scheduler_extra_pod_annotations: dict[str, str] = field(factory=dict)
    """Extra annotations of the scheduler's pod."""
    worker_extra_pod_labels: dict[str, str] = field(factory=dict)
    """Extra labels of each worker's pod."""
    worker_extra_pod_annotations: dict[str, str] = field(factory=dict)
    """Extra annotations of each worker's pod."""
    node_selector: dict[str, str] = field(factory=dict)
    """Node labels every pod of the cluster must match."""
    tolerations: list[dict[str, Any]] = field(factory=list)
    """Tolerations of every pod of the cluster, as in a pod spec."""
    service_account: str = ""
    """Service account of the cluster's pods; empty: the namespace's default."""
    common_labels: dict[str, str] = field(factory=dict)
    """Labels of every object made for the cluster: its DaskCluster, Secret, Service and
    pods (under a pod's own extra labels; ours, ``app.kubernetes.io/*`` and
    ``daskgateway.dev/*``, may not be set)."""
    common_annotations: dict[str, str] = field(factory=dict)
    """Annotations of every object made for the cluster (as ``common_labels``)."""

    def check(self) -> list[str]:
        problems: list[str] = []
        if self.image_pull_policy not in IMAGE_PULL_POLICIES:
            problems.append(
                f"image_pull_policy: {self.image_pull_policy!r} is not one of "
                "Always, IfNotPresent, Never"
            )
        if not self.image:
            problems.append("image: must not be empty")
        for i, secret in enumerate(self.image_pull_secrets):
            if set(secret) != {"name"} or not secret["name"]:
                problems.append(f'image_pull_secrets[{i}]: must be {{"name": "<secret>"}}')
        problems += template_problems("namespace", self.namespace)
        for name in ("scheduler_cores_limit", "worker_cores_limit"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must not be negative")
        for name in ("scheduler_memory_limit", "worker_memory_limit"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must not be negative")
        for role, what in (
            ("scheduler", "cores"),
            ("scheduler", "memory"),
            ("worker", "cores"),
            ("worker", "memory"),
        ):
            limit, request = getattr(self, f"{role}_{what}_limit"), getattr(self, f"{role}_{what}")
            if limit > 0 and limit < request:
                # Kubernetes refuses a pod whose limit is below its request; a worker group
                # with more cores or memory than [cluster] meets this with the cluster's limit.
                shown = (f"{limit:g}", f"{request:g}") if what == "cores" else (limit, request)
                problems.append(
                    f"{role}_{what}_limit: {shown[0]} is below {role}_{what} {shown[1]} "
                    "(Kubernetes refuses such pods); raise it, or 0 for the request itself"
                )
        for i, toleration in enumerate(self.tolerations):
            if toleration.get("operator", "Equal") not in ("Equal", "Exists"):
                problems.append(f"tolerations[{i}].operator: must be Equal or Exists")
        problems += _metadata_problems("common_labels", self.common_labels, values=True)
        problems += _metadata_problems("common_annotations", self.common_annotations)
        problems += self._group_backend_problems()
        return problems

    def _group_backend_problems(self) -> list[str]:
        """Group extras core accepts (settings of this class) that mean nothing for one
        worker's pod. Keys core refuses itself (unknown ones, the group's own) are left to it."""
        problems: list[str] = []
        known = {a.name for a in fields(type(self))}
        for name, group in self.worker_groups.items():
            for key in group.backend:
                if (
                    key not in known
                    or key in GROUP_BACKEND_KEYS
                    or key in GROUP_OWN_KEYS
                    or key in GROUP_FORBIDDEN_BACKEND_KEYS
                ):
                    continue
                if key in ("image_pull_secrets", "service_account"):
                    why = (
                        "it applies to every pod of the cluster; set it in [cluster], or give "
                        "the group's pods their own through worker_extra_pod_config"
                    )
                elif key.startswith("scheduler_"):
                    why = "a scheduler setting; a group has workers only"
                else:
                    why = "a setting of the whole cluster, not of one worker"
                problems.append(
                    f"worker_groups.{name}.backend.{key}: not a per-group setting on Kubernetes "
                    f"({why}); a group's backend table may set {', '.join(GROUP_BACKEND_KEYS)}"
                )
        return problems


@define(kw_only=True, frozen=True)
class KubeControllerConfig(ApiSettings):
    """The controller's settings (`gateway k8s controller` options)."""

    parallelism: int = 4
    """Clusters reconciled at once."""
    leader_election: bool = True
    """Only the holder of the Lease reconciles, so several replicas are safe."""
    lease_name: str = "dask-gateway-controller"
    lease_namespace: str = ""
    """Namespace of the Lease; empty: ``namespace``."""
    identity: str = ""
    """This replica's name in the Lease; empty: host name and pid."""
    lease_duration: float = 15.0
    """Seconds a Lease stays valid without renewal; then another replica takes over."""
    renew_period: float = 5.0
    """Seconds between renewals by the leader (and attempts by the others)."""
    address_mode: Literal["service", "pod"] = "service"
    """What ``status.schedulerAddress`` names: the scheduler's Service by its DNS name
    (``service``), or its pod's IP (``pod``: networks without cluster DNS, and the tests)."""
    cluster_domain: str = "cluster.local"
    retire_grace: float = 10.0
    """Seconds excess running workers are left to the scheduler's own retirement before the
    controller asks the scheduler to retire them."""
    retire_timeout: float = 120.0
    """Seconds after which excess workers the scheduler did not retire are deleted."""
    worker_failure_limit: int = 3
    """Worker pods failing in a row (none ran 10 s between) after which the cluster
    fails, instead of replacing them for ever; 0: no limit."""
    expectations_timeout: float = 300.0
    """Seconds an unobserved create or delete is expected before it is forgotten."""
    queue_backoff_base: float = 0.05
    """Seconds before a cluster whose reconcile failed is reconciled again; doubled at each
    failure in a row, up to ``queue_backoff_max``."""
    queue_backoff_max: float = 30.0
    """The longest wait between reconciles of a failing cluster (a refused create of a
    running cluster's pods is retried this often once the backoff reached it)."""
    api_backoff_base: float = 0.2
    """Seconds before a failed list or watch is tried again (not a 410 Gone, which relists at
    once); doubled at each failure in a row, up to ``api_backoff_max``."""
    api_backoff_max: float = 10.0
    """The longest wait between tries of a failing list or watch."""
    health_address: str = ""
    """``host:port`` serving ``/healthz`` and ``/readyz`` (``:8081``: every address); empty:
    none. Readiness fails, naming the verb and resource, while a list, watch or status write
    is refused."""

    def check(self) -> list[str]:
        problems: list[str] = []
        if self.parallelism < 1:
            problems.append("parallelism: must be at least 1")
        if self.worker_failure_limit < 0:
            problems.append("worker_failure_limit: must not be negative")
        if self.renew_period * 2 > self.lease_duration:
            problems.append("renew_period: must be at most half of lease_duration")
        for kind in ("queue", "api"):
            base, most = getattr(self, f"{kind}_backoff_base"), getattr(self, f"{kind}_backoff_max")
            if not base > 0:
                problems.append(f"{kind}_backoff_base: must be more than 0 seconds, got {base:g}")
            elif not most >= base:
                problems.append(
                    f"{kind}_backoff_max: must be at least {kind}_backoff_base ({base:g} s), "
                    f"got {most:g}"
                )
            elif most > 3600:
                problems.append(f"{kind}_backoff_max: must be at most 3600 seconds, got {most:g}")
        if self.health_address:
            port = self.health_address.rpartition(":")[2]
            if ":" not in self.health_address or not port.isdigit() or int(port) > 65535:
                problems.append(
                    f"health_address: {self.health_address!r} is not host:port (':8081' for "
                    "every address)"
                )
        return problems
