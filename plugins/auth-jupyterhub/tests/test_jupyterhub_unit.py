"""Unit tests of the ``jupyterhub`` authenticator's config and header parsing, and of what the
``gateway`` command says about them (no hub needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_auth_jupyterhub.authenticator import (
    JupyterHubAuthConfig,
    has_access_scope,
    ssl_context,
    token_of,
)
from gateway_core.auth.base import Unauthorized
from gateway_core.config import ConfigError, structure

pytestmark = pytest.mark.unit

GOOD = {"jupyterhub_api_url": "http://127.0.0.1:8081/hub/api/", "jupyterhub_api_token": "s3"}


def gateway_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway_core", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        check=False,
    )


def test_config_takes_the_original_names_and_strips_the_trailing_slash() -> None:
    config = structure(
        {**GOOD, "cache_max_age": 60, "cookie_name": "hub-login"},
        JupyterHubAuthConfig,
        path="auth.jupyterhub",
    )
    assert config.api_url == "http://127.0.0.1:8081/hub/api"
    assert config.cache_max_age == 60
    assert config.cookie_name == "hub-login"
    assert config.admin_from_hub is True
    assert config.service_name == ""
    assert "s3" not in repr(config)


def test_url_and_token_default_to_the_hub_service_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "from-env")
    config = structure({}, JupyterHubAuthConfig, path="auth.jupyterhub")
    assert config.jupyterhub_api_url == "http://hub:8081/hub/api"
    assert config.jupyterhub_api_token == "from-env"


def test_missing_url_and_token_are_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        structure({}, JupyterHubAuthConfig, path="auth.jupyterhub")
    assert len(info.value.problems) == 2
    url, token = info.value.problems
    assert url.startswith("auth.jupyterhub.jupyterhub_api_url: required (or $JUPYTERHUB_API_URL)")
    assert token.startswith(
        "auth.jupyterhub.jupyterhub_api_token: required (or $JUPYTERHUB_API_TOKEN)"
    )


def test_bad_urls_and_tls_files_are_named(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as info:
        structure(
            {
                **GOOD,
                "jupyterhub_api_url": "hub:8081",
                "tls_ca": str(tmp_path / "nope.pem"),
                "tls_cert": str(cert),
                "request_timeout": 0,
            },
            JupyterHubAuthConfig,
            path="auth.jupyterhub",
        )
    assert info.value.problems == [
        "auth.jupyterhub.jupyterhub_api_url: 'hub:8081' is not an http:// or https:// URL",
        "auth.jupyterhub.tls_cert: tls_cert and tls_key must be set together",
        f"auth.jupyterhub.tls_ca: {tmp_path / 'nope.pem'}: no such file",
        "auth.jupyterhub.request_timeout: must be positive",
    ]


def test_tls_ca_makes_a_verifying_context(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert ssl_context(structure(GOOD, JupyterHubAuthConfig)) is None
    context = ssl_context(structure({**GOOD, "tls_ca": str(ca_file)}, JupyterHubAuthConfig))
    assert context is not None
    assert context.verify_mode.name == "CERT_REQUIRED"
    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("jupyterhub abc123", "abc123"),
        ("token abc123", "abc123"),
        ("Bearer abc123", "abc123"),
        ("JupyterHub   abc123  ", "abc123"),
    ],
)
def test_the_three_schemes_carry_a_token(header: str, token: str) -> None:
    assert token_of(header) == token


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("", "authentication required"),
        ("Basic dTpw", "unsupported authorization scheme 'Basic'"),
        ("jupyterhub", "malformed JupyterHub token"),
        ("jupyterhub a b", "malformed JupyterHub token"),
    ],
)
def test_other_headers_are_refused_with_the_challenge(header: str, reason: str) -> None:
    with pytest.raises(Unauthorized) as info:
        token_of(header)
    assert reason in info.value.reason
    assert info.value.headers["WWW-Authenticate"].startswith("jupyterhub")


def test_access_scope_check() -> None:
    assert has_access_scope(["access:services"], "gw")
    assert has_access_scope(["x", "access:services!service=gw"], "gw")
    assert not has_access_scope(["access:services!service=other"], "gw")
    assert not has_access_scope(None, "gw")


def test_gateway_plugins_lists_the_authenticator() -> None:
    out = gateway_cli("plugins")
    assert out.returncode == 0, out.stderr
    line = next(row for row in out.stdout.splitlines() if row.startswith("auth-jupyterhub"))
    assert "gateway-auth-jupyterhub" in line
    assert "authenticator:jupyterhub" in line


def test_config_check_and_serve_say_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nauthenticator = "jupyterhub"\n')
    check = gateway_cli("config", "check", "--config", str(path))
    assert check.returncode == 1
    assert check.stdout.splitlines() == [
        "auth.jupyterhub.jupyterhub_api_url: required (or $JUPYTERHUB_API_URL): the hub's "
        "API URL, e.g. http://127.0.0.1:8081/hub/api",
        "auth.jupyterhub.jupyterhub_api_token: required (or $JUPYTERHUB_API_TOKEN): the "
        "gateway's API token as a JupyterHub service (c.JupyterHub.services)",
    ]
    serve = gateway_cli("serve", "--config", str(path))
    assert serve.returncode != 0
    assert "Traceback" not in serve.stderr
    assert [line for line in serve.stderr.splitlines() if line.strip()] == [
        f"error: {line}" for line in check.stdout.splitlines()
    ]
    env = {"JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api", "JUPYTERHUB_API_TOKEN": "t"}
    assert gateway_cli("config", "check", "--config", str(path), env=env).returncode == 0


def test_an_oauth_client_id_needs_the_redirect_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_OAUTH_CALLBACK_URL", raising=False)
    with pytest.raises(ConfigError) as info:
        structure({**GOOD, "oauth_client_id": "service-dask-gateway"}, JupyterHubAuthConfig)
    assert info.value.problems == [
        "oauth_redirect_uri: required with oauth_client_id (or $JUPYTERHUB_OAUTH_CALLBACK_URL): "
        "the gateway's public .../api/v2/oauth/callback URL registered at the hub"
    ]
    monkeypatch.setenv("JUPYTERHUB_CLIENT_ID", "service-gw")
    monkeypatch.setenv("JUPYTERHUB_OAUTH_CALLBACK_URL", "https://gw/api/v2/oauth/callback")
    config = structure(GOOD, JupyterHubAuthConfig)
    assert config.oauth_client_id == "service-gw"
    assert config.oauth_redirect_uri == "https://gw/api/v2/oauth/callback"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/api/v1/clusters/", "/api/v1/clusters/"),
        ("/", "/"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example.org/", "/"),
        ("//evil.example.org/", "/"),
        ("/\\evil.example.org/", "/"),
    ],
)
def test_after_an_oauth_login_only_local_paths_are_followed(given: str | None, kept: str) -> None:
    from gateway_auth_jupyterhub.oauth import safe_next

    assert safe_next(given) == kept
