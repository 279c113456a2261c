"""The table of proxy routes the gateway publishes, with its bounded event log.

Owns `Route`, `RouteEvent` and `RouteTable`: the in-process API an embedded proxy subscribes to,
and the source of the `/api/v1/routes` feed a standalone proxy polls (PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, Literal

from attrs import define

RouteKind = Literal["PATH", "SNI"]


@define(kw_only=True, frozen=True)
class Route:
    """One route: ``kind`` PATH (key is a path prefix) or SNI (key is the server name, no
    ``daskgateway-`` prefix); ``target`` is ``http://ip:port`` or ``tls://ip:port``."""

    kind: RouteKind
    key: str
    target: str

    def to_json(self) -> dict[str, str]:
        keyname = "path" if self.kind == "PATH" else "sni"
        return {"kind": self.kind, keyname: self.key, "target": self.target}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        kind = data.get("kind")
        if kind == "PATH":
            return cls(kind="PATH", key=str(data["path"]), target=str(data["target"]))
        if kind == "SNI":
            return cls(kind="SNI", key=str(data["sni"]), target=str(data["target"]))
        raise ValueError(f"unknown route kind {kind!r}; expected PATH or SNI")


@define(kw_only=True, frozen=True)
class RouteEvent:
    """A change to the table: ``type`` PUT (route added or replaced) or DELETE."""

    id: int
    type: Literal["PUT", "DELETE"]
    route: Route

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "route": self.route.to_json()}


class EventsGone(Exception):
    """The route events after ``last_id`` are not available (dropped from the retained window,
    or ``last_id`` is no event id of this table): the reader must fetch the whole route table
    again. The feed answers it with HTTP 410; the proxy's `gateway_proxy.feed.EventsGone` is
    the same condition seen from the reader's side."""

    def __init__(self, message: str, *, last_id: int) -> None:
        super().__init__(message)
        self.last_id = last_id


Listener = Callable[[RouteEvent], None]


class RouteTable:
    """Routes keyed by (kind, key), every change numbered and the last ``max_events`` kept.

    Listeners are called synchronously with each event (the embedded proxy applies it to its own
    lookup tables); ``wait_for_events`` serves long-polling readers of the HTTP feed.
    """

    def __init__(self, *, max_events: int = 100) -> None:
        self._routes: dict[tuple[str, str], Route] = {}
        self._events: collections.deque[RouteEvent] = collections.deque(maxlen=max_events)
        self._last_id = 0
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event() if _has_loop() else None

    @property
    def last_id(self) -> int:
        return self._last_id

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def get(self, kind: RouteKind, key: str) -> Route | None:
        return self._routes.get((kind, key))

    def put(self, route: Route) -> None:
        if self._routes.get((route.kind, route.key)) == route:
            return
        self._routes[(route.kind, route.key)] = route
        self._emit("PUT", route)

    def delete(self, kind: RouteKind, key: str) -> None:
        route = self._routes.pop((kind, key), None)
        if route is not None:
            self._emit("DELETE", route)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every future event; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def events_since(self, last_id: int) -> list[RouteEvent]:
        """Events after ``last_id``; raise EventsGone if some were already dropped."""
        if last_id > self._last_id or last_id < 0:
            raise EventsGone(f"last_id {last_id} is not a known event id", last_id=last_id)
        if last_id == self._last_id:
            return []
        oldest = self._events[0].id if self._events else self._last_id + 1
        if last_id + 1 < oldest:
            raise EventsGone(f"events after {last_id} are no longer retained", last_id=last_id)
        return [e for e in self._events if e.id > last_id]

    async def wait_for_events(self, last_id: int, timeout: float) -> list[RouteEvent]:
        """Like events_since, but wait up to ``timeout`` seconds for at least one event."""
        events = self.events_since(last_id)
        if events:
            return events
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return []
        return self.events_since(last_id)

    def _emit(self, type_: Literal["PUT", "DELETE"], route: Route) -> None:
        self._last_id += 1
        event = RouteEvent(id=self._last_id, type=type_, route=route)
        self._events.append(event)
        for listener in list(self._listeners):
            listener(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
