"""The pytest plugin plugin authors get with gateway-core: fixtures for a running gateway.

Owns the fixtures `gateway_plugin_manager`, `make_gateway`, `make_api_client` and
`no_process_left_behind`; the machinery they use lives in `gateway_core.testing.harness` and
`gateway_core.testing.processes`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..app import Gateway
    from .harness import ApiClient

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
def gateway_plugin_manager() -> Iterator[Any]:
    """A fresh plugin manager with entry points and built-ins loaded, as the gateway builds it."""
    from ..plugins import make_plugin_manager

    yield make_plugin_manager()


@pytest.fixture
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


@pytest.fixture
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
