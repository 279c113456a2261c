"""A gateway killed with SIGKILL and restarted on its persistent store finds its clusters.

Real `gateway serve` processes, real Dask clusters (unsafe-local), our client: one cluster
running with a worker and one still starting when the gateway dies.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@define(kw_only=True)
class Server:
    folder: Path
    config: Path
    address: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.folder / "gateway.log").open("ab")
        # As a user would run it: with this environment's scripts (`dask`) on PATH.
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway_core", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, "gateway did not start\n" + self.log_tail()
            time.sleep(0.1)

    def log_tail(self) -> str:
        return (self.folder / "gateway.log").read_text()[-4000:]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.address}/api{path}",
            data=data,
            method=method,
            headers={
                "Authorization": "Basic " + base64.b64encode(b"alice:").decode(),
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    config = tmp_path / "gateway.toml"
    key = base64.b64encode(os.urandom(32)).decode()
    config.write_text(
        f"""
[gateway]
backend = "unsafe-local"
db_url = "sqlite:///{tmp_path / "gateway.sqlite"}"
db_encrypt_keys = ["{key}"]
stop_clusters_on_shutdown = false

[proxy]
address = "127.0.0.1:{port}"

[backend.unsafe-local]
cluster_heartbeat_period = 1
cluster_status_period = 2
worker_status_period = 2
clusters_directory = "{tmp_path / "clusters"}"

[cluster]
worker_memory = "512 MiB"
"""
    )
    srv = Server(folder=tmp_path, config=config, address=f"http://127.0.0.1:{port}")
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def wait_status(server: Server, name: str, wanted: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = server.call("GET", f"/v1/clusters/{name}")
        if report["status"] in wanted:
            return report
        if report["status"] == "FAILED":
            reason = server.call("GET", f"/v2/clusters/{name}/reason")["reason"]
            pytest.fail(f"{name} failed: {reason}\n{server.log_tail()}")
        assert time.monotonic() < deadline, f"{name} stuck in {report['status']}"
        time.sleep(0.2)


def compute(server: Server, name: str, workers: int) -> int:
    from gateway_client import BasicAuth, Gateway

    with Gateway(server.address, auth=BasicAuth("alice")) as gateway:
        cluster = gateway.connect(name)
        client = cluster.get_client(set_as_default=False)
        try:
            client.wait_for_workers(workers, timeout=60)
            return int(client.submit(sum, range(10)).result(timeout=60))
        finally:
            client.close()
            cluster.close()


def test_sigkill_and_restart_keeps_clusters(server: Server) -> None:
    server.start()
    running = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    wait_status(server, running, {"RUNNING"})
    server.call("POST", f"/v1/clusters/{running}/scale", {"count": 1})
    assert compute(server, running, 1) == 45

    starting = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # dies while `starting` starts

    server.start()
    # The running cluster is reachable again, with its worker, through the new proxy.
    assert wait_status(server, running, {"RUNNING"})["status"] == "RUNNING"
    assert compute(server, running, 1) == 45
    # The one that was starting finishes or fails cleanly, with a reason if it fails.
    report = wait_status(server, starting, {"RUNNING", "FAILED"})
    if report["status"] == "RUNNING":
        server.call("POST", f"/v1/clusters/{starting}/scale", {"count": 1})
        assert compute(server, starting, 1) == 45
    else:
        reason = server.call("GET", f"/v2/clusters/{starting}/reason")["reason"]
        assert reason, "a failed cluster must say why"

    for name in (running, starting):
        server.call("DELETE", f"/v1/clusters/{name}")
    for name in (running, starting):
        assert wait_status(server, name, {"STOPPED", "FAILED"})["status"] in {"STOPPED", "FAILED"}
    assert server.stop() == 0
    leftovers = list((server.folder / "clusters").glob("*"))
    assert leftovers == [], f"cluster directories left behind: {leftovers}"
