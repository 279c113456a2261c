"""Test helpers for job-queue backend plugins: throwaway users and a Python they can run.

Owns `shared_tempdir`, `add_user` / `delete_user` (real accounts, root only), `job_python`
(this interpreter if other users can run it with Dask, else a venv built for them) and
`jobqueue_test_config` (a gateway config with short periods for a job-queue backend). The
Slurm and PBS plugins' tests use them; so can a third party's.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class JobTestSetupError(RuntimeError):
    """What a system test needs cannot be had here; the message says why (tests fail on it,
    they never skip)."""


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)


def shared_tempdir(prefix: str) -> Path:
    """A new directory in /tmp that every user can read and traverse (mode 0755)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    return base


def add_user(prefix: str, homes: Path) -> pwd.struct_passwd:
    """A new account ``<prefix><8 hex>`` with its home under ``homes``; needs root."""
    if os.geteuid() != 0:
        raise JobTestSetupError("these tests create user accounts, which needs root (CI is root)")
    name = f"{prefix}{secrets.token_hex(4)}"
    done = _run(
        ["useradd", "--create-home", "--home-dir", str(homes / name), "-s", "/bin/sh", name]
    )
    if done.returncode != 0:
        raise JobTestSetupError(f"useradd {name} failed: {done.stderr.strip()}")
    return pwd.getpwnam(name)


def delete_user(name: str) -> None:
    """Kill what ``name`` still runs and remove the account (cancel its jobs first)."""
    _run(["pkill", "-KILL", "-u", name])
    _run(["userdel", "--force", name])


IMPORT_CHECK = "import distributed, gateway_client, gateway_core"


def runs_as_others(python: str) -> subprocess.CompletedProcess[str]:
    """Run ``python`` as nobody, importing Dask and the gateway's packages, the way the
    gateway switches users (setuid in the child, not a helper program)."""
    try:
        return subprocess.run(
            [python, "-c", IMPORT_CHECK],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            user=65534,
            group=65534,
            extra_groups=[],
        )
    except OSError as exc:
        return subprocess.CompletedProcess([python], 126, "", str(exc))


def job_python(*, packages: Sequence[str], base: Path, source: Path) -> str:
    """A Python other users can run with Dask and ``packages``: this interpreter when they can
    (a system Python), else a venv built in ``base`` from /usr/bin/python3 with ``packages``
    installed from ``source`` (not editable: the checkout may be unreadable to them; a pyenv
    or uv-managed Python under /root is). Raises `JobTestSetupError` with the reason."""
    python = sys.executable
    probe = runs_as_others(python)
    if probe.returncode == 0:
        return python
    venv = base / "job-venv"
    python = str(venv / "bin" / "python")
    uv = shutil.which("uv")
    steps = (
        [
            [uv, "venv", "--quiet", "--python", "/usr/bin/python3", str(venv)],
            [uv, "pip", "install", "--quiet", "--python", python, *packages],
        ]
        if uv
        else [
            ["/usr/bin/python3", "-m", "venv", str(venv)],
            [python, "-m", "pip", "install", "--quiet", *packages],
        ]
    )
    for argv in steps:
        done = _run(argv, cwd=source, timeout=900)
        if done.returncode != 0:
            raise JobTestSetupError(
                f"building the jobs' venv failed: {' '.join(argv)}\n{done.stderr[-3000:]}"
            )
    _run(["chmod", "-R", "a+rX", str(venv)])
    probe = runs_as_others(python)
    if probe.returncode != 0:
        raise JobTestSetupError(
            f"other users cannot run {python} with Dask: {probe.stderr.strip()[-500:]}. Jobs "
            "and the launcher run as throwaway users, so their Python must be readable by them."
        )
    return python


def jobqueue_test_config(
    backend_name: str,
    *,
    python: str,
    backend: Mapping[str, Any] | None = None,
    cluster: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway config for a job-queue backend with short periods and small jobs; the
    launcher and the jobs run ``python`` (its environment goes first on the jobs' PATH)."""
    setup = f'export PATH="{os.path.dirname(python)}:$PATH"'
    return {
        "gateway": {"backend": backend_name},
        "backend": {
            backend_name: {
                "cluster_heartbeat_period": 1,
                "cluster_heartbeat_timeout": 30,
                "cluster_status_period": 1.0,
                "worker_status_period": 1.0,
                "cluster_start_timeout": 90,
                "worker_start_timeout": 90,
                "backoff_base_delay": 0.2,
                "backoff_max_delay": 2.0,
                "dask_gateway_jobqueue_launcher": [
                    python,
                    "-m",
                    "gateway_core.backends.jobqueue_launcher",
                ],
                **(backend or {}),
            }
        },
        "cluster": {
            "scheduler_setup": setup,
            "worker_setup": setup,
            "scheduler_memory": "1 G",
            "worker_memory": "768 M",
            **(cluster or {}),
        },
    }
