"""Unit tests of the ``kerberos`` authenticator's config, principal mapping and the refusals it
makes before any Kerberos call; no KDC, no processes."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway_auth_kerberos.authenticator import (
    KerberosAuthConfig,
    KerberosAuthenticator,
    PrincipalRule,
    gss_reason,
    map_principal,
)
from gateway_core.auth.base import Unauthorized
from gateway_core.config import ConfigError, structure

pytestmark = pytest.mark.unit


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structure(data, KerberosAuthConfig, path="auth.kerberos")
    return info.value.problems


def test_the_defaults_are_the_originals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The original's keytab default, relative to the working directory: absent here.
    assert problems({}) == [
        "auth.kerberos.keytab: cannot read the keytab 'dask_gateway.keytab': "
        "No such file or directory"
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is not a keytab file"),
        (b"\x05", "is not a keytab file"),
        (b"[libdefaults]\n", "is not a keytab file"),
    ],
)
def test_a_file_that_is_no_keytab_is_named(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "gateway.keytab"
    path.write_bytes(content)
    assert problems({"keytab": str(path)}) == [f"auth.kerberos.keytab: '{path}' {problem}"]


def test_a_directory_or_unreadable_keytab_is_named(tmp_path: Path) -> None:
    (found,) = problems({"keytab": str(tmp_path)})
    assert found == f"auth.kerberos.keytab: cannot read the keytab '{tmp_path}': Is a directory"


def test_an_empty_keytab_holds_no_key(tmp_path: Path) -> None:
    """A keytab with its header and no entry (what ktutil writes first) has no HTTP key."""
    path = tmp_path / "empty.keytab"
    path.write_bytes(b"\x05\x02")
    (found,) = problems({"keytab": str(path)})
    assert found.startswith(
        f"auth.kerberos.keytab: the keytab '{path}' holds no usable key for HTTP/<host>: "
    ), found


@pytest.mark.parametrize("service", ["", "HTTP/host", "HTTP@host", "two words"])
def test_service_name_must_be_a_service(tmp_path: Path, service: str) -> None:
    found = problems({"keytab": str(tmp_path / "x"), "service_name": service})
    assert found == [
        f"auth.kerberos.service_name: {service!r} is not a service name (e.g. HTTP)"
    ], found


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"pattern": "(unclosed"}, "pattern: not a regular expression: missing ), unterminated"),
        ({"pattern": "(a)@R", "user": r"\2"}, r"user: refers to group 2, but pattern has 1"),
        ({"pattern": "(a)@R", "user": r"\g<name>"}, "user: refers to group 'name'"),
        ({"pattern": "a@R", "user": "x", "extra": 1}, "extra: unknown key"),
    ],
)
def test_principal_map_rules_are_checked(rule: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        structure({"principal_map": [rule]}, KerberosAuthConfig, path="auth.kerberos")
    found = [p for p in info.value.problems if "principal_map" in p]
    assert len(found) == 1 and found[0].startswith(f"auth.kerberos.principal_map[0].{problem}"), (
        info.value.problems
    )


def test_the_default_mapping_strips_the_realm() -> None:
    assert map_principal("alice@EXAMPLE.ORG", []) == "alice"
    assert map_principal("alice/admin@EXAMPLE.ORG", []) == "alice/admin"
    assert map_principal("alice", []) == "alice"


def test_rules_map_in_order_and_refuse_the_unmatched() -> None:
    rules = [
        PrincipalRule(pattern=r"(?P<who>[^/@]+)/admin@EXAMPLE\.ORG", user=r"\g<who>-admin"),
        PrincipalRule(pattern=r"([^/@]+)@EXAMPLE\.ORG"),
        PrincipalRule(pattern=r"([^/@]+)@PARTNER\.ORG", user=r"partner-\1"),
    ]
    assert map_principal("alice/admin@EXAMPLE.ORG", rules) == "alice-admin"
    assert map_principal("alice@EXAMPLE.ORG", rules) == "alice"
    assert map_principal("bob@PARTNER.ORG", rules) == "partner-bob"
    assert map_principal("eve@ELSEWHERE.ORG", rules) is None
    assert map_principal("alice@EXAMPLE.ORG.EVIL", rules) is None  # whole-principal match


def test_a_template_python_cannot_fill_is_a_clear_error() -> None:
    rule = PrincipalRule(pattern=r"(\w+)@R", user="x\\")
    with pytest.raises(ValueError, match=r"principal_map rule .* cannot make a user name from"):
        map_principal("alice@R", [rule])


def test_gss_reason_without_the_mechanisms_words_gives_the_generic_ones() -> None:
    """A minor code the library cannot put in words (the real ones are tested against the KDC)
    leaves the major message and the code, on one line."""
    import gssapi.raw.misc

    error = gssapi.raw.misc.GSSError(0x000D0000, 123456789)
    assert gss_reason(error) == (
        "Unspecified GSS failure. Minor code may provide more information (minor code 123456789)"
    )
    assert gss_reason(gssapi.raw.misc.GSSError(0x00090000, 0)) == "Invalid token was supplied"


def test_reasons_are_cleaned_of_control_characters() -> None:
    assert gss_reason(ValueError("bad\nname\x1b[31m")) == "bad name?[31m"


@pytest.fixture
def authenticator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KerberosAuthenticator:
    """An authenticator whose keytab check is bypassed: these refusals never reach gssapi."""
    monkeypatch.setattr(
        "gateway_auth_kerberos.authenticator.keytab_problem", lambda keytab, service: None
    )
    config = KerberosAuthConfig(keytab=str(tmp_path / "unused.keytab"))
    return KerberosAuthenticator(config=config, context=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "Kerberos authentication required (Authorization: Negotiate); got no credentials"),
        (
            "Basic YWxpY2U6",
            "Kerberos authentication required (Authorization: Negotiate); got the 'Basic' scheme",
        ),
        ("Negotiate", "malformed Negotiate token (not base64)"),
        ("Negotiate %%%", "malformed Negotiate token (not base64)"),
    ],
)
async def test_requests_without_a_token_are_challenged(
    authenticator: KerberosAuthenticator, header: str | None, reason: str
) -> None:
    headers = {} if header is None else {"Authorization": header}
    request = make_mocked_request("GET", "/api/v1/clusters/", headers=headers)
    with pytest.raises(Unauthorized) as info:
        await authenticator.authenticate(request)
    assert info.value.reason == reason
    assert info.value.headers == {"WWW-Authenticate": "Negotiate"}


def test_the_mutual_token_goes_back_only_after_a_login(
    authenticator: KerberosAuthenticator,
) -> None:
    from aiohttp import web

    from gateway_auth_kerberos.authenticator import REQUEST_TOKEN_KEY

    request = make_mocked_request("GET", "/api/v1/clusters/")
    response = web.Response()
    authenticator.pre_response(request, response)
    assert "WWW-Authenticate" not in response.headers
    request[REQUEST_TOKEN_KEY] = b"\x01\x02final"
    authenticator.pre_response(request, response)
    assert response.headers["WWW-Authenticate"] == "Negotiate " + base64.b64encode(
        b"\x01\x02final"
    ).decode("ascii")


def test_a_wrong_config_class_is_a_type_error() -> None:
    from gateway_core.config import AuthConfig

    with pytest.raises(TypeError, match="needs a KerberosAuthConfig"):
        KerberosAuthenticator(config=AuthConfig(), context=None)  # type: ignore[arg-type]


def test_the_client_auth_says_how_to_install_gssapi(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from gateway_client.auth import get_auth
    from gateway_client.kerberos import KerberosAuth

    assert isinstance(get_auth("kerberos"), KerberosAuth)  # the entry point, by its name
    monkeypatch.setitem(sys.modules, "gssapi", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'gateway-client\[kerberos\]'"):
        KerberosAuth()


def test_gateway_plugins_lists_the_authenticator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed, the distribution's entry point registers ``kerberos`` without importing
    gssapi until a gateway selects it."""
    import json

    from click.testing import CliRunner

    from gateway_core.cli import make_cli

    monkeypatch.chdir(tmp_path)  # no gateway.toml here
    result = CliRunner().invoke(make_cli(), ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = [p for p in json.loads(result.output) if p["name"] == "auth-kerberos"]
    assert entry["kinds"] == ["authenticator:kerberos"]
    assert entry["distribution"] == "gateway-auth-kerberos"
    assert entry["status"] == "ok"


def test_the_hook_module_does_not_import_gssapi() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway_auth_kerberos.hooks as h; h.gateway_register_authenticators(); "
        "print('gssapi' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("principal", "rules", "outcome"),
    [
        ("alice@R", [], "alice"),
        ("alice@R", [{"pattern": r"(\w+)@R", "user": r"k-\1"}], "k-alice"),
        ("eve@X", [{"pattern": r"(\w+)@R"}], "matches no rule of principal_map"),
        ("@R", [], "maps to an unusable user name: the user name is empty"),
        ("alice@R", [{"pattern": r"(\w+)@R", "user": "x\\"}], "cannot make a user name"),
    ],
)
async def test_the_accepted_principal_becomes_the_user_or_a_401(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    principal: str,
    rules: list[dict[str, str]],
    outcome: str,
) -> None:
    """After the ticket is accepted (stubbed here; the KDC tests run it for real)."""
    from gateway_auth_kerberos.authenticator import REQUEST_TOKEN_KEY

    monkeypatch.setattr(
        "gateway_auth_kerberos.authenticator.keytab_problem", lambda keytab, service: None
    )
    config = structure({"keytab": str(tmp_path / "k"), "principal_map": rules}, KerberosAuthConfig)
    auth = KerberosAuthenticator(config=config, context=None)  # type: ignore[arg-type]
    monkeypatch.setattr(auth, "_accept", lambda token: (principal, b"final"))
    request = make_mocked_request(
        "GET", "/api/v1/clusters/", headers={"Authorization": "Negotiate dG9rZW4="}
    )
    if " " not in outcome:
        user = await auth.authenticate(request)
        assert user.name == outcome
        assert request[REQUEST_TOKEN_KEY] == b"final"
    else:
        with pytest.raises(Unauthorized, match=outcome) as info:
            await auth.authenticate(request)
        assert info.value.headers == {"WWW-Authenticate": "Negotiate"}
        assert REQUEST_TOKEN_KEY not in request
