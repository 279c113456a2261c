"""The ``gateway`` command line: serve, inspect plugins, show and check the configuration,
check and upgrade the database's schema (``gateway db``).

Owns `make_cli` (builds the click group and lets plugins add commands through
`gateway_register_commands`) and `main`, the console script.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import pluggy
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import __version__
from .config import Config, ConfigError, find_config_file, load_config, unstructure
from .configcheck import ResolvedConfig, resolve_config
from .hookcaller import GatewayHooks
from .plugins import PluginError, Registry, make_plugin_manager, plugin_infos

PluginManagerFactory = Callable[..., pluggy.PluginManager]
"""Builds a plugin manager; called with ``local_plugins=`` and ``local_plugin_path=``."""

SECRET_KEYS = frozenset({"api_token", "password", "db_encrypt_keys", "token"})
"""Config keys whose values `gateway config show` never prints."""
SECRET_SUFFIXES = ("_token", "_secret", "_password")
"""So are plugins' keys ending so (``jupyterhub_api_token``, ``oauth_client_secret``)."""
REDACTED = "<redacted>"

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $GATEWAY_CONFIG, else ./gateway.toml if present).",
)
DB_URL_OPTION = click.option(
    "--db-url",
    default=None,
    help="The database's SQLAlchemy URL (default: [gateway] db_url of the config).",
)


def make_cli(*, plugin_manager_factory: PluginManagerFactory = make_plugin_manager) -> click.Group:
    """Build the ``gateway`` command group.

    The plugin manager is built once here (entry points and built-ins) so that plugins can add
    commands; commands that read a config file build another one when the file lists local
    plugin modules. Raises `PluginError` when the plugins cannot be loaded at all.
    """
    base_pm = plugin_manager_factory()

    def manager_for(config: Config) -> pluggy.PluginManager:
        if not config.plugins:
            return base_pm
        search = [str(Path(config.source).resolve().parent)] if config.source else []
        return plugin_manager_factory(local_plugins=config.plugins, local_plugin_path=search)

    def load(config_path: str | None, collect: list[str] | None = None) -> Config:
        path = find_config_file(config_path)
        return load_config(path=path, collect=collect)

    def resolve(config_path: str | None, *, to_stderr: bool) -> ResolvedConfig:
        """Load and resolve the config; print every problem, one per line, and exit 1."""
        problems: list[str] = []
        try:
            config = load(config_path, collect=problems)
            registry = Registry.from_plugin_manager(manager_for(config))
            try:
                resolved = resolve_config(config, registry)
            except ConfigError as exc:
                problems.extend(p for p in exc.problems if p not in problems)
        except (ConfigError, PluginError) as exc:
            _fail(exc, err=to_stderr)
        if problems:
            _fail(ConfigError(problems), err=to_stderr)
        return resolved

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "-V", "--version", prog_name="gateway")
    def cli() -> None:
        """A multi-tenant gateway for Dask clusters."""

    @cli.command("plugins")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @CONFIG_OPTION
    def plugins_command(as_json: bool, config_path: str | None) -> None:
        """List installed plugins: what they provide, their distribution, and failures."""
        try:
            pm = manager_for(load(config_path))
            registry = Registry.from_plugin_manager(pm)
        except (ConfigError, PluginError) as exc:
            _fail(exc)
        infos = plugin_infos(pm, registry)
        if as_json:
            click.echo(json.dumps([info.to_json() for info in infos], indent=2))
            return
        rows = [
            (
                info.name,
                info.status,
                info.distribution or f"({info.source})",
                info.version,
                ", ".join(info.kinds) or ", ".join(info.hooks) or "-",
            )
            for info in infos
        ]
        click.echo(_table(("NAME", "STATUS", "DISTRIBUTION", "VERSION", "PROVIDES"), rows))
        for info in infos:
            if info.error:
                click.echo(f"{info.name}: {info.error}")

    @cli.group("config")
    def config_group() -> None:
        """Show or check the configuration."""

    @config_group.command("check")
    @CONFIG_OPTION
    def config_check(config_path: str | None) -> None:
        """Validate the config: one line per bad key, exit status 1 when any."""
        resolved = resolve(config_path, to_stderr=False)
        source = resolved.config.source or "built-in defaults"
        click.echo(f"config OK ({source})")

    @config_group.command("show")
    @CONFIG_OPTION
    def config_show(config_path: str | None) -> None:
        """Print the effective config as TOML, with defaults filled in and secrets redacted."""
        resolved = resolve(config_path, to_stderr=True)
        click.echo(render_toml(effective_config(resolved)), nl=False)

    @cli.command("serve")
    @CONFIG_OPTION
    @click.option("--debug", is_flag=True, help="Show the traceback when the gateway cannot start.")
    def serve_command(config_path: str | None, debug: bool) -> None:
        """Run the gateway until interrupted.

        When it cannot start (a bad config, a missing key, the database or a port), it prints
        what is wrong, one line per problem, and exits with status 1.
        """
        from .app import StartupError, serve

        try:
            serve(config_path)
        except (ConfigError, PluginError, StartupError) as exc:
            if debug:
                raise
            _fail(exc)

    @cli.group("db")
    def db_group() -> None:
        """Check or upgrade the schema of the store's database ([gateway] db_url)."""

    @db_group.command("current")
    @CONFIG_OPTION
    @DB_URL_OPTION
    @click.option(
        "--check", is_flag=True, help="Exit with status 1 unless the schema is the newest."
    )
    def db_current(config_path: str | None, db_url: str | None, check: bool) -> None:
        """Print the database's schema revision and whether it needs `gateway db upgrade`."""
        from .migrations import SchemaError, inspect_schema

        engine, where = _db_engine(db_url or load_or_fail(config_path).gateway.db_url)
        try:
            with engine.connect() as conn:
                state = inspect_schema(conn)
        except (SchemaError, SQLAlchemyError) as exc:
            _fail(_db_problem(exc, where))
        finally:
            engine.dispose()
        click.echo(f"{where}: {state.describe()}")
        if check and not state.current:
            sys.exit(1)

    @db_group.command("upgrade")
    @CONFIG_OPTION
    @DB_URL_OPTION
    def db_upgrade(config_path: str | None, db_url: str | None) -> None:
        """Bring the database to the newest schema revision.

        Back the database up first, and stop every gateway using it: the gateway refuses to
        start on a database whose schema is behind, and never upgrades it by itself. An
        empty database is created; one made by a gateway from before migrations is
        recognised and upgraded in place.
        """
        from .migrations import SchemaError, upgrade

        engine, where = _db_engine(db_url or load_or_fail(config_path).gateway.db_url)
        try:
            before, after = upgrade(engine, where=where)
        except (SchemaError, SQLAlchemyError) as exc:
            _fail(_db_problem(exc, where))
        finally:
            engine.dispose()
        if before.current:
            click.echo(f"{where}: already at revision {after.revision}, the newest")
        else:
            was = "empty" if before.empty else f"revision {before.revision}"
            click.echo(f"{where}: upgraded from {was} to revision {after.revision}")

    def load_or_fail(config_path: str | None) -> Config:
        try:
            return load(config_path)
        except ConfigError as exc:
            _fail(exc)

    GatewayHooks.from_plugin_manager(base_pm).gateway_register_commands(cli=cli)
    return cli


def _db_engine(url: str) -> tuple[Engine, str]:
    """An engine for ``url`` and the URL to show (password hidden); exits 1 when the URL is
    unusable or keeps the database in memory (nothing there outlives a gateway)."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError

    from .store import is_in_memory

    try:
        where = sa.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        _fail(ValueError(f"db_url {url!r} is not a database URL (dialect+driver://...)"))
    if is_in_memory(url):
        _fail(
            ValueError(
                f"db_url {url} keeps the database in memory: each gateway start creates it "
                "at the newest schema, there is nothing to upgrade; set [gateway] db_url (or "
                "--db-url) to the persistent database"
            )
        )
    try:
        return sa.create_engine(url), where
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        _fail(ValueError(f"cannot use db_url {where}: {exc}"))


def _db_problem(exc: Exception, where: str) -> Exception:
    if isinstance(exc, SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        text = str(orig if isinstance(orig, BaseException) else exc)
        reason = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        return ValueError(f"cannot open the database {where}: {reason}")
    return exc


def main(argv: Sequence[str] | None = None) -> None:
    """The ``gateway`` console script."""
    try:
        cli = make_cli()
    except PluginError as exc:
        _fail(exc)
    cli.main(args=list(argv) if argv is not None else None, prog_name="gateway")


def _fail(exc: Exception, *, err: bool = True) -> NoReturn:
    lines = exc.problems if isinstance(exc, ConfigError) else str(exc).splitlines()
    for line in lines:
        click.echo(f"error: {line}" if err else line, err=err)
    sys.exit(1)


# --------------------------------------------------------------------------------------------
# `config show`
# --------------------------------------------------------------------------------------------


def effective_config(resolved: ResolvedConfig) -> dict[str, Any]:
    """The config as the gateway will run it, as TOML-shaped data with secrets redacted."""
    config = resolved.config
    data: dict[str, Any] = {}
    if config.plugins:
        data["plugins"] = list(config.plugins)
    data["gateway"] = unstructure(resolved.gateway)
    data["proxy"] = unstructure(resolved.proxy)
    data["metrics"] = unstructure(config.metrics)
    data["cluster"] = unstructure(resolved.cluster)
    data["backend"] = {name: unstructure(c) for name, c in resolved.backends.items()}
    data["auth"] = {name: unstructure(c) for name, c in resolved.auths.items()}
    if config.options:
        data["options"] = {name: unstructure(spec) for name, spec in config.options.items()}
    data["quotas"] = unstructure(config.quotas)
    return redact(data)


def redact(data: Any) -> Any:
    """A copy of ``data`` where every non-empty value under a secret key is replaced."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if (key in SECRET_KEYS or str(key).endswith(SECRET_SUFFIXES)) and value:
                out[key] = [REDACTED] * len(value) if isinstance(value, list) else REDACTED
            else:
                out[key] = redact(value)
        return out
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def render_toml(data: Mapping[str, Any]) -> str:
    """TOML text for ``data``: plain keys first, then one ``[section]`` per table (a table of
    tables such as ``backend`` becomes ``[backend.<name>]`` sections). Keys whose value is None
    (unset) are written as comments, since TOML has no null."""
    lines: list[str] = []
    _emit_table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    if not path:
        sections = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        for key, value in table.items():
            if key not in sections:
                _emit_key(lines, key, value)
        for key, value in sections.items():
            _emit_table(lines, [key], value)
    elif len(path) == 1 and table and all(isinstance(v, Mapping) for v in table.values()):
        for key, value in table.items():  # a table of tables: [backend.<name>]
            _emit_table(lines, [*path, key], value)
    else:
        lines.extend(["", "[" + ".".join(_toml_key(p) for p in path) + "]"])
        for key, value in table.items():  # deeper tables are written inline
            _emit_key(lines, key, value)


def _emit_key(lines: list[str], key: str, value: Any) -> None:
    if value is None:
        lines.append(f"# {_toml_key(key)} = (unset)")
    else:
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        items = [
            f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None
        ]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
