"""The proxy's own route table: path prefixes for the HTTP face, server names for the TCP face.

Owns `Route` and `RouteTable`, named as core's `gateway_core.routes.Route` and `RouteTable` (the
same routes, same JSON; the proxy does not import core): a route from the feed's JSON or from
core's, target parsing, and the table's segment-wise longest-prefix match.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from attrs import define

from .addresses import split_address

SNI_PREFIX = "daskgateway-"
"""Clients ask for ``daskgateway-<cluster>``; SNI routes are keyed by ``<cluster>`` alone."""


class RouteLike(Protocol):
    """Anything with the three fields of a route (core's `gateway_core.routes.Route` fits)."""

    @property
    def kind(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def target(self) -> str: ...


@define(kw_only=True, frozen=True, slots=True)
class Route:
    """One route: ``kind`` PATH (``key`` a path prefix, prefix of the gateway included) or SNI
    (``key`` the server name without ``daskgateway-``); ``target`` ``http(s)://host:port[/path]``
    for PATH, ``tls://host:port`` (or ``host:port``) for SNI. ``target`` may be empty in the
    route of a DELETE event."""

    kind: Literal["PATH", "SNI"]
    key: str
    target: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Route:
        """Parse one route of the ``/api/v1/routes`` feed (PROTOCOL.md)."""
        kind = data.get("kind")
        target = str(data.get("target") or "")
        if kind == "PATH":
            if not data.get("path"):
                raise ValueError("PATH route without a path")
            return cls(kind="PATH", key=str(data["path"]), target=target)
        if kind == "SNI":
            if not data.get("sni"):
                raise ValueError("SNI route without an sni")
            return cls(kind="SNI", key=str(data["sni"]), target=target)
        raise ValueError(f"unknown route kind {kind!r}")

    @classmethod
    def of(cls, route: RouteLike) -> Route:
        kind = route.kind
        if kind not in ("PATH", "SNI"):
            raise ValueError(f"unknown route kind {kind!r}")
        return cls(kind=kind, key=route.key, target=route.target)  # type: ignore[arg-type]


@define(kw_only=True, frozen=True, slots=True)
class HttpTarget:
    """Where a PATH route sends requests: the upstream server and the path its routes hang off."""

    host: str
    port: int
    tls: bool
    path: str
    """The target URL's path without a trailing slash; "" for the server root."""
    host_header: bytes
    """``host:port`` as sent in the upstream request's Host header."""
    route: str = ""
    """The route's public path (``/clusters/abc``), "" for the root route."""

    @classmethod
    def parse(cls, url: str, *, route: str = "") -> HttpTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"PATH target {url!r} must be http:// or https://")
        if not parts.hostname:
            raise ValueError(f"PATH target {url!r} has no host")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(
            host=host,
            port=port,
            tls=tls,
            path=parts.path.rstrip("/"),
            host_header=f"{shown}:{port}".encode("ascii"),
            route="/" + route if route else "",
        )

    def public_location(self, location: bytes) -> bytes:
        """A ``Location`` from this target as the client must see it.

        The route's public path is stripped before requests go upstream, so an absolute-path
        redirect (``/status``), or an absolute URL on the target itself, would leave the route;
        it gets the public path put back (``/clusters/abc/status``). Relative references,
        other hosts, and paths outside the target's own path are left alone.
        """
        if not self.route:
            return location
        path = location
        for scheme in (b"http://", b"https://"):
            origin = scheme + self.host_header
            if path.startswith(origin) and path[len(origin) : len(origin) + 1] in (b"", b"/"):
                path = path[len(origin) :] or b"/"
                break
        if not path.startswith(b"/") or path.startswith(b"//"):
            return location
        base = self.path.encode("latin-1")
        if base:
            rest = path[len(base) :]
            if not path.startswith(base) or rest[:1] not in (b"", b"/", b"?"):
                return location  # outside the target's own path
            path = rest if rest.startswith(b"/") else b"/" + rest
        return self.route.encode("latin-1") + path


def parse_sni_target(target: str) -> tuple[str, int]:
    """``tls://host:port`` (or bare ``host:port``) → (host, port)."""
    rest = target.removeprefix("tls://")
    try:
        if "://" in rest:
            raise ValueError("not tls://")
        host, port = split_address(rest)
    except ValueError:
        raise ValueError(f"SNI target {target!r} must be tls://host:port") from None
    if not host:
        raise ValueError(f"SNI target {target!r} must be tls://host:port")
    if port == 0:
        raise ValueError(f"SNI target {target!r} has a bad port")
    return host, port


SniTarget = tuple[str, int, int]
"""(host, port, address family): the family is AF_INET or AF_INET6 for an IP literal, 0 for a
host name that needs resolving first."""


def sni_target(target: str) -> SniTarget:
    host, port = parse_sni_target(target)
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return host, port, 0
    return host, port, socket.AF_INET6 if version == 6 else socket.AF_INET


def normalize_prefix(prefix: str) -> str:
    """``"gateway/"`` → ``"/gateway"``; ``"/"`` and ``""`` → ``""``."""
    stripped = prefix.strip("/")
    return f"/{stripped}" if stripped else ""


def _path_key(path: str) -> str:
    return path.strip("/")


class RouteTable:
    """The live routes of one proxy.

    PATH routes match whole path segments (``/clusters/ab`` never matches ``/clusters/abc``);
    the longest matching route wins and its path is replaced by the target's path, as the
    original proxy does (``/clusters/x/status`` on target ``http://h:p`` → ``/status``).
    ``static`` routes (the default route to the gateway API) sit underneath the dynamic ones:
    a feed route with the same path overrides one, a full reload keeps it.
    """

    def __init__(self) -> None:
        self._paths: dict[str, HttpTarget] = {}
        self._sni: dict[str, SniTarget] = {}
        self._static: dict[str, HttpTarget] = {}
        self._dynamic_paths: dict[str, HttpTarget] = {}

    # -- changes ----------------------------------------------------------------------------

    def set_static_path(self, path: str, target: str) -> None:
        key = _path_key(path)
        self._static[key] = HttpTarget.parse(target, route=key)
        if key not in self._dynamic_paths:
            self._paths[key] = self._static[key]

    def put(self, route: Route) -> None:
        """Add or replace a route; raises ValueError for a malformed target."""
        if route.kind == "SNI":
            self._sni[route.key] = sni_target(route.target)
        else:
            key = _path_key(route.key)
            target = HttpTarget.parse(route.target, route=key)
            self._dynamic_paths[key] = target
            self._paths[key] = target

    def delete(self, route: Route) -> None:
        if route.kind == "SNI":
            self._sni.pop(route.key, None)
            return
        key = _path_key(route.key)
        self._dynamic_paths.pop(key, None)
        if key in self._static:
            self._paths[key] = self._static[key]
        else:
            self._paths.pop(key, None)

    def replace(self, routes: Iterable[Route]) -> list[tuple[Route, str]]:
        """Swap in a whole table at once; returns the routes refused and why."""
        sni: dict[str, SniTarget] = {}
        dynamic: dict[str, HttpTarget] = {}
        refused: list[tuple[Route, str]] = []
        for route in routes:
            try:
                if route.kind == "SNI":
                    sni[route.key] = sni_target(route.target)
                else:
                    key = _path_key(route.key)
                    dynamic[key] = HttpTarget.parse(route.target, route=key)
            except ValueError as exc:
                refused.append((route, str(exc)))
        paths = dict(self._static)
        paths.update(dynamic)
        self._sni, self._dynamic_paths, self._paths = sni, dynamic, paths
        return refused

    # -- lookups ----------------------------------------------------------------------------

    def lookup_sni(self, name: str) -> SniTarget | None:
        """The target of a server name as the client sent it (``daskgateway-<cluster>``)."""
        if not name.startswith(SNI_PREFIX):
            return None
        return self._sni.get(name[len(SNI_PREFIX) :])

    def match_path(self, path: str) -> tuple[HttpTarget, str] | None:
        """(target, upstream path) for a request path, or None when no route matches."""
        paths = self._paths
        rest = path[1:] if path.startswith("/") else path
        exact = paths.get(rest)
        if exact is not None:
            return exact, exact.path + "/"
        end = len(rest)
        while True:
            end = rest.rfind("/", 0, end)
            if end < 0:
                break
            found = paths.get(rest[:end])
            if found is not None:
                return found, found.path + "/" + rest[end + 1 :]
        root = paths.get("")
        if root is not None:
            return root, root.path + "/" + rest
        return None

    def __len__(self) -> int:
        return len(self._paths) + len(self._sni)

    def snapshot(self) -> dict[str, dict[str, str]]:
        """The current table, for logs and tests: {"paths": {...}, "sni": {...}}."""
        return {
            "paths": {
                "/" + k: f"{'https' if t.tls else 'http'}://{t.host_header.decode()}{t.path}"
                for k, t in self._paths.items()
            },
            "sni": {k: f"tls://{h}:{p}" for k, (h, p, _) in self._sni.items()},
        }
