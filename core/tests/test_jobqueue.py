"""Tests of the job-queue driver base with a toy scheduler and a fake command runner.

No batch system and no processes: `FakeQueue` stands in for both the status command (run as
the gateway) and the launcher (run as the user), and records every call, so the tests can
count status calls (one per period, whatever the number of jobs), check what would be
submitted, and inject failures. The launcher itself is tested at the end, as a real process
of the current user.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest

from gateway_core.backends import jobqueue
from gateway_core.backends.jobqueue import (
    CommandResult,
    GoneJobMessages,
    JobQueueClusterConfig,
    JobQueueConfig,
    JobQueueDriver,
    JobState,
    LauncherError,
    StateTable,
    Submission,
)
from gateway_core.backends.kit import RunAs
from gateway_core.config import ConfigError, load_config, structure, unstructure
from gateway_core.context import GatewayContext
from gateway_core.hookspecs import hookimpl
from gateway_core.models import Cluster, ClusterStatus, Worker
from gateway_core.specs import BackendSpec

pytestmark = pytest.mark.unit

ALICE = RunAs(name="alice", uid=1234, gid=1234, groups=[1234], home="/home/alice", shell="/bin/sh")


class FakeQueue:
    """A batch system and a launcher in one: jobs are a dict of id → state code."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}
        self.names: dict[str, str] = {}
        """Job id → the name it was submitted with (``--name=``)."""
        self.owners: dict[str, str] = {}
        self.lookup_stderr = ""
        """Set: the lookup command fails (exit 1) printing it."""
        self.next_id = 100
        self.status_calls: list[tuple[float, list[str]]] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.status_failures = 0
        self.status_stderr = "toy-status: error: cannot reach the controller"
        self.submit_stderr = ""
        self.submit_delay = 0.0
        self.tail_text = ""
        self.files: dict[str, str] | None = None
        """Path → text the launcher's ``tail`` reads; None: `tail_text` for any path."""

    def mode(self) -> str:
        return "fake"

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Any = None,
        stdin: bytes | None = None,
        timeout: float,
        identity: RunAs | None = None,
    ) -> CommandResult:
        ids = argv[1].split(",")
        self.status_calls.append((time.monotonic(), ids))
        if self.status_failures > 0:
            self.status_failures -= 1
            return CommandResult(returncode=1, stdout="", stderr=self.status_stderr)
        if len(ids) == 1 and ids[0] not in self.jobs:
            return CommandResult(returncode=1, stdout="", stderr="unknown job " + ids[0])
        out = "".join(f"{i} {self.jobs[i]}\n" for i in ids if i in self.jobs)
        return CommandResult(returncode=0, stdout=out, stderr="")

    async def run_as(self, user: RunAs, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((user.name, request))
        action = request["action"]
        if action == "submit":
            if self.submit_delay:
                await asyncio.sleep(self.submit_delay)
            if self.submit_stderr:
                return {"ok": True, "returncode": 1, "stdout": "", "stderr": self.submit_stderr}
            job_id = str(self.next_id)
            self.next_id += 1
            self.jobs[job_id] = "Q"
            self.names[job_id] = request["cmd"][1].removeprefix("--name=")
            self.owners[job_id] = user.name
            return {"ok": True, "returncode": 0, "stdout": f"{job_id}\n", "stderr": ""}
        if action == "run" and (request.get("cmd") or [""])[0] == "toy-lookup":
            if self.lookup_stderr:
                return {"ok": True, "returncode": 1, "stdout": "", "stderr": self.lookup_stderr}
            name, owner = request["cmd"][1], request["cmd"][2]
            found = [
                j
                for j, state in self.jobs.items()
                if state != "X" and self.names.get(j) == name and self.owners.get(j) == owner
            ]
            # newest first, as some schedulers list them: the driver's parser sorts
            out = "".join(f"{j}\n" for j in reversed(found))
            return {"ok": True, "returncode": 0, "stdout": out, "stderr": ""}
        if action == "run":
            for job_id in (request.get("cmd") or [])[1:]:
                if job_id in self.jobs:
                    self.jobs[job_id] = "X"
            return {"ok": True, "returncode": 0, "stdout": "", "stderr": ""}
        if action == "tail":
            if self.files is None:
                return {"ok": True, "text": self.tail_text}
            path = request["path"]
            if path not in self.files:
                raise LauncherError(f"cannot read {path}: No such file or directory")
            text = self.files[path]
            return {"ok": True, "text": text[-int(request.get("max_bytes") or len(text)) :]}
        raise AssertionError(action)

    def of(self, action: str) -> list[dict[str, Any]]:
        return [r for _, r in self.requests if r["action"] == action]


class ToyDriver(JobQueueDriver):
    """A scheduler whose submit prints the id, whose status prints ``<id> <Q|R|X>`` lines."""

    name = "toyq"
    job_label: ClassVar[str] = "toy job"
    default_submit_command: ClassVar[str] = "toy-submit"
    default_cancel_command: ClassVar[str] = "toy-cancel"
    default_status_command: ClassVar[str] = "toy-status"
    default_lookup_command: ClassVar[str] = "toy-lookup"
    states: ClassVar[StateTable] = {
        "Q": (JobState.PENDING, "queued"),
        "R": (JobState.RUNNING, "running"),
        "X": (JobState.FINISHED, "cancelled"),
    }
    gone_messages: ClassVar[GoneJobMessages] = GoneJobMessages(unknown_job=("unknown job",))

    def submission(
        self,
        cluster: Cluster,
        settings: JobQueueClusterConfig,
        *,
        worker: Worker | None,
        staging_dir: str,
        script: str,
    ) -> Submission:
        name = self.job_name(cluster, worker)
        return Submission(argv=[self.submit_program, f"--name={name}"], stdin=script)

    def lookup_command_line(self, job_name: str, username: str) -> list[str]:
        return [self.lookup_program, job_name, username]

    def parse_job_lookup(self, stdout: str) -> list[str]:
        ids = stdout.split()
        if not all(i.isdigit() for i in ids):
            raise ValueError("expected job ids")
        return sorted(ids, key=int)

    def status_command_line(self, job_ids: Sequence[str]) -> list[str]:
        return [self.status_program, ",".join(job_ids)]

    def parse_job_id(self, stdout: str) -> str:
        if not stdout.strip().isdigit():
            raise ValueError("expected digits")
        return stdout.strip()

    def parse_job_states(self, stdout: str) -> dict[str, str]:
        return dict(line.split() for line in stdout.splitlines() if line.strip())


@pytest.fixture(autouse=True)
def known_users(monkeypatch: pytest.MonkeyPatch) -> None:
    def lookup(username: str, *, purpose: str) -> RunAs:
        if username != "alice":
            raise RuntimeError(f"User {username!r} has no account on the gateway's host")
        return ALICE

    monkeypatch.setattr(jobqueue, "lookup_user", lookup)


def make_driver(queue: FakeQueue, **settings: Any) -> ToyDriver:
    config = JobQueueConfig(**{"backoff_base_delay": 0.01, **settings})
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    context.api_url = "http://127.0.0.1:8000/api"
    return ToyDriver(
        config=config,
        context=context,
        cluster_config_class=JobQueueClusterConfig,
        runner=queue,  # type: ignore[arg-type]
    )


def test_a_driver_missing_a_scheduler_method_fails_when_made() -> None:
    """The four scheduler-specific methods are abstract: a plugin that forgets one learns it
    when the driver is made, not on the first status check."""

    class Forgetful(JobQueueDriver):  # everything but parse_job_states
        name = "forgetful"
        submission = ToyDriver.submission
        status_command_line = ToyDriver.status_command_line
        parse_job_id = ToyDriver.parse_job_id
        lookup_command_line = ToyDriver.lookup_command_line
        parse_job_lookup = ToyDriver.parse_job_lookup

    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    with pytest.raises(TypeError, match="parse_job_states"):
        Forgetful(config=JobQueueConfig(), context=context, runner=FakeQueue())  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------
# What the base reads from a driver's tables


def test_the_state_table_says_what_a_code_means_and_an_unknown_code_is_alive() -> None:
    driver = make_driver(FakeQueue())
    assert driver.job_state("Q") is JobState.PENDING
    assert driver.job_state("R") is JobState.RUNNING
    assert driver.job_state("X") is JobState.FINISHED
    assert driver.job_state("ZZ") is JobState.RUNNING  # left to the heartbeat timeout
    assert driver.describe_state("X") == "X: cancelled"
    assert driver.describe_state("ZZ") == "ZZ"


def test_the_cancel_command_is_the_cancel_program_and_the_ids_by_default() -> None:
    driver = make_driver(FakeQueue(), cancel_command="/opt/bin/toy-cancel")
    assert driver.cancel_command_line(["7", "8"]) == ["/opt/bin/toy-cancel", "7", "8"]


def failed(stderr: str, returncode: int = 1) -> CommandResult:
    return CommandResult(returncode=returncode, stdout="", stderr=stderr)


def test_gone_messages_decide_whether_a_failed_status_or_cancel_means_the_job_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = make_driver(FakeQueue())
    # One "unknown job" message means every job asked about has ended (the default rule).
    assert driver.status_error_means_gone(failed("unknown job 7"), ["7", "8"])
    assert not driver.status_error_means_gone(failed("cannot reach the controller"), ["7"])
    assert driver.cancel_succeeded(failed("", returncode=0))
    assert driver.cancel_succeeded(failed("toy-cancel: unknown job 7"))
    assert not driver.cancel_succeeded(failed("toy-cancel: permission denied"))

    named = GoneJobMessages(
        unknown_job=(r"no job (\S+)",), job_finished=("has ended",), status_names_each_job=True
    )
    monkeypatch.setattr(ToyDriver, "gone_messages", named)
    # Named rule: gone only when every job asked about is named.
    assert driver.status_error_means_gone(failed("no job 7\nno job 8\n"), ["7", "8"])
    assert not driver.status_error_means_gone(failed("no job 7\n"), ["7", "8"])
    assert not driver.status_error_means_gone(failed("no job 7\n"), [])
    assert driver.cancel_succeeded(failed("toy-cancel: 9 has ended"))
    assert driver.cancel_succeeded(failed("no job 9"))
    assert not driver.cancel_succeeded(failed("toy-cancel: busy"))


def test_gone_messages_are_checked_when_declared() -> None:
    with pytest.raises(ValueError, match="not a regular expression"):
        GoneJobMessages(unknown_job=("unknown (job",))
    with pytest.raises(ValueError, match="one group capturing the job id"):
        GoneJobMessages(unknown_job=("Unknown Job Id",), status_names_each_job=True)


def make_cluster(name: str = "c0ffee", username: str = "alice", **config: Any) -> Cluster:
    return Cluster(
        name=name,
        username=username,
        token="secret-token",
        config=unstructure(structure(config, JobQueueClusterConfig)),
        tls_cert=b"CERT",
        tls_key=b"KEY",
    )


async def run_start(updates: Any) -> list[dict[str, Any]]:
    assert isinstance(updates, AsyncIterator)
    return [state async for state in updates]


# -------------------------------------------------------------------------------------------
# Starting


async def test_the_scheduler_is_submitted_as_the_user_with_its_staging_directory() -> None:
    queue = FakeQueue()
    driver = make_driver(queue, job_host="10.0.0.1", inherited_environment=[])
    cluster = make_cluster(
        scheduler_setup="source /opt/env/bin/activate",
        environment={"GREETING": "it's me"},
        staging_directory="/scratch/{username}/dg",
    )
    states = await run_start(driver.start_scheduler(cluster))
    staging = "/scratch/alice/dg/c0ffee"
    assert states == [{"staging_dir": staging}, {"job_id": "100"}]

    [(user, request)] = queue.requests
    assert user == "alice"
    assert request["action"] == "submit" and request["staging_dir"] == staging
    assert request["files"] == {
        "dask.crt": {"data": "CERT", "mode": 0o600},
        "dask.pem": {"data": "KEY", "mode": 0o600},
    }
    assert request["cmd"] == ["toy-submit", "--name=dask-scheduler-c0ffee"]
    script = request["stdin"]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert "export GREETING='it'\"'\"'s me'" in lines
    assert "export DASK_GATEWAY_API_TOKEN=secret-token" in lines
    assert "export DASK_GATEWAY_API_URL=http://127.0.0.1:8000/api" in lines
    assert f"export DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY={staging}/dask.pem" in lines
    assert f"export DASK_DISTRIBUTED__COMM__TLS__CA_FILE={staging}/dask.crt" in lines
    # exports, then the setup script, then the scheduler itself
    setup = lines.index("source /opt/env/bin/activate")
    assert setup > max(i for i, line in enumerate(lines) if line.startswith("export "))
    last = lines[-1]
    assert last.startswith("exec dask scheduler --protocol tls --port 0 --host 10.0.0.1 ")
    assert "--preload gateway_client.agent --dg-api-address 10.0.0.1:0" in last
    # the secret goes through stdin, never the command line
    assert not any("secret-token" in arg for arg in request["cmd"])


async def test_a_worker_job_uses_the_clusters_staging_directory() -> None:
    queue = FakeQueue()
    driver = make_driver(queue, job_host="0.0.0.0")
    cluster = make_cluster(worker_setup="module load dask", worker_cores=2, worker_memory="1 G")
    cluster.state = {"staging_dir": "/home/alice/.dask-gateway/c0ffee", "job_id": "7"}
    cluster.scheduler_address = "tls://10.0.0.5:8786"
    worker = Worker(name="c0ffee-w1", cluster_name="c0ffee")
    assert await run_start(driver.start_worker(cluster, worker)) == [
        {"job_name": "dask-worker-c0ffee-w1"},  # stored before the submit: a crash-safe mark
        {"job_id": "100"},
    ]
    [request] = queue.of("submit")
    assert "staging_dir" not in request and "files" not in request
    lines = request["stdin"].splitlines()
    assert "module load dask" in lines
    assert (
        "export DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT=/home/alice/.dask-gateway/c0ffee/dask.crt"
        in lines
    )
    assert lines[-1] == (
        "exec dask worker tls://10.0.0.5:8786 --dashboard-address 0.0.0.0:0 --name c0ffee-w1 "
        f"--nthreads 2 --memory-limit {2**30}"
    )


async def test_an_unknown_user_fails_before_anything_is_created_or_submitted() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    gen = driver.start_scheduler(make_cluster(username="mallory"))
    with pytest.raises(RuntimeError, match="'mallory' has no account"):
        await run_start(gen)
    assert queue.requests == []


async def test_a_failed_submit_raises_with_the_schedulers_error() -> None:
    queue = FakeQueue()
    queue.submit_stderr = "toy-submit: error: invalid partition specified: nope"
    driver = make_driver(queue)
    seen: list[dict[str, Any]] = []
    with pytest.raises(RuntimeError) as info:
        async for state in driver.start_scheduler(make_cluster()):  # type: ignore[union-attr]
            seen.append(state)
    assert seen == [{"staging_dir": "/home/alice/.dask-gateway/c0ffee"}]
    message = str(info.value)
    assert "toy-submit failed (exit 1)" in message
    assert "invalid partition specified: nope" in message


async def test_a_submit_without_a_job_id_in_its_output_is_an_error() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)

    async def odd_submit(user: RunAs, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "returncode": 0, "stdout": "Submitted, probably\n", "stderr": ""}

    queue.run_as = odd_submit  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="no job id in the output of toy-submit"):
        await run_start(driver.start_scheduler(make_cluster()))


async def test_a_start_cancelled_during_submission_cancels_the_job_it_gave() -> None:
    queue = FakeQueue()
    queue.submit_delay = 0.2
    driver = make_driver(queue)
    task = asyncio.create_task(run_start(driver.start_scheduler(make_cluster())))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await driver.cleanup()  # waits for the late cancellation
    assert queue.jobs == {"100": "X"}
    [cancel] = queue.of("run")
    assert cancel["cmd"] == ["toy-cancel", "100"]


def test_the_staging_directory_template_is_checked() -> None:
    with pytest.raises(ConfigError) as info:
        structure({"staging_directory": "{home}/{user}/x"}, JobQueueClusterConfig)
    assert info.value.problems == [
        "staging_directory: unknown placeholder {user}; known: {home}, {username}"
    ]
    with pytest.raises(ConfigError) as info:
        structure({"switch_user": "su", "command_timeout": 0}, JobQueueConfig)
    assert info.value.problems == [
        "switch_user: expected one of auto, sudo, setuid, got 'su'",
        "command_timeout: must be positive, got 0.0",
    ]


async def test_a_relative_staging_directory_fails_the_start() -> None:
    driver = make_driver(FakeQueue())
    with pytest.raises(RuntimeError, match="not an absolute path"):
        await run_start(driver.start_scheduler(make_cluster(staging_directory="dg/{username}")))


# -------------------------------------------------------------------------------------------
# Stopping


async def test_stopping_the_scheduler_cancels_its_job_and_removes_the_staging_directory() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    cluster = make_cluster()
    for state in await run_start(driver.start_scheduler(cluster)):
        cluster.state.update(state)
    await driver.stop_scheduler(cluster)
    [stop] = queue.of("run")
    assert stop["cmd"] == ["toy-cancel", "100"]
    assert stop["remove"] == "/home/alice/.dask-gateway/c0ffee"
    assert queue.jobs["100"] == "X"


async def test_stopping_what_never_started_does_nothing() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    await driver.stop_scheduler(make_cluster())
    await driver.stop_worker(make_cluster(), Worker(name="w", cluster_name="c0ffee"))
    assert queue.requests == []


async def test_a_failed_cancel_raises_so_the_stop_is_retried() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)

    async def refuse(user: RunAs, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "returncode": 1, "stdout": "", "stderr": "toy-cancel: access denied"}

    queue.run_as = refuse  # type: ignore[method-assign]
    cluster = make_cluster()
    cluster.state = {"job_id": "5", "staging_dir": "/home/alice/.dask-gateway/c0ffee"}
    with pytest.raises(RuntimeError, match=r"cancelling toy job 5 .* access denied"):
        await driver.stop_scheduler(cluster)


async def test_a_launcher_failure_fails_the_stop_only_when_a_job_may_be_left_behind() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    calls: list[dict[str, Any]] = []
    fail_lookup = True

    async def broken(user: RunAs, request: dict[str, Any]) -> dict[str, Any]:
        calls.append(request)
        if request["cmd"] and (request["cmd"][0] != "toy-lookup" or fail_lookup):
            raise LauncherError("cannot run the launcher as alice: Permission denied")
        if request["cmd"]:
            return {"ok": True, "returncode": 0, "stdout": "", "stderr": ""}
        raise LauncherError("cannot run the launcher as alice: Permission denied")

    queue.run_as = broken  # type: ignore[method-assign]
    # No job id stored: a job may have been submitted after the last write, so a lookup that
    # cannot be made fails the stop (retried) rather than leave the job behind.
    unknown = make_cluster()
    unknown.state = {"staging_dir": "/home/alice/.dask-gateway/c0ffee"}
    with pytest.raises(RuntimeError, match="looking up the scheduler of cluster c0ffee"):
        await driver.stop_scheduler(unknown)
    # The lookup finds nothing: only the removal is left, and its failure is not fatal.
    fail_lookup = False
    await driver.stop_scheduler(unknown)
    assert [c["cmd"] and c["cmd"][0] for c in calls[1:]] == ["toy-lookup", None]
    submitted = make_cluster()
    submitted.state = {"staging_dir": "/home/alice/.dask-gateway/c0ffee", "job_id": "9"}
    with pytest.raises(LauncherError):
        await driver.stop_scheduler(submitted)


# -------------------------------------------------------------------------------------------
# A crash between a submit and the write of its job id


class Crashed(Exception):
    """Stands for the SIGKILL a crash point sends under ``GATEWAY_TEST_CRASH_AT``."""


@pytest.fixture
def crash_points(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every crash point the driver passes raises `Crashed`; the list records them."""
    seen: list[str] = []

    def crash(name: str) -> None:
        seen.append(name)
        raise Crashed(name)

    monkeypatch.setattr(jobqueue, "crash_point", crash)
    return seen


async def crash_in_start(updates: Any, stored: dict[str, Any]) -> None:
    """Run a start until its crash point, storing what it yields before, as the gateway does."""
    with pytest.raises(Crashed):
        async for state in updates:
            stored.update(state)


def running_cluster() -> Cluster:
    cluster = make_cluster()
    cluster.state = {"staging_dir": "/home/alice/.dask-gateway/c0ffee", "job_id": "7"}
    cluster.scheduler_address = "tls://10.0.0.5:8786"
    return cluster


async def test_a_worker_submitted_just_before_a_crash_is_adopted_not_submitted_again(
    crash_points: list[str],
) -> None:
    queue = FakeQueue()
    cluster = running_cluster()
    worker = Worker(name="c0ffee-w1", cluster_name="c0ffee")
    first = make_driver(queue)
    assert not first.worker_start_may_rerun(
        cluster, Worker(name="w", cluster_name="c0ffee", state={"job_id": "3"})
    )
    await crash_in_start(first.start_worker(cluster, worker), worker.state)
    assert crash_points == ["submitted:worker"]
    assert worker.state == {"job_name": "dask-worker-c0ffee-w1"}  # the id never stored
    assert queue.jobs == {"100": "Q"}

    second = make_driver(queue)  # the restarted gateway
    assert second.worker_start_may_rerun(cluster, worker)
    assert await run_start(second.start_worker(cluster, worker)) == [{"job_id": "100"}]
    assert len(queue.of("submit")) == 1, "submitted twice"
    lookup = queue.of("run")[-1]
    assert lookup["cmd"] == ["toy-lookup", "dask-worker-c0ffee-w1", "alice"]
    assert queue.requests[-1][0] == "alice"  # as the user, through the launcher


async def test_a_rerun_finding_no_job_submits_once_and_stores_its_id() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    cluster = running_cluster()
    worker = Worker(
        name="c0ffee-w1", cluster_name="c0ffee", state={"job_name": "dask-worker-c0ffee-w1"}
    )
    assert await run_start(driver.start_worker(cluster, worker)) == [{"job_id": "100"}]
    assert [r["action"] for r in queue.of("run") + queue.of("submit")] == ["run", "submit"]


async def test_a_scheduler_submitted_just_before_a_crash_is_adopted(
    crash_points: list[str],
) -> None:
    queue = FakeQueue()
    cluster = make_cluster()
    await crash_in_start(make_driver(queue).start_scheduler(cluster), cluster.state)
    assert crash_points == ["submitted:scheduler"]
    assert cluster.state == {"staging_dir": "/home/alice/.dask-gateway/c0ffee"}

    second = make_driver(queue)
    assert second.start_may_rerun(cluster)
    assert await run_start(second.start_scheduler(cluster)) == [{"job_id": "100"}]
    assert len(queue.of("submit")) == 1, "submitted twice"
    # Adopted: its staging directory (with the TLS files the job reads) is left as it is.
    assert all(not r.get("remove") for r in queue.of("run"))
    cluster.state["job_id"] = "100"
    assert not second.start_may_rerun(cluster)


async def test_a_scheduler_rerun_finding_no_job_clears_the_half_made_directory_first() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    cluster = make_cluster()
    staging = "/home/alice/.dask-gateway/c0ffee"
    cluster.state = {"staging_dir": staging}  # made, maybe half made; nothing submitted
    assert await run_start(driver.start_scheduler(cluster)) == [
        {"staging_dir": staging},
        {"job_id": "100"},
    ]
    lookup, clear, submit = (r for _, r in queue.requests)
    assert lookup["cmd"][0] == "toy-lookup"
    assert (clear["action"], clear["cmd"], clear["remove"]) == ("run", None, staging)
    assert submit["action"] == "submit" and submit["staging_dir"] == staging


async def test_a_scheduler_rerun_fails_when_the_old_directory_cannot_be_removed() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    real = queue.run_as

    async def cannot_remove(user: RunAs, request: dict[str, Any]) -> dict[str, Any]:
        answer = await real(user, request)
        if request.get("remove"):
            answer["remove_error"] = "cannot remove /x: Permission denied"
        return answer

    queue.run_as = cannot_remove  # type: ignore[method-assign]
    cluster = make_cluster()
    cluster.state = {"staging_dir": "/home/alice/.dask-gateway/c0ffee"}
    with pytest.raises(RuntimeError, match="staging directory cannot be removed"):
        await run_start(driver.start_scheduler(cluster))
    assert queue.of("submit") == []


async def test_of_several_jobs_found_by_name_the_newest_is_adopted_and_the_rest_cancelled() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    cluster = running_cluster()
    worker = Worker(name="c0ffee-w1", cluster_name="c0ffee")
    for _ in range(3):  # three attempts, each killed after its submit
        await run_start(
            driver.start_worker(cluster, Worker(name="c0ffee-w1", cluster_name="c0ffee"))
        )
    worker.state = {"job_name": "dask-worker-c0ffee-w1"}
    assert await run_start(driver.start_worker(cluster, worker)) == [{"job_id": "102"}]
    assert queue.jobs == {"100": "X", "101": "X", "102": "Q"}
    assert queue.of("run")[-1]["cmd"] == ["toy-cancel", "100", "101"]


async def test_a_failed_lookup_is_never_taken_for_no_job() -> None:
    queue = FakeQueue()
    queue.lookup_stderr = "toy-lookup: error: cannot reach the controller"
    driver = make_driver(queue)
    cluster = running_cluster()
    worker = Worker(
        name="c0ffee-w1", cluster_name="c0ffee", state={"job_name": "dask-worker-c0ffee-w1"}
    )
    with pytest.raises(RuntimeError) as info:
        await run_start(driver.start_worker(cluster, worker))
    message = str(info.value)
    assert "looking up worker c0ffee-w1 by its job name" in message
    assert "toy-lookup dask-worker-c0ffee-w1 alice" in message  # the command, named
    assert "cannot reach the controller" in message
    assert queue.of("submit") == []  # no second job on a guess
    with pytest.raises(RuntimeError, match="toy-lookup dask-worker-c0ffee-w1 alice"):
        await driver.stop_worker(cluster, worker)

    queue.lookup_stderr = ""

    async def garbled(user: RunAs, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "returncode": 0, "stdout": "Segmentation fault\n", "stderr": ""}

    queue.run_as = garbled  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="cannot understand its output"):
        await run_start(driver.start_worker(cluster, worker))


async def test_a_stop_without_a_job_id_cancels_what_it_finds_by_name() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    cluster = make_cluster()
    await run_start(driver.start_scheduler(cluster))  # job 100, its id "lost"
    cluster.state = {"staging_dir": "/home/alice/.dask-gateway/c0ffee"}
    await driver.stop_scheduler(cluster)
    stop = queue.of("run")[-1]
    assert stop["cmd"] == ["toy-cancel", "100"]
    assert stop["remove"] == "/home/alice/.dask-gateway/c0ffee"  # in the same call
    assert queue.jobs == {"100": "X"}

    running = running_cluster()
    await run_start(driver.start_worker(running, Worker(name="c0ffee-w1", cluster_name="c0ffee")))
    worker = Worker(
        name="c0ffee-w1", cluster_name="c0ffee", state={"job_name": "dask-worker-c0ffee-w1"}
    )
    await driver.stop_worker(running, worker)
    assert queue.jobs["101"] == "X"
    assert queue.of("run")[-1]["cmd"] == ["toy-cancel", "101"]
    # Nothing found: nothing to cancel, and no error.
    before = len(queue.of("run"))
    await driver.stop_worker(running, worker)
    assert [r["cmd"][0] for r in queue.of("run")[before:]] == ["toy-lookup"]


# -------------------------------------------------------------------------------------------
# Status


def clusters_with_jobs(queue: FakeQueue, n: int, state: str = "R") -> list[Cluster]:
    out = []
    for i in range(n):
        cluster = make_cluster(name=f"c{i}")
        cluster.state = {"job_id": str(1000 + i)}
        queue.jobs[str(1000 + i)] = state
        out.append(cluster)
    return out


async def test_clusters_and_workers_checked_together_share_one_status_call() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    clusters = clusters_with_jobs(queue, 25)
    pairs = []
    for i in range(25):
        worker = Worker(name=f"w{i}", cluster_name="c0", state={"job_id": str(2000 + i)})
        queue.jobs[str(2000 + i)] = "Q"
        pairs.append((clusters[0], worker))
    alive_c, alive_w = await asyncio.gather(
        driver.check_clusters(clusters), driver.check_workers(pairs)
    )
    assert alive_c == [True] * 25 and alive_w == [True] * 25
    assert len(queue.status_calls) == 1
    assert len(queue.status_calls[0][1]) == 50
    assert driver.status_calls == 1


async def test_ended_and_missing_jobs_are_dead() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    clusters = clusters_with_jobs(queue, 4)
    queue.jobs["1001"] = "X"
    del queue.jobs["1002"]
    clusters[3].state = {}
    assert await driver.check_clusters(clusters) == [True, False, False, False]


async def test_a_status_command_that_forgot_every_job_means_they_ended() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    cluster = make_cluster()
    cluster.state = {"job_id": "4242"}
    assert await driver.check_clusters([cluster]) == [False]
    assert len(queue.status_calls) == 1


async def test_a_status_command_failing_once_is_retried_after_a_backoff() -> None:
    queue = FakeQueue()
    queue.status_failures = 1
    driver = make_driver(queue, backoff_base_delay=0.1)
    clusters = clusters_with_jobs(queue, 3)
    assert await driver.check_clusters(clusters) == [True, True, True]
    (t0, _), (t1, _) = queue.status_calls
    assert t1 - t0 >= 0.09


async def test_a_status_command_that_keeps_failing_raises_rather_than_reporting_deaths() -> None:
    queue = FakeQueue()
    queue.status_failures = 10
    driver = make_driver(queue, status_command_retries=2)
    clusters = clusters_with_jobs(queue, 3)
    with pytest.raises(RuntimeError, match="cannot reach the controller"):
        await driver.check_clusters(clusters)
    assert len(queue.status_calls) == 3
    # the next period asks again
    queue.status_failures = 0
    assert await driver.check_clusters(clusters) == [True, True, True]


async def test_unreadable_status_output_raises() -> None:
    queue = FakeQueue()
    driver = make_driver(queue, status_command_retries=0)

    async def garbage(argv: Sequence[str], **kw: Any) -> CommandResult:
        return CommandResult(returncode=0, stdout="what is this\n", stderr="")

    queue.run = garbage  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="cannot understand the output of toy-status"):
        await driver.check_clusters(clusters_with_jobs(FakeQueue(), 2))


async def test_logs_are_the_jobs_output_files_read_as_the_user() -> None:
    queue = FakeQueue()
    driver = make_driver(queue)
    [cluster] = clusters_with_jobs(queue, 1)
    staging = "/home/alice/.dask-gateway/c0"
    cluster.state["staging_dir"] = staging
    queue.files = {
        f"{staging}/dask-scheduler-c0.log": "".join(f"s{i}\n" for i in range(50)),
        f"{staging}/dask-worker-w1.log": "w one\n\nw two\n",
    }
    logs = await driver.cluster_logs(
        cluster, components=["scheduler", "w1", "w2"], tail=3, max_bytes=4096
    )
    assert logs["scheduler"] == "s47\ns48\ns49"
    assert logs["w1"] == "w one\n\nw two"  # blank lines kept, unlike failure reasons
    assert logs["w2"].startswith("(no log: cannot read " + f"{staging}/dask-worker-w2.log")
    # One launcher call per component, as the cluster's user, bounded in bytes.
    assert sorted(r["path"] for r in queue.of("tail")) == sorted(
        [*queue.files, f"{staging}/dask-worker-w2.log"]
    )
    assert {u for u, r in queue.requests} == {"alice"}
    assert all(r["max_bytes"] == 4096 for r in queue.of("tail"))

    # The end of a file longer than max_bytes starts at a whole line.
    logs = await driver.cluster_logs(cluster, components=["scheduler"], tail=100, max_bytes=10)
    assert logs["scheduler"] == "s48\ns49"

    # Before the cluster has a staging directory, and after it is gone: a message, no error.
    cluster.state.pop("staging_dir")
    assert await driver.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=99) == {
        "scheduler": "(no log: the cluster has not started yet)"
    }


async def test_logs_name_the_batch_systems_reason_when_output_comes_late() -> None:
    class LateOutput(ToyDriver):
        def missing_output_hint(self) -> str:
            return "the toy queue copies it there when the job ends"

    queue = FakeQueue()
    queue.files = {}
    driver = LateOutput(
        config=make_driver(queue).config,
        context=make_driver(queue).context,
        cluster_config_class=JobQueueClusterConfig,
        runner=queue,  # type: ignore[arg-type]
    )
    [cluster] = clusters_with_jobs(queue, 1)
    cluster.state["staging_dir"] = "/home/alice/.dask-gateway/c0"
    logs = await driver.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=99)
    assert logs["scheduler"].endswith("; the toy queue copies it there when the job ends)")


async def test_the_failure_reason_has_the_last_state_and_the_end_of_the_output() -> None:
    queue = FakeQueue()
    queue.tail_text = "starting\n\nTraceback (most recent call last):\nImportError: no dask\n"
    driver = make_driver(queue)
    [cluster] = clusters_with_jobs(queue, 1)
    cluster.state["staging_dir"] = "/home/alice/.dask-gateway/c0"
    queue.jobs["1000"] = "X"
    assert await driver.check_clusters([cluster]) == [False]
    reason = await driver.failure_reason(cluster)
    assert reason == (
        "The scheduler's toy job 1000 ended (state X: cancelled); the end of its output "
        "(/home/alice/.dask-gateway/c0/dask-scheduler-c0.log):\n"
        "starting\nTraceback (most recent call last):\nImportError: no dask"
    )
    assert queue.of("tail") == [
        {"action": "tail", "path": "/home/alice/.dask-gateway/c0/dask-scheduler-c0.log"}
    ]


# -------------------------------------------------------------------------------------------
# Through a whole gateway: one status call per period for 50 clusters

SHARED = FakeQueue()


class GatewayToyDriver(ToyDriver):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(runner=SHARED, **kwargs)  # type: ignore[arg-type]


class ToyPlugin:
    @hookimpl
    def gateway_register_backends(self) -> list[BackendSpec]:
        return [
            BackendSpec(
                name="toyq",
                driver=GatewayToyDriver,
                config=JobQueueConfig,
                cluster_config=JobQueueClusterConfig,
            )
        ]


async def test_fifty_clusters_cost_one_status_call_per_period(
    make_gateway: Any, make_api_client: Any
) -> None:
    SHARED.__init__()  # type: ignore[misc]
    period = 0.2
    gw = await make_gateway(
        {
            "gateway": {"backend": "toyq"},
            "backend": {
                "toyq": {
                    "cluster_status_period": period,
                    "worker_status_period": period,
                    "cluster_start_timeout": 60,
                }
            },
        },
        plugins=[ToyPlugin()],
    )
    alice = make_api_client(gw, "alice")
    names = [
        (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
        for _ in range(50)
    ]
    deadline = time.monotonic() + 10
    while len(SHARED.of("submit")) < 50:
        assert time.monotonic() < deadline, "the 50 clusters were not submitted"
        await asyncio.sleep(0.02)
    first = len(SHARED.status_calls)
    began = time.monotonic()
    await asyncio.sleep(10 * period + period / 2)
    elapsed = time.monotonic() - began
    calls = SHARED.status_calls[first:]
    assert len(calls) <= elapsed / period + 1
    assert len(calls) >= 5  # checks keep coming (a loaded 2-core CI machine may lag a few)
    assert all(len(ids) == 50 for _, ids in calls[1:])
    for (a, _), (b, _) in itertools.pairwise(calls):
        assert b - a > period / 2, "two status calls within one period"
    for name in names:
        assert (await alice.get(f"/api/v1/clusters/{name}")).body["status"] == "PENDING"


async def test_a_cancelled_job_fails_its_cluster_with_the_reason(
    make_gateway: Any, make_api_client: Any
) -> None:
    SHARED.__init__()  # type: ignore[misc]
    SHARED.tail_text = "distributed.scheduler - INFO - Scheduler closing\n"
    gw = await make_gateway(
        {
            "gateway": {"backend": "toyq"},
            "backend": {"toyq": {"cluster_status_period": 0.1, "worker_status_period": 0.1}},
        },
        plugins=[ToyPlugin()],
    )
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    cluster = gw.backend.store.get(name)
    deadline = time.monotonic() + 10
    while "job_id" not in cluster.state:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    SHARED.jobs[cluster.state["job_id"]] = "X"
    while cluster.status != ClusterStatus.FAILED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    body = (await alice.get(f"/api/v1/clusters/{name}")).body
    assert body["status"] == "FAILED"
    assert "ended (state X: cancelled)" in cluster.reason
    assert "Scheduler closing" in cluster.reason


# -------------------------------------------------------------------------------------------
# The launcher, as a real process of the current user


def launch(request: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway_core.backends.jobqueue_launcher"],
        input=json.dumps(request).encode(),
        capture_output=True,
        check=True,
        timeout=30,
    )
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


@pytest.mark.integration
def test_the_launcher_makes_a_private_staging_directory_and_submits_from_it(
    tmp_path: Path,
) -> None:
    staging = tmp_path / "home" / ".dask-gateway" / "abc"
    answer = launch(
        {
            "action": "submit",
            "staging_dir": str(staging),
            "files": {"dask.pem": {"data": "KEY", "mode": 0o600}},
            "cmd": ["/bin/sh", "-c", 'pwd; cat; echo "home=$HOME" >&2; exit 3'],
            "stdin": "the script\n",
            "env": {"PATH": os.environ["PATH"]},
        }
    )
    assert answer["ok"] and answer["returncode"] == 3
    assert answer["stdout"] == f"{staging}\nthe script\n"
    assert answer["stderr"].startswith("home=")
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert stat.S_IMODE(staging.parent.stat().st_mode) == 0o700
    key = staging / "dask.pem"
    assert key.read_text() == "KEY" and stat.S_IMODE(key.stat().st_mode) == 0o600

    again = launch({"action": "submit", "staging_dir": str(staging), "cmd": ["true"]})
    assert again == {"ok": False, "error": f"staging directory {staging} already exists"}

    (staging / "dask-scheduler-abc.log").write_text("one\ntwo\n")
    tail = launch({"action": "tail", "path": str(staging / "dask-scheduler-abc.log")})
    assert tail == {"ok": True, "text": "one\ntwo\n"}

    done = launch({"action": "run", "cmd": ["true"], "remove": str(staging)})
    assert done["ok"] and done["returncode"] == 0 and "remove_error" not in done
    assert not staging.exists()
    # removing again, or cancelling with nothing to remove, is fine
    assert launch({"action": "run", "cmd": None, "remove": str(staging)})["ok"]


@pytest.mark.integration
def test_the_launcher_answers_bad_requests_with_an_error(tmp_path: Path) -> None:
    assert launch({"action": "fly"}) == {"ok": False, "error": "unknown action 'fly'"}
    missing = launch({"action": "submit", "cmd": ["/no/such/program"]})
    assert missing == {"ok": False, "error": "command not found: '/no/such/program'"}
    relative = launch({"action": "submit", "staging_dir": "rel/dir", "cmd": ["true"]})
    assert relative["error"] == "staging directory 'rel/dir' is not an absolute path"
    assert launch({"action": "run", "remove": "/"})["error"] == "refusing to remove '/'"


async def test_a_launcher_that_cannot_run_is_a_clear_error(tmp_path: Path) -> None:
    runner = jobqueue.JobRunner(
        JobQueueConfig(dask_gateway_jobqueue_launcher=["/no/such/launcher"], switch_user="setuid")
    )
    me = RunAs.from_pwd(__import__("pwd").getpwuid(os.getuid()))
    if os.geteuid() != 0:
        pytest.fail("run as root: the setuid mode needs it (CI runs as root)")
    with pytest.raises(LauncherError, match=r"cannot run the launcher as .*/no/such/launcher"):
        await runner.run_as(me, {"action": "tail", "path": "/etc/hostname"})


def test_every_config_class_checks_its_own_settings_and_all_problems_come_at_once() -> None:
    from gateway_core.config import CheckedConfig

    # Three levels, each with a bad value: ClusterConfig (worker_cores),
    # JobQueueClusterConfig (staging_directory) and a subclass declaring its own check.
    @attrs.define(kw_only=True, frozen=True)
    class SiteClusterConfig(JobQueueClusterConfig):
        partition: str = "main"

        def check(self) -> list[str]:
            return [] if self.partition else ["partition: must not be empty"]

    assert issubclass(SiteClusterConfig, CheckedConfig)
    with pytest.raises(ConfigError) as caught:
        SiteClusterConfig(worker_cores=0, staging_directory="{nowhere}", partition="")
    problems = caught.value.problems
    assert problems[0].startswith("worker_cores: must be at least 1")  # the base's first
    assert any(p.startswith("staging_directory: unknown placeholder {nowhere}") for p in problems)
    assert problems[-1] == "partition: must not be empty"
    assert SiteClusterConfig().partition == "main"  # nothing to report: no error


def test_a_command_runs_as_another_user_on_the_gateways_default_event_loop() -> None:
    """`gateway serve` runs on uvloop, whose create_subprocess_exec refuses user=/group=:
    the setuid mode's commands must still run, as the user asked for."""
    import pwd

    uvloop = pytest.importorskip("uvloop", reason="uvloop comes with gateway-core[local]")
    if os.geteuid() != 0:
        pytest.fail("run as root: the setuid mode needs it (CI runs as root)")
    nobody = RunAs.from_pwd(pwd.getpwnam("nobody"))
    runner = jobqueue.JobRunner(JobQueueConfig(switch_user="setuid"))

    async def ids() -> jobqueue.CommandResult:
        return await runner.run(["sh", "-c", "id -u; id -g"], timeout=30, identity=nobody)

    result = uvloop.run(ids())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(nobody.uid), str(nobody.gid)]
