"""Tests of the standalone route feed client against a small fake gateway feed.

Owns `FakeFeed` (an aiohttp app speaking the ``/api/v1/routes`` protocol of PROTOCOL.md, with
knobs for failures, 410 and short streams) and checks of loading, events, refresh, readiness
and backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import LOOPBACK

from gateway_proxy.feed import RouteFeed

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token"


class FakeFeed:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], dict[str, str]] = {}
        self.events: list[dict[str, Any]] = []
        self.last_id = 0
        self.dropped_before = 0
        """Events with an id <= this are no longer retained (410 for older readers)."""
        self.fail_with = 0
        """Answer every request with this status (0: behave)."""
        self.end_streams = False
        """End each watch stream right after the pending events."""
        self.requests: list[tuple[float, dict[str, str]]] = []
        self.changed = asyncio.Event()
        self.url = ""

    def put(self, route: dict[str, str]) -> None:
        key = (route["kind"], route.get("path") or route.get("sni", ""))
        self.routes[key] = route
        self._event("PUT", route)

    def delete(self, kind: str, key: str) -> None:
        route = self.routes.pop((kind, key))
        self._event("DELETE", route)

    def _event(self, kind: str, route: dict[str, str]) -> None:
        self.last_id += 1
        self.events.append({"id": self.last_id, "type": kind, "route": route})
        self.changed.set()
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((time.monotonic(), dict(request.query)))
        if request.headers.get("Authorization") != f"token {TOKEN}":
            return web.json_response({"error": "bad token"}, status=401)
        if self.fail_with:
            return web.json_response({"error": "down"}, status=self.fail_with)
        if not request.query.get("watch"):
            return web.json_response({"routes": list(self.routes.values()), "id": self.last_id})
        last_id = int(request.query.get("last_id", "0"))
        if last_id < self.dropped_before:
            return web.json_response({"error": "gone"}, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            events = [e for e in self.events if e["id"] > last_id]
            if events:
                await response.write(json.dumps({"events": events}).encode() + b"\n")
                last_id = events[-1]["id"]
            if self.end_streams:
                break
            await self.changed.wait()
        await response.write_eof()
        return response


@pytest.fixture
async def fake_feed() -> AsyncIterator[FakeFeed]:
    feed = FakeFeed()
    app = web.Application()
    app.router.add_get("/api/v1/routes", feed.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    feed.url = f"http://{LOOPBACK}:{site._server.sockets[0].getsockname()[1]}"  # type: ignore
    yield feed
    feed.end_streams = True
    feed.changed.set()
    await runner.cleanup()


@pytest.fixture
async def follow() -> AsyncIterator[Callable[..., RouteFeed]]:
    feeds: list[RouteFeed] = []

    def start(server: Any, url: str, token: str = TOKEN, **kwargs: Any) -> RouteFeed:
        kwargs.setdefault("initial_backoff", 0.02)
        kwargs.setdefault("max_backoff", 0.1)
        feed = RouteFeed(server, gateway_url=url, api_token=token, **kwargs)
        feed.start()
        feeds.append(feed)
        return feed

    yield start
    for feed in feeds:
        await feed.stop()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` (state changed by the feed task) until true, failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(0.01)


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


async def test_full_table_is_loaded_and_routed(fake_feed, make_proxy, follow) -> None:
    fake_feed.put({"kind": "PATH", "path": "/clusters/a", "target": "http://127.0.0.1:1001"})
    fake_feed.put({"kind": "SNI", "sni": "a", "target": "tls://127.0.0.1:1002"})
    proxy = await make_proxy(ready=False)
    feed = follow(proxy, fake_feed.url)
    await eventually(lambda: proxy.ready)
    assert proxy.table.snapshot() == {
        "paths": {"/clusters/a": "http://127.0.0.1:1001"},
        "sni": {"a": "tls://127.0.0.1:1002"},
    }
    assert feed.last_id == 2 and feed.full_loads == 1


async def test_events_are_applied(fake_feed, make_proxy, follow) -> None:
    proxy = await make_proxy(ready=False)
    feed = follow(proxy, fake_feed.url)
    await eventually(lambda: proxy.ready)
    fake_feed.put({"kind": "SNI", "sni": "new", "target": "tls://127.0.0.1:2001"})
    fake_feed.put({"kind": "PATH", "path": "/clusters/new", "target": "http://127.0.0.1:2002"})
    await eventually(lambda: proxy.table.lookup_sni("daskgateway-new") is not None)
    await eventually(lambda: proxy.table.match_path("/clusters/new/x") is not None)
    fake_feed.put({"kind": "SNI", "sni": "new", "target": "tls://127.0.0.1:2003"})
    await eventually(lambda: proxy.table.lookup_sni("daskgateway-new") == ("127.0.0.1", 2003, 2))
    fake_feed.delete("SNI", "new")
    await eventually(lambda: proxy.table.lookup_sni("daskgateway-new") is None)
    assert proxy.table.match_path("/clusters/new/x") is not None
    assert feed.last_id == 4 and feed.full_loads == 1


async def test_410_fetches_the_whole_table_again(fake_feed, make_proxy, follow, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway.proxy")
    fake_feed.put({"kind": "SNI", "sni": "old", "target": "tls://127.0.0.1:3001"})
    fake_feed.end_streams = True  # every watch ends; the next one starts from last_id
    proxy = await make_proxy(ready=False)
    feed = follow(proxy, fake_feed.url)
    await eventually(lambda: proxy.ready)
    # Many changes while the events after the proxy's id are dropped from the window.
    fake_feed.delete("SNI", "old")
    fake_feed.put({"kind": "SNI", "sni": "fresh", "target": "tls://127.0.0.1:3002"})
    fake_feed.dropped_before = fake_feed.last_id
    await eventually(lambda: feed.full_loads >= 2)
    await eventually(lambda: proxy.table.lookup_sni("daskgateway-fresh") is not None)
    assert proxy.table.lookup_sni("daskgateway-old") is None
    assert any(q.get("watch") for _, q in fake_feed.requests)
    gone = [r.getMessage() for r in caplog.records if "are gone" in r.getMessage()]
    assert gone and all(m.startswith("route feed: events after ") for m in gone)


async def test_ready_only_after_the_table_is_loaded(fake_feed, make_proxy, follow) -> None:
    fake_feed.fail_with = 500
    proxy = await make_proxy(ready=False)
    follow(proxy, fake_feed.url)
    ready_url = f"http://{proxy.address}/_gateway-proxy/ready"
    await eventually(lambda: len(fake_feed.requests) >= 3)
    assert not proxy.ready
    assert await status_of(ready_url) == 503
    fake_feed.fail_with = 0
    await eventually(lambda: proxy.ready)
    assert await status_of(ready_url) == 200


async def test_wrong_token_never_becomes_ready(fake_feed, make_proxy, follow) -> None:
    proxy = await make_proxy(ready=False)
    follow(proxy, fake_feed.url, token="wrong")
    await eventually(lambda: len(fake_feed.requests) >= 3)
    assert not proxy.ready


async def test_errors_back_off_exponentially_up_to_the_cap(fake_feed, make_proxy, follow) -> None:
    fake_feed.fail_with = 503
    proxy = await make_proxy(ready=False)
    follow(proxy, fake_feed.url, initial_backoff=0.05, max_backoff=0.2)
    await eventually(lambda: len(fake_feed.requests) >= 6, timeout=10)
    times = [t for t, _ in fake_feed.requests[:6]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Sleeps never end early: the doubling shows in the lower bounds ...
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2 and gaps[3] >= 0.2
    # ... and the cap in the last two: uncapped they would take 0.4 + 0.8 s.
    assert gaps[3] + gaps[4] < 1.0


async def test_short_streams_do_not_spin(fake_feed, make_proxy, follow) -> None:
    fake_feed.end_streams = True
    proxy = await make_proxy(ready=False)
    follow(proxy, fake_feed.url, initial_backoff=0.05, max_backoff=0.2)
    await eventually(lambda: proxy.ready)
    count = len(fake_feed.requests)
    await asyncio.sleep(0.6)
    assert len(fake_feed.requests) - count <= 8


async def test_bad_routes_are_skipped(fake_feed, make_proxy, follow) -> None:
    fake_feed.put({"kind": "SNI", "sni": "ok", "target": "tls://127.0.0.1:4001"})
    fake_feed.put({"kind": "SNI", "sni": "bad", "target": "not an address"})
    fake_feed.put({"kind": "PATH", "path": "/p", "target": "ftp://nope"})
    proxy = await make_proxy(ready=False)
    follow(proxy, fake_feed.url)
    await eventually(lambda: proxy.ready)
    assert proxy.table.snapshot() == {"paths": {}, "sni": {"ok": "tls://127.0.0.1:4001"}}
