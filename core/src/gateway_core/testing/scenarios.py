"""The end-to-end scenario suite every backend plugin runs: real clusters through a whole
gateway, its proxy and the user-facing client, the same scenarios for every backend.

Owns `BackendSetup` (what a plugin tells the suite: its gateway config, the hooks that look at
and act on its infrastructure, and the scenarios that do not apply to it), `LiveJob`,
`RunningCluster`, `BackendScenarios` (the scenarios; a plugin's test module subclasses it)
with `ScenarioRun` (the steps they share), `applies`, `SCENARIOS`, `eventually` and
`passes`. The guide is docs/testing-a-backend.md.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from attrs import define, field

from ..models import ClusterStatus, WorkerStatus
from .harness import merge

if TYPE_CHECKING:
    from ..models import Cluster, Worker

SCENARIOS: dict[str, str] = {
    "life_cycle": "a cluster starts (as the requesting user), scales, computes through the "
    "proxy, and stopping it ends its jobs and removes its files",
    "refused_option": "an option the infrastructure refuses fails the cluster with its reason, "
    "shown to the client, and leaves nothing behind",
    "scheduler_dies": "a scheduler that dies fails the cluster with the end of its output",
    "ended_behind_the_gateways_back": "a worker and a scheduler ended outside the gateway are "
    "noticed within the status period; the worker is replaced, the cluster fails with the reason",
    "status_command_fails_once": "a status command failing once fails nothing",
    "one_status_command_per_check": "each check asks one status command about all its jobs",
    "unknown_user": "a user without an account fails with the reason before anything is submitted",
    "logs": "the logs route answers the scheduler's and each worker's output while the cluster "
    "runs, and a message, not an error, once it stopped",
}
"""Every scenario of `BackendScenarios`: its name (for `BackendSetup.not_applicable`) and what
it proves."""

DYING_OUTPUT = ("loading the environment", "no such environment: /opt/nowhere")
DYING_SCRIPT = f'echo "{DYING_OUTPUT[0]}"; echo "{DYING_OUTPUT[1]}" >&2; exit 3'
"""The shell script a dying scheduler runs (`BackendSetup.dying_scheduler`): a line on stdout,
a line on stderr, exit 3."""

NOT_APPLICABLE_KEY = pytest.StashKey[list[tuple[str, str, str]]]()
"""Where the session collects (backend, scenario, reason) of the scenarios declared not
applicable; the ``gateway_core`` pytest plugin lists them at the end of the run."""


@define(kw_only=True, frozen=True)
class LiveJob:
    """One scheduler or worker the backend's infrastructure still runs for a cluster (a batch
    job, a process, a pod)."""

    owner: str
    """The name of the account it runs as."""
    running: bool
    """True once it runs; False while queued or starting."""
    worker: str | None = None
    """The worker's name; None for the cluster's scheduler."""


@define(kw_only=True, frozen=True)
class RunningCluster:
    """What `BackendSetup.inspect_running` gets while the life-cycle scenario's cluster runs
    with two workers (called in a thread, outside the event loop)."""

    gateway: Any
    """The running `gateway_core.app.Gateway`."""
    cluster: Cluster
    """The gateway's record of the cluster (``cluster.state`` holds the driver's state)."""
    username: str
    uid: int
    """The uid its processes should run as."""
    variant: str
    """Which of `BackendSetup.variants` runs."""
    client: Any
    """A `distributed.Client` connected through the gateway's proxy."""
    jobs: Mapping[str, LiveJob]
    """`BackendSetup.live_jobs` of the cluster: its scheduler and two workers."""


def _no_files(cluster: Cluster) -> list[Path]:
    return []


def _no_reason(cluster: Cluster) -> list[str]:
    return []


@define(kw_only=True, frozen=True)
class BackendSetup:
    """How the scenario suite runs one backend: what the plugin's ``gateway_backend_setup``
    fixture returns. Fields left unset make the scenarios needing them fail with the field's
    name, unless those scenarios are declared in ``not_applicable``."""

    backend: str
    """The backend's name (``[gateway] backend``)."""
    config: Mapping[str, Any]
    """A gateway config table (TOML-shaped) selecting the backend, with short periods (about
    1 s status periods) and small clusters; each scenario merges its own keys over it."""
    not_applicable: Mapping[str, str] = field(factory=dict)
    """Scenario name (`SCENARIOS`) → why it does not apply to this backend. Such a scenario
    is reported as skipped with that reason and listed at the end of the run."""
    variants: Mapping[str, Mapping[str, Any]] = field(factory=lambda: {"default": {}})
    """Config tables merged over ``config``, each running the life-cycle scenario once (e.g.
    each way of switching users)."""
    runs_as_user: bool = False
    """True: clusters run as the requesting user's own account; the scenarios ask as throwaway
    accounts (`make_user`, root only) and check every process's uid. False: any user name
    works and processes run as the gateway's account."""
    record: Callable[[Any, str], Cluster] | None = None
    """(gateway, cluster name) → the gateway's record of the cluster, whose ``status``,
    ``reason`` and ``workers`` follow the cluster as the scenarios wait on them. None: the
    store's record (``gateway.backend.store.get``), for backends built on `ProcessBackend`; a
    backend keeping its clusters elsewhere (a Kubernetes resource) gives a live view of them."""
    live_jobs: Callable[[Cluster], Mapping[str, LiveJob]] | None = None
    """Job id → `LiveJob`: what the infrastructure still runs (not ended) for the cluster, found
    by the cluster's and its workers' names, not only by the state the driver stored."""
    end_job: Callable[[Cluster, Worker | None], None] | None = None
    """End the scheduler (worker None) or a worker of a cluster behind the gateway's back, as
    an operator would (``scancel``, ``qdel``, ``kill -9``)."""
    cluster_files: Callable[[Cluster], Sequence[Path]] = _no_files
    """Files and directories the backend makes on the gateway's host for the cluster; none may
    exist once it stopped or failed."""
    inspect_running: Callable[[RunningCluster], None] | None = None
    """Backend-specific checks of the life-cycle scenario's running cluster (assert in it)."""
    check_stopped: Callable[[Cluster], None] | None = None
    """Backend-specific checks of the life-cycle scenario's cluster once it stopped and its
    jobs ended (assert in it; e.g. that they were cancelled, not failed); retried for up to
    30 s while it fails."""
    refused_option: Mapping[str, Any] | None = None
    """``[cluster]`` keys the infrastructure refuses at submission (an unknown queue)."""
    refused_reason: Sequence[str] = ()
    """Regular expressions the client's error must match for ``refused_option``."""
    dying_scheduler: Callable[[str], Mapping[str, Any]] | None = None
    """``[cluster]`` keys making the scheduler run the given shell script (`DYING_SCRIPT`)
    instead of starting, e.g. as its setup script."""
    dead_scheduler_reason: Sequence[str] = ()
    """Regular expressions the client's error must match when the scheduler died."""
    ended_reason: Callable[[Cluster], Sequence[str]] = _no_reason
    """Regular expressions the cluster's reason must match after `end_job` ended its
    scheduler."""
    unknown_user_reason: Sequence[str] = ()
    """Regular expressions the cluster's reason must match for a user without an account (the
    user's name must be in it too)."""
    status_command: str | None = None
    """The status program (backend option ``status_command``) the status scenarios wrap with a
    script that records each call and can fail once."""
    status_period: float = 1.0
    """``cluster_status_period`` and ``worker_status_period`` of ``config``."""
    detection_slack: float = 3.0
    """Seconds beyond one status period that noticing an ended job may take (the
    infrastructure's own delay in ending it, a loaded machine)."""

    def __attrs_post_init__(self) -> None:
        unknown = sorted(set(self.not_applicable) - set(SCENARIOS))
        if unknown:
            raise ValueError(
                f"BackendSetup.not_applicable names no scenario: {', '.join(unknown)}; the "
                f"scenarios are {', '.join(SCENARIOS)}"
            )
        if not self.variants:
            raise ValueError("BackendSetup.variants must name at least one config")

    def config_with(
        self,
        *,
        backend: Mapping[str, Any] | None = None,
        cluster: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``config`` with ``[backend.<name>]`` and ``[cluster]`` keys (and a whole table)
        merged over it."""
        out = merge(self.config, extra or {})
        return merge(
            out, {"backend": {self.backend: dict(backend or {})}, "cluster": cluster or {}}
        )


async def eventually(
    predicate: Callable[[], object],
    *,
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.1,
) -> float:
    """Wait until ``predicate()`` is true; the seconds it took. Fails naming ``what``."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, (
            f"timed out after {timeout:g} s waiting for {what}"
        )
        await asyncio.sleep(interval)
    return time.monotonic() - began


async def passes(
    check: Callable[[Cluster], None], cluster: Cluster, *, timeout: float, interval: float = 0.5
) -> None:
    """Run ``check(cluster)`` (in a thread) until it raises no AssertionError; after
    ``timeout`` seconds its last AssertionError is raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(check, cluster)
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)


def _matches(text: str, patterns: Sequence[str], what: str) -> None:
    for pattern in patterns:
        assert re.search(pattern, text), f"{what}: no match for {pattern!r} in:\n{text}"


def _client(gateway: Any, username: str) -> Any:
    from gateway_client import BasicAuth, Gateway

    return Gateway(f"http://{gateway.public_address}", auth=BasicAuth(username))


def _status_wrapper(directory: Path, program: str) -> tuple[Path, Path, Path]:
    """A script standing in for ``program``: records each call's arguments, one line each, and
    fails once after the flag file appears. (script, calls file, flag file)."""
    real = shutil.which(program) or program
    calls, flag = directory / "status-calls", directory / "fail-once"
    script = directory / f"recording-{os.path.basename(real)}"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        f"if [ -e {flag} ] && [ ! -e {flag}.done ]; then\n"
        f"  touch {flag}.done\n"
        '  echo "status: error: cannot reach the controller (failure injected by the test)" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return script, calls, flag


def _calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def _names(line: str, job_id: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(job_id)}(?![\w.\[])", line) is not None


def applies(
    request: pytest.FixtureRequest, setup: BackendSetup, scenario: str, *needs: str
) -> None:
    """Skip ``scenario`` with the plugin's reason when ``setup`` declares it not applicable
    (and record it for the end-of-run list); fail naming the `BackendSetup` fields it
    ``needs`` that are missing."""
    reason = setup.not_applicable.get(scenario)
    if reason is not None:
        request.config.stash.setdefault(NOT_APPLICABLE_KEY, []).append(
            (setup.backend, scenario, reason)
        )
        pytest.skip(f"not applicable to {setup.backend}: {reason}")
    missing = [name for name in needs if not getattr(setup, name)]
    if missing:
        pytest.fail(
            f"the scenario {scenario!r} needs BackendSetup.{', BackendSetup.'.join(missing)} "
            f"from the {setup.backend} backend's gateway_backend_setup; provide it, or "
            "declare the scenario in BackendSetup.not_applicable with the reason"
        )


@define(kw_only=True)
class ScenarioRun:
    """One scenario's fixtures and the steps scenarios share (the ``scenario`` fixture of
    `BackendScenarios`)."""

    request: pytest.FixtureRequest
    setup: BackendSetup
    make_user: Callable[[], pwd.struct_passwd]
    make_gateway: Callable[..., Any]
    make_api_client: Callable[..., Any]
    tmp_path: Path

    def applies(self, scenario: str, *needs: str) -> None:
        applies(self.request, self.setup, scenario, *needs)

    def account(self) -> tuple[str, int]:
        """(user name, uid its processes run as): a throwaway account when clusters run as
        the user, else any name and the gateway's uid."""
        if self.setup.runs_as_user:
            user = self.make_user()
            return user.pw_name, user.pw_uid
        return f"user{secrets.token_hex(3)}", os.getuid()

    def record(self, gateway: Any, name: str) -> Cluster:
        """The gateway's record of cluster ``name`` (`BackendSetup.record`)."""
        if self.setup.record is not None:
            return self.setup.record(gateway, name)
        cluster: Cluster = gateway.backend.store.get(name)
        return cluster

    def live(self, cluster: Cluster) -> Mapping[str, LiveJob]:
        assert self.setup.live_jobs is not None
        return self.setup.live_jobs(cluster)

    def files_left(self, cluster: Cluster) -> list[Path]:
        return [p for p in self.setup.cluster_files(cluster) if p.exists()]

    async def start_failure(self, cluster: Mapping[str, Any]) -> tuple[Any, str]:
        """A gateway with these ``[cluster]`` keys, and the error the client raises asking it
        for a cluster."""
        from gateway_client import GatewayClusterError

        username, _ = self.account()
        gateway = await self.make_gateway(self.setup.config_with(cluster=cluster))

        def user_flow() -> str:
            with _client(gateway, username) as client:
                with pytest.raises(GatewayClusterError) as info:
                    client.new_cluster()
                return str(info.value)

        return gateway, await asyncio.to_thread(user_flow)

    async def running_cluster(
        self, workers: int, backend: Mapping[str, Any] | None = None
    ) -> tuple[Any, Cluster]:
        """A gateway (with these ``[backend.<name>]`` keys) and a cluster of a user's running
        with ``workers`` workers: (API client of the user, the stored cluster)."""
        username, _ = self.account()
        gateway = await self.make_gateway(self.setup.config_with(backend=backend))
        api = self.make_api_client(gateway, username)
        name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
        cluster = self.record(gateway, name)
        await eventually(
            lambda: cluster.status == ClusterStatus.RUNNING, what="the cluster running"
        )
        scaled = await api.post(f"/api/v1/clusters/{name}/scale", json={"count": workers})
        assert scaled.status == 200, scaled.body
        await eventually(
            lambda: len(running_workers(cluster)) == workers, what=f"{workers} running worker(s)"
        )
        return api, cluster

    async def recorded_status_cluster(self, workers: int) -> tuple[Any, Cluster, Path, Path]:
        """`running_cluster` with the status command wrapped (`_status_wrapper`): (API client,
        cluster, the file of recorded calls, the flag file that makes the next call fail)."""
        assert self.setup.status_command is not None
        script, calls, flag = _status_wrapper(self.tmp_path, self.setup.status_command)
        api, cluster = await self.running_cluster(workers, {"status_command": str(script)})
        return api, cluster, calls, flag


def running_workers(cluster: Cluster) -> list[Worker]:
    return [w for w in cluster.workers.values() if w.status == WorkerStatus.RUNNING]


class BackendScenarios:
    """The scenarios, one test each (`SCENARIOS`). Subclass it in a test module of your plugin
    (``class TestScenarios(BackendScenarios): pass``) and provide the ``gateway_backend_setup``
    fixture returning a `BackendSetup`; mark the module with its tier (``integration`` or
    ``system``). Every test is marked for pytest-asyncio, so strict mode runs them too."""

    @pytest.fixture
    def scenario(
        self,
        request: pytest.FixtureRequest,
        gateway_backend_setup: BackendSetup,
        make_user: Callable[[], pwd.struct_passwd],
        make_gateway: Callable[..., Any],
        make_api_client: Callable[..., Any],
        tmp_path: Path,
    ) -> ScenarioRun:
        """The scenario's fixtures; ``make_user`` comes before ``make_gateway`` so gateways
        stop before their users' accounts go."""
        return ScenarioRun(
            request=request,
            setup=gateway_backend_setup,
            make_user=make_user,
            make_gateway=make_gateway,
            make_api_client=make_api_client,
            tmp_path=tmp_path,
        )

    @pytest.mark.asyncio
    async def test_life_cycle(self, scenario: ScenarioRun) -> None:
        """A cluster starts (as the requesting user), scales to two workers, computes through
        the proxy; stopping it ends its jobs and removes its files. Once per variant."""
        setup = scenario.setup
        scenario.applies("life_cycle", "live_jobs")
        for variant, table in setup.variants.items():
            username, uid = scenario.account()
            gateway = await scenario.make_gateway(merge(setup.config, table))
            await self.one_life_cycle(scenario, gateway, username, uid, variant)

    async def one_life_cycle(
        self, scenario: ScenarioRun, gateway: Any, username: str, uid: int, variant: str
    ) -> None:
        setup = scenario.setup
        seen: dict[str, Any] = {}

        def user_flow() -> None:
            with _client(gateway, username) as user_gateway:
                cluster = user_gateway.new_cluster()
                seen["name"] = cluster.name
                cluster.scale(2)
                client = cluster.get_client(set_as_default=False)
                try:
                    client.wait_for_workers(2, timeout=90)
                    seen["sum"] = client.submit(sum, range(100)).result(timeout=60)
                    seen["scheduler_uid"] = client.run_on_scheduler(os.getuid)
                    seen["worker_uids"] = sorted(client.run(os.getuid).values())
                    seen["task_uid"] = client.submit(os.getuid, pure=False).result(timeout=60)
                    record = scenario.record(gateway, cluster.name)
                    seen["record"] = record
                    seen["jobs"] = jobs = scenario.live(record)
                    seen["files"] = scenario.files_left(record)
                    if setup.inspect_running is not None:
                        setup.inspect_running(
                            RunningCluster(
                                gateway=gateway,
                                cluster=record,
                                username=username,
                                uid=uid,
                                variant=variant,
                                client=client,
                                jobs=jobs,
                            )
                        )
                finally:
                    client.close()
                    cluster.shutdown()

        await asyncio.to_thread(user_flow)

        where = f"{setup.backend}, variant {variant!r}"
        assert seen["sum"] == 4950, where
        # Every process of the cluster, scheduler, workers and tasks, runs as the user (or as
        # the gateway, for a backend that does not switch users).
        assert seen["scheduler_uid"] == uid, where
        assert seen["worker_uids"] == [uid, uid], where
        assert seen["task_uid"] == uid, where
        jobs: Mapping[str, LiveJob] = seen["jobs"]
        assert len(jobs) == 3, (where, jobs)
        assert sorted(j.worker is None for j in jobs.values()) == [False, False, True], jobs
        owner = username if setup.runs_as_user else pwd.getpwuid(os.getuid()).pw_name
        assert all(j.owner == owner and j.running for j in jobs.values()), (where, jobs)
        # Stopped: its jobs end, its files are removed.
        cluster: Cluster = seen["record"]
        await eventually(
            lambda: cluster.status == ClusterStatus.STOPPED, what=f"the cluster stopped ({where})"
        )
        if setup.cluster_files is not _no_files:
            assert seen["files"], f"{where}: cluster_files gave nothing for a running cluster"
        await eventually(
            lambda: not scenario.files_left(cluster), timeout=30, what="its files removed"
        )
        await eventually(
            lambda: not scenario.live(cluster),
            timeout=30,
            interval=0.5,
            what=f"its jobs ended ({where})",
        )
        if setup.check_stopped is not None:
            await passes(setup.check_stopped, cluster, timeout=30)

    @pytest.mark.asyncio
    async def test_refused_option(self, scenario: ScenarioRun) -> None:
        """An option the infrastructure refuses fails the cluster; the client shows why, and
        nothing is left behind."""
        setup = scenario.setup
        scenario.applies("refused_option", "refused_option", "live_jobs")
        assert setup.refused_option is not None
        gateway, message = await scenario.start_failure(setup.refused_option)
        _matches(message, setup.refused_reason, "the client's error")
        [cluster] = await gateway.backend.list_clusters()
        assert cluster.status == ClusterStatus.FAILED
        assert not scenario.files_left(cluster)
        assert not await asyncio.to_thread(scenario.live, cluster)

    @pytest.mark.asyncio
    async def test_scheduler_dies(self, scenario: ScenarioRun) -> None:
        """A scheduler that dies at once fails the cluster with the end of its output."""
        setup = scenario.setup
        scenario.applies("scheduler_dies", "dying_scheduler")
        assert setup.dying_scheduler is not None
        _, message = await scenario.start_failure(setup.dying_scheduler(DYING_SCRIPT))
        _matches(message, setup.dead_scheduler_reason, "the client's error")
        assert "\n".join(DYING_OUTPUT) in message, message

    @pytest.mark.asyncio
    async def test_ended_behind_the_gateways_back(self, scenario: ScenarioRun) -> None:
        """A worker ended outside the gateway is noticed within a status period and replaced;
        the cluster keeps running. Its scheduler ended so fails the cluster, with the reason."""
        setup = scenario.setup
        scenario.applies("ended_behind_the_gateways_back", "end_job", "live_jobs")
        assert setup.end_job is not None
        api, cluster = await scenario.running_cluster(workers=1)
        within = setup.status_period + setup.detection_slack

        [first] = running_workers(cluster)
        await asyncio.to_thread(setup.end_job, cluster, first)
        took = await eventually(
            lambda: first.status in (WorkerStatus.FAILED, WorkerStatus.STOPPED),
            timeout=within + 10,
            what="the ended worker noticed",
        )
        # Well under the heartbeat timeout: the status check noticed, not the heartbeat.
        assert took < within, f"noticed after {took:.1f} s"
        await eventually(
            lambda: len(running_workers(cluster)) == 1 and running_workers(cluster)[0] is not first,
            what="a replacement worker",
        )
        assert cluster.status == ClusterStatus.RUNNING

        await asyncio.to_thread(setup.end_job, cluster, None)
        took = await eventually(
            lambda: cluster.status == ClusterStatus.FAILED,
            timeout=within + 10,
            what="the cluster failed",
        )
        assert took < within, f"noticed after {took:.1f} s"
        assert cluster.reason
        _matches(cluster.reason, setup.ended_reason(cluster), "the cluster's reason")
        shown = await api.get(f"/api/v2/clusters/{cluster.name}/reason")
        assert shown.body["reason"] == cluster.reason
        await eventually(
            lambda: not scenario.live(cluster),
            timeout=30,
            interval=0.5,
            what="every job of the cluster ended",
        )

    @pytest.mark.asyncio
    async def test_status_command_fails_once(self, scenario: ScenarioRun) -> None:
        """A status command that fails once (the controller is busy) fails no cluster and no
        worker: the check is retried."""
        scenario.applies("status_command_fails_once", "status_command")
        api, cluster, calls, flag = await scenario.recorded_status_cluster(workers=1)
        [worker] = running_workers(cluster)
        flag.touch()
        await eventually(
            lambda: Path(f"{flag}.done").exists(), timeout=10, what="the injected failure"
        )
        after = len(_calls(calls))
        await eventually(lambda: len(_calls(calls)) >= after + 3, timeout=10, what="more checks")
        assert cluster.status == ClusterStatus.RUNNING
        assert worker.status == WorkerStatus.RUNNING
        assert (await api.delete(f"/api/v1/clusters/{cluster.name}")).status == 204
        await eventually(
            lambda: cluster.status == ClusterStatus.STOPPED, what="the cluster stopped"
        )

    @pytest.mark.asyncio
    async def test_one_status_command_per_check(self, scenario: ScenarioRun) -> None:
        """Each check asks one status command about all its jobs: with 1 s periods, about one
        call per second for both workers and one for the scheduler (the two checks have their
        own timers; questions asked together share a call)."""
        scenario.applies("one_status_command_per_check", "status_command", "live_jobs")
        _, cluster, calls, _ = await scenario.recorded_status_cluster(workers=2)
        jobs = await asyncio.to_thread(scenario.live, cluster)
        [scheduler_job] = [j for j, job in jobs.items() if job.worker is None]
        worker_jobs = [j for j, job in jobs.items() if job.worker is not None]
        assert len(worker_jobs) == 2, jobs

        before = len(_calls(calls))
        await asyncio.sleep(5.5 * scenario.setup.status_period)
        during = _calls(calls)[before:]
        with_workers = [line for line in during if any(_names(line, j) for j in worker_jobs)]
        with_scheduler = [line for line in during if _names(line, scheduler_job)]
        assert all(all(_names(line, j) for j in worker_jobs) for line in with_workers), during
        assert 4 <= len(with_workers) <= 7, during
        assert 4 <= len(with_scheduler) <= 7, during
        assert len(during) <= 2 * 7, during

    @pytest.mark.asyncio
    async def test_unknown_user(self, scenario: ScenarioRun) -> None:
        """A user without an account on the gateway's host fails with the reason, before
        anything is submitted or made."""
        setup = scenario.setup
        scenario.applies("unknown_user", "runs_as_user", "live_jobs")
        gateway = await scenario.make_gateway(setup.config)
        nobody = f"nosuchuser{secrets.token_hex(3)}"
        api = scenario.make_api_client(gateway, nobody)
        name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
        cluster = scenario.record(gateway, name)
        await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
        assert cluster.reason and nobody in cluster.reason, cluster.reason
        _matches(cluster.reason, setup.unknown_user_reason, "the cluster's reason")
        assert cluster.state == {}
        assert not await asyncio.to_thread(scenario.live, cluster)

    @pytest.mark.asyncio
    async def test_logs(self, scenario: ScenarioRun) -> None:
        """``GET /api/v2/clusters/{name}/logs`` answers the running scheduler's and worker's
        output (as Dask writes it), ``tail`` lines of it, and once the cluster stopped, a
        message for each (its files are gone), never an error."""
        scenario.applies("logs")
        api, cluster = await scenario.running_cluster(workers=1)
        [worker] = running_workers(cluster)
        path = f"/api/v2/clusters/{cluster.name}/logs"
        answers: list[Any] = []

        async def written() -> bool:
            answer = await api.get(path)
            answers.append(answer)
            assert answer.status == 200, answer.body
            logs = answer.body
            return "Scheduler at:" in logs.get("scheduler", "") and "Registered to" in logs.get(
                worker.name, ""
            )

        deadline = time.monotonic() + 60
        while not await written():
            assert time.monotonic() < deadline, f"no Dask output in the logs: {answers[-1].body}"
            await asyncio.sleep(0.5)
        assert list(answers[-1].body) == ["scheduler", worker.name]
        short = await api.get(f"{path}?component=scheduler&tail=2")
        assert short.status == 200, short.body
        assert list(short.body) == ["scheduler"]
        assert len(short.body["scheduler"].splitlines()) == 2, short.body

        assert (await api.delete(f"/api/v1/clusters/{cluster.name}")).status == 204
        await eventually(
            lambda: cluster.status == ClusterStatus.STOPPED, what="the cluster stopped"
        )
        await eventually(
            lambda: not scenario.files_left(cluster), timeout=30, what="its files removed"
        )
        gone = await api.get(path)
        assert gone.status == 200, gone.body
        assert list(gone.body) == ["scheduler", worker.name]
        assert all(text.startswith("(no log: ") for text in gone.body.values()), gone.body


def not_applicable_report(stash: pytest.Stash) -> Iterator[str]:
    """Lines naming each scenario declared not applicable in this run, and why."""
    for backend, scenario, reason in stash.get(NOT_APPLICABLE_KEY, []):
        yield f"{backend}: {scenario}: {reason}"


__all__ = [
    "DYING_OUTPUT",
    "DYING_SCRIPT",
    "SCENARIOS",
    "BackendScenarios",
    "BackendSetup",
    "LiveJob",
    "RunningCluster",
    "ScenarioRun",
    "applies",
    "eventually",
    "passes",
]
