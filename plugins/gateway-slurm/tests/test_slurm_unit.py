"""Unit tests of the Slurm driver: the sbatch command line, squeue parsing, state mapping,
the config sections. No Slurm, no processes."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from gateway_core.backends.jobqueue import CommandResult, JobState
from gateway_core.config import ConfigError, structure
from gateway_core.models import Worker
from gateway_core.testing.units import unit_cluster, unit_driver
from gateway_slurm.backend import (
    STATES,
    SlurmClusterConfig,
    SlurmConfig,
    SlurmDriver,
    slurm_memory,
)
from gateway_slurm.hooks import gateway_register_backends

pytestmark = pytest.mark.unit


SPEC = gateway_register_backends()[0]


DEFAULTS = {"submit_command": "/usr/bin/sbatch", "cancel_command": "/usr/bin/scancel"}


def driver(**settings: Any) -> SlurmDriver:
    return unit_driver(SPEC, SlurmDriver, **{**DEFAULTS, **settings})


cluster = functools.partial(unit_cluster, SPEC)


def test_the_scheduler_job_asks_for_its_cores_and_memory_in_its_partition() -> None:
    d = driver(status_command="/usr/bin/squeue")
    c = cluster(
        partition="debug", account="physics", qos="short", scheduler_cores=2, scheduler_memory="3 G"
    )
    settings = d.cluster_config(c)
    sub = d.submission(c, settings, worker=None, staging_dir="/h/.dg/abc123", script="#!/bin/sh\n")
    assert sub.argv == [
        "/usr/bin/sbatch",
        "--parsable",
        "--job-name=dask-scheduler-abc123",
        "--partition=debug",
        "--account=physics",
        "--qos=short",
        "--chdir=/h/.dg/abc123",
        "--output=/h/.dg/abc123/dask-scheduler-abc123.log",
        "--cpus-per-task=2",
        "--mem=3072M",
        "--export=ALL",
    ]
    assert sub.stdin == "#!/bin/sh\n"


def test_a_worker_job_has_the_worker_settings_and_no_empty_options() -> None:
    d = driver()
    c = cluster(worker_cores=4, worker_memory="1500 MiB")
    w = Worker(name="abc123-w9", cluster_name="abc123")
    sub = d.submission(c, d.cluster_config(c), worker=w, staging_dir="/s/abc123", script="x")
    assert sub.argv == [
        "/usr/bin/sbatch",
        "--parsable",
        "--job-name=dask-worker-abc123-w9",
        "--chdir=/s/abc123",
        "--output=/s/abc123/dask-worker-abc123-w9.log",
        "--cpus-per-task=4",
        "--mem=1500M",
        "--export=ALL",
    ]


def test_a_worker_of_a_group_goes_to_the_groups_partition_with_its_resources() -> None:
    d = driver()
    c = cluster(
        partition="cpu",
        qos="normal",
        worker_cores=1,
        environment={"A": "1"},
        worker_groups={
            "gpu": {
                "worker_cores": 8,
                "worker_memory": "32 GiB",
                "environment": {"CUDA_MODULE": "12"},
                "backend": {"partition": "gpu", "worker_setup": "module load cuda"},
            }
        },
    )
    w = Worker(name="abc123-gpu-w9", cluster_name="abc123", group="gpu")
    settings = d.worker_config(c, w)
    sub = d.submission(c, settings, worker=w, staging_dir="/s/abc123", script="x")
    assert "--partition=gpu" in sub.argv and "--qos=normal" in sub.argv
    assert "--cpus-per-task=8" in sub.argv and "--mem=32768M" in sub.argv
    script = d.job_script(c, settings, worker=w, staging_dir="/s/abc123")
    assert "export A=1\n" in script and "export CUDA_MODULE=12\n" in script
    assert "module load cuda" in script
    assert "--nthreads 8 --memory-limit 34359738368" in script
    # The default group's workers keep the cluster's partition.
    plain = Worker(name="abc123-w1", cluster_name="abc123")
    default = d.submission(c, d.worker_config(c, plain), worker=plain, staging_dir="/s", script="")
    assert "--partition=cpu" in default.argv and "--cpus-per-task=1" in default.argv


def test_memory_is_given_in_whole_mebibytes_rounded_up() -> None:
    assert slurm_memory(2 * 2**30) == "2048M"
    assert slurm_memory(2**20 + 1) == "2M"
    assert slurm_memory(1) == "1M"


def test_one_squeue_asks_for_every_job_in_every_state() -> None:
    d = driver(status_command="/opt/slurm/bin/squeue")
    assert d.status_command_line(["11", "12", "13"]) == [
        "/opt/slurm/bin/squeue",
        "-h",
        "--states=all",
        "--jobs=11,12,13",
        "-o",
        "%i %t",
    ]
    assert d.cancel_command_line(["11", "12"]) == ["/usr/bin/scancel", "11", "12"]


def test_a_job_never_recorded_is_looked_up_by_its_name_among_the_users_live_jobs() -> None:
    d = driver(lookup_command="/opt/slurm/bin/squeue")
    c = cluster()
    assert d.job_name(c, None) == "dask-scheduler-abc123"
    assert d.lookup_command_line("dask-worker-abc123-w9", "alice") == [
        "/opt/slurm/bin/squeue",
        "--noheader",
        "--format=%i",
        "--name=dask-worker-abc123-w9",
        "--user=alice",
    ]
    # Oldest first, whatever order squeue prints them in (its default sorts by state).
    assert d.parse_job_lookup("105\n98\n\n1000\n") == ["98", "105", "1000"]
    assert d.parse_job_lookup("") == []
    with pytest.raises(ValueError, match="expected one job id per line, got 'JOBID'"):
        d.parse_job_lookup("JOBID\n105\n")


def test_squeue_output_is_parsed_and_states_mapped() -> None:
    d = driver()
    assert d.parse_job_states("11 PD\n12 R\n\n13 CA\n14 OOM\n") == {
        "11": "PD",
        "12": "R",
        "13": "CA",
        "14": "OOM",
    }
    with pytest.raises(ValueError, match="unexpected line"):
        d.parse_job_states("11 PD extra\n")
    for code in ("PD", "CF"):
        assert d.job_state(code) == JobState.PENDING
    for code in ("R", "CG"):
        assert d.job_state(code) == JobState.RUNNING
    for code in ("CD", "F", "CA", "TO", "NF", "PR", "OOM", "BF", "DL"):
        assert d.job_state(code) == JobState.FINISHED, code
        assert not d.job_state(code).alive
    assert d.job_state("XX").alive  # unknown: left to the heartbeat timeout
    assert d.describe_state("TO") == "TO: timed out"
    assert set(STATES) >= {"PD", "R", "CG", "CD", "CA", "F"}


def test_sbatch_parsable_output_gives_the_job_id() -> None:
    d = driver()
    assert d.parse_job_id("4242\n") == "4242"
    assert d.parse_job_id("4242;cluster-a\n") == "4242"
    with pytest.raises(ValueError):
        d.parse_job_id("sbatch: error: Batch job submission failed\n")
    with pytest.raises(ValueError):
        d.parse_job_id("")


def test_forgotten_jobs_are_gone_not_a_failed_check() -> None:
    d = driver()
    forgotten = CommandResult(
        returncode=1, stdout="", stderr="slurm_load_jobs error: Invalid job id specified\n"
    )
    down = CommandResult(
        returncode=1,
        stdout="",
        stderr="slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
    )
    assert d.status_error_means_gone(forgotten, ["9"])
    assert not d.status_error_means_gone(down, ["9"])
    assert d.cancel_succeeded(forgotten)
    assert not d.cancel_succeeded(
        CommandResult(returncode=1, stdout="", stderr="scancel: error: Access/permission denied")
    )


def test_the_config_sections_take_the_seed_names() -> None:
    section = structure(
        {
            "submit_command": "/opt/slurm/bin/sbatch",
            "status_command": "squeue",
            "cancel_command": "scancel",
            "dask_gateway_jobqueue_launcher": "/opt/gw/bin/gateway-jobqueue-launcher",
            "cluster_status_period": 10,
            "switch_user": "sudo",
        },
        SlurmConfig,
    )
    assert list(section.dask_gateway_jobqueue_launcher) == ["/opt/gw/bin/gateway-jobqueue-launcher"]
    c = structure(
        {"partition": "gpu", "qos": "q", "account": "a", "worker_setup": "module load x"},
        SlurmClusterConfig,
    )
    assert (c.partition, c.qos, c.account, c.staging_directory) == (
        "gpu",
        "q",
        "a",
        "{home}/.dask-gateway/",
    )
    with pytest.raises(ConfigError) as info:
        structure({"partition": 3, "queue": "x"}, SlurmClusterConfig)
    assert sorted(info.value.problems) == ["partition: expected str, got int", "queue: unknown key"]


def test_the_plugin_registers_the_slurm_backend(gateway_plugin_manager: Any) -> None:
    specs = [s for batch in gateway_plugin_manager.hook.gateway_register_backends() for s in batch]
    [spec] = [s for s in specs if s.name == "slurm"]
    assert spec.driver is SlurmDriver
    assert spec.config is SlurmConfig
    assert spec.cluster_config is SlurmClusterConfig
