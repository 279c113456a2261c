"""Structures every section of a loaded config with the classes of the plugins it selects.

Owns `resolve_config` and its result `ResolvedConfig`: `gateway config check`, `config show` and
the gateway's start-up all use it, so they agree on what a valid config is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define, field

from .config import (
    AuthConfig,
    BackendConfig,
    ClusterConfig,
    Config,
    ConfigError,
    GatewayConfig,
    ProxyConfig,
    structure,
)
from .plugins import PluginError, Registry
from .specs import AuthenticatorSpec, BackendSpec, ProxySpec

if TYPE_CHECKING:
    from .options import Options

T = TypeVar("T")
SpecT = TypeVar("SpecT", BackendSpec, AuthenticatorSpec)

DEFAULT_PROXY = GatewayConfig().proxy
"""The proxy selected when the config names none. Its absence is not an error (the API is then
served directly, without scheduler routing) unless its distribution is installed but broken."""
PROXY_DISTRIBUTION = "gateway-proxy"
"""The distribution that registers the default proxy."""


@define(kw_only=True, frozen=True)
class ResolvedConfig:
    """A config with every section structured by the selected plugins' classes."""

    config: Config
    """The loaded file, as `load_config` returned it."""
    gateway: GatewayConfig
    backend_spec: BackendSpec
    backend: BackendConfig
    """``[backend.<selected>]`` structured with ``backend_spec.config``."""
    backends: Mapping[str, BackendConfig] = field(factory=dict)
    """Every ``[backend.<name>]`` section in the file, structured, plus the selected one."""
    auth_spec: AuthenticatorSpec
    auth: AuthConfig
    """``[auth.<selected>]`` structured with ``auth_spec.config``."""
    auths: Mapping[str, AuthConfig] = field(factory=dict)
    """Every ``[auth.<name>]`` section in the file, structured, plus the selected one."""
    proxy_spec: ProxySpec | None
    """The selected proxy; None when no proxy plugin is installed and the default is selected."""
    proxy: ProxyConfig
    cluster: ClusterConfig
    """``[cluster]`` structured with the selected backend's cluster config class."""
    cluster_table: dict[str, Any]
    """``[cluster]`` as written, the base every cluster's options are applied over."""
    options: Options


def resolve_config(config: Config, registry: Registry) -> ResolvedConfig:
    """Look up the selected backend, authenticator and proxy in ``registry`` and structure
    every plugin section of ``config`` with their classes.

    Raises `ConfigError` listing every problem at once, each as ``"path: what is wrong"``: an
    unknown plugin name, a ``[backend.<name>]`` or ``[auth.<name>]`` section no plugin owns, a
    bad key in any section, an invalid ``[options]`` form.
    """
    from .options import Options, OptionsError

    problems: list[str] = []
    gw = config.gateway
    problems.extend(_store_problems(gw))
    problems.extend(_metrics_problems(config))

    backend_spec = _select(problems, "gateway.backend", registry.backend, gw.backend)
    backends = _structure_sections(
        problems, "backend", config.backend, registry.backends, backend_spec
    )
    auth_spec = _select(problems, "gateway.authenticator", registry.authenticator, gw.authenticator)
    auths = _structure_sections(problems, "auth", config.auth, registry.authenticators, auth_spec)

    proxy_spec: ProxySpec | None = None
    proxy_broken = any(f.distribution == PROXY_DISTRIBUTION for f in registry.failures)
    if gw.proxy in registry.proxies or gw.proxy != DEFAULT_PROXY or proxy_broken:
        proxy_spec = _select(problems, "gateway.proxy", registry.proxy, gw.proxy)
    proxy_class = proxy_spec.config if proxy_spec is not None else ProxyConfig
    proxy = _structure(problems, config.proxy, proxy_class, "proxy")

    cluster_class = backend_spec.cluster_config if backend_spec is not None else ClusterConfig
    cluster = _structure(problems, config.cluster, cluster_class, "cluster")

    options: Options | None = None
    try:
        options = Options.from_config(config.options)
    except OptionsError as exc:
        problems.extend(exc.problems)
    if options is not None and cluster is not None:
        problems.extend(_check_targets(config, options, cluster_class))

    if problems:
        raise ConfigError(problems)
    assert backend_spec is not None and auth_spec is not None
    assert cluster is not None and proxy is not None and options is not None
    backend = backends[backend_spec.name]
    auth = auths[auth_spec.name]
    return ResolvedConfig(
        config=config,
        gateway=gw,
        backend_spec=backend_spec,
        backend=backend,
        backends=backends,
        auth_spec=auth_spec,
        auth=auth,
        auths=auths,
        proxy_spec=proxy_spec,
        proxy=proxy,
        cluster=cluster,
        cluster_table=dict(config.cluster),
        options=options,
    )


def _store_problems(gw: GatewayConfig) -> list[str]:
    """What `Store` would refuse at start-up: a ``db_url`` that is no database URL, a
    persistent database without ``db_encrypt_keys``, a key that is not a Fernet key."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError

    from .store import KEY_HELP, StoreError, fernet_from_key, is_in_memory

    try:
        url = sa.make_url(gw.db_url)
    except ArgumentError:
        return [f"gateway.db_url: {gw.db_url!r} is not a database URL (dialect+driver://...)"]
    keys = [k for k in gw.db_encrypt_keys if k.strip()]
    if not keys and not is_in_memory(gw.db_url):
        shown = url.render_as_string(hide_password=True)
        return [
            f"gateway.db_encrypt_keys: required, since the database {shown} is persistent "
            f"(cluster secrets are encrypted at rest); {KEY_HELP}"
        ]
    problems = []
    for index, key in enumerate(keys):
        try:
            fernet_from_key(key, index=index)
        except StoreError as exc:
            where, _, what = str(exc).partition(" ")
            problems.append(f"gateway.{where}: {what}")
    return problems


def _metrics_problems(config: Config) -> list[str]:
    """``[metrics]``: a token of blanks, or a token that ``public = true`` would make unused."""
    metrics = config.metrics
    if metrics.token and not metrics.token.strip():
        return ["metrics.token: is only blanks; give a real token or remove the key"]
    if metrics.token and metrics.public:
        return [
            "metrics.public: true serves /metrics to anyone, so metrics.token would be unused; "
            "keep one of them"
        ]
    return []


def _select(problems: list[str], path: str, lookup: Any, name: str) -> Any:
    try:
        return lookup(name)
    except PluginError as exc:
        problems.append(f"{path}: {exc}")
        return None


def _structure(problems: list[str], data: Any, cls: type[T], path: str) -> T | None:
    try:
        return structure(data, cls, path=path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _structure_sections(
    problems: list[str],
    kind: str,
    sections: Mapping[str, Mapping[str, Any]],
    specs: Mapping[str, SpecT],
    selected: SpecT | None,
) -> dict[str, Any]:
    """Structure each ``[<kind>.<name>]`` with its plugin's class, and the selected plugin's
    section from its defaults when the file has none."""
    tables = dict(sections)
    if selected is not None:
        tables.setdefault(selected.name, {})
    out: dict[str, Any] = {}
    for name, table in tables.items():
        spec = specs.get(name)
        if spec is None:
            available = ", ".join(sorted(specs)) or "none"
            problems.append(
                f"{kind}.{name}: no plugin provides {kind} {name!r} (installed: {available})"
            )
            continue
        value = _structure(problems, table, spec.config, f"{kind}.{name}")
        if value is not None:
            out[name] = value
    return out


def _check_targets(
    config: Config, options: Options, cluster_class: type[ClusterConfig]
) -> list[str]:
    """Each `[options]` field must land on a setting of the cluster config (its ``target``, or
    its own name), and its default must be a valid value there."""
    import attrs

    names = {f.name for f in attrs.fields(cluster_class)}
    problems = []
    for option in options.fields:
        if option.target_name in names:
            continue
        where = f"options.{option.field}" + (".target" if option.target else "")
        problems.append(
            f"{where}: {option.target_name!r} is not a [cluster] setting of "
            f"{cluster_class.__name__}" + ("" if option.target else "; set `target` to one")
        )
    if problems:
        return problems
    merged = {**config.cluster, **options.targets(options.defaults())}
    owners = {option.target_name: option.field for option in options.fields}
    try:
        with_defaults = structure(merged, cluster_class)
    except ConfigError as exc:
        for problem in exc.problems:
            key = problem.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
            if key in owners:
                problems.append(f"options.{owners[key]}.default: {problem}")
        return problems
    ceiling = structure(config.cluster, cluster_class).max_lifetime
    lifetime = with_defaults.max_lifetime
    if "max_lifetime" in owners and ceiling is not None and (lifetime or math.inf) > ceiling:
        problems.append(
            f"options.{owners['max_lifetime']}.default: max_lifetime {lifetime} is above "
            f"[cluster] max_lifetime {ceiling}; options may only lower it"
        )
    return problems
