"""The typed way core calls its plugins' hooks: one method per hook, awaitables handled here.

Owns `GatewayHooks` (built from a plugin manager with `GatewayHooks.from_plugin_manager`),
and `PluginAnswer` (one plugin's answer to a registration hook).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pluggy
from attrs import define, field

from . import hookspecs
from .hookspecs import PROJECT_NAME

if TYPE_CHECKING:
    import click

    from .config import ClusterConfig, Config
    from .events import ClusterEvent
    from .models import User
    from .options import Options

log = logging.getLogger("gateway.hooks")

CALLED_ONE_BY_ONE = (
    "gateway_cluster_options",
    "gateway_apply_options",
    "gateway_cluster_event",
    "gateway_register_backends",
    "gateway_register_authenticators",
    "gateway_register_proxies",
)
"""Hooks whose implementations `GatewayHooks` calls itself, one at a time (to await each answer
or to isolate each plugin); pluggy's hook wrappers cannot wrap them, so `make_plugin_manager`
refuses wrappers of these hooks."""


@define(kw_only=True, frozen=True)
class PluginAnswer:
    """One plugin's answer to a hook every plugin is asked: its ``value``, or the ``error``
    its implementation raised (then ``value`` is None)."""

    plugin: str
    value: Any = None
    error: Exception | None = None


@define(kw_only=True)
class GatewayHooks:
    """Calls the hooks of `gateway_core.hookspecs` with their real types.

    Build it with `from_plugin_manager`. Implementations are called in pluggy's order (the
    last registered first; ``tryfirst`` ones before and ``trylast`` ones after all others), and
    an implementation may return an awaitable wherever the hookspec allows one: every method
    here awaits or schedules it, so no caller of this class sees an awaitable.
    """

    pm: pluggy.PluginManager
    _tasks: set[asyncio.Task[None]] = field(factory=set, alias="_tasks")

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> GatewayHooks:
        """The caller for ``pm``'s plugins (hook wrappers of `CALLED_ONE_BY_ONE` are skipped;
        `gateway_core.plugins.make_plugin_manager` refuses them)."""
        return cls(pm=pm)

    @classmethod
    def without_plugins(cls) -> GatewayHooks:
        """A caller with no plugin at all (not even core's built-ins): no form, no observers.
        For backends and drivers built outside a gateway, e.g. in their tests."""
        pm = pluggy.PluginManager(PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        return cls(pm=pm)

    # ----------------------------------------------------------------------------------------
    # The hooks
    # ----------------------------------------------------------------------------------------

    async def gateway_cluster_options(self, *, user: User, config: Config) -> Options | None:
        """The first implementation's answer that is not None once awaited, or None.

        A plugin answering None (directly or from a coroutine) defers to the next one; an
        answer that is not an `Options` is a TypeError naming the plugin.
        """
        from .options import Options

        kwargs = {"user": user, "config": config}
        for impl in self._impls("gateway_cluster_options"):
            answer = await _awaited(_call(impl, kwargs))
            if answer is None:
                continue
            if not isinstance(answer, Options):
                raise TypeError(
                    f"plugin {impl.plugin_name!r}: gateway_cluster_options returned "
                    f"{type(answer).__name__}, expected Options or None"
                )
            return answer
        return None

    async def gateway_apply_options(
        self, *, user: User, options: Mapping[str, Any], config: ClusterConfig
    ) -> list[Mapping[str, Any]]:
        """Every implementation's answer, awaited, in call order (so the first one should win a
        key: apply them in reverse). None answers are left out; an answer that is not a mapping
        is a TypeError naming the plugin. Exceptions (e.g. `OptionsError`) propagate."""
        kwargs = {"user": user, "options": MappingProxyType(dict(options)), "config": config}
        answers: list[Mapping[str, Any]] = []
        for impl in self._impls("gateway_apply_options"):
            answer = await _awaited(_call(impl, kwargs))
            if answer is None:
                continue
            if not isinstance(answer, Mapping):
                raise TypeError(
                    f"plugin {impl.plugin_name!r}: gateway_apply_options returned "
                    f"{type(answer).__name__}, expected a mapping or None"
                )
            answers.append(answer)
        return answers

    def gateway_cluster_event(self, *, event: ClusterEvent) -> None:
        """Tell every observer about ``event``; never raises, never blocks.

        Each observer is isolated: one that raises, or whose awaitable raises (awaited in a
        background task), is logged with its plugin's name and the others still run.
        """
        for impl in self._impls("gateway_cluster_event"):
            try:
                result = _call(impl, {"event": event})
            except Exception:
                log.exception(
                    "gateway_cluster_event observer of plugin %r failed for %s %s",
                    impl.plugin_name,
                    event.kind,
                    event.cluster_name,
                )
                continue
            if inspect.isawaitable(result):
                self._observe_later(result, impl.plugin_name, event)

    def gateway_register_commands(self, *, cli: click.Group) -> None:
        """Let every plugin add its commands to ``cli`` (called through pluggy: wrappers work)."""
        self.pm.hook.gateway_register_commands(cli=cli)

    def gateway_register_backends(self) -> list[PluginAnswer]:
        """Each plugin's answer (a list of `BackendSpec`, unchecked) in registration order."""
        return self._registrations("gateway_register_backends")

    def gateway_register_authenticators(self) -> list[PluginAnswer]:
        """Each plugin's answer (a list of `AuthenticatorSpec`, unchecked), as for backends."""
        return self._registrations("gateway_register_authenticators")

    def gateway_register_proxies(self) -> list[PluginAnswer]:
        """Each plugin's answer (a list of `ProxySpec`, unchecked), as for backends."""
        return self._registrations("gateway_register_proxies")

    async def drain(self) -> None:
        """Wait for the observers' awaitables still running (tests, a tidy shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    def _impls(self, hook_name: str) -> Iterator[pluggy.HookImpl]:
        """The implementations of ``hook_name`` in pluggy's call order, without wrappers."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if not (impl.wrapper or impl.hookwrapper):
                yield impl

    def _registrations(self, hook_name: str) -> list[PluginAnswer]:
        answers = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                continue
            try:
                answers.append(PluginAnswer(plugin=impl.plugin_name, value=_call(impl, {})))
            except Exception as exc:  # noqa: BLE001 - the registry reports a broken plugin
                answers.append(PluginAnswer(plugin=impl.plugin_name, error=exc))
        return answers

    def _observe_later(self, awaitable: Awaitable[Any], plugin: str, event: ClusterEvent) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running event loop: nothing could await it
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            log.error(
                "gateway_cluster_event observer of plugin %r returned an awaitable outside an "
                "event loop; it was not run for %s %s",
                plugin,
                event.kind,
                event.cluster_name,
            )
            return
        task = loop.create_task(_observe(awaitable, plugin, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _call(impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
    """Call one implementation as pluggy would: with the arguments it names."""
    func: Callable[..., Any] = impl.function
    return func(*[kwargs[name] for name in impl.argnames])


async def _awaited(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _observe(awaitable: Awaitable[Any], plugin: str, event: ClusterEvent) -> None:
    try:
        await awaitable
    except Exception:
        log.exception(
            "gateway_cluster_event observer of plugin %r failed for %s %s",
            plugin,
            event.kind,
            event.cluster_name,
        )
