"""The pytest plugin plugin authors get with gateway-core: fixtures for a running gateway,
throwaway user accounts, and the backend scenario suite's setup.

Owns the fixtures `gateway_plugin_manager`, `postgres_url`, `make_gateway`, `make_api_client`,
`no_process_left_behind`, `job_user_homes`, `end_user_jobs`, `make_user`,
`job_python_packages`, `job_python` and the default `gateway_backend_setup` (which fails: a
plugin provides its own), and the end-of-run list of scenarios declared not applicable. The
machinery lives in `gateway_core.testing.harness`, `.processes`, `.jobqueue`, `.postgres`
and `.scenarios`. Async fixtures are pytest-asyncio fixtures, so they work in its strict mode as
in auto mode.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Imported with the plugin, not in the end-of-run hook: an import there may be the first of
# the module, so pytest's assertion rewriter parses it at exit, where CPython 3.11.7 can fail
# with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905) after the
# original client's finalizers raised.
from .scenarios import not_applicable_report

try:
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # gateway-core[testing] brings it; without it async fixtures cannot run
    async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:
    import pwd

    from ..app import Gateway
    from .harness import ApiClient
    from .scenarios import BackendSetup

# Heavy imports happen inside the fixtures: pytest loads this module in every session of every
# project that has gateway-core installed, and most of them never use it.
GatewayFactory = Callable[..., Awaitable["Gateway"]]


@pytest.fixture
def no_process_left_behind() -> Iterator[None]:
    """Fail the test if a process it started (a scheduler, a worker, a fork server, their
    orphans when the session set a subreaper) outlives it by more than 10 s; what is left is
    killed either way, so one failure does not spoil the next test.

    Use it with ``pytestmark = pytest.mark.usefixtures("no_process_left_behind")``.
    """
    from .processes import check_no_process_left, descendants

    before = set(descendants(reap=True))
    yield
    check_no_process_left(before)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database for this test, dropped after it.

    The server is the one core/ci/start-postgres.sh starts, or the one named by
    ``GATEWAY_TEST_POSTGRES_URL`` (`gateway_core.testing.postgres`). Without one the test fails
    under CI (``CI`` set) and is skipped elsewhere, with the command that starts it.
    """
    from .postgres import postgres_database

    with postgres_database() as url:
        yield url


@pytest.fixture
def gateway_plugin_manager() -> Iterator[Any]:
    """A fresh plugin manager with entry points and built-ins loaded, as the gateway builds it."""
    from ..plugins import make_plugin_manager

    yield make_plugin_manager()


@async_fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start gateways on free loopback ports; every one is stopped at teardown.

    ``await make_gateway(config, plugins=[...])``: ``config`` is a TOML-shaped dict merged over
    test defaults (loopback ports, the in-process backend); ``plugins`` are extra plugin
    objects. Select your own backend with ``{"gateway": {"backend": "mine"}}``.
    """
    from .harness import start_gateway

    started: list[Gateway] = []

    async def factory(
        config: Mapping[str, Any] | None = None, *, plugins: Sequence[object] = ()
    ) -> Gateway:
        gateway = await start_gateway(config, plugins=plugins)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in reversed(started):
        await gateway.stop()


@async_fixture
async def make_api_client() -> AsyncIterator[Callable[..., ApiClient]]:
    """``make_api_client(gateway, "alice", password=None)``: an `ApiClient` for that user."""
    from .harness import client_for

    clients: list[ApiClient] = []

    def factory(
        gateway: Gateway, username: str = "alice", password: str | None = None
    ) -> ApiClient:
        client = client_for(gateway, username, password)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


# --------------------------------------------------------------------------------------------
# Throwaway users and the jobs' Python (backends that run clusters as the requesting user)


@pytest.fixture(scope="session")
def job_user_homes() -> Iterator[Path]:
    """A directory in /tmp (mode 0755) for the throwaway users' homes and the jobs' venv,
    removed at the end of the session."""
    from .jobqueue import shared_tempdir

    base = shared_tempdir("gw-test-homes-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def end_user_jobs() -> Callable[[str], None]:
    """``end_user_jobs(username)``: end every job a throwaway account still has on your
    infrastructure (`make_user`'s teardown calls it before removing the account). Override it
    in your conftest; the default does nothing."""
    return lambda username: None


@pytest.fixture
def make_user(
    job_user_homes: Path, end_user_jobs: Callable[[str], None]
) -> Iterator[Callable[[], pwd.struct_passwd]]:
    """``make_user()``: a new account ``gwt<hex>`` with its home under `job_user_homes`, for one
    test (root only; fails with the reason otherwise). At teardown its jobs are ended
    (`end_user_jobs`), what it still runs is killed and the account removed."""
    from .jobqueue import JobTestSetupError, add_user, delete_user

    made: list[str] = []

    def factory() -> pwd.struct_passwd:
        try:
            user = add_user("gwt", job_user_homes)
        except JobTestSetupError as exc:
            pytest.fail(str(exc))
        made.append(user.pw_name)
        return user

    yield factory
    for name in made:
        end_user_jobs(name)
        delete_user(name)


@pytest.fixture(scope="session")
def job_python_packages() -> list[str]:
    """What `job_python` installs when it has to build a venv for the throwaway users: pip
    arguments (paths of your checkout's packages, requirement specifiers). Override it in your
    conftest; the default installs nothing, so only a Python users can already run works."""
    return []


@pytest.fixture(scope="session")
def job_python(job_user_homes: Path, job_python_packages: list[str]) -> str:
    """A Python the throwaway users can run with Dask and the gateway's packages: this
    interpreter when they can, else a venv built in `job_user_homes` with
    `job_python_packages` (see `gateway_core.testing.jobqueue.job_python`). Fails with the
    reason when neither works."""
    from .jobqueue import JobTestSetupError
    from .jobqueue import job_python as find_job_python

    try:
        return find_job_python(packages=job_python_packages, base=job_user_homes, source=Path.cwd())
    except JobTestSetupError as exc:
        pytest.fail(str(exc))


# --------------------------------------------------------------------------------------------
# The scenario suite


@pytest.fixture
def gateway_backend_setup() -> BackendSetup:
    """The backend the scenario suite (`gateway_core.testing.scenarios.BackendScenarios`) runs.
    Your plugin's conftest overrides it, returning a `BackendSetup`; this default fails."""
    pytest.fail(
        "the backend scenario suite needs a gateway_backend_setup fixture returning a "
        "gateway_core.testing.scenarios.BackendSetup: define it in your plugin's conftest.py "
        "(see docs/testing-a-backend.md)"
    )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """List the scenarios a plugin declared not applicable, and why, at the end of the run."""
    lines = list(not_applicable_report(config.stash))
    if lines:
        terminalreporter.section("backend scenarios declared not applicable")
        for line in lines:
            terminalreporter.line(line)
