"""Tests of the built-in `simple` authenticator: HTTP Basic with an optional shared password."""

from __future__ import annotations

import base64

import pluggy
import pytest
from aiohttp.test_utils import make_mocked_request

import gateway_core.hookspecs
from gateway_core.auth.base import Unauthorized
from gateway_core.auth.simple import SimpleAuthConfig, SimpleAuthenticator
from gateway_core.config import load_config, structure
from gateway_core.context import GatewayContext
from gateway_core.hookcaller import GatewayHooks
from gateway_core.models import User

pytestmark = pytest.mark.unit


def make_auth(password: str | None = None) -> SimpleAuthenticator:
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(gateway_core.hookspecs)
    context = GatewayContext(config=load_config({}), hook=GatewayHooks.from_plugin_manager(pm))
    return SimpleAuthenticator(config=SimpleAuthConfig(password=password), context=context)


def basic(user: str, password: str = "", encoding: str = "utf-8") -> dict[str, str]:
    raw = f"{user}:{password}".encode(encoding)
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def login(auth: SimpleAuthenticator, headers: dict[str, str]) -> User:
    return await auth.authenticate(make_mocked_request("GET", "/api/v1/clusters/", headers=headers))


async def refused(auth: SimpleAuthenticator, headers: dict[str, str]) -> Unauthorized:
    with pytest.raises(Unauthorized) as exc:
        await login(auth, headers)
    assert exc.value.headers == {"WWW-Authenticate": 'Basic realm="gateway"'}
    return exc.value


async def test_any_user_without_a_password() -> None:
    auth = make_auth()
    assert await login(auth, basic("alice", "whatever")) == User(name="alice")
    assert await login(auth, basic("bob")) == User(name="bob")


async def test_shared_password_must_match() -> None:
    auth = make_auth(password="s3cret")
    assert await login(auth, basic("alice", "s3cret")) == User(name="alice")
    exc = await refused(auth, basic("alice", "wrong"))
    assert exc.reason == "invalid user name or password"
    await refused(auth, basic("alice", ""))


async def test_password_may_contain_colons_and_non_ascii() -> None:
    auth = make_auth(password="a:b:ü")
    assert (await login(auth, basic("zoë", "a:b:ü"))).name == "zoë"
    # the original client encodes as Latin-1
    assert (await login(auth, basic("zoë", "a:b:ü", "latin-1"))).name == "zoë"


async def test_missing_header_is_challenged() -> None:
    exc = await refused(make_auth(), {})
    assert "authentication required" in exc.reason


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Bearer abc", "unsupported authorization scheme 'Bearer'"),
        ("token abc", "unsupported authorization scheme 'token'"),
        ("Basic !!!notbase64", "malformed Basic credentials"),
        ("Basic " + base64.b64encode(b"nocolon").decode(), "no ':'"),
    ],
)
async def test_bad_headers_are_refused(header: str, reason: str) -> None:
    exc = await refused(make_auth(), {"Authorization": header})
    assert reason in exc.reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "the user name is empty"),
        ("a" * 257, "longer than 256 characters"),
        ("ali\x00ce", "control characters"),
        ("ali\nce", "control characters"),
        ("ali\x7fce", "control characters"),
        (" alice", "starts or ends with whitespace"),
    ],
)
async def test_bad_user_names_are_refused(name: str, reason: str) -> None:
    exc = await refused(make_auth(), basic(name, "pw"))
    assert reason in exc.reason


async def test_scheme_is_case_insensitive() -> None:
    header = basic("carol")["Authorization"].replace("Basic", "basic")
    assert (await login(make_auth(), {"Authorization": header})).name == "carol"


def test_config_section_structures_from_toml() -> None:
    config = structure({"password": "pw", "cache_max_age": 10}, SimpleAuthConfig)
    assert config == SimpleAuthConfig(password="pw", cache_max_age=10)
    assert SimpleAuthConfig().password is None
    assert SimpleAuthenticator.name == "simple"
