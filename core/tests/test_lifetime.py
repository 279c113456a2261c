"""Tests of `[cluster] max_lifetime` with the reconciler and the in-process driver.

A cluster gets a ``lifetime_warning`` event, then is stopped (not failed) with a reason the user
reads; a user option may lower the lifetime through the cluster manager, never raise it.
Lifetimes are seconds long and the timeouts pass runs every 20 ms.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pluggy
import pytest
from test_reconciler import FAST, Events, until

from gateway_core import builtin, hookspecs
from gateway_core.backends.process import ProcessBackend
from gateway_core.config import ClusterConfig, ConfigError, load_config, structure
from gateway_core.context import GatewayContext
from gateway_core.errors import InvalidRequest
from gateway_core.hookcaller import GatewayHooks
from gateway_core.manager import ClusterManager
from gateway_core.models import ClusterStatus, User
from gateway_core.testing.driver import InProcessConfig, InProcessDriver
from gateway_core.units import format_duration, parse_duration

pytestmark = pytest.mark.unit

ALICE = User(name="alice")


class Site:
    """A ProcessBackend over the in-process driver, with the cluster manager in front."""

    def __init__(self, config: dict[str, Any]) -> None:
        pm = pluggy.PluginManager("gateway")
        pm.add_hookspecs(hookspecs)
        self.observer = Events()
        pm.register(self.observer)
        pm.register(builtin)  # the `[options]` form
        cfg = load_config(config, environ={})
        self.context = GatewayContext(config=cfg, hook=GatewayHooks.from_plugin_manager(pm))
        self.backend_config = InProcessConfig(**FAST)
        self.driver = InProcessDriver(config=self.backend_config, context=self.context)
        self.backend = ProcessBackend(
            config=self.backend_config,
            cluster_config_class=ClusterConfig,
            context=self.context,
            driver=self.driver,
        )
        self.driver.deliver_to(self.backend)
        self.manager = ClusterManager(
            backend=self.backend, context=self.context, cluster_defaults=cfg.cluster
        )

    def events(self, name: str) -> list[Any]:
        return [e for e in self.observer.events if e.cluster_name == name]


SiteFactory = Callable[[dict[str, Any]], Awaitable[Site]]


@pytest.fixture
async def site() -> AsyncIterator[SiteFactory]:
    made: list[Site] = []

    async def factory(config: dict[str, Any]) -> Site:
        s = Site(config)
        await s.backend.setup()
        made.append(s)
        return s

    yield factory
    for s in made:
        await s.backend.cleanup()
        await s.driver.shutdown()


async def test_a_warning_then_a_stop_whose_reason_the_user_sees(site: SiteFactory) -> None:
    s = await site({"cluster": {"max_lifetime": "3s", "lifetime_warning": "2s"}})
    short = await s.manager.create_cluster(ALICE, {})
    endless = await s.backend.start_cluster(
        user=ALICE, options={}, config=ClusterConfig()
    )  # no max_lifetime: never warned, never stopped
    cluster = await s.backend.get_cluster(short)
    assert cluster is not None
    await until(lambda: cluster.status == ClusterStatus.RUNNING)
    await until(lambda: "lifetime_warning" in [e.kind for e in s.events(short)], timeout=10)
    warning = next(e for e in s.events(short) if e.kind == "lifetime_warning")
    assert warning.detail == {"max_lifetime": 3.0, "stop_time": cluster.start_time + 3000}
    assert warning.time - cluster.start_time >= 1000  # 3 s - 2 s
    assert cluster.status == ClusterStatus.RUNNING
    await until(lambda: cluster.status == ClusterStatus.STOPPED, timeout=10)
    assert cluster.stop_time is not None and cluster.stop_time - cluster.start_time >= 3000
    assert cluster.reason == "stopped: maximum lifetime of 3s reached"
    got = await s.manager.get_cluster(ALICE, short)
    assert got.reason == "stopped: maximum lifetime of 3s reached"  # what /reason answers
    kinds = [e.kind for e in s.events(short)]
    assert kinds.index("lifetime_warning") < kinds.index("stopped")
    assert kinds.count("lifetime_warning") == 1
    stopped = next(e for e in s.events(short) if e.kind == "stopped")
    assert stopped.detail["reason"] == "stopped: maximum lifetime of 3s reached"
    other = await s.backend.get_cluster(endless)
    assert other is not None and other.status == ClusterStatus.RUNNING
    assert "lifetime_warning" not in [e.kind for e in s.events(endless)]


LIFETIME_OPTION = {"lifetime": {"type": "string", "default": "1h", "target": "max_lifetime"}}


async def test_a_user_option_lowers_the_lifetime(site: SiteFactory) -> None:
    s = await site({"cluster": {"max_lifetime": "1h"}, "options": LIFETIME_OPTION})
    name = await s.manager.create_cluster(ALICE, {"lifetime": "1.5s"})
    cluster = await s.backend.get_cluster(name)
    assert cluster is not None
    await until(lambda: cluster.status == ClusterStatus.STOPPED, timeout=10)
    assert cluster.reason == "stopped: maximum lifetime of 1.5s reached"
    # 1h's warning is capped at half the lifetime: it came first.
    assert [e.kind for e in s.events(name)].count("lifetime_warning") == 1


async def test_a_user_option_may_not_raise_the_lifetime(site: SiteFactory) -> None:
    s = await site({"cluster": {"max_lifetime": "1h"}, "options": LIFETIME_OPTION})
    with pytest.raises(InvalidRequest) as info:
        await s.manager.create_cluster(ALICE, {"lifetime": "1d"})
    assert str(info.value) == (
        "max_lifetime: 1d is above the configured maximum of 1h; a cluster may live at most "
        "that long"
    )
    assert await s.backend.list_clusters() == []


async def test_a_plugin_may_not_lift_the_lifetime_either(site: SiteFactory) -> None:
    s = await site({"cluster": {"max_lifetime": "1h"}})

    class Lift:
        @hookspecs.hookimpl
        def gateway_apply_options(self, user: User, options: Any, config: Any) -> Any:
            return {"max_lifetime": None}

    s.context.hook = GatewayHooks.from_plugin_manager(_with(s, Lift()))
    with pytest.raises(InvalidRequest, match=r"max_lifetime: none \(no limit\) is above"):
        await s.manager.create_cluster(ALICE, {})
    assert await s.backend.list_clusters() == []


def _with(s: Site, plugin: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    pm.register(s.observer)
    pm.register(builtin)
    pm.register(plugin)
    return pm


@pytest.mark.parametrize(
    ("text", "seconds", "shown"),
    [
        ("8h", 28800.0, "8h"),
        ("1h30m", 5400.0, "1h30m"),
        ("90s", 90.0, "1m30s"),
        ("2d", 172800.0, "2d"),
        (" 0.5H ", 1800.0, "30m"),
        ("600", 600.0, "10m"),
        (600, 600.0, "10m"),
        (1.5, 1.5, "1.5s"),
    ],
)
def test_durations_parse_and_print(text: Any, seconds: float, shown: str) -> None:
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == shown


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("8x", "invalid duration '8x'"),
        ("h", "invalid duration 'h'"),
        ("-1h", "invalid duration '-1h'"),
        (-5, "must not be negative"),
        (True, "expected a duration"),
    ],
)
def test_bad_durations_are_refused(value: Any, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_duration(value)


def test_max_lifetime_in_the_cluster_section_is_checked() -> None:
    assert structure({"max_lifetime": "8h"}, ClusterConfig).max_lifetime == 28800.0
    for value, problem in (
        ("8q", "cluster.max_lifetime: invalid duration '8q'"),
        (0, "cluster.max_lifetime: must be positive (leave it unset for no limit)"),
    ):
        with pytest.raises(ConfigError) as info:
            structure({"max_lifetime": value}, ClusterConfig, path="cluster")
        assert info.value.problems[0].startswith(problem)
    # The warning comes at most half the lifetime early.
    assert structure({"max_lifetime": "10m"}, ClusterConfig).lifetime_warning_at == 300.0
    assert structure({"max_lifetime": "8h"}, ClusterConfig).lifetime_warning_at == 28200.0


def test_config_check_refuses_an_option_default_above_max_lifetime() -> None:
    from gateway_core.configcheck import resolve_config
    from gateway_core.plugins import Registry, make_plugin_manager

    registry = Registry.from_plugin_manager(make_plugin_manager())

    def check(default: str) -> None:
        option = {"type": "string", "default": default, "target": "max_lifetime"}
        cfg = {"cluster": {"max_lifetime": "8h"}, "options": {"lifetime": option}}
        resolve_config(load_config(cfg, environ={}), registry)

    check("2h")
    with pytest.raises(ConfigError) as info:
        check("10h")
    assert info.value.problems == [
        "options.lifetime.default: max_lifetime 10h is above [cluster] max_lifetime 8h; "
        "options may only lower it"
    ]
