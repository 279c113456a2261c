"""A real Dask dashboard through the embedded proxy's HTTP face: the bokeh page, its static
files, its websocket (bokeh's own protocol both ways) and the scheduler's JSON endpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from bokeh.protocol import Protocol  # core's `local` extra: the dashboard needs bokeh
from bokeh.protocol.receiver import Receiver
from bokeh.util.token import get_token_payload

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]

TIMEOUT = 30.0
"""Seconds any single step may take (a request, a websocket message)."""
WHOLE_TEST = 150.0
"""Seconds for the whole flow, cluster start included."""

FAST: dict[str, Any] = {
    "cluster_start_timeout": 60.0,
    "cluster_heartbeat_period": 1,
    # Building the bokeh document for the page and its websocket keeps the scheduler's loop
    # busy for seconds on a loaded 2-core machine, delaying its heartbeats; this test is not
    # about heartbeat timeouts, so the default of twice the period (2 s) is too tight here.
    "cluster_heartbeat_timeout": 30.0,
    "cluster_status_period": 0.2,
    "backoff_base_delay": 0.01,
    "backoff_max_delay": 0.2,
    "sigint_timeout": 5.0,
    "sigterm_timeout": 2.0,
    "sigkill_timeout": 2.0,
}


@pytest.fixture
def dask_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dask`` on PATH is this environment's."""
    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def render_item(html: str) -> dict[str, Any]:
    """The one render item a bokeh server page embeds: its session token and root ids."""
    found = re.search(r"const render_items = (\[.*?\]);\n", html)
    assert found is not None, "no bokeh render_items in the page"
    (item,) = json.loads(found.group(1))
    return item


async def eventually(check: Callable[[], bool], *, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {TIMEOUT} s: {what}")
        await asyncio.sleep(0.05)


async def receive_message(ws: aiohttp.ClientWebSocketResponse, receiver: Any) -> Any:
    """The next whole bokeh message (header, metadata, content, buffers: one frame each)."""
    async with asyncio.timeout(TIMEOUT):  # pings do not count as progress
        while True:
            frame = await ws.receive()
            if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise AssertionError(f"the websocket ended before a whole message: {frame!r}")
            message = await receiver.consume(frame.data)
            if message is not None:
                return message


async def test_a_real_dashboard_and_its_websocket_load_through_the_proxy(
    make_gateway: Any, make_api_client: Any, tmp_path: Path, dask_on_path: None
) -> None:
    config = {
        "gateway": {"backend": "unsafe-local"},
        "backend": {"unsafe-local": {**FAST, "clusters_directory": str(tmp_path / "clusters")}},
    }
    async with asyncio.timeout(WHOLE_TEST):
        gw = await make_gateway(config)
        assert gw.proxy is not None, "the embedded proxy is not running"
        proxy = f"http://{gw.public_address}"
        alice = make_api_client(gw, "alice")

        created = await alice.post("/api/v1/clusters/", {})
        assert created.status == 201, created.body
        name = created.body["name"]
        report = await alice.get(f"/api/v1/clusters/{name}?wait")
        cluster = gw.backend.store.get(name)
        assert report.body["status"] == "RUNNING", cluster.reason
        route = report.body["dashboard_route"]
        assert route == f"/clusters/{name}/status"
        dashboard = urlsplit(cluster.dashboard_address)
        assert dashboard.port is not None and dashboard.port != urlsplit(proxy).port

        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            # The page: bokeh's, for a fresh session whose token the page carries.
            async with http.get(proxy + route) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/html"
                page = await resp.text()
            assert "Bokeh.embed.embed_items" in page
            scripts = re.findall(r'<script src="(static/js/bokeh[^"]*)"', page)
            assert scripts, "the page loads no bokeh script"
            item = render_item(page)
            token = item["token"]
            assert item["root_ids"]

            # The scheduler saw the page request with the proxy's forwarding headers (bokeh
            # puts the headers of the request that made the session in its token).
            seen = get_token_payload(token)["headers"]
            assert seen["X-Forwarded-Host"] == gw.public_address
            assert seen["X-Forwarded-Proto"] == "http"
            assert seen["X-Forwarded-For"] == "127.0.0.1"
            assert seen["Host"] == dashboard.netloc

            # Its scripts resolve (relative to the page) through the same route.
            script = proxy + route.rsplit("/", 1)[0] + "/" + scripts[0]
            async with http.get(script) as resp:
                assert resp.status == 200
                body = await resp.read()
            assert b"Bokeh" in body and len(body) > 100_000

            # The websocket, as the browser opens it: <page path>/ws, subprotocols bokeh and
            # the session token.
            answers: list[aiohttp.TraceRequestEndParams] = []

            async def on_request_end(_s: Any, _c: Any, params: Any) -> None:
                answers.append(params)

            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(on_request_end)
            browser = aiohttp.ClientSession(timeout=timeout, trace_configs=[trace])
            async with (
                browser,
                browser.ws_connect(
                    f"ws://{gw.public_address}{route}/ws",
                    protocols=("bokeh", token),
                    origin=proxy,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=TIMEOUT, ws_close=TIMEOUT),
                    autoclose=False,
                ) as ws,
            ):
                (answer,) = answers
                assert answer.response.status == 101
                assert answer.response.headers["Upgrade"].lower() == "websocket"
                assert ws.protocol == "bokeh"

                protocol = Protocol()
                receiver = Receiver(protocol)
                ack = await receive_message(ws, receiver)
                assert ack.header["msgtype"] == "ACK"

                # A round trip: the document of this very session comes back.
                request = protocol.create("PULL-DOC-REQ")
                for part in (request.header_json, request.metadata_json, request.content_json):
                    await ws.send_str(part)
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        reply = await receive_message(ws, receiver)
                        if reply.header.get("reqid") == request.header["msgid"]:
                            break
                assert reply.header["msgtype"] == "PULL-DOC-REPLY", reply.content
                roots = {root["id"] for root in reply.content["doc"]["roots"]}
                assert set(item["root_ids"]) <= roots
                await ws.close()

            # The scheduler's plain HTTP endpoints under the same route.
            async with http.get(f"{proxy}/clusters/{name}/json/identity.json") as resp:
                assert resp.status == 200
                identity = json.loads(await resp.text())
            assert identity["type"] == "Scheduler"
            assert identity["address"] == cluster.scheduler_address
            assert identity["services"]["dashboard"] == dashboard.port
            async with http.get(f"{proxy}/clusters/{name}/health") as resp:
                assert (resp.status, await resp.text()) == (200, "ok")
            # The scheduler answers its root with an absolute-path redirect to /status; the
            # proxy keeps it inside the cluster's route, so the bare link works in a browser.
            for bare in (f"/clusters/{name}", f"/clusters/{name}/"):
                async with http.get(proxy + bare) as resp:
                    assert resp.status == 200
                    assert resp.url.path == route, resp.history
                    assert "Bokeh" in await resp.text()

        assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
        await eventually(lambda: not cluster.status.is_active, what="the cluster stopped")
        # The route went with the cluster: the path now falls to the gateway's own API.
        http = aiohttp.ClientSession(timeout=timeout)
        async with http, http.get(proxy + route) as resp:
            assert resp.status == 404, await resp.text()
