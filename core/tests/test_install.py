"""The headline install, as a user runs it: `pip install gateway-core gateway-slurm` from wheels.

Builds the wheels that install needs (proxy, core, the Slurm plugin) from this checkout, installs
them into a fresh virtual environment with the third-party dependencies from PyPI, then checks
that `gateway plugins` lists the Slurm backend and the proxy and that `gateway serve` answers on
its public (proxy) address. Uses uv when it is on PATH (much faster), else pip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["proxy", "core", "plugins/gateway-slurm"]
"""What `gateway-core gateway-slurm` pulls in from this checkout (no client: no [local])."""
UV = shutil.which("uv")


def clean_env() -> dict[str, str]:
    """The environment without this test run's virtual environment or gateway settings."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GATEWAY_")}


def run(*command: str | Path, timeout: float) -> str:
    result = subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_wheels(out: Path, python: Path) -> dict[str, str]:
    """Wheels of `PACKAGES` into ``out`` (without uv, with ``python``'s pip: the test run's own
    environment may have none); their distribution names and versions."""
    for package in PACKAGES:
        source = ROOT / package
        if UV:
            run(UV, "build", "-q", "--wheel", "--out-dir", out, source, timeout=180)
        else:
            run(python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, source, timeout=300)
    versions = {}
    for wheel in out.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        versions[name.replace("_", "-")] = version
    assert set(versions) == {"gateway-proxy", "gateway-core", "gateway-slurm"}
    return versions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_core_and_slurm_install_a_serving_gateway_with_the_proxy(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    if UV:
        run(UV, "venv", "-q", "-p", sys.executable, venv, timeout=60)
    else:
        run(sys.executable, "-m", "venv", venv, timeout=120)
    wheels = tmp_path / "wheels"
    versions = build_wheels(wheels, python)
    # Ours come from the wheels, whatever PyPI may hold under the same names; a constraint
    # pins a version without asking for the package, so gateway-proxy still has to come from
    # gateway-core's own dependencies.
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{name}=={v}\n" for name, v in versions.items()))
    install = ["--find-links", wheels, "-c", constraints, "gateway-core", "gateway-slurm"]
    if UV:
        run(UV, "pip", "install", "-q", "-p", python, *install, timeout=300)
    else:
        run(python, "-m", "pip", "install", "-q", *install, timeout=600)
    gateway = venv / "bin" / "gateway"

    plugins = {p["name"]: p for p in json.loads(run(gateway, "plugins", "--json", timeout=60))}
    for name, distribution in (("slurm", "gateway-slurm"), ("proxy", "gateway-proxy")):
        assert plugins[name]["status"] == "ok", plugins[name]
        assert plugins[name]["distribution"] == distribution
        assert plugins[name]["version"] == versions[distribution]
    assert "backend:slurm" in plugins["slurm"]["kinds"]
    assert "proxy:builtin" in plugins["proxy"]["kinds"]

    # The schema migrations ship in the wheel: the installed gateway upgrades a database.
    db = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    upgraded = run(gateway, "db", "upgrade", "--db-url", db, timeout=60)
    assert upgraded.startswith(f"{db}: upgraded from empty to revision "), upgraded
    assert "up to date" in run(gateway, "db", "current", "--check", "--db-url", db, timeout=60)

    # Serve with the Slurm backend (it starts without Slurm: clusters would fail, not the
    # gateway); the health check goes through the proxy's public address.
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nbackend = "slurm"\n\n[proxy]\naddress = "127.0.0.1:{port}"\n')
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(gateway), "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=clean_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                url = f"http://127.0.0.1:{port}/api/health"
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    assert json.loads(response.read()) == {"status": "pass"}
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "gateway did not serve:\n" + log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert f"gateway serving at http://127.0.0.1:{port} (backend slurm" in text
    assert "no proxy plugin is installed" not in text
