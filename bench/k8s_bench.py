"""Benchmark of our Kubernetes controller side by side with the original's, on the fake API server.
Owns the run: the fake and its kubelet, the controller processes, bench/results/k8s.{md,json}.
"""

# Per system, in one run, on a fresh fake API server (plugins/gateway-k8s/tests/kube_fake, in a
# thread of this process) with its simulated kubelet marking pods Running without starting
# anything (`run_processes=False`):
#
# - ``ours``: ``gateway k8s controller`` (its own process; leader election on, as deployed;
#   ``--address-mode pod``), DaskClusters of our CRD (``daskclusters.daskgateway.dev``) made by
#   ``gateway_k8s.objects.cluster_resource`` with ``spec.worker.replicas`` set;
# - ``original``: ``dask-gateway-server kube-controller`` (PyPI, unmodified, from its own venv:
#   ``--original-venv``, made with pip when missing), DaskClusters of its CRD
#   (``daskclusters.gateway.dask.org``) made by its own ``KubeBackend.make_cluster_object``
#   (bench/k8s_original_objects.py, run with that venv's Python) with ``spec.replicas`` set. The
#   fake also serves the Traefik CRDs it writes routes to (``ingressroutes.traefik.io``,
#   ``ingressroutetcps.traefik.io``), as its Helm chart installs them.
#
# Both controllers keep their defaults, among them the same client rate limit (50 requests/s,
# burst 100). Once the controller has opened its watches, ``--clusters`` DaskClusters with
# ``--workers`` workers each are POSTed at once (8 threads). Measured until every cluster is
# Running (its DaskCluster's ``status.phase`` is Running, its scheduler pod and ``--workers``
# worker pods are Running, as the fake's store holds them): the time from the first create; the
# controller's requests, counted at the fake by verb (its User-Agent: the kubelet and this
# script use their own); the controller process's CPU seconds (user + system, psutil). Then
# ``--idle`` more seconds: the requests it makes once everything runs.
# Run ``python bench/k8s_bench.py --help``.

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "plugins" / "gateway-k8s" / "tests"))

from kube_fake import FakeKube  # noqa: E402
from kube_fake.kubelet import USER_AGENT as KUBELET_AGENT  # noqa: E402
from kube_fake.kubelet import Kubelet  # noqa: E402

from gateway_k8s import crd, objects  # noqa: E402
from gateway_k8s.config import KubeClusterConfig  # noqa: E402

NAMESPACE = "bench"
BENCH_AGENT = "k8s-bench"
ORIGINAL_VERSION = "2026.3.0"
ORIGINAL_INSTANCE = "bench-original"
IMAGE = "ghcr.io/example/dask:bench"
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
SYSTEMS = {
    "ours": "ours (`gateway k8s controller`)",
    "original": f"original (`dask-gateway-server kube-controller` {ORIGINAL_VERSION})",
}
DISTRIBUTIONS = ("gateway-k8s", "kubernetes", "aiohttp")


def _crd(group: str, kind: str, plural: str, *, status: bool) -> dict[str, Any]:
    """A CRD whose schema keeps every field (as the original's and Traefik's charts do)."""
    version: dict[str, Any] = {
        "name": "v1alpha1",
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        },
    }
    if status:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural},
            "scope": "Namespaced",
            "versions": [version],
        },
    }


ORIGINAL_CRDS = [
    _crd("gateway.dask.org", "DaskCluster", "daskclusters", status=True),
    _crd("traefik.io", "IngressRoute", "ingressroutes", status=False),
    _crd("traefik.io", "IngressRouteTCP", "ingressroutetcps", status=False),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_original_venv(venv: Path) -> Path:
    """The original's venv (made with pip when it lacks the package); its Python."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import dask_gateway_server.backends.kubernetes.controller"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"making {venv} with dask-gateway-server[kubernetes]=={ORIGINAL_VERSION}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            f"dask-gateway-server[kubernetes]=={ORIGINAL_VERSION}",
        ],
        check=True,
    )
    subprocess.run(check, check=True)
    return python


def our_clusters(count: int, workers: int) -> list[dict[str, Any]]:
    config = KubeClusterConfig(image=IMAGE)
    made = []
    for _ in range(count):
        obj = objects.cluster_resource(
            name=uuid.uuid4().hex,
            namespace=NAMESPACE,
            username="bench-user",
            config=config,
            env={},
            options_json="{}",
            config_json="{}",
        )
        obj["spec"]["worker"]["replicas"] = workers
        made.append(obj)
    return made


def original_clusters(python: Path, count: int, workers: int) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(python),
            str(HERE / "k8s_original_objects.py"),
            str(count),
            NAMESPACE,
            ORIGINAL_INSTANCE,
            IMAGE,
            str(workers),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    made: list[dict[str, Any]] = json.loads(out)
    return made


class Shape:
    """How a system's objects look: the DaskCluster kind, and the labels of its pods."""

    def __init__(self, system: str) -> None:
        if system == "ours":
            self.cluster_kind = f"{crd.GROUP}/{crd.PLURAL}"
            self.group, self.version, self.plural = crd.GROUP, crd.VERSION, crd.PLURAL
            self.cluster_label, self.component_label = (
                objects.LABEL_CLUSTER,
                objects.LABEL_COMPONENT,
            )
            self.scheduler, self.worker = "scheduler", "worker"
        else:
            self.cluster_kind = "gateway.dask.org/daskclusters"
            self.group, self.version, self.plural = "gateway.dask.org", "v1alpha1", "daskclusters"
            self.cluster_label = "gateway.dask.org/cluster"
            self.component_label = "app.kubernetes.io/component"
            self.scheduler, self.worker = "dask-scheduler", "dask-worker"


def progress(kube: FakeKube, shape: Shape, names: set[str], workers: int) -> set[str]:
    """The clusters (of ``names``) that are Running: phase, scheduler pod, ``workers`` workers."""
    store = kube.store
    with store.lock:
        phases = {
            name: (obj.get("status") or {}).get("phase")
            for (kind, ns, name), obj in store.objects.items()
            if kind == shape.cluster_kind and ns == NAMESPACE and name in names
        }
        schedulers: set[str] = set()
        running_workers: collections.Counter[str] = collections.Counter()
        for (kind, _, _), pod in store.objects.items():
            if kind != "/pods":
                continue
            meta, status = pod["metadata"], pod.get("status") or {}
            if status.get("phase") != "Running" or meta.get("deletionTimestamp"):
                continue
            labels = meta.get("labels") or {}
            cluster = labels.get(shape.cluster_label)
            if labels.get(shape.component_label) == shape.scheduler:
                schedulers.add(cluster or "")
            elif labels.get(shape.component_label) == shape.worker:
                running_workers[cluster or ""] += 1
    return {
        name
        for name, phase in phases.items()
        if phase == "Running" and name in schedulers and running_workers[name] >= workers
    }


def controller_counts(kube: FakeKube) -> dict[tuple[str, str], int]:
    """The controller's requests so far by (verb, resource): every agent but ours."""
    counts: dict[tuple[str, str], int] = collections.defaultdict(int)
    for (agent, verb, resource), n in kube.request_counts().items():
        if agent not in (KUBELET_AGENT, BENCH_AGENT):
            counts[(verb, resource)] += n
    return dict(counts)


def agents(kube: FakeKube) -> set[str]:
    return {a for (a, _, _) in kube.request_counts()} - {KUBELET_AGENT, BENCH_AGENT}


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def start_controller(
    system: str,
    limits: str,
    kube: FakeKube,
    workdir: Path,
    original_python: Path,
    log: Path,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "KUBE"))}
    if system == "ours":
        argv = [
            str(BIN / "gateway"),
            "k8s",
            "controller",
            "--server",
            kube.url,
            "--namespace",
            NAMESPACE,
            "--address-mode",
            "pod",
            "--log-level",
            "WARNING",
        ]
        if limits == "off":
            argv += ["--api-qps", "0"]  # 0: no limit
    else:
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
                    "users": [{"name": "anonymous", "user": {}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "anonymous"}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        config = workdir / "original_config.py"
        config.write_text(
            f"c.KubeController.address = '127.0.0.1:{free_port()}'\n"
            f"c.KubeController.gateway_instance = '{ORIGINAL_INSTANCE}'\n"
            "c.KubeController.api_url = 'http://127.0.0.1:9/api'\n"
            "c.KubeController.log_level = 'WARN'\n"
        )
        if limits == "off":  # its token bucket has no "off": one nothing reaches
            with config.open("a") as f:
                f.write(
                    "c.KubeController.k8s_api_rate_limit = 1000000\n"
                    "c.KubeController.k8s_api_rate_limit_burst = 1000000\n"
                )
        env["KUBECONFIG"] = str(kubeconfig)
        argv = [
            str(original_python.parent / "dask-gateway-server"),
            "kube-controller",
            "-f",
            str(config),
        ]
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def run_system(
    system: str, limits: str, args: argparse.Namespace, original_python: Path, workdir: Path
) -> dict[str, Any]:
    shape = Shape(system)
    if system == "ours":
        bodies = our_clusters(args.clusters, args.workers)
        informers = 4  # DaskClusters, pods, Services, Secrets
    else:
        bodies = original_clusters(original_python, args.clusters, args.workers)
        informers = 3  # DaskClusters, pods, Endpoints
    names = {b["metadata"]["name"] for b in bodies}
    kube = FakeKube(crds=[crd.crd(), *ORIGINAL_CRDS], history_seconds=3600.0)
    log = workdir / f"{system}-{limits}-controller.log"
    result: dict[str, Any] = {"system": system, "limits": limits, "label": SYSTEMS[system]}
    with kube.running(), Kubelet(kube=kube, workdir=workdir, run_processes=False).running():
        proc = start_controller(system, limits, kube, workdir, original_python, log)
        try:
            process = psutil.Process(proc.pid)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                counts = controller_counts(kube)
                watches = sum(n for (verb, _), n in counts.items() if verb == "watch")
                lease = any(k[0] == "coordination.k8s.io/leases" for k in list(kube.store.objects))
                if watches >= informers and (system != "ours" or lease):
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{system}: the controller exited:\n{tail(log)}")
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{system}: the controller did not start:\n{tail(log)}")
            time.sleep(1.0)  # its informers are synced; the first watch answers are in
            before = controller_counts(kube)
            cpu_before = cpu_seconds(process)
            fake_before = cpu_seconds(psutil.Process())
            loads = [os.getloadavg()[0]]
            client = kube.api_client()
            client.user_agent = BENCH_AGENT
            custom = kubernetes.client.CustomObjectsApi(client)

            def create(body: dict[str, Any]) -> None:
                custom.create_namespaced_custom_object(
                    shape.group, shape.version, NAMESPACE, shape.plural, body
                )

            start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(create, bodies))
            created = time.monotonic() - start
            done_at: dict[str, float] = {}
            deadline = start + args.timeout
            while len(done_at) < len(names) and time.monotonic() < deadline:
                now = time.monotonic() - start
                for name in progress(kube, shape, names, args.workers) - set(done_at):
                    done_at[name] = now
                if proc.poll() is not None:
                    raise RuntimeError(f"{system}: the controller exited:\n{tail(log)}")
                time.sleep(0.1)
            elapsed = time.monotonic() - start
            loads.append(os.getloadavg()[0])
            cpu_run = cpu_seconds(process) - cpu_before
            fake_run = cpu_seconds(psutil.Process()) - fake_before
            during = controller_counts(kube)
            time.sleep(args.idle)
            after = controller_counts(kube)
            cpu_idle = cpu_seconds(process) - cpu_before - cpu_run
            client.close()
            seen_agents = agents(kube)
        finally:
            stop_process(proc)
    finished = sorted(done_at.values())
    delta = {k: during.get(k, 0) - before.get(k, 0) for k in during}
    idle = {k: after.get(k, 0) - during.get(k, 0) for k in after}
    settled = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    by_verb: dict[str, int] = collections.defaultdict(int)
    for (verb, _), n in settled.items():
        by_verb[verb] += n
    result.update(
        agents=sorted(seen_agents),
        clusters=len(names),
        running=len(done_at),
        complete=len(done_at) == len(names),
        creates_s=round(created, 2),
        all_running_s=round(finished[-1], 2) if len(done_at) == len(names) else None,
        waited_s=round(elapsed, 2),
        p50_running_s=round(finished[len(finished) // 2], 2) if finished else None,
        requests=sum(delta.values()),
        settled_requests=sum(settled.values()),
        settled_requests_by_verb=dict(by_verb),
        requests_by_resource={f"{v} {r}": n for (v, r), n in sorted(delta.items()) if n},
        cpu_s=round(cpu_run, 2),
        fake_cpu_s=round(fake_run, 2),
        idle_s=args.idle,
        idle_requests=sum(idle.values()),
        idle_requests_by_resource={f"{v} {r}": n for (v, r), n in sorted(idle.items()) if n},
        idle_cpu_s=round(cpu_idle, 2),
        loadavg_1min=loads,
    )
    return result


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def ratio(ours: float | None, original: float | None) -> float | None:
    if ours is None or original is None or original == 0:
        return None
    return ours / original


LIMITS = {
    "default": "the same client rate limit, 50 requests/s, burst 100 (both defaults)",
    "off": "no client rate limit (ours `--api-qps 0`; the original's token bucket set to "
    "1,000,000/s)",
}


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    rows = {(r["system"], r["limits"]): r for r in report["systems"]}
    v = m["versions"]
    loads = [x for r in report["systems"] for x in r["loadavg_1min"]]
    n, idle = s["clusters"], s["idle"]
    out = [
        "# Kubernetes controller benchmark: ours and the original's, on the fake API server",
        "",
        f"`python bench/k8s_bench.py` — {m['date']}; {m['nproc']} CPUs ({m['cpu']}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}; Python {m['python']}; gateway-k8s "
        f"{v.get('gateway-k8s')}, kubernetes {v.get('kubernetes')}; dask-gateway-server "
        f"{ORIGINAL_VERSION} (kubernetes_asyncio) from its own venv. Whole run "
        f"{report['took_s']:.0f} s; 1-minute load average {min(loads):.1f}-{max(loads):.1f} at "
        "the start and end of each measurement (the machine is shared with other work: the "
        "ratios of the same run are what counts).",
        "",
        f"{n} DaskClusters with {s['workers']} workers each, created at once (POSTed by 8 "
        "threads) once the controller had opened its watches, on the fake API server "
        "(plugins/gateway-k8s/tests/kube_fake, in the benchmark's process) with its simulated "
        "kubelet marking pods Running without starting anything. Running: the DaskCluster's "
        f"`status.phase` is Running and its scheduler pod and {s['workers']} worker pods are "
        "Running, as the fake's store holds them. Requests are the controller's, counted at the "
        "fake by verb (the kubelet's and the benchmark's own are left out; watches are the "
        "long-lived requests its informers open), until all are Running and until settled: "
        f"{idle:.0f} s later, with what it still writes once everything runs (ours: the last "
        "worker counts in the status) and its Lease renewals. CPU is the controller process's "
        "(user + system) until all are Running. Each controller is a process of its own, "
        "alone on a fresh fake.",
        "",
        "| system | client rate limit | all Running (s) | half Running (s) | requests / cluster "
        "until all Running | requests / cluster settled | get | list | watch | create | update "
        "| patch | delete | controller CPU (s) | CPU / cluster (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for limits in LIMITS:
        for system in SYSTEMS:
            r = rows.get((system, limits))
            if r is None:
                continue
            verbs = r["settled_requests_by_verb"]
            total = (
                f"{r['all_running_s']:.1f}"
                if r["complete"]
                else f"not all within {r['waited_s']:.0f} ({r['running']}/{r['clusters']})"
            )
            out.append(
                f"| {r['label']} | {limits} | {total} | {r['p50_running_s']} | "
                f"{r['requests'] / n:.2f} | {r['settled_requests'] / n:.2f} | "
                + " | ".join(f"{verbs.get(verb, 0) / n:.2f}" for verb in VERBS)
                + f" | {r['cpu_s']:.1f} | {1000 * r['cpu_s'] / n:.0f} |"
            )
    out += ["", "Rate limits: " + "; ".join(f"{k}: {t}" for k, t in LIMITS.items()) + "."]
    goals: list[str] = []
    for limits in LIMITS:
        ours, original = rows.get(("ours", limits)), rows.get(("original", limits))
        if not (ours and original):
            continue
        req = ratio(ours["settled_requests"], original["settled_requests"])
        tim = ratio(ours["all_running_s"], original["all_running_s"])
        cpu = ratio(ours["cpu_s"], original["cpu_s"])
        out += ["", f"## Ratios, rate limit {limits} (ours / original, same run)", ""]
        for what, value in (
            ("requests per cluster (settled)", req),
            ("time until all Running", tim),
            ("controller CPU until all Running", cpu),
        ):
            out.append(f"- {what}: " + (f"{value:.2f}" if value is not None else "n/a"))
        for what, value in (("requests per cluster", req), ("time until all Running", tim)):
            met = value is not None and value <= 0.5
            shown = f"{value:.2f}x the original's" if value is not None else "not measured"
            goals.append(
                f"- ours at most half the original's {what} (rate limit {limits}): "
                f"**{'met' if met else 'NOT met'}** ({shown})"
            )
    if goals:
        out += ["", "## Goals of issue 12", "", *goals]
    out += ["", "## Requests by verb and resource (all clusters, until all Running)", ""]
    for limits in LIMITS:
        for system in SYSTEMS:
            r = rows.get((system, limits))
            if r is None:
                continue
            out += [f"{r['label']}, rate limit {limits}:", ""]
            out += [f"- `{key}`: {count}" for key, count in r["requests_by_resource"].items()]
            if r["idle_requests_by_resource"]:
                more = ", ".join(
                    f"`{key}` {count}" for key, count in r["idle_requests_by_resource"].items()
                )
                out.append(f"- then, until settled: {more}")
            out.append("")
    out += ["", "## What bounds these numbers", "", *bounds(report)]
    return "\n".join(out).rstrip() + "\n"


def bounds(report: dict[str, Any]) -> list[str]:
    """The floors of the requests per cluster, and each run's request rate."""
    w, n = report["settings"]["workers"], report["settings"]["clusters"]
    ours_floor, original_floor = w + 4, w + 5
    lines = [
        f"Every worker is a pod of its own, so each cluster costs at least {w} pod creates on "
        f"either side. Ours also creates the scheduler pod, its Service and the credentials "
        f"Secret, and writes the status at least once: {ours_floor} requests per cluster at "
        "best. The original creates the scheduler pod, a Service, the credentials Secret and "
        f"two Traefik routes, then writes its status: {original_floor} creates per cluster "
        "plus its status patches.",
    ]
    for r in report["systems"]:
        if r["system"] == "original" and r["limits"] == "default":
            half = r["settled_requests"] / n / 2
            verdict = (
                "below our floor: no controller that makes one pod per worker can meet the "
                "requests goal against it; what there is to cut is status writes"
                if half < ours_floor
                else "above our floor"
            )
            lines[-1] += (
                f" Here the original made {2 * half:.2f} per cluster (settled, default rate "
                f"limit): half is {half:.2f}, {verdict}."
            )
    lines += [
        "",
    ]
    for r in report["systems"]:
        if r["complete"] and r["all_running_s"]:
            rate = r["requests"] / r["all_running_s"]
            lines.append(
                f"- {r['label']}, rate limit {r['limits']}: {r['requests']} requests in "
                f"{r['all_running_s']:.1f} s ({rate:.0f}/s), {r['cpu_s']:.1f} s of CPU "
                f"({100 * r['cpu_s'] / r['all_running_s']:.0f}% of one core; the fake and its "
                f"kubelet {r['fake_cpu_s']:.1f} s, "
                f"{100 * r['fake_cpu_s'] / r['all_running_s']:.0f}%); "
                f"{r['requests'] / n:.2f} per cluster against a floor of "
                f"{ours_floor if r['system'] == 'ours' else original_floor}"
            )
    lines += [
        "",
        "At the default 50 requests/s a controller that makes N requests needs about "
        "(N - 100) / 50 s whatever else it does, so the time follows the requests; the "
        "unlimited rows show how fast each goes when only its own work and the fake bound it "
        "(the fake is Python under one GIL, serving the kubelet's four requests per pod on top "
        "of the controller's: its CPU share is in the lines above).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=180.0, help="per system, seconds")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds counted after")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument(
        "--limits", nargs="+", choices=sorted(LIMITS), default=list(LIMITS), help="rate limits"
    )
    parser.add_argument("--original-venv", type=Path, default=Path("/tmp/orig-k8s-venv"))
    parser.add_argument("--output", type=Path, default=RESULTS / "k8s.md")
    parser.add_argument(
        "--render", type=Path, default=None, help="only write the table of this JSON report"
    )
    args = parser.parse_args()
    if args.render is not None:
        args.output.write_text(render(json.loads(args.render.read_text())))
        return
    began = time.monotonic()
    original_python = (
        ensure_original_venv(args.original_venv) if "original" in args.systems else Path()
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="k8s-bench-") as tmp:
        for limits in args.limits:
            for system in args.systems:
                workdir = Path(tmp) / f"{system}-{limits}"
                workdir.mkdir()
                print(
                    f"{system}, rate limit {limits}: {args.clusters} clusters x "
                    f"{args.workers} workers",
                    flush=True,
                )
                result = run_system(system, limits, args, original_python, workdir)
                print(json.dumps(result, indent=1), flush=True)
                results.append(result)
    report = {
        "machine": machine(),
        "settings": {"clusters": args.clusters, "workers": args.workers, "idle": args.idle},
        "systems": results,
        "took_s": time.monotonic() - began,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.output.write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
