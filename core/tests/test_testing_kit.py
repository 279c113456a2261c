"""Tests of the plugin authors' testing kit itself (`gateway_core.testing`): the scenario suite
runs under pytest-asyncio's strict mode, declared not-applicable scenarios are reported with
their reason, and a setup that forgets what a scenario needs fails naming it.

The strict-mode test runs a small plugin-like suite in a separate pytest process on a temporary
directory: the in-process backend, one scenario that applies, the others declared not
applicable.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway_core.testing.scenarios import NOT_APPLICABLE_KEY, SCENARIOS, BackendSetup, applies

pytestmark = pytest.mark.unit

CONFTEST = '''
"""The in-process backend for the scenario suite: its fake schedulers and workers are ended
behind the gateway's back through the driver the gateway made."""

import pytest

from gateway_core.testing.driver import InProcessDriver
from gateway_core.testing.scenarios import SCENARIOS, BackendSetup, LiveJob


@pytest.fixture
def drivers(monkeypatch):
    made = []
    init = InProcessDriver.__init__

    def tracking(self, **kwargs):
        init(self, **kwargs)
        made.append(self)

    monkeypatch.setattr(InProcessDriver, "__init__", tracking)
    return made


@pytest.fixture
def gateway_backend_setup(drivers):
    def driver_of(cluster):
        [driver] = [d for d in drivers if cluster.name in d.schedulers]
        return driver

    def live_jobs(cluster):
        found = [d for d in drivers if cluster.name in d.schedulers]
        if not found or cluster.name in found[0].dead_clusters:
            return {}
        scheduler = found[0].schedulers[cluster.name]
        jobs = {cluster.name: LiveJob(owner="gateway", running=True)}
        for name in scheduler.launched - found[0].dead_workers:
            jobs[name] = LiveJob(owner="gateway", running=True, worker=name)
        return jobs

    def end_job(cluster, worker):
        driver = driver_of(cluster)
        if worker is None:
            driver.kill_cluster(cluster.name, reason="the fake scheduler was ended")
        else:
            driver.dead_workers.add(worker.name)
            driver.schedulers[cluster.name].kill_worker(worker.name)

    periods = {"cluster_status_period": 1.0, "worker_status_period": 1.0}
    return BackendSetup(
        backend="inprocess",
        config={"backend": {"inprocess": {"cluster_heartbeat_period": 1, **periods}}},
        not_applicable={
            name: "fake schedulers run no Dask and no jobs"
            for name in SCENARIOS
            if name != "ended_behind_the_gateways_back"
        },
        live_jobs=live_jobs,
        end_job=end_job,
        ended_reason=lambda cluster: ["the fake scheduler was ended"],
    )
'''

SUITE = """
import pytest

from gateway_core.testing.scenarios import BackendScenarios


class TestInProcessScenarios(BackendScenarios):
    pass


@pytest.mark.asyncio
async def test_a_plugin_test_of_its_own(make_gateway, make_api_client):
    gateway = await make_gateway()
    alice = make_api_client(gateway, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"
"""


def test_the_kit_runs_under_pytest_asyncio_strict_mode(tmp_path: Path) -> None:
    """The kit's async fixtures (make_gateway, make_api_client) and the scenario suite's async
    tests run with ``--asyncio-mode=strict``, where only marked tests and pytest-asyncio
    fixtures run; the not-applicable scenarios are listed with their reason at the end."""
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "pytest_asyncio",
            "--asyncio-mode=strict",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    skipped = len(SCENARIOS) - 1
    assert f"2 passed, {skipped} skipped" in out, out
    assert "backend scenarios declared not applicable" in out, out
    for name in SCENARIOS:
        if name != "ended_behind_the_gateways_back":
            assert f"inprocess: {name}: fake schedulers run no Dask and no jobs" in out, out


def test_a_setup_naming_an_unknown_scenario_not_applicable_is_refused() -> None:
    with pytest.raises(ValueError, match="names no scenario: life_cylce; the scenarios are"):
        BackendSetup(backend="mine", config={}, not_applicable={"life_cylce": "typo"})


def test_a_scenario_the_setup_cannot_run_fails_naming_what_is_missing(
    request: pytest.FixtureRequest,
) -> None:
    setup = BackendSetup(backend="mine", config={})
    with pytest.raises(pytest.fail.Exception, match=r"needs BackendSetup.dying_scheduler from"):
        applies(request, setup, "scheduler_dies", "dying_scheduler")


def test_a_scenario_declared_not_applicable_is_skipped_with_the_reason_and_recorded(
    request: pytest.FixtureRequest,
) -> None:
    setup = BackendSetup(backend="mine", config={}, not_applicable={"unknown_user": "no users"})
    recorded = len(request.config.stash.get(NOT_APPLICABLE_KEY, []))
    with pytest.raises(pytest.skip.Exception, match="not applicable to mine: no users"):
        applies(request, setup, "unknown_user", "runs_as_user")
    assert request.config.stash[NOT_APPLICABLE_KEY][recorded:] == [
        ("mine", "unknown_user", "no users")
    ]
    request.config.stash[NOT_APPLICABLE_KEY] = request.config.stash[NOT_APPLICABLE_KEY][:recorded]


def test_unit_builders_make_a_typed_driver_and_cluster_and_name_a_bad_setting() -> None:
    from gateway_core.backends.local import LocalBackendConfig, LocalDriver
    from gateway_core.builtin import gateway_register_backends
    from gateway_core.config import ClusterConfig, ConfigError
    from gateway_core.testing.units import UNIT_API_URL, unit_cluster, unit_driver

    spec = next(s for s in gateway_register_backends() if s.name == "unsafe-local")
    driver = unit_driver(spec, LocalDriver, sigint_timeout=3.0)
    assert isinstance(driver.config, LocalBackendConfig) and driver.config.sigint_timeout == 3.0
    assert driver.context.api_url == UNIT_API_URL
    cluster = unit_cluster(spec, worker_cores=3, environment={"A": "1"})
    typed = driver.cluster_config(cluster)
    assert isinstance(typed, ClusterConfig) and typed is cluster.typed_config
    assert (typed.worker_cores, cluster.config["environment"]) == (3, {"A": "1"})
    with pytest.raises(ConfigError, match=r"backend\.unsafe-local\.sigint_timeout"):
        unit_driver(spec, LocalDriver, sigint_timeout="soon")
    with pytest.raises(TypeError, match="not a <class 'str'>"):
        unit_driver(spec, str)  # type: ignore[type-var]
    with pytest.raises(ConfigError, match=r"cluster\.worker_cores"):
        unit_cluster(spec, worker_cores="many")
