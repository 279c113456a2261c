"""Following the gateway's ``/api/v1/routes`` feed, for a proxy running standalone.

Owns `RouteFeed`: fetch the whole table, then watch newline-delimited events from the last id;
410 means the events were dropped, so fetch the whole table again; errors back off
exponentially. The server is marked ready only once a full table has been applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from .server import ProxyServer
from .table import Route

log = logging.getLogger("gateway.proxy")


class FeedError(Exception):
    """The feed answered with an error or something unreadable."""


class EventsGone(FeedError):
    """The route events after ``last_id`` are not available (the feed answered 410): fetch the
    whole route table again. The same condition as core's `gateway_core.routes.EventsGone`,
    seen from the reader's side."""

    def __init__(self, message: str, *, last_id: int) -> None:
        super().__init__(message)
        self.last_id = last_id


class RouteFeed:
    """Keeps a `ProxyServer`'s table in step with a gateway's route feed."""

    def __init__(
        self,
        server: ProxyServer,
        *,
        gateway_url: str,
        api_token: str,
        initial_backoff: float = 0.5,
        max_backoff: float = 15.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.server = server
        self.url = gateway_url.rstrip("/") + "/api/v1/routes"
        self.api_token = api_token
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.read_timeout = read_timeout
        self.last_id = 0
        self.full_loads = 0
        self.failures = 0
        self._backoff = initial_backoff
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def run(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=self.read_timeout)
        headers = {"Authorization": f"token {self.api_token}", "Accept": "application/json"}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                try:
                    await self._load_all(session)
                except (FeedError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    await self._fail("fetching the routing table", exc)
                    continue
                self._backoff = self.initial_backoff
                await self._follow(session)

    async def _follow(self, session: Any) -> None:
        """Watch events until the table must be fetched again."""
        import aiohttp

        while True:
            started = time.monotonic()
            try:
                got = await self._watch(session)
            except EventsGone as gone:
                log.info("route feed: events after %d are gone; fetching the table", gone.last_id)
                return
            except TimeoutError:
                continue  # a quiet feed: ask again from the same id
            except (FeedError, aiohttp.ClientError, ValueError) as exc:
                await self._fail("watching route events", exc)
                return
            if got or time.monotonic() - started > 1.0:
                self._backoff = self.initial_backoff
            else:
                # The feed ends its streams at once: do not spin.
                await self._sleep_backoff()

    async def _load_all(self, session: Any) -> None:
        async with session.get(self.url) as resp:
            if resp.status != 200:
                raise FeedError(f"HTTP {resp.status} from {self.url}")
            data = await resp.json(content_type=None)
        if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
            raise FeedError("the routing table is not {'routes': [...], 'id': n}")
        routes = []
        for item in data["routes"]:
            try:
                routes.append(Route.from_json(item))
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("route feed: ignoring route %r: %s", item, exc)
        self.server.replace(routes)
        self.last_id = int(data.get("id") or 0)
        self.full_loads += 1
        self.server.set_ready(True)

    async def _watch(self, session: Any) -> bool:
        """One watch request; True if it carried any event."""
        got = False
        params = {"watch": "1", "last_id": str(self.last_id)}
        async with session.get(self.url, params=params) as resp:
            if resp.status == 410:
                raise EventsGone(f"HTTP 410 from {self.url}", last_id=self.last_id)
            if resp.status != 200:
                raise FeedError(f"HTTP {resp.status} from {self.url}")
            pending = b""
            async for chunk in resp.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        got = self._apply(line) or got
            if pending.strip():
                got = self._apply(pending) or got
        return got

    def _apply(self, line: bytes) -> bool:
        try:
            msg = json.loads(line)
            events = msg["events"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedError(f"unreadable event line: {exc}") from None
        for event in events:
            try:
                route = Route.from_json(event["route"])
                kind = event["type"]
                event_id = int(event["id"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("route feed: ignoring event %r: %s", event, exc)
                continue
            if kind == "PUT":
                self.server.put(route)
            elif kind == "DELETE":
                self.server.delete(route)
            else:
                log.warning("route feed: unknown event type %r", kind)
            self.last_id = max(self.last_id, event_id)
        return bool(events)

    async def _fail(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        log.warning(
            "route feed: failed %s (%s); retrying in %.1f s",
            what,
            str(exc) or type(exc).__name__,
            self._backoff,
        )
        await self._sleep_backoff()

    async def _sleep_backoff(self) -> None:
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, self.max_backoff)
