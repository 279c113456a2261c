"""Integration test of the standalone proxy: ``python -m gateway_proxy`` in its own process.

Owns one end-to-end run: a fake gateway feed, the proxy process reading it, readiness over
HTTP, a TLS-SNI connection and an HTTP request through it, then a clean stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import aiohttp
import pytest
from conftest import client_context, host_port, server_context
from test_feed import TOKEN, fake_feed  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_standalone_process_follows_the_feed(ca, make_echo, fake_feed, loop) -> None:  # noqa: F811
    echo = await make_echo(server_context(ca, "daskgateway-c1"))
    fake_feed.put({"kind": "SNI", "sni": "c1", "target": echo.target})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_proxy",
        "--address",
        "127.0.0.1:0",
        "--gateway-url",
        fake_feed.url,
        "--log-level",
        "warn",
        "--loop",
        loop,
        "--handshake-timeout",
        "2",
        env={**os.environ, "GATEWAY_PROXY_TOKEN": TOKEN},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "the proxy exited before serving"
                if match := re.search(r"HTTP at (\S+),", line):
                    address = match.group(1)
                    break
            async with aiohttp.ClientSession() as session:
                while True:
                    async with session.get(f"http://{address}/_gateway-proxy/ready") as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)
                # The default route goes to the gateway URL: the feed itself answers there.
                headers = {"Authorization": f"token {TOKEN}"}
                async with session.get(f"http://{address}/api/v1/routes", headers=headers) as resp:
                    assert (await resp.json())["id"] == 1
            host, port = host_port(address)
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_context(ca), server_hostname="daskgateway-c1"
            )
            writer.write(b"through a process")
            assert await reader.readexactly(17) == b"through a process"
            writer.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
