"""Fixtures of the Kerberos tests: a real MIT Kerberos realm (ci/start-kdc.sh, one per session),
a ticket cache per test, and gateways using the ``kerberos`` authenticator.

A system test that cannot get its realm fails with the reason (missing packages are installed
by the script when run as root, as CI is); nothing is skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define

START_KDC = Path(__file__).resolve().parent.parent / "ci" / "start-kdc.sh"
ALICE_PASSWORD = "alice-password"
BOB_PASSWORD = "bob-password"


def _free_port() -> int:
    """A loopback port free for TCP and UDP (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free loopback port for the KDC")


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


@define(kw_only=True)
class Realm:
    """A throwaway realm made by ci/start-kdc.sh in ``path``; see the script for its contents."""

    path: Path
    env: dict[str, str]

    @property
    def name(self) -> str:
        return self.env["KRB_REALM"]

    @property
    def http_keytab(self) -> Path:
        """HTTP/localhost and HTTP/127.0.0.1: what a gateway on loopback accepts."""
        return self.path / "http.keytab"

    def keytab(self, name: str) -> Path:
        """``alice``, ``http``, ``stale`` (HTTP/rotated.test at an old kvno) or ``other``."""
        return self.path / f"{name}.keytab"

    def start(self) -> None:
        """Create the realm (the first time) and start its KDC; fail the test if it cannot."""
        env = {**os.environ, "KRB_KDC_PORT": self.env.get("KRB_KDC_PORT") or str(_free_port())}
        out = _run([str(START_KDC), str(self.path)], env=env, timeout=900)
        if out.returncode != 0:
            pytest.fail(
                f"{START_KDC} could not start a KDC (exit {out.returncode}):\n"
                f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        self.env = _read_env(self.path / "env.sh")

    def stop(self) -> None:
        """Stop the KDC (the realm's files stay, so `start` brings the same realm back)."""
        _run([str(START_KDC), "--stop", str(self.path)], timeout=30)

    def kinit(
        self,
        principal: str = "alice",
        *,
        password: str | None = None,
        keytab: Path | None = None,
        lifetime: str | None = None,
    ) -> None:
        """Get a ticket-granting ticket into the current ``KRB5CCNAME``, from ``password`` or
        from ``keytab`` (default: alice's keytab)."""
        argv = ["kinit"]
        if lifetime is not None:
            argv += ["-l", lifetime]
        if password is None:
            argv += ["-k", "-t", str(keytab or self.keytab("alice"))]
        argv.append(principal)
        out = _run(argv, input=(password + "\n") if password is not None else None, timeout=30)
        assert out.returncode == 0, f"kinit {principal} failed: {out.stderr.strip()}"

    def kadmin(self, query: str) -> str:
        """Run one ``kadmin.local`` query on the realm's database."""
        out = _run(["kadmin.local", "-r", self.name, "-q", query], timeout=30)
        assert out.returncode == 0, f"kadmin.local {query!r} failed: {out.stderr.strip()}"
        return out.stdout


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="session")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    """A running realm for the whole session, with this process's Kerberos environment
    (``KRB5_CONFIG`` and friends) pointed at it."""
    realm = Realm(path=tmp_path_factory.mktemp("realm"), env={})
    realm.start()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in realm.env.items():
            patch.setenv(key, value)
        yield realm
    realm.stop()


@pytest.fixture
def ccache(realm: Realm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ticket cache of this test's own, as ``KRB5CCNAME``."""
    path = tmp_path / "ccache"
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{path}")
    return path


@pytest.fixture
def kerberos_config(realm: Realm) -> Callable[..., dict[str, Any]]:
    """``kerberos_config(**settings)``: a gateway config selecting the ``kerberos``
    authenticator on the realm's HTTP keytab, ``settings`` added to ``[auth.kerberos]``."""

    def make(**settings: Any) -> dict[str, Any]:
        auth = {"keytab": str(realm.http_keytab), **settings}
        return {"gateway": {"authenticator": "kerberos"}, "auth": {"kerberos": auth}}

    return make


@pytest.fixture
def local_backend_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``local_backend_config(config)``: ``config`` plus the ``unsafe-local`` backend (real
    Dask processes as this user, from this environment's ``dask``), tuned for tests."""
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    def make(config: dict[str, Any]) -> dict[str, Any]:
        backend = {
            "cluster_start_timeout": 60.0,
            "worker_start_timeout": 60.0,
            "cluster_heartbeat_period": 1,
            "cluster_status_period": 0.5,
            "worker_status_period": 0.5,
            "clusters_directory": str(tmp_path / "clusters"),
        }
        cluster = {"scheduler_memory": "512 MiB", "worker_memory": "512 MiB"}
        gateway = {**config.get("gateway", {}), "backend": "unsafe-local"}
        return {
            **config,
            "gateway": gateway,
            "backend": {"unsafe-local": backend},
            "cluster": cluster,
        }

    return make
