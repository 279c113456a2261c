"""Tests of the Helm chart in chart/: helm lint and helm template with the default values and
with tests/chart_values/options.yaml, every object validated by kubernetes-validate --strict,
the RBAC matrix (and its enforcement by the fake API server), the gateway's TOML, the secrets,
the probes against a real `gateway serve`, and a comment for every key of values.yaml.

helm comes from plugins/gateway-k8s/ci/install-helm.sh; without it these tests fail under CI
and are skipped elsewhere.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from helm_chart import (
    CHART,
    FULLNAME,
    INSTALL_SCRIPT,
    NS,
    PLUGIN,
    RELEASE,
    Obj,
    find_helm,
    helm_run,
    one,
    render,
)
from kube_fake import FakeKube
from kubernetes.client.exceptions import ApiException
from kubernetes_validate import utils as kube_validate

from gateway_k8s import crd, rbac

OPTIONS = PLUGIN / "tests" / "chart_values" / "options.yaml"

# The grants, as (API group, resource) -> verbs: what the code uses, from its one source
# (gateway_k8s.rbac); the chart's Roles must grant exactly these.
GATEWAY_GRANTS = rbac.grants(rbac.GATEWAY_RULES)
CONTROLLER_GRANTS = rbac.grants(rbac.CONTROLLER_RULES)
LEASE_GRANTS = rbac.grants(rbac.LEADER_ELECTION_RULES)


# --------------------------------------------------------------------------------------------
# helm
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> str:
    return find_helm()


@pytest.fixture(scope="module")
def default_objects(chart_objects: list[Obj]) -> list[Obj]:
    return chart_objects


@pytest.fixture(scope="module")
def option_objects(helm: str) -> list[Obj]:
    return render(helm, "--values", str(OPTIONS))


def kinds(objects: list[Obj]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def grants(role: Obj) -> dict[tuple[str, str], set[str]]:
    """A Role's rules as (group, resource) -> verbs."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def container(deployment: Obj) -> Obj:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def gateway_toml(objects: list[Obj]) -> dict[str, Any]:
    config_map = one(objects, "ConfigMap", f"{FULLNAME}-config")
    return tomllib.loads(config_map["data"]["gateway.toml"])


# --------------------------------------------------------------------------------------------
# The meta-test: every key of values.yaml has a comment
# --------------------------------------------------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_.\-/]+):(?P<rest>.*)$")


def _key_paths(data: Any, prefix: str = "") -> list[str]:
    paths: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.append(path)
            paths.extend(_key_paths(value, path))
    return paths


def undocumented_keys(text: str) -> tuple[list[str], int]:
    """The keys of a values file with no `#` comment on the line before them (at their own
    indentation) or at the end of their line; and how many key lines were seen."""
    lines = text.splitlines()
    missing: list[str] = []
    seen = 0
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        seen += 1
        indent = match["indent"]
        previous = lines[number - 1] if number else ""
        commented_above = previous.startswith(indent + "#")
        if not commented_above and "#" not in match["rest"]:
            missing.append(f"line {number + 1}: {match['key']}")
    return missing, seen


@pytest.mark.unit
def test_values_yaml_has_a_comment_for_every_key() -> None:
    text = (CHART / "values.yaml").read_text()
    missing, seen = undocumented_keys(text)
    assert not missing, f"values.yaml keys without a comment: {missing}"
    # Every key the YAML parser finds is on a line of its own (no flow-style maps hiding keys
    # from the check above).
    assert seen == len(_key_paths(yaml.safe_load(text)))


@pytest.mark.unit
def test_the_meta_test_finds_an_undocumented_key() -> None:
    text = "# -- documented\na: 1\nb:\n  # -- inner\n  c: 2\n  d: 3 # trailing comment\ne: 4\n"
    assert undocumented_keys(text) == (["line 3: b", "line 7: e"], 5)


# --------------------------------------------------------------------------------------------
# Finding helm
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_missing_helm_fails_under_ci_naming_the_install_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HELM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=re.escape(INSTALL_SCRIPT)):
        find_helm()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=re.escape(INSTALL_SCRIPT)):
        find_helm()


# --------------------------------------------------------------------------------------------
# lint, template, kubernetes-validate
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("values", [None, OPTIONS], ids=["defaults", "options"])
def test_helm_lint_strict(helm: str, values: Path | None) -> None:
    extra = ["--values", str(values)] if values else []
    done = helm_run(helm, "lint", "--strict", str(CHART), "--namespace", NS, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships.
KUBE_VERSIONS = ["1.25.0", kube_validate.latest_version()]


def validate_strict(objects: list[Obj]) -> None:
    for obj in objects:
        for version in KUBE_VERSIONS:
            try:
                kube_validate.validate(obj, version, strict=True)
            except kube_validate.ValidationError as error:
                name = f"{obj['kind']} {obj['metadata']['name']}"
                path = "/".join(map(str, error.path))
                raise AssertionError(f"{name} (k8s {version}) at {path}: {error.message}") from None


@pytest.mark.integration
def test_every_default_object_validates_strictly(default_objects: list[Obj]) -> None:
    assert kinds(default_objects) == [
        ("ConfigMap", f"{FULLNAME}-config"),
        ("CustomResourceDefinition", crd.CRD_NAME),
        ("Deployment", f"{FULLNAME}-controller"),
        ("Deployment", f"{FULLNAME}-gateway"),
        ("Role", f"{FULLNAME}-controller"),
        ("Role", f"{FULLNAME}-controller-leader-election"),
        ("Role", f"{FULLNAME}-gateway"),
        ("RoleBinding", f"{FULLNAME}-controller"),
        ("RoleBinding", f"{FULLNAME}-controller-leader-election"),
        ("RoleBinding", f"{FULLNAME}-gateway"),
        ("Secret", f"{FULLNAME}-secrets"),
        ("Service", FULLNAME),
        ("ServiceAccount", f"{FULLNAME}-controller"),
        ("ServiceAccount", f"{FULLNAME}-gateway"),
    ]
    validate_strict(default_objects)


@pytest.mark.integration
def test_every_option_object_validates_strictly(option_objects: list[Obj]) -> None:
    assert ("Ingress", FULLNAME) in kinds(option_objects)
    # rbac.namespaces: the Roles and bindings in the release's namespace and in dask-users.
    for ns in (NS, "dask-users"):
        one(option_objects, "Role", f"{FULLNAME}-gateway", ns)
        one(option_objects, "RoleBinding", f"{FULLNAME}-controller", ns)
    validate_strict(option_objects)


@pytest.mark.integration
def test_strict_validation_catches_an_unknown_field(default_objects: list[Obj]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(one(default_objects, "Service", FULLNAME)))
    broken["spec"]["portz"] = broken["spec"].pop("ports")
    with pytest.raises(AssertionError, match="portz"):
        validate_strict([broken])


@pytest.mark.integration
def test_the_crd_is_the_generated_one(default_objects: list[Obj]) -> None:
    assert one(default_objects, "CustomResourceDefinition", crd.CRD_NAME) == crd.crd()


@pytest.mark.integration
def test_the_rendered_crd_applied_to_the_fake_checks_resources(default_objects: list[Obj]) -> None:
    rendered = one(default_objects, "CustomResourceDefinition", crd.CRD_NAME)
    fake = FakeKube()
    with fake.running():
        client = fake.api_client()
        try:
            kubernetes.client.ApiextensionsV1Api(client).create_custom_resource_definition(rendered)
            custom = kubernetes.client.CustomObjectsApi(client)
            sample = {
                "apiVersion": crd.API_VERSION,
                "kind": crd.KIND,
                "metadata": {"name": "sample"},
                "spec": {
                    "user": "alice",
                    "worker": {"replicas": 2, "resources": {"limits": {"memory": "4Gi"}}},
                    "workerGroups": {"gpu": {"replicas": 1, "nodeSelector": {"gpu": "true"}}},
                },
            }
            created = custom.create_namespaced_custom_object(
                crd.GROUP, crd.VERSION, NS, crd.PLURAL, sample
            )
            assert created["spec"]["workerGroups"]["gpu"]["replicas"] == 1
            bad = {**sample, "metadata": {"name": "bad"}}
            bad["spec"] = {"user": "alice", "worker": {"replicas": -1}}
            with pytest.raises(ApiException) as invalid:
                custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, NS, crd.PLURAL, bad)
            assert invalid.value.status == 422
            assert "spec.worker.replicas" in invalid.value.body
        finally:
            client.close()


# --------------------------------------------------------------------------------------------
# Deployments, Services, Ingress
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_default_gateway_deployment(default_objects: list[Obj]) -> None:
    deployment = one(default_objects, "Deployment", f"{FULLNAME}-gateway")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-gateway"
    gateway = container(deployment)
    assert gateway["image"] == "gateway-k8s:0.1.0"
    assert [*gateway["command"], *gateway["args"]] == ["gateway", "serve"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["GATEWAY_CONFIG"]["value"] == "/etc/gateway-k8s/gateway.toml"
    for name, key in (
        ("GATEWAY_PROXY_TOKEN", "proxy-token"),
        ("GATEWAY_ENCRYPT_KEYS", "encrypt-keys"),
        ("GATEWAY_METRICS_TOKEN", "metrics-token"),
    ):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (f"{FULLNAME}-secrets", key)
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/api/health", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/api/version", "port": "http"}
    assert gateway["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert gateway["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert key not in pod
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/gateway-k8s"]]["configMap"]["name"] == f"{FULLNAME}-config"


@pytest.mark.integration
def test_default_controller_deployment(default_objects: list[Obj]) -> None:
    deployment = one(default_objects, "Deployment", f"{FULLNAME}-controller")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-controller"
    controller = container(deployment)
    assert [*controller["command"], *controller["args"]] == [
        "gateway",
        "k8s",
        "controller",
        "--queue-backoff-base=0.05",
        "--queue-backoff-max=30",
        "--api-backoff-base=0.2",
        "--api-backoff-max=10",
    ]
    env = {e["name"]: e for e in controller["env"]}
    assert env["GATEWAY_CONFIG"]["value"] == "/etc/gateway-k8s/gateway.toml"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The controller has no use for the store's keys or the proxy token.
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in env.values())
    # Readiness names what the API server refuses (gateway_k8s.controller's /readyz).
    assert env["GATEWAY_K8S_HEALTH_ADDRESS"]["value"] == ":8081"
    assert controller["ports"] == [{"name": "health", "containerPort": 8081}]
    assert controller["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


@pytest.mark.integration
def test_option_deployments_services_and_ingress(option_objects: list[Obj]) -> None:
    deployment = one(option_objects, "Deployment", f"{FULLNAME}-gateway")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.example.org/gateway": "true"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["imagePullSecrets"] == [{"name": "registry-login"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "data"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    gateway = container(deployment)
    assert gateway["image"] == "registry.example.org/dask/gateway-k8s:2026.12"
    assert gateway["imagePullPolicy"] == "Always"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/gateway/api/health"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/gateway/api/version"
    assert {"name": "EXTRA", "value": "1"} in gateway["env"]
    assert [p["containerPort"] for p in gateway["ports"]] == [8000, 8786]

    # The gateway's scheduling options are its own: the controller keeps its own.
    controller = one(option_objects, "Deployment", f"{FULLNAME}-controller")
    assert controller["spec"]["replicas"] == 2
    controller_pod = controller["spec"]["template"]["spec"]
    assert controller_pod["nodeSelector"] == {"node-role.example.org/system": "true"}
    assert "tolerations" not in controller_pod
    assert container(controller)["livenessProbe"]["exec"]["command"] == ["gateway", "--version"]

    service = one(option_objects, "Service", FULLNAME)
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 80, "http"),
        ("tcp", 8786, "tcp"),
    ]
    selector = service["spec"]["selector"]
    assert all(labels[k] == v for k, v in selector.items())

    ingress = one(option_objects, "Ingress", FULLNAME)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "gateway.example.org"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/gateway/"
    assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    tls = {"hosts": ["gateway.example.org"], "secretName": "gateway-tls"}
    assert ingress["spec"]["tls"] == [tls]
    account = one(option_objects, "ServiceAccount", f"{FULLNAME}-gateway")
    assert account["metadata"]["annotations"] == {"iam.example.org/role": "gateway"}


@pytest.mark.integration
def test_a_changed_config_rolls_the_pods(helm: str, default_objects: list[Obj]) -> None:
    changed = render(helm, "--set", "gateway.logLevel=DEBUG")
    for name in (f"{FULLNAME}-gateway", f"{FULLNAME}-controller"):
        before = one(default_objects, "Deployment", name)["spec"]["template"]["metadata"]
        after = one(changed, "Deployment", name)["spec"]["template"]["metadata"]
        assert before["annotations"]["checksum/config"] != after["annotations"]["checksum/config"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("gateway.replicas=0", "gateway.replicas: must be at least 1"),
        ("gateway.config.cluster.bad=null", None),
        (
            "controller.backoff.queueBase=0",
            "controller.backoff.queueBase: must be a number of seconds above 0, got 0",
        ),
        (
            "controller.backoff.apiBase=soon",
            "controller.backoff.apiBase: must be a number of seconds above 0, got soon",
        ),
        (
            "controller.backoff.queueMax=0.01",
            "controller.backoff.queueMax: must be a number of seconds from queueBase (0.05) "
            "to 3600, got 0.01",
        ),
        (
            "controller.backoff.apiMax=7200",
            "controller.backoff.apiMax: must be a number of seconds from apiBase (0.2) to "
            "3600, got 7200",
        ),
    ],
)
def test_bad_values(helm: str, setting: str, message: str | None) -> None:
    done = helm_run(helm, "template", RELEASE, str(CHART), "--set", setting)
    if message is None:  # a null value is left out of the TOML (TOML has no null)
        assert done.returncode == 0, done.stderr
        assert "bad" not in done.stdout
    else:
        assert done.returncode != 0
        assert message in done.stderr


@pytest.mark.integration
def test_controller_disabled(helm: str) -> None:
    objects = render(helm, "--set", "controller.enabled=false")
    names = [name for _, name in kinds(objects)]
    assert not [n for n in names if "controller" in n]


@pytest.mark.integration
def test_variants_without_rbac_or_accounts_validate(helm: str) -> None:
    objects = render(
        helm,
        "--set",
        "rbac.create=false,serviceAccount.gateway.create=false,"
        "serviceAccount.controller.name=site-controller,serviceAccount.controller.create=false,"
        "ingress.enabled=true,gateway.readinessProbe.enabled=false",
    )
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ServiceAccount")]
    controller = one(objects, "Deployment", f"{FULLNAME}-controller")
    assert controller["spec"]["template"]["spec"]["serviceAccountName"] == "site-controller"
    assert "readinessProbe" not in container(one(objects, "Deployment", f"{FULLNAME}-gateway"))
    (rule,) = one(objects, "Ingress", FULLNAME)["spec"]["rules"]
    assert "host" not in rule and rule["http"]["paths"][0]["path"] == "/"
    validate_strict(objects)


# --------------------------------------------------------------------------------------------
# The gateway's TOML
# --------------------------------------------------------------------------------------------


def config_problems(toml: dict[str, Any]) -> list[str]:
    """What `gateway config check` would say about the rendered config."""
    from gateway_core.config import ConfigError, load_config
    from gateway_core.configcheck import resolve_config
    from gateway_core.plugins import Registry, make_plugin_manager

    config = load_config(
        toml, environ={"GATEWAY_ENCRYPT_KEYS": "LXkX6AQ3yF7VZgbPuX5l4P4Dcb0OelQYyRyrKJHk3c8="}
    )
    try:
        resolve_config(config, Registry.from_plugin_manager(make_plugin_manager()))
    except ConfigError as error:
        return error.problems
    return []


def kubernetes_backend_registered() -> bool:
    from gateway_core.plugins import Registry, make_plugin_manager

    return "kubernetes" in Registry.from_plugin_manager(make_plugin_manager()).backends


# Until the backend registers itself (issue 12's backend step), these are the only problems
# `gateway config check` may find in the rendered config; from then on, none.
BACKEND_PENDING = re.compile(r"^(gateway\.backend|backend\.kubernetes): .*kubernetes")


def assert_config_valid(toml: dict[str, Any]) -> None:
    problems = config_problems(toml)
    if not kubernetes_backend_registered():
        problems = [p for p in problems if not BACKEND_PENDING.match(p)]
    assert problems == []


@pytest.mark.integration
def test_default_toml(default_objects: list[Obj]) -> None:
    toml = gateway_toml(default_objects)
    assert toml["gateway"] == {
        "backend": "kubernetes",
        "authenticator": "simple",
        "log_level": "INFO",
        "admin_users": [],
        "db_url": "sqlite:///:memory:",
        "api_url": f"http://{FULLNAME}.{NS}.svc:80/api",
    }
    assert toml["proxy"] == {"address": ":8000", "prefix": ""}
    # Clusters go to the release's namespace (not the backend's own default, `default`).
    assert toml["backend"] == {"kubernetes": {"namespace": NS}}
    assert_config_valid(toml)


@pytest.mark.integration
def test_clusters_go_to_the_release_namespace_unless_the_values_say(helm: str) -> None:
    def namespace(*args: str) -> Any:
        done = helm_run(helm, "template", RELEASE, str(CHART), *args)
        assert done.returncode == 0, done.stderr
        objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
        return gateway_toml(objects)["backend"]["kubernetes"].get("namespace")

    assert namespace("--namespace", "team-a") == "team-a"
    # helm template without --namespace renders the release in "default", and says so.
    assert namespace() == "default"
    override = "gateway.config.backend.kubernetes.namespace=dask-users"
    assert namespace("--namespace", "team-a", "--set", override) == "dask-users"


@pytest.mark.integration
def test_option_toml(option_objects: list[Obj]) -> None:
    toml = gateway_toml(option_objects)
    assert toml["gateway"]["api_url"] == f"http://{FULLNAME}.{NS}.svc:80/gateway/api"
    assert toml["gateway"]["wait_timeout"] == 5
    assert toml["gateway"]["stop_clusters_on_shutdown"] is False
    assert toml["gateway"]["admin_users"] == ["alice"]
    assert toml["proxy"] == {"address": ":8000", "tcp_address": ":8786", "prefix": "/gateway"}
    assert toml["auth"] == {"simple": {"password": "testing"}}
    assert toml["metrics"] == {"public": True}
    cluster = toml["cluster"]
    # Whole numbers stay integers (helm's toToml would write 2.0, which [cluster] refuses).
    assert cluster["worker_cores"] == 2 and isinstance(cluster["worker_cores"], int)
    assert cluster["adaptive_period"] == 2.5
    assert cluster["environment"]["QUOTED"] == 'a<b & "c"\n'
    assert toml["options"]["idle"]["options"] == [
        {"key": "short", "value": 600},
        {"key": "long", "value": 3600.5},
    ]
    assert toml["quotas"] == {"default": {"max_clusters": 3, "max_memory": "64 GiB"}}
    assert_config_valid(toml)


@pytest.mark.integration
def test_config_check_finds_a_bad_key(helm: str) -> None:
    # The check above can fail: a misspelt key in the values is reported.
    objects = render(helm, "--set", "gateway.config.cluster.worker_corez=2")
    problems = config_problems(gateway_toml(objects))
    assert "cluster.worker_corez: unknown key" in problems


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def secret_data(objects: list[Obj]) -> dict[str, str]:
    secret = one(objects, "Secret", f"{FULLNAME}-secrets")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


@pytest.mark.integration
def test_generated_secrets(default_objects: list[Obj], helm: str) -> None:
    from gateway_core.store import fernet_from_key

    data = secret_data(default_objects)
    assert set(data) == {"proxy-token", "encrypt-keys"}
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["proxy-token"])
    fernet_from_key(data["encrypt-keys"])  # a valid key, or ValueError naming the problem
    # Generated, not a constant of the chart (helm template has no Secret to look up).
    again = secret_data(render(helm))
    assert again["proxy-token"] != data["proxy-token"]
    assert again["encrypt-keys"] != data["encrypt-keys"]


@pytest.mark.integration
def test_an_upgrade_keeps_the_generated_secrets(helm: str, tmp_path: Path) -> None:
    """`lookup` against a live API server (the fake, through `helm template --dry-run=server`):
    the values in the existing Secret are kept, what it lacks is generated, what the values
    give wins."""
    fake = FakeKube()
    with fake.running():
        fake.store.create(
            fake.store.kinds["/secrets"],
            NS,
            {
                "metadata": {"name": f"{FULLNAME}-secrets"},
                "data": {
                    "proxy-token": base64.b64encode(b"installed-token").decode(),
                    "metrics-token": base64.b64encode(b"installed-metrics").decode(),
                },
            },
        )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                    "users": [{"name": "fake", "user": {}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        server = ("--dry-run=server", "--kubeconfig", str(kubeconfig))
        data = secret_data(render(helm, *server))
        assert data["proxy-token"] == "installed-token"
        assert data["metrics-token"] == "installed-metrics"
        assert len(base64.b64decode(data["encrypt-keys"])) == 32  # missing: generated
        given = secret_data(render(helm, *server, "--set", "secrets.proxyToken=new-token"))
        assert given["proxy-token"] == "new-token"


@pytest.mark.integration
def test_given_secrets(option_objects: list[Obj]) -> None:
    from gateway_core.store import fernet_from_key

    data = secret_data(option_objects)
    assert data["proxy-token"] == "a-proxy-token"
    assert data["metrics-token"] == "a-metrics-token"
    keys = data["encrypt-keys"].split(";")
    assert len(keys) == 2
    for index, key in enumerate(keys):
        fernet_from_key(key, index=index)


@pytest.mark.integration
def test_existing_secret(helm: str) -> None:
    objects = render(helm, "--set", "secrets.existingSecret=site-secrets")
    assert not [o for o in objects if o["kind"] == "Secret"]
    gateway = container(one(objects, "Deployment", f"{FULLNAME}-gateway"))
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in gateway["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {"site-secrets"}


# --------------------------------------------------------------------------------------------
# RBAC
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_roles_grant_exactly_the_rules_of_gateway_k8s_rbac(default_objects: list[Obj]) -> None:
    assert grants(one(default_objects, "Role", f"{FULLNAME}-gateway")) == GATEWAY_GRANTS
    assert grants(one(default_objects, "Role", f"{FULLNAME}-controller")) == CONTROLLER_GRANTS
    lease = one(default_objects, "Role", f"{FULLNAME}-controller-leader-election")
    assert grants(lease) == LEASE_GRANTS
    for name, account in (
        (f"{FULLNAME}-gateway", f"{FULLNAME}-gateway"),
        (f"{FULLNAME}-controller", f"{FULLNAME}-controller"),
        (f"{FULLNAME}-controller-leader-election", f"{FULLNAME}-controller"),
    ):
        binding = one(default_objects, "RoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": name,
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NS}]


def readme_rbac_rows() -> list[tuple[str, str, str, set[str]]]:
    """The README's RBAC table as (component, API group, resource, verbs), in order."""
    text = (PLUGIN / "README.md").read_text()
    header = "| component | API group | resource | verbs | why |\n|---|---|---|---|---|\n"
    assert text.count(header) == 1, "the README has one RBAC table"
    rows = []
    for line in text.split(header, 1)[1].splitlines():
        if not line.startswith("|"):
            break
        component, group, resource, verbs, why = (c.strip() for c in line.strip("|").split("|"))
        assert why, line
        group = "" if group == "core" else group.strip("`")
        rows.append((component, group, resource.strip("`"), {v.strip() for v in verbs.split(",")}))
    return rows


@pytest.mark.unit
def test_the_readme_rbac_table_is_gateway_k8s_rbac() -> None:
    expected = [
        (component, group, resource, set(rule["verbs"]))
        for component, rules in (
            ("gateway", rbac.GATEWAY_RULES),
            ("controller", rbac.CONTROLLER_RULES),
            ("controller", rbac.LEADER_ELECTION_RULES),
        )
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    ]
    assert readme_rbac_rows() == expected


@pytest.mark.unit
def test_every_rule_is_justified_in_a_comment() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    blocks = re.findall(r'define "gateway-k8s\.\w+Rules" -}}\n(.*?)\{\{- ', helpers, re.S)
    rules = [rule for block in blocks for rule in re.split(r"^- ", block, flags=re.M)[1:]]
    # Every rule of the three templates is looked at: controller 6, lease 1, gateway 3.
    assert len(rules) == 10
    for rule in rules:
        (verbs,) = re.findall(r"verbs: \[(.*)\]", rule)
        comments = " ".join(re.findall(r"#\s*(.*)", rule))
        for verb in (v.strip() for v in verbs.split(",")):
            # "get/list/watch: why" or "create: why": each verb named before a colon.
            assert re.search(rf"\b{verb}\b[^:]*:", comments), f"{verb} unexplained: {rule}"


@pytest.mark.integration
def test_cluster_wide_and_extra_rules(helm: str, option_objects: list[Obj]) -> None:
    objects = render(helm, "--set", "rbac.clusterWide=true")
    assert not [o for o in objects if o["kind"] == "Role" and "leader" not in o["metadata"]["name"]]
    gateway = one(objects, "ClusterRole", f"{NS}-{FULLNAME}-gateway")
    controller = one(objects, "ClusterRole", f"{NS}-{FULLNAME}-controller")
    assert grants(gateway) == GATEWAY_GRANTS and grants(controller) == CONTROLLER_GRANTS
    # The Lease stays namespaced even then.
    assert grants(one(objects, "Role", f"{FULLNAME}-controller-leader-election")) == LEASE_GRANTS
    binding = one(objects, "ClusterRoleBinding", f"{NS}-{FULLNAME}-controller")
    assert binding["subjects"][0]["name"] == f"{FULLNAME}-controller"
    validate_strict(objects)
    # rbac.gatewayExtraRules end up in the gateway's Role, and only there.
    extended = grants(one(option_objects, "Role", f"{FULLNAME}-gateway", NS))
    assert extended == {**GATEWAY_GRANTS, ("", "configmaps"): {"get"}}
    assert grants(one(option_objects, "Role", f"{FULLNAME}-controller", NS)) == CONTROLLER_GRANTS


@pytest.mark.integration
def test_per_user_namespaces(helm: str) -> None:
    """perUserNamespaces: the template and the allowed namespaces in gateway.toml, and
    ClusterRoles with exactly the rules of gateway_k8s.rbac (the informers list and watch all
    namespaces); the Lease stays a Role in the release's namespace."""
    objects = render(
        helm,
        "--set",
        "perUserNamespaces.enabled=true",
        "--set-json",
        'perUserNamespaces.allowed=["dask-*","team-a"]',
    )
    toml = gateway_toml(objects)
    assert toml["cluster"]["namespace"] == "dask-{username}"
    assert toml["backend"]["kubernetes"] == {"namespace": NS, "namespaces": ["dask-*", "team-a"]}
    assert_config_valid(toml)
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Role"] == [
        f"{FULLNAME}-controller-leader-election"
    ]
    gateway = one(objects, "ClusterRole", f"{NS}-{FULLNAME}-gateway")
    controller = one(objects, "ClusterRole", f"{NS}-{FULLNAME}-controller")
    assert grants(gateway) == GATEWAY_GRANTS and grants(controller) == CONTROLLER_GRANTS
    for component in ("gateway", "controller"):
        binding = one(objects, "ClusterRoleBinding", f"{NS}-{FULLNAME}-{component}")
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{FULLNAME}-{component}", "namespace": NS}
        ]
    validate_strict(objects)
    # A template that is not a namespace name fails the config check, naming it.
    bad = render(
        helm,
        "--set",
        "perUserNamespaces.enabled=true",
        "--set",
        "perUserNamespaces.template=Dask_{username}",
    )
    problems = config_problems(gateway_toml(bad))
    assert any("'Dask_{username}' is not a namespace name" in p for p in problems), problems


def role_yaml(objects: list[Obj], *names: str) -> str:
    return yaml.safe_dump_all([one(objects, "Role", name) for name in names])


ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
RESOURCES: dict[tuple[str, str], str] = {
    # (group, resource) -> the collection's path in namespace NS
    ("", "pods"): f"/api/v1/namespaces/{NS}/pods",
    ("", "services"): f"/api/v1/namespaces/{NS}/services",
    ("", "secrets"): f"/api/v1/namespaces/{NS}/secrets",
    ("", "endpoints"): f"/api/v1/namespaces/{NS}/endpoints",
    ("", "events"): f"/api/v1/namespaces/{NS}/events",
    ("coordination.k8s.io", "leases"): f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases",
    ("daskgateway.dev", "daskclusters"): f"/apis/{crd.API_VERSION}/namespaces/{NS}/daskclusters",
}


def attempt(client: Any, group: str, resource: str, verb: str) -> int:
    """The HTTP status of one request of ``verb`` on ``resource`` (with the client)."""
    plural, _, sub = resource.partition("/")
    base = RESOURCES[(group, plural)]
    item = f"{base}/absent" + (f"/{sub}" if sub else "")
    method, path, query, body = {
        "get": ("GET", item, [], None),
        "list": ("GET", base, [], None),
        "watch": ("GET", base, [("watch", "true"), ("timeoutSeconds", "1")], None),
        "create": ("POST", base, [], {"metadata": {"name": "absent"}}),
        "update": ("PUT", item, [], {"metadata": {"name": "absent"}}),
        "patch": ("PATCH", item, [], {}),
        "delete": ("DELETE", item, [], None),
    }[verb]
    content_type = "application/merge-patch+json" if verb == "patch" else "application/json"
    request = client.param_serialize(
        method,
        path,
        query_params=query,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
    )
    response = client.call_api(*request)
    status = int(response.status)
    if verb == "watch":
        response.response.close()  # a granted watch streams: its status line suffices
    else:
        response.read()
    return status


def assert_enforced(role: str, granted: dict[tuple[str, str], set[str]]) -> None:
    """Every verb on every resource the chart knows: 403 exactly when not granted."""
    resources = [
        *((g, r) for g, r in RESOURCES),
        ("daskgateway.dev", "daskclusters/status"),
        ("", "pods/log"),
    ]
    fake = FakeKube(crds=[crd.crd()], role=role)
    with fake.running():
        client = fake.api_client()
        try:
            for group, resource in resources:
                for verb in ALL_VERBS:
                    if resource.endswith("/status") and verb in ("list", "watch", "create"):
                        continue  # not verbs of a subresource
                    if resource == "pods/log" and verb != "get":
                        continue  # the only verb of pods/log
                    status = attempt(client, group, resource, verb)
                    allowed = verb in granted.get((group, resource), set())
                    where = f"{verb} {group or 'core'}/{resource}: {status}"
                    if allowed:
                        assert status != 403 and status < 500, where
                    else:
                        assert status == 403, where
        finally:
            client.close()


@pytest.mark.integration
def test_fake_api_server_enforces_the_gateway_role(default_objects: list[Obj]) -> None:
    assert_enforced(role_yaml(default_objects, f"{FULLNAME}-gateway"), GATEWAY_GRANTS)


@pytest.mark.integration
def test_fake_api_server_enforces_the_controller_roles(default_objects: list[Obj]) -> None:
    roles = role_yaml(
        default_objects, f"{FULLNAME}-controller", f"{FULLNAME}-controller-leader-election"
    )
    assert_enforced(roles, {**CONTROLLER_GRANTS, **LEASE_GRANTS})


@pytest.mark.integration
def test_what_each_component_does_with_the_typed_client(default_objects: list[Obj]) -> None:
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "c1"},
        "spec": {"user": "alice"},
    }
    gateway = FakeKube(crds=[crd.crd()], role=role_yaml(default_objects, f"{FULLNAME}-gateway"))
    with gateway.running():
        client = gateway.api_client()
        custom = kubernetes.client.CustomObjectsApi(client)
        core = kubernetes.client.CoreV1Api(client)
        custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, NS, crd.PLURAL, body)
        custom.patch_namespaced_custom_object(
            crd.GROUP, crd.VERSION, NS, crd.PLURAL, "c1", {"spec": {"worker": {"replicas": 3}}}
        )
        with pytest.raises(ApiException) as denied:
            core.create_namespaced_pod(NS, {"metadata": {"name": "p"}, "spec": {"containers": []}})
        assert denied.value.status == 403
        assert 'cannot create resource \\"pods\\"' in denied.value.body
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(NS)
        assert denied.value.status == 403
        client.close()

    roles = role_yaml(
        default_objects, f"{FULLNAME}-controller", f"{FULLNAME}-controller-leader-election"
    )
    controller = FakeKube(crds=[crd.crd()], role=roles)
    with controller.running():
        controller.store.create(controller.store.kinds[f"{crd.GROUP}/{crd.PLURAL}"], NS, body)
        client = controller.api_client()
        custom = kubernetes.client.CustomObjectsApi(client)
        core = kubernetes.client.CoreV1Api(client)
        leases = kubernetes.client.CoordinationV1Api(client)
        scheduler = {"name": "scheduler", "image": "gateway-k8s"}
        core.create_namespaced_pod(
            NS, {"metadata": {"name": "c1-scheduler"}, "spec": {"containers": [scheduler]}}
        )
        core.delete_namespaced_pod("c1-scheduler", NS)
        custom.patch_namespaced_custom_object_status(
            crd.GROUP, crd.VERSION, NS, crd.PLURAL, "c1", {"status": {"phase": "Running"}}
        )
        leases.create_namespaced_lease(NS, {"metadata": {"name": "leader"}, "spec": {}})
        with pytest.raises(ApiException) as denied:
            custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, NS, crd.PLURAL, body)
        assert denied.value.status == 403
        with pytest.raises(ApiException) as denied:
            core.patch_namespaced_pod("c1-scheduler", NS, {"metadata": {"labels": {"a": "b"}}})
        assert denied.value.status == 403
        client.close()


# --------------------------------------------------------------------------------------------
# The probes answer on a real gateway
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.fixture
def served_gateway(helm: str, tmp_path: Path) -> Iterator[tuple[str, list[Obj]]]:
    """`gateway serve` with the chart's TOML (prefix /gateway), on loopback and the
    unsafe-local backend (the probes do not depend on the backend)."""
    objects = render(helm, "--set", "gateway.prefix=/gateway")
    toml_text = one(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["gateway.toml"]
    port = free_port()
    toml_text = toml_text.replace('backend = "kubernetes"', 'backend = "unsafe-local"')
    toml_text = toml_text.replace('address = ":8000"', f'address = "127.0.0.1:{port}"')
    toml_text = toml_text.replace("[backend.kubernetes]", "[backend.unsafe-local]")
    toml_text = re.sub(r"(?m)^namespace = .*$", "", toml_text)  # a key of the kubernetes backend
    toml_text = re.sub(r"(?m)^api_url = .*$", "", toml_text)
    (tmp_path / "gateway.toml").write_text(toml_text)
    secrets = secret_data(objects)
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(tmp_path / "gateway.toml"),
        "GATEWAY_PROXY_TOKEN": secrets["proxy-token"],
        "GATEWAY_ENCRYPT_KEYS": secrets["encrypt-keys"],
    }
    log = (tmp_path / "gateway.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway_core", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get(base + "/")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"gateway did not start: {(tmp_path / 'gateway.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        yield base, objects
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.integration
def test_probes_answer_on_a_gateway_serving_the_rendered_config(
    served_gateway: tuple[str, list[Obj]],
) -> None:
    base, objects = served_gateway
    gateway = container(one(objects, "Deployment", f"{FULLNAME}-gateway"))
    readiness = gateway["readinessProbe"]["httpGet"]["path"]
    liveness = gateway["livenessProbe"]["httpGet"]["path"]
    assert (readiness, liveness) == ("/gateway/api/health", "/gateway/api/version")
    assert get(base + readiness) == 200
    assert get(base + liveness) == 200
    # The prefix matters: without it the routes are not there.
    assert get(base + "/api/health") == 404


@pytest.mark.integration
def test_the_controllers_readiness_probe_answers_on_a_controller_run_as_rendered(
    helm: str, default_objects: list[Obj], kube: Any, tmp_path: Path
) -> None:
    """`gateway k8s controller` with the rendered arguments and health address (on a free
    loopback port instead of :8081) answers the readiness probe's path on the port the probe
    names, against the fake API server."""
    controller = container(one(default_objects, "Deployment", f"{FULLNAME}-controller"))
    env = {e["name"]: e.get("value") for e in controller["env"]}
    [port] = [
        p
        for p in controller["ports"]
        if p["name"] == controller["readinessProbe"]["httpGet"]["port"]
    ]
    assert env["GATEWAY_K8S_HEALTH_ADDRESS"] == f":{port['containerPort']}"
    path = controller["readinessProbe"]["httpGet"]["path"]
    local = free_port()
    log = (tmp_path / "controller.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway_core",
            *controller["args"],
            "--server",
            kube.url,
            "--namespace",
            "dask",
            "--no-leader-election",
        ],
        env={**os.environ, "GATEWAY_K8S_HEALTH_ADDRESS": f"127.0.0.1:{local}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(f"http://127.0.0.1:{local}{path}") == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "controller.log"
            ).read_text()
            time.sleep(0.2)
        assert get(f"http://127.0.0.1:{local}/healthz") == 200
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
