"""Fixtures of the JupyterHub tests: a real ``jupyterhub`` process on free loopback ports, and
its REST API driven with the gateway's service token (users, groups, tokens).

The hub runs from a generated ``jupyterhub_config.py`` in a temporary directory (sqlite database
there too), with a do-nothing proxy class defined in that file: the hub's REST API needs no
configurable-http-proxy. The gateway is registered as the service ``dask-gateway`` with the
admin role (so the tests can manage users, admins, groups and tokens), and every user's role grants
``access:services!service=dask-gateway``. A hub that does not start fails the test with its log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field

SERVICE = "dask-gateway"
"""The name the gateway has as a hub service in every test hub."""
HUB_START_TIMEOUT = 90.0
"""Seconds a hub may take to answer (its imports alone take seconds on a loaded machine)."""

HUB_CONFIG = """
from jupyterhub.proxy import Proxy


class NullProxy(Proxy):
    \"\"\"Keeps the routes the hub asks for in memory and routes nothing: the tests talk to the
    hub's own port.\"\"\"

    should_start = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._routes = {{}}

    async def add_route(self, routespec, target, data):
        self._routes[routespec] = {{"routespec": routespec, "target": target, "data": data}}

    async def delete_route(self, routespec):
        self._routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self._routes)


c = get_config()  # noqa: F821 - given by JupyterHub
c.JupyterHub.proxy_class = NullProxy
c.JupyterHub.bind_url = "http://127.0.0.1:{public_port}"
c.JupyterHub.hub_bind_url = "{scheme}://127.0.0.1:{hub_port}"
c.JupyterHub.db_url = "sqlite:///{directory}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{directory}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{directory}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allow_all = True
c.JupyterHub.services = [{services}]
c.JupyterHub.load_roles = [
    # The tests' service token manages users (admins too), groups and tokens: a site's
    # gateway needs none of this (see the README).
    {{"name": "admin", "services": ["{service}"]}},
    {{"name": "user", "scopes": ["self", "access:services!service={service}"]}},
]
{extra}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubError(Exception):
    """The hub's REST API refused a test's request."""


@define(kw_only=True)
class Hub:
    """A running ``jupyterhub`` process and its REST API as the gateway's service."""

    directory: Path
    hub_url: str
    """``http://127.0.0.1:<port>``: the hub's own server (API under ``/hub/api``)."""
    service_token: str
    password: str
    """Every user's password with the hub's DummyAuthenticator (browser logins)."""
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default=Path())
    tls: dict[str, str] = field(factory=dict)
    """With ``start_hub(tls=True)``: ``tls_ca`` (the hub's CA), ``tls_cert`` and ``tls_key`` (a
    client certificate the hub trusts), as the gateway's settings name them."""

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls["tls_ca"])
        context.load_cert_chain(self.tls["tls_cert"], self.tls["tls_key"])
        return context

    @property
    def api_url(self) -> str:
        return f"{self.hub_url}/hub/api"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """One REST call (sync: the hub answers in milliseconds); the parsed JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.api_url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {token or self.service_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl_context()) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise HubError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
        return json.loads(text) if text.strip() else None

    def create_user(self, prefix: str = "u", *, admin: bool = False) -> str:
        """A new hub user with a unique name; returns the name."""
        name = f"{prefix}{secrets.token_hex(4)}"
        self.api("POST", f"/users/{name}", {"admin": admin} if admin else {})
        return name

    def add_to_group(self, group: str, *users: str) -> None:
        try:
            self.api("POST", f"/groups/{group}", {"users": list(users)})
        except HubError:  # the group exists: add to it
            self.api("POST", f"/groups/{group}/users", {"users": list(users)})

    def token(
        self, user: str, *, expires_in: int | None = None, scopes: list[str] | None = None
    ) -> tuple[str, str]:
        """A new API token of ``user``: (token, token id)."""
        body: dict[str, Any] = {"note": "gateway test"}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if scopes is not None:
            body["scopes"] = scopes
        answer = self.api("POST", f"/users/{user}/tokens", body)
        return answer["token"], answer["id"]

    def revoke(self, user: str, token_id: str) -> None:
        self.api("DELETE", f"/users/{user}/tokens/{token_id}")

    def delete_user(self, user: str) -> None:
        self.api("DELETE", f"/users/{user}")

    def gateway_auth(self, **extra: Any) -> dict[str, Any]:
        """The gateway config selecting the jupyterhub authenticator against this hub."""
        return {
            "gateway": {"authenticator": "jupyterhub"},
            "auth": {
                "jupyterhub": {
                    "jupyterhub_api_url": self.api_url,
                    "jupyterhub_api_token": self.service_token,
                    **self.tls,
                    **extra,
                }
            },
        }

    def stop(self) -> None:
        """Stop the hub (SIGTERM, then SIGKILL after 20 s)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


TLS_CONFIG = """
# The hub's API over TLS with client certificates (its internal_ssl), trusting the tests' CA
# for the gateway's client certificate.
c.JupyterHub.internal_ssl = True
c.JupyterHub.internal_certs_location = "{directory}/internal-ssl"
c.JupyterHub.external_ssl_authorities = {{
    "gateway-tests-ca": {{"cert": "{directory}/tests-ca.crt", "key": "{directory}/tests-ca.key"}}
}}
"""


def _tls_files(directory: Path) -> dict[str, str]:
    """A CA (trustme) the hub is told to trust, and a client certificate it signed."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "tests-ca.crt"))
    ca.private_key_pem.write_to_path(str(directory / "tests-ca.key"))
    leaf = ca.issue_cert("gateway")
    leaf.cert_chain_pems[0].write_to_path(str(directory / "gateway.crt"))
    leaf.private_key_pem.write_to_path(str(directory / "gateway.key"))
    return {
        # written by the hub at start-up: the CA of its own certificate
        "tls_ca": str(directory / "internal-ssl" / "hub-ca" / "hub-ca.crt"),
        "tls_cert": str(directory / "gateway.crt"),
        "tls_key": str(directory / "gateway.key"),
    }


def start_hub(
    directory: Path, *, services_extra: str = "", extra: str = "", tls: bool = False
) -> Hub:
    """Start ``jupyterhub`` in ``directory``; return once its API answers. ``services_extra``
    is added to the gateway's service dict (``"oauth_redirect_uri": ...``), ``extra`` to the
    config file; ``tls`` serves the hub's API over https with client certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    tls_files: dict[str, str] = {}
    if tls:
        tls_files = _tls_files(directory)
        extra = TLS_CONFIG.format(directory=directory) + extra
    hub_port, public_port = free_port(), free_port()
    token = secrets.token_hex(32)
    password = secrets.token_hex(8)
    services = f'{{"name": "{SERVICE}", "api_token": "{token}", {services_extra}}}'
    config = directory / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            HUB_CONFIG.format(
                public_port=public_port,
                hub_port=hub_port,
                scheme="https" if tls else "http",
                directory=directory,
                password=password,
                services=services,
                service=SERVICE,
                extra=extra,
            )
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_"))}
    hub = Hub(
        directory=directory,
        hub_url=f"{'https' if tls else 'http'}://127.0.0.1:{hub_port}",
        service_token=token,
        password=password,
        log_path=directory / "jupyterhub.log",
        tls=tls_files,
    )
    with hub.log_path.open("wb") as log:
        hub.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + HUB_START_TIMEOUT
    while True:
        try:
            if not tls or Path(tls_files["tls_ca"]).exists():
                context = hub.ssl_context()
                with urllib.request.urlopen(f"{hub.api_url}/", timeout=5, context=context) as r:
                    if r.status == 200:
                        return hub
        except OSError:
            pass
        if hub.process.poll() is not None:
            pytest.fail(f"jupyterhub exited with {hub.process.returncode}:\n{hub.log_tail()}")
        if time.monotonic() > deadline:
            hub.stop()
            pytest.fail(
                f"jupyterhub did not answer within {HUB_START_TIMEOUT} s:\n{hub.log_tail()}"
            )
        time.sleep(0.2)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub for the session (tests use their own uniquely named users)."""
    started = start_hub(tmp_path_factory.mktemp("hub"))
    yield started
    started.stop()


@pytest.fixture
def make_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Hub]]:
    """``make_hub(**kwargs)``: a hub of the test's own (to stop it, or configure it), stopped at
    teardown."""
    started: list[Hub] = []

    def factory(**kwargs: Any) -> Hub:
        one = start_hub(tmp_path_factory.mktemp("hub"), **kwargs)
        started.append(one)
        return one

    yield factory
    for one in started:
        one.stop()
