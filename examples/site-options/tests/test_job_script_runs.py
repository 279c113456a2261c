"""The rendered Slurm job script, run by ``/bin/sh`` as Slurm would run it, with stand-ins for
conda's profile script and for pixi: the worker starts with the user's env and environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import site_policy

from gateway_core.config import load_config, structure, unstructure
from gateway_core.context import GatewayContext
from gateway_core.models import Cluster, User, Worker
from gateway_slurm.backend import SlurmClusterConfig, SlurmConfig, SlurmDriver

pytestmark = pytest.mark.integration

SHOW_ENV = "import json, os, sys; print(json.dumps({'env': dict(os.environ), 'argv': sys.argv}))"
"""The "worker" the scripts start: prints what it was started with."""

CONDA_SH = """\
conda() {
    if [ "$1" = activate ] && [ "$2" = analysis ]; then
        export SITE_TEST_CONDA_ENV="$2"
    else
        echo "EnvironmentNameNotFound: $2" >&2
        return 1
    fi
}
"""

FAKE_PIXI = """\
#!/bin/sh
printf "export SITE_TEST_PIXI_ARGS='%s'\\n" "$*"
"""


def run_worker_job(tmp_path: Path, **user_options: Any) -> subprocess.CompletedProcess[str]:
    """Resolve ``user_options`` over a site ``[cluster]``, render a worker's job script with
    the Slurm driver and run it with ``sh`` (fake conda under $CONDA_ROOT, fake pixi on PATH)."""
    table = {"worker_cmd": [sys.executable, "-c", SHOW_ENV], "environment": {"SITE_VAR": "s"}}
    normalized = site_policy.site_options().validate(user_options)
    overrides = site_policy.gateway_apply_options(
        user=User(name="alice"),
        options=normalized,
        config=structure(table, SlurmClusterConfig),
    )
    settings = structure({**table, **overrides}, SlurmClusterConfig)
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    context.api_url = "http://127.0.0.1:8000/api"
    driver = SlurmDriver(
        config=SlurmConfig(submit_command="/usr/bin/sbatch", inherited_environment=[]),
        context=context,
        cluster_config_class=SlurmClusterConfig,
    )
    cluster = Cluster(
        name="abc123",
        username="alice",
        token="tok",
        config=unstructure(settings),
        tls_cert=b"C",
        tls_key=b"K",
        scheduler_address="tls://10.1.1.1:4000",
    )
    worker = Worker(name="abc123-w1", cluster_name="abc123")
    script = driver.job_script(cluster, settings, worker=worker, staging_dir=str(tmp_path))
    conda_root = tmp_path / "conda"
    (conda_root / "etc" / "profile.d").mkdir(parents=True)
    (conda_root / "etc" / "profile.d" / "conda.sh").write_text(CONDA_SH)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pixi").write_text(FAKE_PIXI)
    (bin_dir / "pixi").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "CONDA_ROOT": str(conda_root)}
    return subprocess.run(
        ["/bin/sh", "-s"],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def started_with(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def test_a_conda_worker_starts_activated_with_the_users_env(tmp_path: Path) -> None:
    shown = started_with(
        run_worker_job(
            tmp_path,
            worker_memory=4,
            env={"MY_VAR": "1", "QUOTED": "a 'b' $c"},
            conda_env="analysis",
        )
    )
    assert shown["env"]["SITE_TEST_CONDA_ENV"] == "analysis"
    assert shown["env"]["MY_VAR"] == "1"
    assert shown["env"]["QUOTED"] == "a 'b' $c"
    assert shown["env"]["SITE_VAR"] == "s"
    assert shown["argv"][1:3] == ["tls://10.1.1.1:4000", "--dashboard-address"]
    assert shown["argv"][-2:] == ["--memory-limit", str(4 * 2**30)]


def test_a_missing_conda_env_ends_the_job_before_the_worker_starts(tmp_path: Path) -> None:
    result = run_worker_job(tmp_path, conda_env="missing")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "EnvironmentNameNotFound: missing" in result.stderr
    assert "site_policy: cannot activate conda environment missing" in result.stderr


def test_a_pixi_worker_starts_inside_the_shell_hook_of_its_project(tmp_path: Path) -> None:
    shown = started_with(
        run_worker_job(tmp_path, env={"MY_VAR": "2"}, pixi_project="/depot/ana", pixi_env="gpu")
    )
    assert shown["env"]["SITE_TEST_PIXI_ARGS"] == (
        "shell-hook --shell bash --manifest-path /depot/ana -e gpu"
    )
    assert shown["env"]["MY_VAR"] == "2"
