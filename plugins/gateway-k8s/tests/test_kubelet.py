"""Tests of the simulated kubelet (tests/kube_fake/kubelet.py) on the fake API server: pods run
as local processes with their env, secrets and own loopback IP; phases, conditions, container
states (failing image, OOM kill, error exit), deletion kills the process, events.

Integration tests: real processes on loopback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

pytestmark = pytest.mark.integration
NS = "dask"
PRINT_ENV = (
    "import json, os, pathlib, time; "
    "print(json.dumps({k: os.environ.get(k) for k in ('NAME', 'IP', 'TOKEN', 'PLAIN', 'CERT')}"
    " | {'file': pathlib.Path(os.environ['CERT']).read_text()}), flush=True); "
    "time.sleep(float(os.environ.get('SLEEP', '0')))"
)


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(kube=kube, workdir=tmp_path, failing_images={"no/such:image"}).running() as k:
        yield k


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def python_pod(name: str, code: str, image: str = "python", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "command": [sys.executable, "-c"],
                    "args": [code],
                    "env": [{"name": "SLEEP", "value": "60"}],
                }
            ],
            **spec,
        },
    }


def phase(core: Any, name: str) -> str:
    return core.read_namespaced_pod(name, NS).status.phase


def test_pod_runs_with_env_secrets_and_its_own_ip(core: Any, kubelet: Kubelet) -> None:
    core.create_namespaced_secret(
        NS, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret", "tls.crt": "CERT"}}
    )
    body = python_pod("sched", PRINT_ENV)
    container = body["spec"]["containers"][0]
    container["env"] = [
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "PLAIN", "value": "x"},
        {"name": "CERT", "value": "/etc/dask/tls.crt"},
        {"name": "SLEEP", "value": "60"},
    ]
    container["volumeMounts"] = [{"name": "tls", "mountPath": "/etc/dask"}]
    body["spec"]["volumes"] = [{"name": "tls", "secret": {"secretName": "creds"}}]
    core.create_namespaced_pod(NS, body)
    core.create_namespaced_pod(NS, python_pod("other", "import time; time.sleep(60)"))
    wait_for(lambda: phase(core, "sched") == "Running", "the pod to run")
    log = kubelet.pod(NS, "sched").directory / "log"
    printed = json.loads(wait_for(lambda: log.exists() and log.read_text(), "the pod's output"))
    pod = core.read_namespaced_pod("sched", NS)
    assert printed["NAME"] == "sched" and printed["TOKEN"] == "s3cret" and printed["PLAIN"] == "x"
    assert printed["IP"] == pod.status.pod_ip
    assert pod.status.pod_ip.startswith("127.") and pod.status.pod_ip != pod.status.host_ip
    assert printed["file"] == "CERT"
    assert {c.type: c.status for c in pod.status.conditions} == {
        "PodScheduled": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    assert pod.status.container_statuses[0].state.running is not None
    other = wait_for(lambda: core.read_namespaced_pod("other", NS).status.pod_ip, "other's IP")
    assert other != pod.status.pod_ip
    reasons = {
        e.reason
        for e in core.list_namespaced_event(NS, field_selector="involvedObject.name=sched").items
    }
    assert {"Scheduled", "Started"} <= reasons


def test_exit_codes_become_succeeded_and_failed(core: Any, kubelet: Kubelet) -> None:
    core.create_namespaced_pod(NS, python_pod("ok", "pass"))
    core.create_namespaced_pod(NS, python_pod("bad", "raise SystemExit(3)"))
    wait_for(lambda: phase(core, "ok") == "Succeeded", "the pod to succeed")
    wait_for(lambda: phase(core, "bad") == "Failed", "the pod to fail")
    state = core.read_namespaced_pod("bad", NS).status.container_statuses[0].state.terminated
    assert (state.exit_code, state.reason) == (3, "Error")
    state = core.read_namespaced_pod("ok", NS).status.container_statuses[0].state.terminated
    assert (state.exit_code, state.reason) == (0, "Completed")


def test_failing_image_stays_pending_with_the_reason(core: Any, kubelet: Kubelet) -> None:
    core.create_namespaced_pod(NS, python_pod("img", "pass", image="no/such:image"))

    def waiting() -> str | None:
        statuses = core.read_namespaced_pod("img", NS).status.container_statuses
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason

    assert wait_for(lambda: waiting() == "ImagePullBackOff", "the back-off")
    assert phase(core, "img") == "Pending"
    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=img").items
    assert any("Failed to pull image" in e.message for e in events if e.type == "Warning")


def test_oom_kill(core: Any, kubelet: Kubelet) -> None:
    core.create_namespaced_pod(NS, python_pod("big", "import time; time.sleep(60)"))
    wait_for(lambda: phase(core, "big") == "Running", "the pod to run")
    kubelet.oom_kill(NS, "big")
    wait_for(lambda: phase(core, "big") == "Failed", "the pod to fail")
    state = core.read_namespaced_pod("big", NS).status.container_statuses[0].state.terminated
    assert (state.exit_code, state.reason) == (137, "OOMKilled")


def test_deleting_a_pod_kills_its_process_within_the_grace_period(
    core: Any, kubelet: Kubelet
) -> None:
    ignores_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    core.create_namespaced_pod(
        NS, python_pod("stubborn", ignores_term, terminationGracePeriodSeconds=1)
    )
    core.create_namespaced_pod(NS, python_pod("polite", "import time; time.sleep(60)"))
    for name in ("stubborn", "polite"):
        wait_for(lambda n=name: phase(core, n) == "Running", f"{name} to run")
    log = kubelet.pod(NS, "stubborn").directory / "log"
    wait_for(lambda: log.exists() and "up" in log.read_text(), "the SIGTERM handler")
    processes = {n: kubelet.pod(NS, n).process for n in ("stubborn", "polite")}
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", NS)
    core.delete_namespaced_pod("polite", NS)
    for name, process in processes.items():
        assert process is not None
        wait_for(lambda p=process: p.poll() is not None, f"{name}'s process to end")
    assert processes["polite"].returncode == -15  # SIGTERM was enough
    assert processes["stubborn"].returncode == -9  # SIGKILL after the grace period
    assert time.monotonic() - started < 20


def test_no_process_mode_marks_pods_running(kube: FakeKube, core: Any, tmp_path: Path) -> None:
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False).running() as kubelet:
        core.create_namespaced_pod(
            NS,
            {
                "metadata": {"name": "w"},
                "spec": {"containers": [{"name": "main", "image": "daskdev/dask"}]},
            },
        )  # no command: nothing could run
        wait_for(lambda: phase(core, "w") == "Running", "the pod to be marked running")
        assert kubelet.pod(NS, "w").process is None


def test_graceful_deletion_keeps_the_pod_terminating_until_the_process_ends(
    tmp_path: Path,
) -> None:
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    fake = FakeKube(graceful_pod_deletion=True)
    with fake.running(), Kubelet(kube=fake, workdir=tmp_path).running() as kubelet:
        client = fake.api_client()
        core = kubernetes.client.CoreV1Api(client)
        ignores_term = (
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('up', flush=True); time.sleep(60)"
        )
        core.create_namespaced_pod(
            NS, python_pod("slow", ignores_term, terminationGracePeriodSeconds=2)
        )
        wait_for(lambda: phase(core, "slow") == "Running", "the pod to run")
        log = kubelet.pod(NS, "slow").directory / "log"
        wait_for(lambda: log.exists() and "up" in log.read_text(), "the SIGTERM handler")
        core.delete_namespaced_pod("slow", NS)
        terminating = core.read_namespaced_pod("slow", NS)  # still there, Terminating
        assert terminating.metadata.deletion_timestamp is not None
        assert terminating.metadata.deletion_grace_period_seconds == 2

        def gone() -> bool:
            try:
                core.read_namespaced_pod("slow", NS)
            except ApiException as error:
                return error.status == 404
            return False

        wait_for(gone, "the kubelet to remove the pod")
        process = kubelet.pod(NS, "slow").process
        assert process is not None and process.returncode == -9
        client.close()


def test_graceful_deletion_of_a_pod_no_kubelet_took_is_immediate() -> None:
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    with FakeKube(graceful_pod_deletion=True).running() as fake:
        client = fake.api_client()
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespaced_pod(NS, python_pod("pending", "pass"))
        core.delete_namespaced_pod("pending", NS)
        with pytest.raises(ApiException) as gone:
            core.read_namespaced_pod("pending", NS)
        assert gone.value.status == 404
        client.close()


def test_a_node_kubelet_runs_only_its_pods(kube: FakeKube, core: Any, tmp_path: Path) -> None:
    with Kubelet(kube=kube, workdir=tmp_path, node="n1", run_processes=False).running():
        core.create_namespaced_pod(NS, python_pod("mine", "pass", nodeName="n1"))
        core.create_namespaced_pod(NS, python_pod("theirs", "pass", nodeName="n2"))
        wait_for(lambda: phase(core, "mine") == "Running", "n1's pod to run")
        time.sleep(0.5)
        theirs = core.read_namespaced_pod("theirs", NS)
        assert theirs.status.phase == "Pending" and theirs.status.pod_ip is None


def test_a_missing_secret_is_a_container_config_error(core: Any, kubelet: Kubelet) -> None:
    body = python_pod("nosecret", "pass")
    body["spec"]["containers"][0]["env"] = [
        {"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}}
    ]
    core.create_namespaced_pod(NS, body)

    def reason() -> str | None:
        statuses = core.read_namespaced_pod("nosecret", NS).status.container_statuses
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason

    assert wait_for(reason, "the waiting reason") == "CreateContainerConfigError"
    assert phase(core, "nosecret") == "Pending"


def test_command_and_args_expand_variables_of_the_container_env(
    core: Any, kubelet: Kubelet
) -> None:
    body = python_pod("expand", "import sys, json; print(json.dumps(sys.argv[1:]), flush=True)")
    container = body["spec"]["containers"][0]
    container["args"].extend(["$(IP):8786", "$$(IP)", "$(UNDECLARED)"])
    container["env"] = [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    core.create_namespaced_pod(NS, body)
    wait_for(lambda: "expand" in {p.name for p in kubelet.pods.values()}, "the pod to start")
    pod = kubelet.pod(NS, "expand")
    log = pod.directory / "log"
    printed = json.loads(wait_for(lambda: log.exists() and log.read_text(), "the pod's output"))
    # As the kubelet: a declared variable is replaced, `$$` escapes, unknown names stay.
    assert printed == [f"{pod.ip}:8786", "$(IP)", "$(UNDECLARED)"]
