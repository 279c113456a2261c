"""A simulated kubelet for the fake API server: runs each pod's first container command as a
local process and reports the pod's phase, conditions, container states and events.

Mapping to the real thing (documented, since a process is not a container):
- the image is not pulled; an image named in `failing_images` stays waiting in ErrImagePull,
  then ImagePullBackOff, and the pod stays Pending;
- each pod gets its own loopback address 127.a.x.y as `status.podIP` (env `fieldRef` too), so
  several schedulers can each listen on port 8786; ``a`` is chosen at random per kubelet (never
  0, where 127.0.0.1 is), so test runs side by side on one machine rarely share an address;
- Secret volumes are written to `<workdir>/<namespace>/<pod>/volumes/<volume>/`, and every
  occurrence of a container's `volumeMounts[].mountPath` in its command, args and env values is
  rewritten to that directory;
- the process inherits this process's environment (PATH, the venv) with the pod's env on top;
  its stdout and stderr go to `<workdir>/<namespace>/<pod>/log`, which the fake API server
  serves as the container's `pods/log` (only the first container runs; others have no
  status, so their log is "waiting to start", as a container that never started);
- `$(VAR)` in command and args is the container's env variable VAR (`$$` is `$`), as the
  kubelet expands it;
- restartPolicy is treated as Never: an exit ends the pod (Succeeded on 0, else Failed);
- a container with `terminationMessagePolicy: FallbackToLogsOnError` that exits non-zero gets
  the end of its log (80 lines, 2048 bytes at most) as `state.terminated.message`; nothing
  reads `/dev/termination-log` (the `File` policy's message stays empty);
- deleting a pod sends SIGTERM to its process group, then SIGKILL after the grace period
  (the deletion's, else `terminationGracePeriodSeconds`, default 30), as the kubelet does; with
  `FakeKube(graceful_pod_deletion=True)` the pod stays Terminating until then, and the kubelet
  removes it (delete with grace 0) once the process is gone;
- `run_processes=False` marks pods Running without starting anything (for the benchmark).
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
from attrs import define, field
from kubernetes.client.exceptions import ApiException

from .server import FakeKube

Obj = dict[str, Any]

USER_AGENT = "kubelet/fake (kube_fake)"
"""The kubelet's User-Agent, so the server's request counts tell its requests apart."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_tail(path: Path) -> str:
    """What the kubelet keeps of a failed container's log as its termination message
    (``FallbackToLogsOnError``): the last 80 lines, at most the last 2048 bytes."""
    try:
        data = path.read_bytes()[-2048:]
    except OSError:
        return ""
    return b"".join(data.splitlines(keepends=True)[-80:]).decode(errors="replace")


@define(kw_only=True, eq=False)
class PodProcess:
    namespace: str
    name: str
    uid: str
    ip: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    oom: bool = False
    deleted: bool = False


@define(kw_only=True)
class Kubelet:
    """Call `start()` then `stop()` (or use `running()`); `node`: the node it serves (pods whose
    `spec.nodeName` is it; None serves every pod and reports `fake-node`)."""

    kube: FakeKube
    workdir: Path
    node: str | None = None
    run_processes: bool = True
    failing_images: set[str] = field(factory=set)
    pods: dict[str, PodProcess] = field(factory=dict)  # by uid
    _next_ip: int = 0
    _subnet: int = field(factory=lambda: random.randint(1, 254))
    _stop: threading.Event = field(factory=threading.Event)
    _threads: list[threading.Thread] = field(factory=list)
    _lock: threading.Lock = field(factory=threading.Lock)
    _client: Any = None
    _watch: Any = None

    @property
    def node_name(self) -> str:
        return self.node or "fake-node"

    def start(self) -> Kubelet:
        self._client = self.kube.api_client()
        self._client.user_agent = USER_AGENT
        thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop watching and kill every process this kubelet started."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        for pod in list(self.pods.values()):
            self._kill(pod, grace=0)
        for thread in self._threads:
            thread.join(10)
        if self._client is not None:
            self._client.close()

    @contextlib.contextmanager
    def running(self) -> Any:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def pod(self, namespace: str, name: str) -> PodProcess:
        for pod in list(self.pods.values()):
            if (pod.namespace, pod.name) == (namespace, name):
                return pod
        raise KeyError(f"the kubelet runs no pod {namespace}/{name}")

    def oom_kill(self, namespace: str, name: str) -> None:
        """Kill a pod's process as the kernel's OOM killer would (exit 137, OOMKilled)."""
        pod = self.pod(namespace, name)
        pod.oom = True
        if pod.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, signal.SIGKILL)

    # --- the watch loop -------------------------------------------------------------------

    def _run(self) -> None:
        core = kubernetes.client.CoreV1Api(self._client)
        selector = f"spec.nodeName={self.node}" if self.node else None
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listed = core.list_pod_for_all_namespaces(field_selector=selector)
                    for item in listed.items:
                        self._seen(self._client.sanitize_for_serialization(item), "ADDED")
                    rv = listed.metadata.resource_version if listed.metadata else None
                self._watch = kubernetes.watch.Watch()
                for event in self._watch.stream(
                    core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=rv,
                    timeout_seconds=5,
                ):
                    obj = event["raw_object"]
                    rv = obj["metadata"]["resourceVersion"]
                    self._seen(obj, event["type"])
                    if self._stop.is_set():
                        break
            except ApiException as error:
                if error.status == 410:
                    rv = None  # relist
                elif not self._stop.is_set():
                    time.sleep(0.2)
            except Exception:  # noqa: BLE001 - the server went away; try again until stopped
                if not self._stop.is_set():
                    time.sleep(0.2)

    def _seen(self, obj: Obj, type_: str) -> None:
        uid = obj["metadata"]["uid"]
        with self._lock:
            known = self.pods.get(uid)
            if type_ == "DELETED" or obj["metadata"].get("deletionTimestamp"):
                if known is not None and not known.deleted:
                    known.deleted = True
                    grace = obj["metadata"].get("deletionGracePeriodSeconds")
                    if grace is None:
                        grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
                    self._spawn(self._terminate, known, grace, type_ != "DELETED")
                return
            if known is not None or obj.get("status", {}).get("phase") not in (None, "Pending"):
                return
            self._next_ip += 1
            n = self._next_ip
            pod = PodProcess(
                namespace=obj["metadata"]["namespace"],
                name=obj["metadata"]["name"],
                uid=uid,
                ip=f"127.{self._subnet}.{1 + (n - 1) // 254}.{1 + (n - 1) % 254}",
                directory=self.workdir / obj["metadata"]["namespace"] / obj["metadata"]["name"],
            )
            self.pods[uid] = pod
        self._spawn(self._start_pod, pod, obj)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- one pod --------------------------------------------------------------------------

    def _core(self) -> Any:
        return kubernetes.client.CoreV1Api(self._client)

    def _status(self, pod: PodProcess, status: Obj) -> None:
        with contextlib.suppress(ApiException):  # a pod deleted meanwhile
            self._core().patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})

    def _event(self, pod: PodProcess, reason: str, message: str, type_: str = "Normal") -> None:
        with contextlib.suppress(ApiException):
            self._core().create_namespaced_event(
                pod.namespace,
                {
                    "metadata": {"generateName": f"{pod.name}."},
                    "involvedObject": {
                        "kind": "Pod",
                        "name": pod.name,
                        "namespace": pod.namespace,
                        "uid": pod.uid,
                        "apiVersion": "v1",
                    },
                    "reason": reason,
                    "message": message,
                    "type": type_,
                    "source": {"component": "kubelet", "host": self.node_name},
                    "firstTimestamp": _now(),
                    "lastTimestamp": _now(),
                    "count": 1,
                },
            )

    @staticmethod
    def _conditions(scheduled: bool, ready: bool) -> list[Obj]:
        def condition(type_: str, value: bool) -> Obj:
            return {"type": type_, "status": str(value), "lastTransitionTime": _now()}

        return [
            condition("PodScheduled", scheduled),
            condition("Initialized", scheduled),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ]

    def _start_pod(self, pod: PodProcess, obj: Obj) -> None:
        container = obj["spec"]["containers"][0]
        name, image = container["name"], container.get("image", "")
        base = {"hostIP": "127.0.0.1", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
        self._event(
            pod,
            "Scheduled",
            f"Successfully assigned {pod.namespace}/{pod.name} to {self.node_name}",
        )
        if image in self.failing_images:
            for reason in ("ErrImagePull", "ImagePullBackOff"):
                message = (
                    f'Back-off pulling image "{image}"'
                    if reason != "ErrImagePull"
                    else (f'Failed to pull image "{image}": not found')
                )
                self._status(
                    pod,
                    {
                        **base,
                        "phase": "Pending",
                        "conditions": self._conditions(True, False),
                        "containerStatuses": [
                            {
                                "name": name,
                                "image": image,
                                "imageID": "",
                                "ready": False,
                                "restartCount": 0,
                                "started": False,
                                "state": {"waiting": {"reason": reason, "message": message}},
                            }
                        ],
                    },
                )
                self._event(pod, "Failed", message, "Warning")
                time.sleep(0.2)
            return
        try:
            command = self._command(pod, obj, container) if self.run_processes else None
        except (ApiException, KeyError, ValueError) as error:
            message = f"Error: {error}"
            self._status(
                pod,
                {
                    **base,
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": name,
                            "image": image,
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "waiting": {
                                    "reason": "CreateContainerConfigError",
                                    "message": message,
                                }
                            },
                        }
                    ],
                },
            )
            self._event(pod, "Failed", message, "Warning")
            return
        started = _now()
        if command is not None:
            argv, env = command
            path = pod.directory / "log"
            log = path.open("wb")
            self.kube.container_logs[(pod.uid, name)] = path
            pod.process = subprocess.Popen(
                argv,
                env=env,
                cwd=pod.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            log.close()
        self._event(pod, "Pulled", f'Container image "{image}" already present on machine')
        self._event(pod, "Started", f"Started container {name}")
        running = {
            "name": name,
            "image": image,
            "imageID": f"fake://{image}",
            "ready": True,
            "restartCount": 0,
            "started": True,
            "state": {"running": {"startedAt": started}},
        }
        self._status(
            pod,
            {
                **base,
                "phase": "Running",
                "startTime": started,
                "conditions": self._conditions(True, True),
                "containerStatuses": [running],
            },
        )
        if pod.process is None:
            return
        code = pod.process.wait()
        if pod.deleted:
            return
        if pod.oom:
            reason, code = "OOMKilled", 137
        else:
            reason = "Completed" if code == 0 else "Error"
            if code < 0:
                code = 128 - code  # killed by a signal: 128 + its number
        ended: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": _now(),
        }
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            ended["message"] = _log_tail(pod.directory / "log")
        terminated = {
            **running,
            "ready": False,
            "started": False,
            "state": {"terminated": ended},
        }
        self._status(
            pod,
            {
                **base,
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": self._conditions(True, False),
                "containerStatuses": [terminated],
            },
        )
        if code != 0:
            self._event(
                pod,
                "BackOff" if reason == "Error" else reason,
                f"Container {name} ended: {reason} (exit code {code})",
                "Warning",
            )

    def _command(
        self, pod: PodProcess, obj: Obj, container: Obj
    ) -> tuple[list[str], dict[str, str]]:
        core = self._core()
        pod.directory.mkdir(parents=True, exist_ok=True)
        mounts: dict[str, str] = {}
        volumes = {v["name"]: v for v in obj["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            local = pod.directory / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                secret = core.read_namespaced_secret(volume["secret"]["secretName"], pod.namespace)
                for key, value in (secret.data or {}).items():
                    (local / key).write_bytes(base64.b64decode(value))
            mounts[mount["mountPath"]] = str(local)

        def rewrite(text: str) -> str:
            for path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
                text = text.replace(path, local)
            return text

        env = dict(os.environ)
        fields = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "metadata.uid": pod.uid,
            "status.podIP": pod.ip,
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": self.node_name,
        }
        for item in container.get("env") or []:
            source = item.get("valueFrom")
            if source is None:
                env[item["name"]] = rewrite(item.get("value", ""))
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = core.read_namespaced_secret(ref["name"], pod.namespace)
                env[item["name"]] = base64.b64decode((secret.data or {})[ref["key"]]).decode()
            elif "fieldRef" in source:
                env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
            else:
                raise ValueError(f"env {item['name']}: unsupported valueFrom {sorted(source)}")
        declared = {item["name"]: env[item["name"]] for item in container.get("env") or []}

        def expand(text: str) -> str:
            # As the kubelet: `$(VAR)` names a variable of the container's env; `$$` escapes.
            return re.sub(
                r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: "$" if m.group(0) == "$$" else declared.get(m.group(1), m.group(0)),
                text,
            )

        argv = [
            expand(rewrite(a))
            for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        if not argv:
            raise ValueError(
                f"container {container['name']} has no command (images have none here)"
            )
        return argv, env

    def _terminate(self, pod: PodProcess, grace: float, finish: bool) -> None:
        """Stop a deleted pod's process; `finish`: the pod is Terminating on the server, and
        this kubelet removes it (delete with grace 0) once the process is gone."""
        self._kill(pod, grace)
        if finish:
            with contextlib.suppress(ApiException):
                self._core().delete_namespaced_pod(pod.name, pod.namespace, grace_period_seconds=0)

    def _kill(self, pod: PodProcess, grace: float) -> None:
        process = pod.process
        if process is None or process.poll() is not None:
            return
        self._event(pod, "Killing", f"Stopping container (grace period {grace} s)")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
