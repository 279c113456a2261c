"""The gateway's configuration: attrs classes, one cattrs converter, the TOML loader.

Owns the sections of `gateway.toml` that core defines (`[gateway]`, `[proxy]`, `[cluster]`,
`[options]`, `[quotas]`, `plugins`), the base classes plugins extend for `[backend.<name>]` and
`[auth.<name>]`, environment overrides for secrets, and errors as one line per bad key.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_origin

import cattrs
from attrs import define, field, fields
from cattrs.cols import list_structure_factory, mapping_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from . import models
from .units import format_duration, parse_duration, parse_memory

T = TypeVar("T")


class Memory(int):
    """A size in bytes; config accepts ``"2 G"``, ``"512 MiB"`` or a plain integer."""


class Duration(float):
    """A length of time in seconds; config accepts ``"8h"``, ``"1h30m"``, ``"90s"`` or a number
    of seconds."""

    def __str__(self) -> str:
        return format_duration(self)


class Command(list[str]):
    """A command line; config accepts a list of arguments or one shell-quoted string."""


class ConfigError(Exception):
    """Bad configuration: ``problems`` holds one ``"path: what is wrong"`` line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------------------------
# Core sections
# --------------------------------------------------------------------------------------------


@define(kw_only=True, frozen=True)
class GatewayConfig:
    """`[gateway]`: the API server, which plugins are selected, and the store."""

    address: str = "127.0.0.1:0"
    """Where the private API server listens (``host:port``); the proxy is the public face."""
    backend: str = "unsafe-local"
    """Name of the cluster backend to use (see ``gateway plugins``)."""
    authenticator: str = "simple"
    """Name of the authenticator to use."""
    proxy: str = "builtin"
    """Name of the proxy to use."""
    api_url: str = ""
    """Address clusters use to reach the API; default ``{proxy address}{prefix}/api``."""
    log_level: str = "INFO"
    """Log level of the gateway process: DEBUG, INFO, WARNING, ERROR."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """Event loop of ``gateway serve``: ``auto`` takes uvloop when it is installed (the
    embedded proxy adds about half the latency on it), else asyncio's own."""
    admin_users: list[str] = field(factory=list)
    """Users who may see and act on every cluster."""
    max_body_size: Memory = Memory(1 << 20)
    """Largest request body the API accepts."""
    wait_timeout: float = 20.0
    """How long ``GET /api/v1/clusters/{name}?wait`` blocks at most, in seconds."""
    db_url: str = "sqlite:///:memory:"
    """SQLAlchemy URL of the store; anything but in-memory needs ``db_encrypt_keys``."""
    db_encrypt_keys: list[str] = field(factory=list)
    """Fernet keys (base64, 32 bytes) encrypting secrets at rest; env GATEWAY_ENCRYPT_KEYS."""
    db_debug: bool = False
    """Log every database statement."""
    db_cleanup_period: float = 600.0
    """Seconds between purges of finished clusters' records."""
    db_cluster_max_age: float = 86400.0
    """Seconds a stopped or failed cluster's record is kept."""
    stop_clusters_on_shutdown: bool = True
    """Stop every active cluster when the gateway stops; false leaves them running, and a
    gateway restarted on the same persistent store takes them back."""
    replica_id: str = ""
    """This gateway's name among replicas sharing one PostgreSQL database; empty derives
    ``<host name>:<proxy address>`` (stable across restarts, unique per host and port)."""
    lease_ttl: float = 15.0
    """Seconds a replica's hold on its shards of clusters lasts unrenewed (renewed every third
    of it); a dead replica's clusters are taken over within about 4/3 of it."""
    replica_sync_period: float = 1.0
    """Seconds between reads of what other replicas changed (the staleness bound)."""


@define(kw_only=True, frozen=True)
class MetricsConfig:
    """`[metrics]`: who may read the Prometheus metrics at ``/metrics``.

    With neither ``token`` nor ``public``, ``/metrics`` answers 403 saying how to enable it.
    """

    token: str = field(default="", repr=False)
    """Bearer token a scraper presents (``Authorization: Bearer <token>``); env
    GATEWAY_METRICS_TOKEN."""
    public: bool = False
    """Serve ``/metrics`` to anyone, without a token."""


@define(kw_only=True, frozen=True)
class ProxyConfig:
    """`[proxy]`: the public HTTP and TCP (TLS-SNI) faces; a proxy plugin may extend it."""

    address: str = ":8000"
    """Where the public HTTP face listens (``host:port``; empty host = every interface)."""
    tcp_address: str = ""
    """Where the TLS-SNI face for schedulers listens; empty shares ``address``."""
    prefix: str = ""
    """Path prefix for every HTTP route, e.g. ``/gateway``."""
    tls_cert: str = ""
    """PEM certificate file for HTTPS on the public face (with ``tls_key``)."""
    tls_key: str = ""
    """PEM key file for HTTPS on the public face."""
    api_token: str = ""
    """Token the proxy uses on the routes feed; env GATEWAY_PROXY_TOKEN."""
    externally_managed: bool = False
    """True when the proxy runs on its own (``gateway proxy``) and reads the routes feed."""
    gateway_url: str = ""
    """For a standalone proxy: the gateway API's base URL, where the routes feed is."""
    log_level: str = "warn"
    """Log level of the proxy."""
    max_events: int = 100
    """Route changes kept for feed readers; a reader further behind reloads the full table."""


class CheckedConfig:
    """Base of the config sections plugins subclass (`ClusterConfig`, `BackendConfig`,
    `AuthConfig`): values are checked once, when the section is structured.

    Each class of a section's hierarchy may define ``check(self) -> list[str]``, returning the
    problems with the settings it declares (``"name: why"``). Every class's own ``check`` runs,
    the base's first, and all problems are raised together as one `ConfigError`, so a subclass
    neither calls ``super()`` nor can forget to.
    """

    __slots__ = ()

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        for klass in reversed(type(self).__mro__):
            check = vars(klass).get("check")
            if check is not None:
                problems.extend(check(self))
        if problems:
            raise ConfigError(problems)


DEFAULT_GROUP = models.DEFAULT_GROUP
"""The name of the worker group every cluster has: the workers of the `[cluster]` settings
(and the only group the original dask-gateway client knows)."""

GROUP_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?")
"""Valid worker group names: 1-16 lower-case letters, digits and inner '-' (they go into
worker names, job names and Kubernetes labels; a worker name, ``<32-hex cluster>-<group>-<10
hex>``, then fits a 63-character DNS label)."""

GROUP_OWN_KEYS = ("worker_cmd", "worker_cores", "worker_memory", "worker_threads", "environment")
"""The `WorkerGroup` settings that override the `[cluster]` setting of the same name."""

GROUP_FORBIDDEN_BACKEND_KEYS = frozenset({"worker_groups", "enabled_worker_groups"})
"""Cluster settings a group's ``backend`` table may not override."""


@define(kw_only=True, frozen=True)
class WorkerGroup:
    """One `[cluster.worker_groups.<name>]` table: a named kind of worker a cluster may scale
    besides its default workers. Unset settings are the `[cluster]` ones."""

    worker_cores: int | None = None
    """CPU cores per worker of this group."""
    worker_memory: Memory | None = None
    """Memory per worker of this group."""
    worker_threads: int | None = None
    """Threads per worker; unset: as many as the group's cores."""
    worker_cmd: Command | None = None
    """Command starting a worker of this group."""
    environment: dict[str, str] = field(factory=dict)
    """Environment variables of this group's workers, merged over `[cluster] environment`."""
    max_workers: int | None = None
    """Workers of this group one cluster may have; unset: ``cluster_max_workers``."""
    backend: dict[str, Any] = field(factory=dict)
    """Backend extras: other settings of the backend's cluster config, for this group's
    workers only (Slurm ``partition``, PBS ``queue``, Kubernetes ``image``...)."""


@define(kw_only=True, frozen=True)
class ClusterConfig(CheckedConfig):
    """`[cluster]`: what every cluster gets unless an option handler overrides it.

    Backends with more per-cluster settings (a Slurm partition) subclass this.
    """

    merged_keys: ClassVar[frozenset[str]] = frozenset({"environment"})
    """Mapping-valued settings a user option or a plugin's ``gateway_apply_options`` merges into
    (its keys win) instead of replacing: ``environment``. Every other setting is replaced. A
    subclass may add its own mapping settings (``merged_keys | {"pod_labels"}``)."""

    scheduler_cmd: Command = field(factory=lambda: Command(["dask", "scheduler"]))
    """Command starting a Dask scheduler (a list, or one shell-quoted string)."""
    worker_cmd: Command = field(factory=lambda: Command(["dask", "worker"]))
    """Command starting a Dask worker."""
    scheduler_cores: int = 1
    """CPU cores for the scheduler."""
    scheduler_memory: Memory = Memory(2 * 2**30)
    """Memory for the scheduler (``"2 G"``, ``"512 MiB"`` or bytes)."""
    worker_cores: int = 1
    """CPU cores per worker."""
    worker_memory: Memory = Memory(2 * 2**30)
    """Memory per worker."""
    worker_threads: int = 0
    """Threads per worker; 0 means as many as ``worker_cores``."""
    environment: dict[str, str] = field(factory=dict)
    """Environment variables for scheduler and workers."""
    idle_timeout: float = 0.0
    """Seconds of idleness after which a cluster stops itself; 0 never."""
    adaptive_period: float = 3.0
    """Seconds between adaptive-scaling decisions in the scheduler."""
    cluster_max_cores: float | None = None
    """Cores one cluster may use in all (scheduler included); unset for no limit."""
    cluster_max_memory: Memory | None = None
    """Memory one cluster may use in all (scheduler included); unset for no limit."""
    cluster_max_workers: int | None = None
    """Workers one cluster may have; combined with the core and memory limits."""
    max_lifetime: Duration | None = None
    """Longest a cluster may live (``"8h"``, ``"30m"`` or seconds), counted from its creation;
    then it is stopped with the reason "stopped: maximum lifetime of 8h reached". Unset: no
    limit. An option or plugin may lower it per cluster, never raise it above this value (such
    a request is refused with 422)."""
    lifetime_warning: Duration = Duration(600.0)
    """How long before ``max_lifetime`` a ``lifetime_warning`` cluster event is emitted; at
    most half the lifetime (a 10-minute lifetime warns after 5 minutes)."""
    worker_groups: dict[str, WorkerGroup] = field(factory=dict)
    """`[cluster.worker_groups.<name>]`: named worker groups besides the default one, each
    with its own cores, memory, environment and backend extras (docs/worker-groups.md)."""
    enabled_worker_groups: list[str] | None = None
    """The named groups this cluster may scale; unset: all of ``worker_groups``. An option
    targeting it lets users choose, or admins limit, the groups of a cluster."""

    def check(self) -> list[str]:
        """Problems with the settings this class declares (see `CheckedConfig`)."""
        problems: list[str] = []
        for name in ("scheduler_cores", "worker_cores"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.worker_threads < 0:
            problems.append(f"worker_threads: must not be negative, got {self.worker_threads}")
        if self.cluster_max_workers is not None and self.cluster_max_workers < 0:
            problems.append("cluster_max_workers: must not be negative")
        if self.cluster_max_memory is not None and self.scheduler_memory > self.cluster_max_memory:
            problems.append("scheduler_memory: larger than cluster_max_memory")
        if self.cluster_max_cores is not None and self.scheduler_cores > self.cluster_max_cores:
            problems.append("scheduler_cores: larger than cluster_max_cores")
        if self.max_lifetime is not None and self.max_lifetime <= 0:
            problems.append("max_lifetime: must be positive (leave it unset for no limit)")
        problems.extend(self._group_problems())
        return problems

    def _group_problems(self) -> list[str]:
        problems: list[str] = []
        known = set(_field_names(type(self)))
        for name, group in self.worker_groups.items():
            where = f"worker_groups.{name}"
            if name == DEFAULT_GROUP:
                problems.append(
                    f"{where}: '{DEFAULT_GROUP}' is the name of the default group "
                    "(the [cluster] settings); choose another name"
                )
                continue
            if not GROUP_NAME.fullmatch(name):
                problems.append(
                    f"{where}: invalid group name {name!r}; names are 1-16 lower-case letters, "
                    "digits or inner '-'"
                )
                continue
            for key in ("worker_cores", "worker_threads", "max_workers"):
                value = getattr(group, key)
                if value is not None and value < (0 if key == "max_workers" else 1):
                    least = 0 if key == "max_workers" else 1
                    problems.append(f"{where}.{key}: must be at least {least}, got {value}")
            for key in group.backend:
                if key in GROUP_FORBIDDEN_BACKEND_KEYS or key in GROUP_OWN_KEYS:
                    problems.append(
                        f"{where}.backend.{key}: set it "
                        + ("on the group itself" if key in GROUP_OWN_KEYS else "in [cluster]")
                    )
                elif key not in known:
                    problems.append(f"{where}.backend.{key}: not a cluster setting of this backend")
            if problems:
                continue
            try:
                self.for_group(name)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if self.enabled_worker_groups is not None:
            for i, name in enumerate(self.enabled_worker_groups):
                if name != DEFAULT_GROUP and name not in self.worker_groups:
                    problems.append(
                        f"enabled_worker_groups[{i}]: no worker group {name!r}; "
                        f"the groups are {', '.join(self.group_names(all_groups=True))}"
                    )
        return problems

    def group_names(self, *, all_groups: bool = False) -> list[str]:
        """The groups a cluster of this config may scale: ``default`` first, then the named
        ones (those of ``enabled_worker_groups`` unless ``all_groups``), in declared order."""
        named = list(self.worker_groups)
        if not all_groups and self.enabled_worker_groups is not None:
            named = [n for n in named if n in self.enabled_worker_groups]
        return [DEFAULT_GROUP, *named]

    def group(self, name: str) -> WorkerGroup:
        """The named group ``name`` (KeyError naming the groups there are when it is not one
        this cluster may scale)."""
        if name == DEFAULT_GROUP or name not in self.group_names():
            raise KeyError(
                f"no worker group {name!r}; the groups are {', '.join(self.group_names())}"
            )
        return self.worker_groups[name]

    def for_group(self, name: str) -> ClusterConfig:
        """This config as the workers of group ``name`` see it: the group's settings (and its
        backend extras) over the `[cluster]` ones, mappings of ``merged_keys`` merged. The
        default group is this config itself. ConfigError when the result does not fit."""
        if name == DEFAULT_GROUP:
            return self
        group = self.worker_groups[name]
        data = unstructure(self)
        data["worker_groups"] = {}
        data["enabled_worker_groups"] = None
        layer: dict[str, Any] = dict(group.backend)
        for key in GROUP_OWN_KEYS:
            value = getattr(group, key)
            if value is not None and value != {}:
                layer[key] = unstructure(value)
        for key, value in layer.items():
            below = data.get(key)
            if (
                key in self.merged_keys
                and isinstance(value, Mapping)
                and isinstance(below, Mapping)
            ):
                data[key] = {**below, **value}
            else:
                data[key] = value
        if group.worker_cores is not None and group.worker_threads is None:
            data["worker_threads"] = 0
        return structure(data, type(self), path=f"worker_groups.{name}")

    def group_max_workers(self, name: str) -> int | None:
        """The most workers of group ``name`` one cluster may have (None: no limit): the
        default group's is `max_workers`; a named group's its own ``max_workers``, else
        ``cluster_max_workers``."""
        if name == DEFAULT_GROUP:
            return self.max_workers
        group = self.group(name)
        return group.max_workers if group.max_workers is not None else self.cluster_max_workers

    @property
    def lifetime_warning_at(self) -> float | None:
        """Seconds after creation when the lifetime warning is due; None without a lifetime."""
        if self.max_lifetime is None:
            return None
        return self.max_lifetime - min(self.lifetime_warning, self.max_lifetime / 2)

    @property
    def threads(self) -> int:
        return self.worker_threads or self.worker_cores

    @property
    def max_workers(self) -> int | None:
        """Workers allowed by ``cluster_max_workers``, ``_cores`` and ``_memory`` together.

        The scheduler's share comes off the core and memory limits first. None: no limit.
        """
        limit: float = math.inf
        if self.cluster_max_workers is not None:
            limit = self.cluster_max_workers
        if self.cluster_max_cores is not None:
            limit = min(limit, (self.cluster_max_cores - self.scheduler_cores) // self.worker_cores)
        if self.cluster_max_memory is not None:
            spare = self.cluster_max_memory - self.scheduler_memory
            limit = min(limit, spare // self.worker_memory)
        return None if limit == math.inf else max(0, int(limit))


@define(kw_only=True, frozen=True)
class BackendConfig(CheckedConfig):
    """Base of every `[backend.<name>]` section."""


@define(kw_only=True, frozen=True)
class ProcessBackendConfig(BackendConfig):
    """Timing and limits of the reconciler every process-style backend shares (seed 000)."""

    cluster_start_timeout: float = 60.0
    """Seconds a cluster may take from submission to its scheduler's first heartbeat."""
    worker_start_timeout: float = 60.0
    """Seconds a worker may take to connect to its scheduler."""
    cluster_heartbeat_period: int = 15
    """Seconds between scheduler heartbeats."""
    cluster_heartbeat_timeout: float = 0.0
    """Seconds without a heartbeat before a cluster is failed; 0 means twice the period."""
    cluster_status_period: float = 30.0
    """Seconds between batched checks that schedulers are alive."""
    worker_status_period: float = 30.0
    """Seconds between batched checks that workers are alive."""
    check_timeouts_period: float = 0.0
    """Seconds between timeout checks; 0 derives it from the smallest timeout."""
    backoff_base_delay: float = 0.1
    """First retry delay after a failed operation; doubles each failure."""
    backoff_max_delay: float = 300.0
    """Longest retry delay."""
    parallelism: int = 20
    """Operations (starts, stops) run at once."""
    worker_start_failure_limit: int = 3
    """Failed worker starts in a row after which the cluster is failed."""

    @property
    def heartbeat_timeout(self) -> float:
        return self.cluster_heartbeat_timeout or 2.0 * self.cluster_heartbeat_period

    @property
    def timeouts_period(self) -> float:
        if self.check_timeouts_period > 0:
            return self.check_timeouts_period
        smallest = min(
            self.cluster_start_timeout, self.worker_start_timeout, self.heartbeat_timeout
        )
        return max(0.05, min(5.0, smallest / 4))


@define(kw_only=True, frozen=True)
class AuthConfig(CheckedConfig):
    """Base of every `[auth.<name>]` section."""

    cache_max_age: int = 300
    """Seconds a login is cached in a cookie before the backing service is asked again."""
    cookie_name: str = ""
    """Name of that cookie; empty means ``gateway-<authenticator name>``."""


@define(kw_only=True, frozen=True)
class OptionSpec:
    """One user option declared in `[options.<field>]`."""

    type: str
    default: Any = None
    label: str | None = None
    target: str | None = None
    min: float | None = None
    max: float | None = None
    options: list[Any] = field(factory=list)
    """For ``select``: keys, or ``{key = "...", value = ...}`` tables."""


QUOTA_KEYS = ("max_clusters", "max_workers", "max_cores", "max_memory")
"""The limits a `[quotas.*]` table may set, in the order messages list them."""


@define(kw_only=True, frozen=True)
class Quota(CheckedConfig):
    """One `[quotas.default]`, `[quotas.users.<name>]` or `[quotas.groups.<group>]` table: the
    limits on all active (pending or running) clusters of one user, or of a group's members
    together. An unset key is no limit (or, for a user, the default's value)."""

    max_clusters: int | None = None
    """Active clusters at once."""
    max_workers: int | None = None
    """Workers (pending and running) of all those clusters together."""
    max_cores: float | None = None
    """Cores of all those clusters together, schedulers included."""
    max_memory: Memory | None = None
    """Memory of all those clusters together (``"64 GiB"``), schedulers included."""

    def check(self) -> list[str]:
        """Problems with the limits (see `CheckedConfig`): none may be negative."""
        return [
            f"{key}: must not be negative, got {getattr(self, key)}"
            for key in QUOTA_KEYS
            if getattr(self, key) is not None and getattr(self, key) < 0
        ]

    def over(self, base: Quota) -> Quota:
        """This table's keys where set, ``base``'s elsewhere (a user's override of the
        default, key by key)."""
        values = {k: getattr(self, k) for k in QUOTA_KEYS}
        return Quota(**{k: getattr(base, k) if v is None else v for k, v in values.items()})

    @property
    def is_limited(self) -> bool:
        """True when any key is set."""
        return any(getattr(self, k) is not None for k in QUOTA_KEYS)


@define(kw_only=True, frozen=True)
class QuotasConfig:
    """`[quotas]`: per-user limits (`default`, overridden key by key in `users`) and group
    pools shared by all members of a group together (`groups`)."""

    default: Quota = field(factory=Quota)
    """`[quotas.default]`: the limits of every user."""
    users: dict[str, Quota] = field(factory=dict)
    """`[quotas.users.<name>]`: one user's limits, overriding the default key by key."""
    groups: dict[str, Quota] = field(factory=dict)
    """`[quotas.groups.<group>]`: one pool for all members of the group (groups come from
    the authenticator, `User.groups`)."""

    def for_user(self, name: str) -> Quota:
        """The limits of user ``name``: its own table over the default."""
        own = self.users.get(name)
        return self.default if own is None else own.over(self.default)


@define(kw_only=True, frozen=True)
class Config:
    """The whole file, with backend and authenticator sections structured later by their
    plugin's classes (only the plugins know them); see `load_config`."""

    plugins: list[str] = field(factory=list)
    gateway: GatewayConfig = field(factory=GatewayConfig)
    metrics: MetricsConfig = field(factory=MetricsConfig)
    proxy: dict[str, Any] = field(factory=dict)
    cluster: dict[str, Any] = field(factory=dict)
    backend: dict[str, dict[str, Any]] = field(factory=dict)
    auth: dict[str, dict[str, Any]] = field(factory=dict)
    options: dict[str, OptionSpec] = field(factory=dict)
    quotas: QuotasConfig = field(factory=QuotasConfig)
    source: str = ""
    """Where the config came from (a path, or empty for built-in defaults)."""


# --------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------


def _structure_memory(value: Any, _type: Any) -> Memory:
    return Memory(parse_memory(value))


def _structure_duration(value: Any, _type: Any) -> Duration:
    return Duration(parse_duration(value))


def _structure_command(value: Any, _type: Any) -> Command:
    if isinstance(value, str):
        return Command(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return Command(value)
    raise TypeError(f"expected a command (string or list of strings), got {_kind(value)}")


def _structure_strict(expected: type) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        # TOML already gives real types; refuse silent coercion ("3" to 3, 1 to True).
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not expected:
            raise TypeError(f"expected {expected.__name__}, got {_kind(value)}")
        return value

    return hook


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "table", list: "array"}
    return names.get(type(value), type(value).__name__)


def _container_hook(expected: type, factory: Any) -> Any:
    """cattrs builds a list from any iterable (``"alice"`` → five letters) and a dict from
    anything with ``items``; refuse what TOML would not have given for the type."""

    def make(type_: Any, conv: cattrs.Converter) -> Any:
        inner = factory(type_, conv)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, expected):
                name = "array" if expected is list else "table"
                raise TypeError(f"expected {name}, got {_kind(value)}")
            return inner(value, t)

        return hook

    return make


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook_factory(
        lambda t: t is list or get_origin(t) is list,
        _container_hook(list, list_structure_factory),
    )
    conv.register_structure_hook_factory(
        lambda t: t is dict or get_origin(t) is dict,
        _container_hook(Mapping, mapping_structure_factory),
    )
    conv.register_structure_hook(Memory, _structure_memory)
    conv.register_structure_hook(Command, _structure_command)
    conv.register_structure_hook(Duration, _structure_duration)
    for t in (str, int, float, bool):
        conv.register_structure_hook(t, _structure_strict(t))
    conv.register_structure_hook(Any, lambda v, _t: v)
    conv.register_unstructure_hook(Memory, int)
    conv.register_unstructure_hook(Command, list)
    conv.register_unstructure_hook(Duration, float)
    quota_hook = conv.get_structure_hook(Quota)

    def structure_quota(value: Any, type_: Any) -> Quota:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table of limits, got {_kind(value)}")
        return quota_hook(value, type_)

    conv.register_structure_hook(Quota, structure_quota)
    return conv


_converter = _make_converter()


def structure(data: Any, cls: type[T], *, path: str = "") -> T:
    """Build ``cls`` from plain data; raise ConfigError with one line per bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"{path or '<root>'}: expected a table, got {_kind(data)}"])
    try:
        return _converter.structure(data, cls)
    except ConfigError as exc:
        raise ConfigError([_join(path, p) for p in exc.problems]) from None
    except Exception as exc:  # noqa: BLE001 - cattrs raises groups of anything a hook raised
        raise ConfigError(list(_problems(exc, path))) from None


def unstructure(obj: Any) -> Any:
    """Plain data (dicts, lists, numbers) from a config object, as TOML would hold it."""
    return _converter.unstructure(obj)


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _problems(exc: BaseException, path: str) -> Iterator[str]:
    if isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            yield f"{_join(path, key)}: unknown key"
    elif isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            sub_path = path
            for note in notes:
                if hasattr(note, "name"):
                    sub_path = _join(path, note.name)
                elif hasattr(note, "index"):
                    sub_path = _join(path, note.index)
            yield from _problems(sub, sub_path)
    elif isinstance(exc, ExceptionGroup):
        for sub in exc.exceptions:
            yield from _problems(sub, path)
    elif isinstance(exc, ConfigError):
        for problem in exc.problems:
            yield _join(path, problem) if path else problem
    elif isinstance(exc, KeyError):
        yield f"{path}: required key is missing"
    else:
        yield f"{path or '<root>'}: {_message(exc)}"


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TypeError) and "missing" in text and "required" in text:
        return "required key is missing"
    value, sep, choices = text.partition(" not in literal typing.Literal[")
    if sep and choices.endswith("]"):  # cattrs' words for a value outside a Literal
        return f"expected one of {choices[:-1]}, got {value!r}"
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

ENV_PROXY_TOKEN = "GATEWAY_PROXY_TOKEN"
ENV_ENCRYPT_KEYS = "GATEWAY_ENCRYPT_KEYS"
ENV_CONFIG = "GATEWAY_CONFIG"
ENV_METRICS_TOKEN = "GATEWAY_METRICS_TOKEN"
DEFAULT_CONFIG_FILE = "gateway.toml"

REMOVED_KEYS: Mapping[tuple[str, str], str] = {
    ("proxy", "proxy_status_period"): "it never had an effect; delete the line",
}
"""Keys earlier versions accepted, by (section, key), with what to do instead. A file that
still sets one is refused with that advice rather than a bare "unknown key"."""


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes a one-line ConfigError with the position."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such config file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: invalid TOML: {exc}"]) from None


def find_config_file(explicit: str | None = None) -> Path | None:
    """The file to load: ``explicit``, else $GATEWAY_CONFIG, else ./gateway.toml if present."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(
    data: Mapping[str, Any] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    collect: list[str] | None = None,
) -> Config:
    """Structure the core sections of a config from ``data`` or the TOML file at ``path``.

    Environment variables then override secrets. Plugin sections (``backend``, ``auth``,
    ``proxy``, ``cluster``) stay plain tables here; `gateway_core.app` structures them with the
    selected plugins' classes. Raises ConfigError listing every bad key; with ``collect``, adds
    the problems to that list instead and returns the config with bad sections at defaults.
    """
    source = ""
    if data is None:
        data = read_toml(path) if path is not None else {}
        source = str(path or "")
    env = os.environ if environ is None else environ
    raw = dict(data)
    gateway = dict(raw.get("gateway") or {})
    if env.get(ENV_ENCRYPT_KEYS):
        gateway["db_encrypt_keys"] = [k for k in env[ENV_ENCRYPT_KEYS].split(";") if k.strip()]
    if gateway:
        raw["gateway"] = gateway
    proxy = raw.get("proxy")
    if env.get(ENV_PROXY_TOKEN):
        proxy = dict(proxy or {})
        proxy["api_token"] = env[ENV_PROXY_TOKEN]
        raw["proxy"] = proxy
    if env.get(ENV_METRICS_TOKEN):
        raw["metrics"] = {**dict(raw.get("metrics") or {}), "token": env[ENV_METRICS_TOKEN]}
    problems: list[str] = []
    for (name, key), advice in REMOVED_KEYS.items():
        section = raw.get(name)
        if isinstance(section, Mapping) and key in section:
            problems.append(f"{name}.{key}: no longer a setting ({advice})")
            raw[name] = {k: v for k, v in section.items() if k != key}
    for name in ("backend", "auth"):
        section = raw.get(name, {})
        if not isinstance(section, Mapping):
            problems.append(f"{name}: expected a table of [{name}.<name>] tables")
            raw.pop(name)
            continue
        for key, value in section.items():
            if not isinstance(value, Mapping):
                problems.append(f"{name}.{key}: expected a table, got {_kind(value)}")
        raw[name] = {k: v for k, v in section.items() if isinstance(v, Mapping)}
    if collect is None:
        try:
            config = structure(raw, Config)
        except ConfigError as exc:
            raise ConfigError(problems + exc.problems) from None
        if problems:
            raise ConfigError(problems)
    else:
        # Report every problem, then go on with the bad sections at their defaults so the
        # caller can check the plugin sections too (`gateway config check`).
        collect.extend(problems)
        while True:
            try:
                config = structure(raw, Config)
                break
            except ConfigError as exc:
                collect.extend(exc.problems)
                before = raw
                raw = _without(raw, [p.split(":")[0] for p in exc.problems])
                if raw == before:
                    config = Config()
                    break
    return config.__class__(**{**_shallow(config), "source": source})


def _without(raw: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``raw`` without the keys at ``paths`` (``gateway.admin_users`` drops that one key of the
    section; a path naming no key of a table drops the whole top-level entry)."""
    out = dict(raw)
    for path in paths:
        parts = path.replace("[", ".").split(".")
        top = parts[0]
        section = out.get(top)
        if len(parts) > 1 and isinstance(section, Mapping) and parts[1] in section:
            out[top] = {k: v for k, v in section.items() if k != parts[1]}
        else:
            out.pop(top, None)
    return out


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _shallow(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(type(obj))}
