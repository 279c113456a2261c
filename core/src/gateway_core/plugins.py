"""Builds the plugin manager for one gateway and the registry of what its plugins provide.

Owns `make_plugin_manager` (hookspecs, blocked names, entry points, core's built-ins, local
modules, `check_pending`), `Registry` (backends, authenticators and proxies by name, each
stamped with the plugin that registered it) and `plugin_infos`, the records `gateway plugins`
shows.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import pluggy
from attrs import define, evolve, field

from . import __version__, builtin, hookspecs
from .hookcaller import CALLED_ONE_BY_ONE, GatewayHooks
from .hookspecs import PROJECT_NAME
from .specs import AnySpec, AuthenticatorSpec, BackendSpec, ProxySpec

log = logging.getLogger("gateway.plugins")

ENTRY_POINT_GROUP = PROJECT_NAME
"""Entry-point group third-party plugins declare themselves under."""
ENV_DISABLE_PLUGINS = "GATEWAY_DISABLE_PLUGINS"
"""Comma-separated plugin names that must not be registered."""
BUILTIN_NAME = "core"
"""The name core's own plugin (`gateway_core.builtin`) is registered under."""

PluginSource = Literal["entry point", "built-in", "local", "extra"]
SpecT = TypeVar("SpecT", BackendSpec, AuthenticatorSpec, ProxySpec)


class PluginError(Exception):
    """A plugin cannot be loaded or used, or two plugins clash; the message names them."""


class UnknownPluginError(PluginError, LookupError):
    """The config selects a backend, authenticator or proxy that no plugin registered."""


@define(kw_only=True, frozen=True)
class PluginFailure:
    """An installed plugin that could not be used: it failed to import, to register, or to
    answer a registration hook."""

    name: str
    distribution: str = ""
    version: str = ""
    error: str


class GatewayPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers what went wrong while loading plugins.

    ``failures`` lists entry points that could not be loaded (they are reported, not fatal);
    ``blocked`` the names refused on purpose; ``sources`` how each registered plugin arrived.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.failures: list[PluginFailure] = []
        self.blocked: list[str] = []
        self.sources: dict[str, PluginSource] = {}
        self.entry_points: dict[str, tuple[str, str]] = {}
        """Every `gateway` entry point seen, blocked or not: name → (distribution, version)."""


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def make_plugin_manager(
    *,
    entry_points: bool = True,
    disabled: Iterable[str] | None = None,
    local_plugins: Sequence[str] = (),
    extra_plugins: Sequence[object] = (),
    local_plugin_path: Sequence[str | os.PathLike[str]] = (),
) -> GatewayPluginManager:
    """Build a fresh plugin manager for one gateway (or one CLI run).

    In order: add core's hookspecs; block ``disabled`` (default: the comma-separated names in
    ``$GATEWAY_DISABLE_PLUGINS``); load every ``gateway`` entry point, one at a time, so one
    that fails is recorded in ``pm.failures`` and the rest still load; register core's
    built-in plugin as ``"core"``; import and register the ``local_plugins`` modules the config
    lists (searching ``local_plugin_path`` first; failure here is fatal, since the config asked
    for them); register ``extra_plugins`` objects (tests use these); check that no plugin
    implements a hook that does not exist or wraps a hook core calls one implementation at a
    time (`gateway_core.hookcaller.CALLED_ONE_BY_ONE`).

    Raises `PluginError` naming the plugin for a local module that cannot be imported or
    registered, for an unknown hook name and for such a hook wrapper.
    """
    pm = GatewayPluginManager()
    pm.add_hookspecs(hookspecs)
    pm.blocked = _disabled_names(disabled)
    for name in pm.blocked:
        pm.set_blocked(name)
    if entry_points:
        _load_entry_points(pm)
    _register(pm, builtin, BUILTIN_NAME, "built-in")
    for module_name in local_plugins:
        module = _import_local(module_name, local_plugin_path)
        _register(pm, module, module_name, "local")
    for plugin in extra_plugins:
        _register(pm, plugin, None, "extra")
    _check_hook_names(pm)
    _check_wrappers(pm)
    pm.check_pending()  # what _check_hook_names already refused, in pluggy's own words
    return pm


def _disabled_names(disabled: Iterable[str] | None) -> list[str]:
    if disabled is None:
        disabled = os.environ.get(ENV_DISABLE_PLUGINS, "").split(",")
    names: list[str] = []
    for name in disabled:
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def _load_entry_points(pm: GatewayPluginManager) -> None:
    found: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        key = _normalize(dist_name)
        if key in seen:  # the same distribution twice on sys.path: the first one wins
            continue
        seen.add(key)
        found.extend(
            (ep.name, dist_name, dist.version)
            for ep in dist.entry_points
            if ep.group == ENTRY_POINT_GROUP
        )
    for name, dist_name, version in found:
        if name in pm.entry_points:
            other = pm.entry_points[name][0]
            pm.failures.append(
                PluginFailure(
                    name=name,
                    distribution=dist_name,
                    version=version,
                    error=f"entry point name {name!r} is already used by {other}",
                )
            )
            continue
        pm.entry_points[name] = (dist_name, version)
        if pm.is_blocked(name):
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception as exc:  # noqa: BLE001 - any error in a plugin's import is reported
            failure = PluginFailure(
                name=name, distribution=dist_name, version=version, error=_one_line(exc)
            )
            pm.failures.append(failure)
            log.warning(
                "plugin %r (%s %s) failed to load: %s", name, dist_name, version, failure.error
            )
            continue
        pm.sources[name] = "entry point"


def _import_local(name: str, search_path: Sequence[str | os.PathLike[str]]) -> object:
    added = [str(p) for p in search_path if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        return importlib.import_module(name)
    except Exception as exc:
        where = f" (searched {', '.join(added)} and sys.path)" if added else ""
        raise PluginError(
            f"plugin module {name!r} listed in `plugins` cannot be imported{where}: "
            f"{_one_line(exc)}"
        ) from exc
    finally:
        for path in added:
            if path in sys.path:
                sys.path.remove(path)


def _register(
    pm: GatewayPluginManager, plugin: object, name: str | None, source: PluginSource
) -> None:
    label = name or pm.get_canonical_name(plugin)
    try:
        registered = pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"plugin {label!r} cannot be registered: {_one_line(exc)}") from exc
    if registered is not None:
        pm.sources[registered] = source


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """Refuse hook implementations whose name is not a hook (usually a typo), naming all."""
    known = [name for name in vars(hookspecs) if name.startswith("gateway_")]
    problems: list[str] = []
    for hook_name, caller in vars(pm.hook).items():
        if hook_name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            guess = difflib.get_close_matches(hook_name, known, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            problems.append(
                f"plugin {impl.plugin_name!r}{_dist_note(pm, impl.plugin_name)} implements "
                f"unknown hook {hook_name!r}{hint}; fix it or disable the plugin with "
                f"{ENV_DISABLE_PLUGINS}={impl.plugin_name}"
            )
    if problems:
        raise PluginError("\n".join(problems))


def _check_wrappers(pm: pluggy.PluginManager) -> None:
    """Refuse hook wrappers of the hooks `GatewayHooks` calls one implementation at a time."""
    problems: list[str] = []
    for hook_name in CALLED_ONE_BY_ONE:
        problems.extend(
            f"plugin {impl.plugin_name!r}{_dist_note(pm, impl.plugin_name)} implements "
            f"{hook_name} as a hook wrapper; core calls each implementation of {hook_name} "
            "itself (to await it or to isolate a failing plugin), so make it a plain @hookimpl"
            for impl in getattr(pm.hook, hook_name).get_hookimpls()
            if impl.wrapper or impl.hookwrapper
        )
    if problems:
        raise PluginError("\n".join(problems))


# --------------------------------------------------------------------------------------------
# Where plugins come from
# --------------------------------------------------------------------------------------------


def plugin_distribution(pm: pluggy.PluginManager, name: str) -> tuple[str, str]:
    """(distribution, version) of the plugin registered as ``name``; empty strings for local
    modules and plugin objects handed in directly."""
    plugin = pm.get_plugin(name)
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return dist.project_name, dist.version
    if name == BUILTIN_NAME:
        return "gateway-core", __version__
    entry_points: Mapping[str, tuple[str, str]] = getattr(pm, "entry_points", {})
    return entry_points.get(name, ("", ""))


def _dist_note(pm: pluggy.PluginManager, name: str) -> str:
    dist, version = plugin_distribution(pm, name)
    return f" ({_dist_label(dist, version)})" if dist else ""


def _dist_label(dist: str, version: str) -> str:
    if not dist:
        return "no distribution"
    return f"{dist} {version}".strip()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _one_line(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_REGISTRATIONS: tuple[tuple[str, str, type[Any]], ...] = (
    ("backend", "gateway_register_backends", BackendSpec),
    ("authenticator", "gateway_register_authenticators", AuthenticatorSpec),
    ("proxy", "gateway_register_proxies", ProxySpec),
)


@define(kw_only=True, frozen=True)
class Registry:
    """Every backend, authenticator and proxy the loaded plugins registered, by name.

    Build it with `Registry.from_plugin_manager`. Each spec's ``plugin`` names the plugin that
    registered it. ``failures`` holds plugins that could not be loaded or whose registration
    hook failed; a lookup of a name such a plugin would have provided says so.
    """

    backends: Mapping[str, BackendSpec] = field(factory=dict)
    authenticators: Mapping[str, AuthenticatorSpec] = field(factory=dict)
    proxies: Mapping[str, ProxySpec] = field(factory=dict)
    failures: tuple[PluginFailure, ...] = ()
    blocked: tuple[str, ...] = ()

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Ask every plugin's registration hooks and index the answers by name.

        A plugin whose hook raises or returns something other than a list of specs becomes a
        failure (reported, not fatal). Two plugins registering one name is a `PluginError`
        naming both plugins and their distributions.
        """
        failures = list(getattr(pm, "failures", ()))
        hooks = GatewayHooks.from_plugin_manager(pm)
        tables: dict[str, dict[str, Any]] = {}
        clashes: list[str] = []
        for kind, hook_name, spec_type in _REGISTRATIONS:
            table: dict[str, Any] = {}
            for answer in getattr(hooks, hook_name)():
                plugin_name = answer.plugin
                try:
                    if answer.error is not None:
                        raise answer.error
                    specs = _checked_specs(answer.value, spec_type, hook_name)
                except Exception as exc:  # noqa: BLE001 - a broken plugin is reported
                    dist, version = plugin_distribution(pm, plugin_name)
                    failures.append(
                        PluginFailure(
                            name=plugin_name,
                            distribution=dist,
                            version=version,
                            error=f"{hook_name}: {_one_line(exc)}",
                        )
                    )
                    log.warning("plugin %r failed in %s: %s", plugin_name, hook_name, exc)
                    continue
                for spec in specs:
                    if spec.name in table:
                        clashes.append(_clash(pm, kind, spec.name, table[spec.name], plugin_name))
                        continue
                    table[spec.name] = evolve(spec, plugin=plugin_name)
            tables[kind] = table
        if clashes:
            raise PluginError("\n".join(clashes))
        return cls(
            backends=tables["backend"],
            authenticators=tables["authenticator"],
            proxies=tables["proxy"],
            failures=tuple(failures),
            blocked=tuple(getattr(pm, "blocked", ())),
        )

    def backend(self, name: str) -> BackendSpec:
        """The backend called ``name``; `UnknownPluginError` says what is available instead."""
        return self._lookup("backend", self.backends, name)

    def authenticator(self, name: str) -> AuthenticatorSpec:
        """The authenticator called ``name``; `UnknownPluginError` otherwise."""
        return self._lookup("authenticator", self.authenticators, name)

    def proxy(self, name: str) -> ProxySpec:
        """The proxy called ``name``; `UnknownPluginError` otherwise."""
        return self._lookup("proxy", self.proxies, name)

    def specs(self) -> Iterator[AnySpec]:
        """Every registered spec, backends first."""
        yield from self.backends.values()
        yield from self.authenticators.values()
        yield from self.proxies.values()

    def _lookup(self, kind: str, table: Mapping[str, SpecT], name: str) -> SpecT:
        if name in table:
            return table[name]
        available = ", ".join(sorted(table)) or "none"
        message = f"no {kind} named {name!r} is installed (available: {available})"
        related = [f for f in self.failures if _may_provide(name, f.name, f.distribution)]
        blocked = [b for b in self.blocked if _may_provide(name, b, "")]
        if related:
            message += "; " + "; ".join(
                f"plugin {f.name!r} ({_dist_label(f.distribution, f.version)}) failed to "
                f"load: {f.error}"
                for f in related
            )
        elif blocked:
            message += "; " + "; ".join(
                f"plugin {b!r} is disabled by {ENV_DISABLE_PLUGINS}" for b in blocked
            )
        elif self.failures:
            message += "; these plugins failed to load and might provide it: " + ", ".join(
                f"{f.name!r} ({f.error})" for f in self.failures
            )
        raise UnknownPluginError(message)


def _checked_specs(result: Any, spec_type: type[SpecT], hook_name: str) -> list[SpecT]:
    if result is None:
        return []
    if not isinstance(result, list | tuple) or not all(isinstance(s, spec_type) for s in result):
        raise TypeError(f"{hook_name} must return a list of {spec_type.__name__}, got {result!r}")
    return list(result)


def _clash(
    pm: pluggy.PluginManager, kind: str, name: str, first: AnySpec, second_plugin: str
) -> str:
    def who(plugin_name: str) -> str:
        dist, version = plugin_distribution(pm, plugin_name)
        return f"plugin {plugin_name!r} ({_dist_label(dist, version)})"

    return (
        f"{kind} {name!r} is registered twice: by {who(first.plugin)} and by "
        f"{who(second_plugin)}; uninstall one or disable it with {ENV_DISABLE_PLUGINS}"
    )


def _may_provide(wanted: str, plugin_name: str, distribution: str) -> bool:
    """Could the plugin ``plugin_name`` (from ``distribution``) be the one that registers
    ``wanted``? Entry points are named after their distribution less ``gateway-``, and a
    plugin usually names its backend or authenticator after itself (``auth-kerberos`` →
    ``kerberos``)."""
    target = _normalize(wanted)
    for candidate in (plugin_name, distribution):
        parts = _normalize(candidate).split("-") if candidate else []
        tails = {"-".join(parts[i:]) for i in range(len(parts))}
        if target in tails:
            return True
    return False


# --------------------------------------------------------------------------------------------
# What `gateway plugins` shows
# --------------------------------------------------------------------------------------------

PluginStatus = Literal["ok", "failed", "blocked"]


@define(kw_only=True, frozen=True)
class PluginInfo:
    """One plugin as the ``gateway plugins`` command reports it."""

    name: str
    kinds: list[str] = field(factory=list)
    """What it registered, as ``"<kind>:<name>"`` (``"backend:slurm"``)."""
    hooks: list[str] = field(factory=list)
    """The hooks it implements."""
    distribution: str = ""
    version: str = ""
    source: str = ""
    """``entry point``, ``built-in``, ``local`` (config ``plugins``) or ``extra``."""
    status: PluginStatus = "ok"
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kinds": list(self.kinds),
            "hooks": list(self.hooks),
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
        }


def plugin_infos(pm: pluggy.PluginManager, registry: Registry) -> list[PluginInfo]:
    """One record per plugin: registered ones in registration order, then those that failed
    to load, then blocked names."""
    sources: Mapping[str, str] = getattr(pm, "sources", {})
    entry_points: Mapping[str, tuple[str, str]] = getattr(pm, "entry_points", {})
    kinds: dict[str, list[str]] = {}
    for spec in registry.specs():
        kind = (
            "authenticator"
            if isinstance(spec, AuthenticatorSpec)
            else ("backend" if isinstance(spec, BackendSpec) else "proxy")
        )
        kinds.setdefault(spec.plugin, []).append(f"{kind}:{spec.name}")
    errors: dict[str, list[str]] = {}
    for failure in registry.failures:
        errors.setdefault(failure.name, []).append(failure.error)

    infos: list[PluginInfo] = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist, version = plugin_distribution(pm, name)
        callers = pm.get_hookcallers(plugin) or []
        problems = errors.pop(name, [])
        infos.append(
            PluginInfo(
                name=name,
                kinds=kinds.get(name, []),
                hooks=sorted(caller.name for caller in callers),
                distribution=dist,
                version=version,
                source=sources.get(name, ""),
                status="failed" if problems else "ok",
                error="; ".join(problems),
            )
        )
    for failure in registry.failures:
        if failure.name in errors:
            infos.append(
                PluginInfo(
                    name=failure.name,
                    distribution=failure.distribution,
                    version=failure.version,
                    source="entry point",
                    status="failed",
                    error="; ".join(errors.pop(failure.name)),
                )
            )
    for name in registry.blocked:
        dist, version = entry_points.get(name, ("", ""))
        infos.append(
            PluginInfo(
                name=name,
                distribution=dist,
                version=version,
                source="entry point" if name in entry_points else "",
                status="blocked",
                error=f"disabled by {ENV_DISABLE_PLUGINS}",
            )
        )
    return infos
