"""Unit tests of the PBS driver: the qsub command line, resource lists, qsub's and qstat's
output, the state mapping, qstat/qdel errors, the config sections. No PBS, no processes."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from gateway_core.backends.jobqueue import CommandResult, JobState
from gateway_core.config import ConfigError
from gateway_core.models import Worker
from gateway_core.testing.units import unit_cluster, unit_driver
from gateway_pbs.backend import (
    STATES,
    PBSClusterConfig,
    PBSConfig,
    PBSDriver,
    pbs_memory,
    resource_list,
)
from gateway_pbs.hooks import gateway_register_backends

pytestmark = pytest.mark.unit

QSTAT = """\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
17.pbs01          dask-scheduler-* alice             00:00:12 R workq
18.pbs01          dask-worker-abc* alice             00:00:00 Q workq
19.pbs01          dask-worker-abc* alice             00:01:02 F debug
"""


SPEC = gateway_register_backends()[0]


DEFAULTS = {
    "submit_command": "/opt/pbs/bin/qsub",
    "cancel_command": "/opt/pbs/bin/qdel",
    "status_command": "/opt/pbs/bin/qstat",
    "gateway_hostname": "gw01",
}


def driver(**settings: Any) -> PBSDriver:
    return unit_driver(SPEC, PBSDriver, **{**DEFAULTS, **settings})


cluster = functools.partial(unit_cluster, SPEC)


def test_the_scheduler_job_stages_in_the_staging_directory_and_asks_for_its_resources() -> None:
    d = driver()
    c = cluster(
        queue="dask", account="physics", project="p42", scheduler_cores=2, scheduler_memory="3 G"
    )
    sub = d.submission(c, d.cluster_config(c), worker=None, staging_dir="/h/.dg/abc123", script="S")
    assert sub.argv == [
        "/opt/pbs/bin/qsub",
        "-N",
        "dask-scheduler-abc123",
        "-q",
        "dask",
        "-A",
        "physics",
        "-P",
        "p42",
        "-j",
        "oe",
        "-o",
        "gw01:/h/.dg/abc123/dask-scheduler-abc123.log",
        "-l",
        "select=1:ncpus=2:mem=3072mb",
        "-W",
        "sandbox=PRIVATE",
        "-W",
        "stagein=.@gw01:/h/.dg/abc123/*",
    ]
    assert sub.stdin == "S"


def test_a_worker_on_a_shared_file_system_has_no_stagein_and_no_empty_options() -> None:
    d = driver()
    c = cluster(use_stagein=False, worker_cores=4, worker_memory="16 GiB")
    w = Worker(name="abc123-w9", cluster_name="abc123")
    sub = d.submission(c, d.cluster_config(c), worker=w, staging_dir="/s/abc123", script="x")
    assert sub.argv == [
        "/opt/pbs/bin/qsub",
        "-N",
        "dask-worker-abc123-w9",
        "-j",
        "oe",
        "-o",
        "gw01:/s/abc123/dask-worker-abc123-w9.log",
        "-l",
        "select=1:ncpus=4:mem=16gb",
    ]


def test_a_worker_of_a_group_goes_to_the_groups_queue_with_its_resources() -> None:
    d = driver()
    c = cluster(
        queue="workq",
        worker_cores=1,
        worker_groups={
            "big": {
                "worker_cores": 16,
                "worker_memory": "64 GiB",
                "environment": {"BIG": "yes"},
                "backend": {"queue": "bigmem", "project": "p7"},
            }
        },
    )
    w = Worker(name="abc123-big-w9", cluster_name="abc123", group="big")
    settings = d.worker_config(c, w)
    sub = d.submission(c, settings, worker=w, staging_dir="/s/abc123", script="x")
    assert sub.argv[sub.argv.index("-q") + 1] == "bigmem"
    assert sub.argv[sub.argv.index("-P") + 1] == "p7"
    assert sub.argv[sub.argv.index("-l") + 1] == resource_list(
        settings.worker_resource_list, cores=16, memory=64 << 30
    )
    assert "ncpus=16" in sub.argv[sub.argv.index("-l") + 1]
    script = d.job_script(c, settings, worker=w, staging_dir="/s/abc123")
    assert "export BIG=yes\n" in script and "--nthreads 16" in script
    plain = Worker(name="abc123-w1", cluster_name="abc123")
    default = d.submission(c, d.worker_config(c, plain), worker=plain, staging_dir="/s", script="")
    assert default.argv[default.argv.index("-q") + 1] == "workq" and "-P" not in default.argv


def test_resource_list_templates_are_the_sites_to_shape() -> None:
    d = driver()
    c = cluster(worker_resource_list="nodes=1:ppn={cores},mem={memory},walltime=01:00:00")
    w = Worker(name="abc123-w1", cluster_name="abc123")
    sub = d.submission(c, d.cluster_config(c), worker=w, staging_dir="/s/abc123", script="x")
    assert sub.argv[sub.argv.index("-l") + 1] == "nodes=1:ppn=1,mem=2048mb,walltime=01:00:00"
    assert resource_list("ncpus={cores}", cores=3, memory=1) == "ncpus=3"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (512, "512b"),
        (10 * 1024, "10kb"),
        (10 * 2**20 - 1, "10240kb"),
        (768 * 2**20, "768mb"),
        (2 * 2**30, "2048mb"),
        (10 * 2**30, "10gb"),
        (int(10.5 * 2**30), "11gb"),
    ],
)
def test_memory_is_a_pbs_size_rounded_up(n: int, text: str) -> None:
    assert pbs_memory(n) == text


def test_with_stagein_the_jobs_read_the_tls_files_from_their_sandbox() -> None:
    d = driver()
    staged, shared = cluster(), cluster(use_stagein=False)
    assert d.tls_paths(staged, "/h/.dg/abc123") == ("dask.crt", "dask.pem")
    assert d.tls_paths(shared, "/h/.dg/abc123") == (
        "/h/.dg/abc123/dask.crt",
        "/h/.dg/abc123/dask.pem",
    )
    script = d.job_script(
        staged, d.cluster_config(staged), worker=None, staging_dir="/h/.dg/abc123"
    )
    assert "export DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT=dask.crt" in script


def test_status_is_one_qstat_x_for_every_job_and_cancel_one_qdel() -> None:
    d = driver()
    assert d.status_command_line(["17.pbs01", "18.pbs01"]) == [
        "/opt/pbs/bin/qstat",
        "-x",
        "17.pbs01",
        "18.pbs01",
    ]
    assert d.cancel_command_line(["17.pbs01"]) == ["/opt/pbs/bin/qdel", "17.pbs01"]


def test_a_log_read_before_its_job_ends_says_pbs_writes_it_at_the_end() -> None:
    """The logs route reads the jobs' output files; PBS copies them back at the end, so a
    missing one is explained (the job-queue base appends the hint to its message)."""
    assert driver().missing_output_hint() == (
        "PBS copies a job's output there only when the job ends"
    )


def test_qsubs_job_id_is_sequence_dot_server() -> None:
    d = driver()
    assert d.parse_job_id("17.pbs01\n") == "17.pbs01"
    assert d.parse_job_id("1234.pbs.example.org\n") == "1234.pbs.example.org"
    assert d.parse_job_id("42[].pbs01") == "42[].pbs01"
    for bad in ("", "\n", "qsub: would submit", "17 pbs01"):
        with pytest.raises(ValueError, match="expected a job id"):
            d.parse_job_id(bad)


def test_a_job_never_recorded_is_looked_up_with_qselect_among_the_live_states() -> None:
    d = driver(lookup_command="/opt/pbs/bin/qselect")
    assert d.lookup_command_line("dask-worker-abc123-w9", "alice") == [
        "/opt/pbs/bin/qselect",
        "-N",
        "dask-worker-abc123-w9",
        "-u",
        "alice",
        "-s",
        "QHWTSURB",
    ]
    # Every state of STATES but the ended ones (E, F, X, M).
    assert {c for c, (state, _) in STATES.items() if not state.alive} == set("EFXM")
    assert d.parse_job_lookup("108.pbs01\n17.pbs01\n\n9[].pbs01\n") == [
        "9[].pbs01",
        "17.pbs01",
        "108.pbs01",
    ]
    assert d.parse_job_lookup("") == []
    with pytest.raises(ValueError, match="got 'qselect: illegal -s value'"):
        d.parse_job_lookup("qselect: illegal -s value\n")


def test_qstat_tables_are_read_by_their_state_column() -> None:
    d = driver()
    assert d.parse_job_states(QSTAT) == {"17.pbs01": "R", "18.pbs01": "Q", "19.pbs01": "F"}
    assert d.parse_job_states("") == {}
    with pytest.raises(ValueError, match="unexpected line"):
        d.parse_job_states("pbs_iff: cannot connect to host\n")
    with pytest.raises(ValueError, match="unexpected line"):
        d.parse_job_states(QSTAT + "20.pbs01 garbage\n")


def test_what_pbs_states_mean() -> None:
    d = driver()
    assert {code for code, (state, _) in STATES.items() if state.alive} == {
        "Q",
        "H",
        "W",
        "T",
        "S",
        "U",
        "R",
        "B",
    }
    assert d.job_state("R") is JobState.RUNNING
    assert d.job_state("Q") is JobState.PENDING
    assert d.job_state("H") is JobState.PENDING
    assert d.job_state("E") is JobState.FINISHED
    assert d.job_state("F") is JobState.FINISHED
    assert d.job_state("?") is JobState.RUNNING
    assert d.describe_state("F") == "F: finished"
    assert d.describe_state("?") == "?"


def test_unknown_job_ids_mean_gone_only_when_qstat_names_every_job() -> None:
    d = driver()
    both = CommandResult(
        returncode=153,
        stdout="",
        stderr="qstat: Unknown Job Id 17.pbs01\nqstat: Unknown Job Id 18.pbs01\n",
    )
    one = CommandResult(returncode=153, stdout=QSTAT, stderr="qstat: Unknown Job Id 17.pbs01\n")
    down = CommandResult(
        returncode=1,
        stdout="",
        stderr="Connection refused\nqstat: cannot connect to server pbs01 (errno=15010)\n",
    )
    assert d.status_error_means_gone(both, ["17.pbs01", "18.pbs01"])
    assert not d.status_error_means_gone(one, ["17.pbs01", "18.pbs01"])
    assert not d.status_error_means_gone(down, ["17.pbs01"])


def test_qdel_of_a_finished_or_forgotten_job_has_done_its_job() -> None:
    d = driver()
    assert d.cancel_succeeded(CommandResult(returncode=0, stdout="", stderr=""))
    assert d.cancel_succeeded(
        CommandResult(returncode=35, stdout="", stderr="qdel: Job has finished 17.pbs01\n")
    )
    assert d.cancel_succeeded(
        CommandResult(returncode=153, stdout="", stderr="qdel: Unknown Job Id 17.pbs01\n")
    )
    assert not d.cancel_succeeded(
        CommandResult(returncode=159, stdout="", stderr="qdel: Unauthorized Request  17.pbs01\n")
    )


def test_the_config_sections_check_their_values() -> None:
    with pytest.raises(ConfigError) as info:
        PBSClusterConfig(worker_resource_list="select=1:ncpus={ncpus}", scheduler_resource_list=" ")
    text = "\n".join(info.value.problems)
    assert "worker_resource_list: unknown placeholder {ncpus}" in text
    assert "scheduler_resource_list: must not be empty" in text
    with pytest.raises(ConfigError, match="gateway_hostname: not a host name"):
        PBSConfig(gateway_hostname="a b")
    defaults = PBSClusterConfig()
    assert defaults.use_stagein is True
    assert defaults.worker_resource_list == "select=1:ncpus={cores}:mem={memory}"
    assert PBSConfig().gateway_hostname


def test_the_plugin_registers_the_pbs_backend() -> None:
    from gateway_pbs.hooks import gateway_register_backends

    [spec] = gateway_register_backends()
    assert spec.name == "pbs"
    assert spec.driver is PBSDriver
    assert spec.config is PBSConfig
    assert spec.cluster_config is PBSClusterConfig
