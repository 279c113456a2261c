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
from conftest import client_context, server_context
from test_feed import TOKEN, fake_feed  # noqa: F401 - the fixture is used by name

from gateway_proxy.addresses import split_address

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
            host, port = split_address(address)
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


# --- `--config`: the [proxy] section of a gateway config file -------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Replace the serving loop: the settings the command built are recorded, nothing runs."""
    from gateway_proxy import cli

    seen: list[object] = []

    async def fake_run(settings, *, stop=None) -> None:
        seen.append(settings)

    monkeypatch.setattr(cli, "run_standalone", fake_run)
    monkeypatch.delenv("GATEWAY_PROXY_TOKEN", raising=False)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    return seen


def _invoke(args: list[str], env: dict[str, str] | None = None):
    from click.testing import CliRunner

    from gateway_proxy.cli import proxy_command

    return CliRunner().invoke(proxy_command, args, env=env, catch_exceptions=False)


@pytest.mark.unit
def test_config_file_gives_defaults_and_options_win(tmp_path, captured) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[gateway]\nbackend = 'slurm'\n\n"  # other sections are the gateway's business
        "[proxy]\naddress = '127.0.0.1:9000'\ntcp_address = '127.0.0.1:9001'\n"
        "prefix = '/gw'\ngateway_url = 'http://127.0.0.1:8081'\napi_token = 'from-file'\n"
        "connect_timeout = 3\nexternally_managed = true\nmax_events = 50\n"
    )
    result = _invoke(["--config", str(config), "--address", "127.0.0.1:9100"])
    assert result.exit_code == 0, result.output
    (settings,) = captured
    assert settings.address == "127.0.0.1:9100"  # the command line wins
    assert settings.tcp_address == "127.0.0.1:9001"
    assert settings.prefix == "/gw"
    assert settings.gateway_url == settings.api_target == "http://127.0.0.1:8081"
    assert settings.api_token == "from-file"
    assert settings.connect_timeout == 3.0
    # The environment beats the file, as an explicit option does.
    captured.clear()
    result = _invoke(["--config", str(config)], env={"GATEWAY_PROXY_TOKEN": "from-env"})
    assert result.exit_code == 0, result.output
    assert captured[0].api_token == "from-env"
    assert captured[0].address == "127.0.0.1:9000"


@pytest.mark.unit
def test_config_file_problems_are_all_named(tmp_path, captured) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[proxy]\nadress = ':9000'\nconnect_timeout = 'soon'\nprefix = 3\nlog_level = 'loud'\n"
        "proxy_status_period = 30\n"
    )
    result = _invoke(["--config", str(config)])
    assert result.exit_code == 2
    for line in (
        "proxy.adress: unknown key",
        "proxy.connect_timeout: expected float, got str",
        "proxy.prefix: expected str, got int",
        "proxy.log_level: 'loud' is not one of",
        "proxy.proxy_status_period: no longer a setting (it never had an effect; delete the line)",
    ):
        assert line in result.output
    assert captured == []


@pytest.mark.unit
def test_config_file_unreadable_or_not_toml(tmp_path, captured) -> None:
    result = _invoke(["--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "cannot read" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy\n")
    result = _invoke(["--config", str(bad)])
    assert result.exit_code == 2 and "not valid TOML" in result.output
    assert captured == []


@pytest.mark.unit
def test_feed_url_and_token_are_required_somewhere(tmp_path, captured) -> None:
    result = _invoke([])
    assert result.exit_code == 2 and "--gateway-url is required" in result.output
    result = _invoke(["--gateway-url", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "--api-token is required" in result.output
    assert captured == []


@pytest.mark.unit
def test_config_keys_cover_the_embedded_proxys_proxy_section() -> None:
    """`gateway proxy --config` reads [proxy] without importing gateway-core, from its own list
    of keys: it must name every key of `BuiltinProxyConfig`, no more, no fewer."""
    import attrs

    from gateway_proxy.cli import CONFIG_KEYS, GATEWAY_ONLY_KEYS
    from gateway_proxy.embedded import BuiltinProxyConfig

    section = {f.name for f in attrs.fields(BuiltinProxyConfig)}
    assert set(CONFIG_KEYS) | GATEWAY_ONLY_KEYS == section


@pytest.mark.unit
def test_a_taken_port_is_one_clear_line_not_a_traceback(tmp_path) -> None:
    import socket

    from click.testing import CliRunner

    from gateway_proxy.cli import proxy_command

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            proxy_command,
            [
                "--address",
                f"127.0.0.1:{port}",
                "--gateway-url",
                "http://127.0.0.1:1",
                "--api-token",
                "t",
                "--loop",
                "asyncio",
            ],
            env={"GATEWAY_PROXY_TOKEN": None, "GATEWAY_CONFIG": None},
        )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)
    line = result.output.strip()
    assert line.startswith("Error: the proxy cannot start:")
    assert str(port) in line and "address already in use" in line.lower()
    # A TLS file that does not exist is named the same way.
    missing = tmp_path / "nope.pem"
    result = CliRunner().invoke(
        proxy_command,
        [
            "--address",
            "127.0.0.1:0",
            "--gateway-url",
            "http://127.0.0.1:1",
            "--api-token",
            "t",
            "--tls-cert",
            str(missing),
            "--tls-key",
            str(missing),
            "--loop",
            "asyncio",
        ],
        env={"GATEWAY_PROXY_TOKEN": None, "GATEWAY_CONFIG": None},
    )
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and "nope.pem" in result.output
