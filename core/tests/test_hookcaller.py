"""Tests of `GatewayHooks`: pluggy's call order, awaited firstresult, isolated observers.

Also checks that core calls hooks only through it and that every hookspec has its method.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest

from gateway_core import hookimpl, hookspecs
from gateway_core.config import ClusterConfig, load_config
from gateway_core.context import GatewayContext
from gateway_core.events import ClusterEvent
from gateway_core.hookcaller import CALLED_ONE_BY_ONE, GatewayHooks
from gateway_core.models import User
from gateway_core.options import Integer, Options, OptionsError
from gateway_core.plugins import PluginError, make_plugin_manager

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src" / "gateway_core"
ALICE = User(name="alice")
CONFIG = load_config({"options": {"worker_cores": {"type": "int", "default": 1}}})
EVENT = ClusterEvent(kind="stopped", cluster_name="c1", username="alice")


def hooks_with(*plugins: object) -> GatewayHooks:
    """A caller over core's hookspecs and ``plugins``, registered in this order."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"p{i}")
    return GatewayHooks.from_plugin_manager(pm)


def form(name: str) -> Options:
    return Options(fields=[Integer(field=name)])


class Answers:
    """Answers ``gateway_cluster_options`` with ``answer`` (sync or from a coroutine)."""

    def __init__(self, answer: Options | None, *, is_async: bool = False, **opts: Any) -> None:
        self.answer = answer
        self.calls = 0

        def sync(user: User, config: Any) -> Options | None:
            self.calls += 1
            return self.answer

        async def from_coroutine(user: User, config: Any) -> Options | None:
            await asyncio.sleep(0)
            self.calls += 1
            return self.answer

        self.gateway_cluster_options = hookimpl(**opts)(from_coroutine if is_async else sync)


# --------------------------------------------------------------------------------------------
# gateway_cluster_options: firstresult on the awaited value
# --------------------------------------------------------------------------------------------


async def test_an_async_none_defers_to_the_next_plugin() -> None:
    fallback = Answers(form("from_file"))
    deferring = Answers(None, is_async=True)
    hooks = hooks_with(fallback, deferring)  # `deferring` is registered last: asked first
    answer = await hooks.gateway_cluster_options(user=ALICE, config=CONFIG)
    assert answer is not None and answer.names == ["from_file"]
    assert (deferring.calls, fallback.calls) == (1, 1)


async def test_a_sync_none_defers_and_the_first_answer_wins() -> None:
    never = Answers(form("never"))
    winner = Answers(form("winner"), is_async=True)
    deferring = Answers(None)
    hooks = hooks_with(never, winner, deferring)
    answer = await hooks.gateway_cluster_options(user=ALICE, config=CONFIG)
    assert answer is not None and answer.names == ["winner"]
    assert never.calls == 0  # nobody is asked after the first answer


async def test_tryfirst_and_trylast_order_as_pluggy_does() -> None:
    last = Answers(form("last"), trylast=True)
    first = Answers(None, is_async=True, tryfirst=True)
    plain_old = Answers(form("plain_old"))
    plain_new = Answers(None, is_async=True)
    hooks = hooks_with(first, plain_old, last, plain_new)
    order = [impl.plugin_name for impl in hooks._impls("gateway_cluster_options")]
    pm_order = [
        impl.plugin_name for impl in reversed(hooks.pm.hook.gateway_cluster_options.get_hookimpls())
    ]
    assert order == pm_order == ["p0", "p3", "p1", "p2"]
    answer = await hooks.gateway_cluster_options(user=ALICE, config=CONFIG)
    assert answer is not None and answer.names == ["plain_old"]
    assert last.calls == 0


async def test_no_answer_is_none_and_a_wrong_answer_names_the_plugin() -> None:
    assert (
        await hooks_with(Answers(None, is_async=True)).gateway_cluster_options(
            user=ALICE, config=CONFIG
        )
        is None
    )
    bad = Answers({"worker_cores": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"plugin 'p0': gateway_cluster_options returned dict"):
        await hooks_with(bad).gateway_cluster_options(user=ALICE, config=CONFIG)


async def test_an_implementation_may_take_fewer_arguments() -> None:
    class OnlyUser:
        @hookimpl
        def gateway_cluster_options(self, user: User) -> Options:
            return form(user.name)

    answer = await hooks_with(OnlyUser()).gateway_cluster_options(user=ALICE, config=CONFIG)
    assert answer is not None and answer.names == ["alice"]


# --------------------------------------------------------------------------------------------
# gateway_apply_options: every answer, awaited, in call order
# --------------------------------------------------------------------------------------------


class Overrides:
    def __init__(self, answer: Any, *, is_async: bool = False) -> None:
        def sync(user: User, options: Mapping[str, Any], config: ClusterConfig) -> Any:
            return answer

        async def from_coroutine(
            user: User, options: Mapping[str, Any], config: ClusterConfig
        ) -> Any:
            await asyncio.sleep(0)
            return answer

        self.gateway_apply_options = hookimpl(from_coroutine if is_async else sync)


async def test_apply_options_answers_come_awaited_in_call_order() -> None:
    hooks = hooks_with(Overrides({"a": 1}), Overrides(None), Overrides({"b": 2}, is_async=True))
    answers = await hooks.gateway_apply_options(
        user=ALICE, options={"x": 1}, config=ClusterConfig()
    )
    assert answers == [{"b": 2}, {"a": 1}]


async def test_apply_options_refusals_and_bad_answers() -> None:
    class Refuses:
        @hookimpl
        async def gateway_apply_options(self, options: Mapping[str, Any]) -> None:
            raise OptionsError(["x: no"])

    with pytest.raises(OptionsError, match="x: no"):
        await hooks_with(Refuses()).gateway_apply_options(
            user=ALICE, options={}, config=ClusterConfig()
        )
    with pytest.raises(TypeError, match=r"plugin 'p0': gateway_apply_options returned list"):
        await hooks_with(Overrides([1], is_async=True)).gateway_apply_options(
            user=ALICE, options={}, config=ClusterConfig()
        )


# --------------------------------------------------------------------------------------------
# gateway_cluster_event: each observer isolated
# --------------------------------------------------------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def gateway_cluster_event(self, event: ClusterEvent) -> None:
        self.events.append(event.kind)


class AsyncSeen(Seen):
    @hookimpl
    async def gateway_cluster_event(self, event: ClusterEvent) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.events.append(event.kind)


class RaisesNow:
    @hookimpl
    def gateway_cluster_event(self, event: ClusterEvent) -> None:
        raise RuntimeError("sync observer bug")


class RaisesLater:
    @hookimpl
    async def gateway_cluster_event(self, event: ClusterEvent) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async observer bug")


async def test_a_raising_observer_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, third = Seen(), AsyncSeen(), Seen()
    # call order is the reverse of registration: each raising one is called before a listener
    hooks = hooks_with(first, RaisesLater(), second, RaisesNow(), third, RaisesNow())
    with caplog.at_level(logging.ERROR, logger="gateway.hooks"):
        hooks.gateway_cluster_event(event=EVENT)
        await hooks.drain()
    assert (first.events, second.events, third.events) == (["stopped"], ["stopped"], ["stopped"])
    failures = [r.getMessage() for r in caplog.records]
    assert sorted(failures) == sorted(
        f"gateway_cluster_event observer of plugin {p!r} failed for stopped c1"
        for p in ("p1", "p3", "p5")
    )
    assert "sync observer bug" in caplog.text and "async observer bug" in caplog.text


async def test_emit_goes_through_the_caller_and_does_not_wait_for_observers() -> None:
    slow = AsyncSeen()
    context = GatewayContext(config=load_config({}), hook=hooks_with(slow))
    context.emit(EVENT)
    assert slow.events == []  # scheduled, not awaited by emit
    await context.hook.drain()
    assert slow.events == ["stopped"]


def test_an_awaitable_outside_an_event_loop_is_logged_not_leaked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks_with(AsyncSeen()).gateway_cluster_event(event=EVENT)
    assert "returned an awaitable outside an event loop" in caplog.text


# --------------------------------------------------------------------------------------------
# The rest of the contract
# --------------------------------------------------------------------------------------------


def test_a_context_without_hooks_has_no_plugins() -> None:
    context = GatewayContext(config=load_config({}))
    assert context.hook.pm.get_plugins() == set()
    context.emit(EVENT)  # no observer: nothing happens
    with pytest.raises(TypeError, match="must be a GatewayHooks"):
        GatewayContext(config=load_config({}), hook=object())  # type: ignore[arg-type]


def test_registration_answers_keep_each_plugins_error() -> None:
    class Broken:
        @hookimpl
        def gateway_register_proxies(self) -> list[Any]:
            raise ImportError("no such module")

    class Fine:
        @hookimpl
        def gateway_register_proxies(self) -> list[Any]:
            return []

    answers = hooks_with(Broken(), Fine()).gateway_register_proxies()
    assert [(a.plugin, a.value) for a in answers] == [("p0", None), ("p1", [])]
    assert isinstance(answers[0].error, ImportError) and answers[1].error is None


@pytest.mark.parametrize("hook", CALLED_ONE_BY_ONE)
def test_wrappers_of_hooks_called_one_by_one_are_refused(hook: str) -> None:
    def wrapper() -> Any:
        return (yield)

    plugin = types.SimpleNamespace(__name__="wraps")
    setattr(plugin, hook, hookimpl(wrapper=True)(wrapper))
    with pytest.raises(PluginError, match=f"implements {hook} as a hook wrapper"):
        make_plugin_manager(entry_points=False, extra_plugins=[plugin])


def test_every_hookspec_has_a_typed_method() -> None:
    specs = {n for n in vars(hookspecs) if n.startswith("gateway_")}
    methods = {n for n in vars(GatewayHooks) if n.startswith("gateway_")}
    assert specs == methods
    for name in specs:
        spec = inspect.signature(getattr(hookspecs, name))
        method = inspect.signature(getattr(GatewayHooks, name))
        assert list(method.parameters)[1:] == list(spec.parameters), name


def test_core_calls_hooks_only_through_the_caller() -> None:
    raw = re.compile(r"pm\.hook\.gateway_\w+\(")  # a pluggy relay called directly
    offenders = [
        f"{path.relative_to(SRC)}:{number}"
        for path in SRC.rglob("*.py")
        if path.name != "hookcaller.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if raw.search(line)
    ]
    assert offenders == []
