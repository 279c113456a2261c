"""Where the client takes its settings from: arguments, dask config, templates, auth lookup,
proxy addresses and the HTTP proxy.
"""

from __future__ import annotations

import getpass

import aiohttp
import dask
import pytest

from gateway_client import BasicAuth, Gateway, GatewayAuth, JupyterHubAuth
from gateway_client._http import proxy_for
from gateway_client.auth import get_auth
from gateway_client.comm import parse_gateway_address
from gateway_client.config import format_template
from gateway_client.gateway import resolve_proxy_address

pytestmark = pytest.mark.unit


class TokenAuth(GatewayAuth):
    """A custom auth class found by its dotted path."""

    def __init__(self, token: str = "") -> None:
        self.token = token

    def pre_request(self, resp: aiohttp.ClientResponse | None) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


def test_shipped_defaults_are_registered() -> None:
    import yaml

    import gateway_client.config

    with gateway_client.config.DEFAULTS_FILE.open() as f:
        shipped = yaml.safe_load(f)["gateway"]
    assert shipped["auth"] == {"type": "basic", "kwargs": {}}
    assert shipped["http-client"] == {"proxy": True}
    assert shipped["cluster"] == {"options": {}, "progress": True}
    assert {"address", "public-address", "proxy-address"} <= set(shipped)
    # Registered with dask at import: outside the test's config override they are the defaults.
    assert dask.config.defaults and any("gateway" in d for d in dask.config.defaults)


def test_addresses_from_config_with_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_HOST", "gw.example.org")
    with (
        dask.config.set(
            {
                "gateway.address": "http://{GW_HOST}:8000/",
                "gateway.public-address": "https://{GW_HOST}/",
                "gateway.proxy-address": 8786,
            }
        ),
        Gateway(auth=BasicAuth()) as gw,
    ):
        assert gw.address == "http://gw.example.org:8000"
        assert gw.public_address == "https://gw.example.org"
        assert gw.proxy_address == "gateway://gw.example.org:8786"
        assert repr(gw) == "Gateway<http://gw.example.org:8000>"


def test_missing_address_is_explained() -> None:
    with pytest.raises(ValueError, match=r"no gateway address.*gateway\.address"):
        Gateway()


def test_template_naming_an_unset_variable_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    with pytest.raises(ValueError, match="'NOPE_NOT_SET', which is not set"):
        format_template("http://{NOPE_NOT_SET}")
    assert format_template(5) == 5


@pytest.mark.parametrize(
    ("address", "proxy", "expected"),
    [
        ("http://gw:8000", None, "gateway://gw:8000"),
        ("http://gw", None, "gateway://gw:80"),
        ("https://gw", None, "gateway://gw:443"),
        ("http://gw:8000", 8786, "gateway://gw:8786"),
        ("http://gw:8000", "proxy.example.org:443", "gateway://proxy.example.org:443"),
        ("http://gw:8000", "tls://proxy.example.org:8786", "gateway://proxy.example.org:8786"),
        ("http://gw:8000", "gateway://other:1", "gateway://other:1"),
        ("http://[::1]:8000", None, "gateway://[::1]:8000"),
        ("http://[::1]:8000", 8786, "gateway://[::1]:8786"),
    ],
)
def test_proxy_address_resolution(address: str, proxy: str | int | None, expected: str) -> None:
    assert resolve_proxy_address(address, proxy) == expected


def test_an_ipv6_proxy_address_needs_brackets() -> None:
    with pytest.raises(ValueError, match="IPv6 proxy address in brackets"):
        resolve_proxy_address("http://gw:8000", "::1:8786")
    assert parse_gateway_address("gateway://[::1]:8786/abc") == ("::1", 8786, "abc")


def test_get_auth_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    basic = get_auth()
    assert (
        isinstance(basic, BasicAuth)
        and basic.username == getpass.getuser()
        and basic.password == ""
    )
    given = BasicAuth(username="bob")
    assert get_auth(given) is given
    with dask.config.set(
        {"gateway.auth.type": "jupyterhub", "gateway.auth.kwargs": {"api_token": "{TOK}"}}
    ):
        monkeypatch.setenv("TOK", "t0k")
        hub = get_auth()
    assert isinstance(hub, JupyterHubAuth) and hub.api_token == "t0k"
    assert "t0k" not in repr(hub)
    with dask.config.set(
        {"gateway.auth.type": f"{__name__}.TokenAuth", "gateway.auth.kwargs": {"token": "x"}}
    ):
        custom = get_auth()
    assert isinstance(custom, TokenAuth) and custom.token == "x"
    assert isinstance(get_auth(TokenAuth), TokenAuth)
    # kerberos comes from this distribution's own gateway_client.auth entry point.
    with pytest.raises(
        ValueError,
        match=r"unknown auth type 'radius'; available: basic, jupyterhub, kerberos.*"
        r"gateway_client.auth",
    ):
        get_auth("radius")
    with pytest.raises(ImportError, match=r"cannot import auth class 'no\.such\.Thing'"):
        get_auth("no.such.Thing")
    with pytest.raises(TypeError, match="must build a GatewayAuth"):
        get_auth(dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a GatewayAuth"):
        get_auth(42)  # type: ignore[arg-type]


def test_kerberos_auth_without_its_extra_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gssapi", None)  # as without gateway-client[kerberos]
    with pytest.raises(ImportError, match=r"pip install 'gateway-client\[kerberos\]'"):
        get_auth("kerberos")


def test_auth_entry_points_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    point = importlib.metadata.EntryPoint(
        name="token", value=f"{__name__}:TokenAuth", group="gateway_client.auth"
    )

    def fake_entry_points(**kw: str) -> list[importlib.metadata.EntryPoint]:
        return (
            [point]
            if kw.get("group") == "gateway_client.auth" and kw.get("name", "token") == "token"
            else []
        )

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert isinstance(get_auth("token"), TokenAuth)


def test_base_auth_class_contract() -> None:
    with pytest.raises(TypeError, match="takes no options"):
        GatewayAuth(colour="blue")
    with pytest.raises(NotImplementedError, match="GatewayAuth does not implement pre_request"):
        GatewayAuth().pre_request(None)


def test_http_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert proxy_for("http://gw:8000", False) == (None, None)
    assert proxy_for("http://gw:8000", None) == (None, None)
    proxy, headers = proxy_for("http://gw:8000", "http://user:pw@proxy:3128")
    assert proxy == "http://proxy:3128"
    assert headers == {"Proxy-Authorization": "Basic dXNlcjpwdw=="}
    monkeypatch.setenv("http_proxy", "http://envproxy:3128")
    monkeypatch.setenv("no_proxy", "internal.example.org")
    assert proxy_for("http://gw:8000", True) == ("http://envproxy:3128", None)
    assert proxy_for("http://internal.example.org:8000", True) == (None, None)
    assert proxy_for("https://gw:8000", True) == (None, None)  # no https_proxy set
