"""Running the proxy on its own: the ``gateway proxy`` command (also ``gateway-proxy``).

Owns the click command, its options (a gateway config file's `[proxy]` section, environment
variables for secrets), logging setup, the choice of event loop, and `run_standalone`: serve,
follow the gateway's route feed, stop on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from .settings import READY_PATH, ProxySettings

log = logging.getLogger("gateway.proxy")

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class ProxyStartError(RuntimeError):
    """The proxy could not open its listening sockets or read its TLS files; says which."""


async def run_standalone(settings: ProxySettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve ``settings`` and follow its gateway's route feed until ``stop`` (or a signal).

    Raises `ProxyStartError` when a port is taken or a TLS file cannot be read.
    """
    from .feed import RouteFeed
    from .server import ProxyServer

    server = ProxyServer(settings)
    feed = RouteFeed(
        server,
        gateway_url=settings.gateway_url,
        api_token=settings.api_token,
        initial_backoff=settings.feed_initial_backoff,
        max_backoff=settings.feed_max_backoff,
        read_timeout=settings.feed_timeout,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
            pass
    try:
        await server.start()
    except OSError as exc:  # a port taken, a TLS file missing or unreadable
        await server.stop()
        reason = exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        raise ProxyStartError(f"the proxy cannot start: {where}{reason}") from exc
    feed.start()
    log.warning(
        "gateway proxy: HTTP at %s, TLS-SNI at %s, routes from %s (ready at %s)",
        server.address,
        server.tcp_address,
        feed.url,
        READY_PATH,
    )
    try:
        await stop.wait()
    finally:
        await feed.stop()
        await server.stop()


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: every proxied connection takes two files."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


# `[proxy]` keys of a gateway config file the standalone proxy takes, with their types. Keys
# that only the gateway reads are accepted and ignored, so one file serves both processes.
CONFIG_KEYS: dict[str, type] = {
    "address": str,
    "tcp_address": str,
    "prefix": str,
    "tls_cert": str,
    "tls_key": str,
    "api_token": str,
    "gateway_url": str,
    "log_level": str,
    "handshake_timeout": float,
    "connect_timeout": float,
    "max_hello_size": int,
    "upstream_idle_timeout": float,
    "client_idle_timeout": float,
}
GATEWAY_ONLY_KEYS = frozenset({"externally_managed", "max_events"})
REMOVED_KEYS = {"proxy_status_period": "it never had an effect; delete the line"}
"""`[proxy]` keys earlier versions accepted, with the advice given when a file still sets one
(the gateway refuses them the same way)."""


def read_config_file(path: str) -> dict[str, Any]:
    """The `[proxy]` section of a gateway TOML config, checked; every problem in one error.

    Raises `click.UsageError` naming the file and each bad key (unknown key, wrong type).
    """
    try:
        with Path(path).open("rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise click.UsageError(f"--config {path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.UsageError(f"--config {path}: not valid TOML: {exc}") from None
    section = document.get("proxy", {})
    if not isinstance(section, Mapping):
        raise click.UsageError(f"--config {path}: proxy must be a table, got {section!r}")
    values: dict[str, Any] = {}
    problems = []
    for key, value in section.items():
        if key in GATEWAY_ONLY_KEYS:
            continue
        kind = CONFIG_KEYS.get(key)
        if key in REMOVED_KEYS:
            problems.append(f"proxy.{key}: no longer a setting ({REMOVED_KEYS[key]})")
        elif kind is None:
            problems.append(f"proxy.{key}: unknown key")
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"proxy.{key}: expected {kind.__name__}, got {type(value).__name__}")
        else:
            values[key] = value
    if "log_level" in values and values["log_level"].lower() not in LEVELS:
        problems.append(
            f"proxy.log_level: {values['log_level']!r} is not one of {', '.join(sorted(LEVELS))}"
        )
    if problems:
        raise click.UsageError(f"--config {path}:\n  " + "\n  ".join(problems))
    return values


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise click.UsageError("--loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@click.command("proxy")
@click.option(
    "--config",
    "config_file",
    default=None,
    envvar="GATEWAY_CONFIG",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="Gateway TOML config whose [proxy] section gives defaults; options given here win.",
)
@click.option(
    "--address",
    default=":8000",
    show_default=True,
    help="host:port of the HTTP face (and of the TLS-SNI face unless --tcp-address).",
)
@click.option("--tcp-address", default="", help="host:port of the TLS-SNI face; default: shared.")
@click.option("--prefix", default="", help="Path prefix the gateway is served under.")
@click.option(
    "--gateway-url",
    default="",
    help="Base URL of the gateway API with the /api/v1/routes feed (here or in --config).",
)
@click.option(
    "--api-token",
    envvar="GATEWAY_PROXY_TOKEN",
    default="",
    show_envvar=True,
    help="(Required here, in the environment or in --config.) Token for the routes feed.",
)
@click.option("--tls-cert", default="", help="PEM certificate: serve HTTPS on the HTTP face.")
@click.option("--tls-key", default="", help="PEM key for --tls-cert.")
@click.option(
    "--handshake-timeout",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds a client has to send its first bytes.",
)
@click.option(
    "--connect-timeout",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds to connect to a route's target.",
)
@click.option(
    "--log-level",
    default="warn",
    show_default=True,
    type=click.Choice(sorted(LEVELS), case_sensitive=False),
)
@click.option(
    "--loop",
    "loop_kind",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    help="Event loop; auto picks uvloop when installed.",
)
@click.pass_context
def proxy_command(
    ctx: click.Context,
    config_file: str | None,
    address: str,
    tcp_address: str,
    prefix: str,
    gateway_url: str,
    api_token: str,
    tls_cert: str,
    tls_key: str,
    handshake_timeout: float,
    connect_timeout: float,
    log_level: str,
    loop_kind: str,
) -> None:
    """Run the proxy standalone, following a gateway's route feed.

    Readiness: GET /_gateway-proxy/ready answers 200 once the routes are loaded.
    """
    given = {
        "address": address,
        "tcp_address": tcp_address,
        "prefix": prefix,
        "gateway_url": gateway_url,
        "api_token": api_token,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "handshake_timeout": handshake_timeout,
        "connect_timeout": connect_timeout,
        "log_level": log_level,
    }
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(read_config_file(config_file))
    for name, value in given.items():
        source = ctx.get_parameter_source(name)
        if name not in merged or source not in (None, click.core.ParameterSource.DEFAULT):
            merged[name] = value
    for name, flag in (("gateway_url", "--gateway-url"), ("api_token", "--api-token")):
        if not merged.get(name):
            raise click.UsageError(
                f"{flag} is required (or `{name}` in the [proxy] section of --config)"
            )
    logging.basicConfig(
        level=LEVELS[merged.pop("log_level").lower()],
        format="[%(levelname).1s %(asctime)s.%(msecs)03d %(name)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    try:
        settings = ProxySettings(api_target=merged["gateway_url"], **merged)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    raise_open_files_limit()
    loop = _new_loop(loop_kind)
    try:
        loop.run_until_complete(run_standalone(settings))
    except ProxyStartError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        loop.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``gateway-proxy`` console script."""
    proxy_command.main(args=list(argv) if argv is not None else None, prog_name="gateway-proxy")
