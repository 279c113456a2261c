"""Assembles one running gateway from its config and plugins, and serves it until stopped.

Owns `Gateway` (plugin manager, registry, backend, authenticator, API server, proxy, and their
start/stop order), `serve`, which the `gateway serve` command runs, and `StartupError`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from attrs import define, field

from gateway_proxy.addresses import join_address, split_address

from .api.app import make_api_app
from .backends.base import Backend
from .config import Config, ConfigError, find_config_file, load_config
from .configcheck import ResolvedConfig, resolve_config
from .context import GatewayContext
from .hookcaller import GatewayHooks
from .manager import ClusterManager
from .plugins import PluginError, Registry, make_plugin_manager, plugin_infos
from .routes import Route, RouteTable
from .store import StoreError
from .web import PLUGIN_INFOS

log = logging.getLogger("gateway")


class StartupError(Exception):
    """The gateway could not start; the message is one line saying why (the original error is
    its ``__cause__``). `serve` raises it for every failure before the gateway serves, except
    `ConfigError` and `PluginError`, which already name what is wrong."""


def _split(address: str) -> tuple[str, int]:
    try:
        return split_address(address)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def _bind(address: str) -> socket.socket:
    host, port = _split(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError as exc:
        sock.close()
        problem = f"gateway.address: cannot listen on {address}: {exc.strerror}"
        raise ConfigError([problem]) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _reachable(address: str) -> str:
    """An address other processes on this host can connect to, for a bound ``host:port``."""
    host, port = _split(address)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return join_address(host, port)


@define(kw_only=True)
class Gateway:
    """One gateway: build with `Gateway.create`, then ``await start()`` and ``await stop()``."""

    config: Config
    pm: Any
    registry: Registry
    resolved: ResolvedConfig
    context: GatewayContext
    backend: Backend
    manager: ClusterManager
    api_app: web.Application
    proxy_token: str
    proxy: Any = None
    api_address: str = ""
    """``host:port`` of the private API, once started."""
    _runner: web.AppRunner | None = field(default=None, alias="_runner")
    _sock: socket.socket | None = field(default=None, alias="_sock")

    @classmethod
    def create(cls, config: Config, *, extra_plugins: Sequence[object] = ()) -> Gateway:
        """Load plugins and build every component; raise ConfigError naming every problem."""
        search = [Path(config.source).resolve().parent] if config.source else []
        pm = make_plugin_manager(
            local_plugins=config.plugins,
            extra_plugins=extra_plugins,
            local_plugin_path=search,
        )
        registry = Registry.from_plugin_manager(pm)
        resolved = resolve_config(config, registry)
        context = GatewayContext(
            config=config,
            hook=GatewayHooks.from_plugin_manager(pm),
            routes=RouteTable(max_events=resolved.proxy.max_events),
            prefix=resolved.proxy.prefix.rstrip("/"),
        )
        authenticator = resolved.auth_spec.authenticator(config=resolved.auth, context=context)
        authenticator.name = resolved.auth_spec.name
        spec = resolved.backend_spec
        backend: Backend
        if spec.driver is not None:
            from .backends.process import ProcessBackend

            driver = spec.make_driver(config=resolved.backend, context=context)
            backend = ProcessBackend(
                config=resolved.backend,
                cluster_config_class=spec.cluster_config,
                context=context,
                driver=driver,
            )
        else:
            assert spec.backend is not None
            backend = spec.backend(
                config=resolved.backend,
                cluster_config_class=spec.cluster_config,
                context=context,
            )
        context.metrics.backend_name = spec.name
        context.metrics.watch_backend(backend)
        manager = ClusterManager(
            backend=backend,
            context=context,
            cluster_config_class=spec.cluster_config,
            cluster_defaults=resolved.cluster_table,
        )
        proxy_token = resolved.proxy.api_token or secrets.token_hex(32)
        api_app = make_api_app(
            manager=manager,
            authenticator=authenticator,
            context=context,
            proxy_token=proxy_token,
        )

        async def lifetime(app: web.Application) -> Any:
            await authenticator.setup()
            await backend.setup()
            yield
            await backend.cleanup()
            await authenticator.cleanup()

        api_app.cleanup_ctx.append(lifetime)
        api_app[PLUGIN_INFOS] = lambda: plugin_infos(pm, registry)
        return cls(
            config=config,
            pm=pm,
            registry=registry,
            resolved=resolved,
            context=context,
            backend=backend,
            manager=manager,
            api_app=api_app,
            proxy_token=proxy_token,
        )

    @property
    def public_address(self) -> str:
        return self.context.public_address

    @property
    def api_url(self) -> str:
        return self.context.api_url

    async def start(self) -> None:
        """Bind the API, start the proxy, then the backend; return once serving.

        If any step fails, whatever already started is stopped before the error is raised.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        gw = self.resolved.gateway
        self._sock = _bind(gw.address)
        self.api_address = _reachable(join_address(*self._sock.getsockname()[:2]))
        api_target = f"http://{self.api_address}"
        proxy_conf = self.resolved.proxy
        prefix = self.context.prefix
        self.context.routes.put(Route(kind="PATH", key=prefix or "/", target=api_target))
        if self.resolved.proxy_spec is not None and not proxy_conf.externally_managed:
            self.proxy = self.resolved.proxy_spec.proxy(
                config=proxy_conf,
                routes=self.context.routes,
                api_target=api_target,
                context=self.context,
            )
            try:
                await self.proxy.start()
            except OSError as exc:  # a port taken, a TLS file missing
                raise StartupError(f"the proxy cannot start: {_os_reason(exc)}") from exc
            self.context.public_address = _reachable(self.proxy.address)
            self.context.metrics.watch_proxy(self.proxy)
        elif proxy_conf.externally_managed:
            self.context.public_address = _reachable(proxy_conf.address)
        else:
            log.warning(
                "no proxy plugin is installed (pip install gateway-proxy); serving the API "
                "directly on %s, without dashboard or scheduler routing",
                self.api_address,
            )
            self.context.public_address = self.api_address
        self.context.api_url = gw.api_url or f"http://{self.context.public_address}{prefix}/api"
        runner = web.AppRunner(self.api_app, access_log=None)
        await runner.setup()
        self._runner = runner
        site = web.SockSite(runner, self._sock)
        await site.start()
        if self.proxy is not None and runner.server is not None:
            # An embedded proxy reaches the API in memory: no loopback hop per request.
            self.proxy.serve_api_in_process(runner.server)
        log.info(
            "gateway serving at http://%s%s (backend %s, authenticator %s, event loop %s)",
            self.context.public_address,
            prefix,
            self.resolved.backend_spec.name,
            self.resolved.auth_spec.name,
            type(asyncio.get_running_loop()).__module__,
        )

    async def stop(self) -> None:
        """Stop the API and backend (stopping clusters if configured), then the proxy."""
        if self.proxy is not None:
            self.proxy.serve_api_in_process(None)  # from now on as refused as the socket
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.proxy is not None:
            await self.proxy.stop()
            self.proxy = None
            self.context.metrics.watch_proxy(None)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="[%(levelname).1s %(asctime)s.%(msecs)03d %(name)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )


async def run_until_stopped(config: Config) -> None:
    """Start a gateway, wait for SIGINT/SIGTERM, stop it.

    A failure to start raises `ConfigError`, `PluginError` or `StartupError` (one line each).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        gateway = Gateway.create(config)
        await gateway.start()
    except (ConfigError, PluginError, StartupError):
        raise
    except StoreError as exc:
        raise StartupError(str(exc)) from exc
    except OSError as exc:
        raise StartupError(f"the gateway cannot start: {_os_reason(exc)}") from exc
    except Exception as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise StartupError(
            f"the gateway cannot start: {type(exc).__name__}: {reason} "
            "(`gateway serve --debug` shows where)"
        ) from exc
    # What start-up loaded (every stored cluster and worker, the plugins) lives as long as
    # the process: moved out of the collector's generations, a full collection no longer
    # walks it (at 10,000 clusters x 10 workers one walk held the event loop about 0.3 s).
    gc.collect()
    gc.freeze()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await gateway.stop()


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop ``[gateway] event_loop`` asks for; ``auto`` is uvloop when installed.

    Raises `ConfigError` for ``uvloop`` when it is not installed.
    """
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ConfigError(
                    ["gateway.event_loop: uvloop is not installed (pip install uvloop)"]
                ) from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def serve(config_path: str | None = None) -> None:
    """Entry point of ``gateway serve``: load the config and run until a signal."""
    path = find_config_file(config_path)
    config = load_config(path=path) if path is not None else load_config()
    configure_logging(config.gateway.log_level)
    factory = loop_factory(config.gateway.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run_until_stopped(config))
