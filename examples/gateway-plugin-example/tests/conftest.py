"""The ``command-template`` backend for `gateway_core.testing`'s scenario suite: the
``gateway_backend_setup`` fixture `test_scenarios.py` runs.

The templates here run real Dask (``dask scheduler`` with the gateway's agent preload, ``dask
worker``), over TLS with the cluster's certificate, on loopback. Processes run as the gateway's
own account, so the scenarios about accounts and status commands do not apply; they are
declared below with the reason.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway_core.backends.kit import ProcessRef
from gateway_core.testing.scenarios import BackendSetup, LiveJob

if TYPE_CHECKING:
    from gateway_core.models import Cluster, Worker

DASK = os.path.join(os.path.dirname(sys.executable), "dask")
"""The ``dask`` command of this interpreter's environment (found without activating it)."""
TLS = ["--tls-ca-file", "{tls_cert}", "--tls-cert", "{tls_cert}", "--tls-key", "{tls_key}"]
MISSING = "no-such-program-for-the-gateway"


def dask_config(clusters_directory: Path) -> dict[str, object]:
    """A gateway config whose command templates run real Dask schedulers and workers."""
    return {
        "gateway": {"backend": "command-template"},
        "backend": {
            "command-template": {
                "clusters_directory": str(clusters_directory),
                "scheduler_template": [
                    "{cmd}",
                    "--protocol",
                    "tls",
                    "--port",
                    "0",
                    "--host",
                    "127.0.0.1",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--preload",
                    "gateway_client.agent",
                    "--dg-api-address",
                    "127.0.0.1:0",
                    "--dg-heartbeat-period",
                    "{heartbeat_period}",
                    *TLS,
                ],
                "worker_template": [
                    "{cmd}",
                    "{scheduler_address}",
                    "--name",
                    "{worker_name}",
                    "--nthreads",
                    "{threads}",
                    "--memory-limit",
                    "{memory}",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    *TLS,
                ],
                "stop_timeout": 5.0,
                "cluster_heartbeat_period": 1,
                "cluster_heartbeat_timeout": 30,
                "cluster_status_period": 1.0,
                "worker_status_period": 1.0,
                "cluster_start_timeout": 60,
                "worker_start_timeout": 60,
                "backoff_base_delay": 0.2,
                "backoff_max_delay": 2.0,
            }
        },
        "cluster": {
            "scheduler_cmd": [DASK, "scheduler"],
            "worker_cmd": [DASK, "worker"],
            "scheduler_memory": "1 G",
            "worker_memory": "768 M",
        },
    }


def live_processes(cluster: Cluster) -> dict[str, LiveJob]:
    """The cluster's scheduler and worker processes that still run, by pid, with the account
    each runs as. A process that exited but is not reaped yet (a zombie) has ended: it is not
    listed (`ProcessRef.running`, as the driver's own checks see it)."""
    live = {}
    records = [(cluster.state, None)] + [(w.state, w.name) for w in cluster.workers.values()]
    for state, worker in records:
        ref = ProcessRef.from_state(state)
        if ref is None or not ref.running():
            continue
        try:
            uid = os.stat(f"/proc/{ref.pid}").st_uid
        except FileNotFoundError:
            continue
        live[str(ref.pid)] = LiveJob(owner=pwd.getpwuid(uid).pw_name, running=True, worker=worker)
    return live


def kill(cluster: Cluster, worker: Worker | None) -> None:
    """Kill a scheduler's or worker's process group, as someone on the host could."""
    os.killpg(int((worker or cluster).state["pid"]), signal.SIGKILL)


@pytest.fixture
def gateway_backend_setup(tmp_path: Path) -> BackendSetup:
    """The command-template backend for the scenario suite, running real Dask."""
    return BackendSetup(
        backend="command-template",
        config=dask_config(tmp_path / "clusters"),
        not_applicable={
            "unknown_user": "processes run as the gateway's own account; any user name works",
            "status_command_fails_once": "no status command: the driver checks its processes "
            "itself (signal 0 to each pid)",
            "one_status_command_per_check": "no status command: the driver checks its "
            "processes itself (signal 0 to each pid)",
        },
        live_jobs=live_processes,
        end_job=kill,
        cluster_files=lambda cluster: (
            [Path(cluster.state["directory"])] if cluster.state.get("directory") else []
        ),
        refused_option={"scheduler_cmd": [MISSING]},
        refused_reason=[f"'{MISSING}'", "not found|No such file"],
        dying_scheduler=lambda script: {"scheduler_cmd": ["/bin/sh", "-c", script]},
        dead_scheduler_reason=[r"The scheduler process exited( with status 3)?\. Its last output:"],
        ended_reason=lambda cluster: [
            "The scheduler process (exited|was killed by signal 9)",
        ],
    )
