"""The ``kerberos`` authenticator: Kerberos tickets over SPNEGO (``Authorization: Negotiate``).

Owns `KerberosAuthConfig` (``[auth.kerberos]``), `PrincipalRule`, `KerberosAuthenticator`, and
the helpers `map_principal` (principal -> user name) and `keytab_problem` (start-up check).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from attrs import define, field

from gateway_core.auth.base import Authenticator, Unauthorized
from gateway_core.auth.simple import username_problem
from gateway_core.config import AuthConfig, ConfigError
from gateway_core.models import User

if TYPE_CHECKING:
    import gssapi

    from gateway_core.context import GatewayContext

log = logging.getLogger("gateway_auth_kerberos")

SCHEME = "Negotiate"
CHALLENGE = {"WWW-Authenticate": SCHEME}
"""Headers of every 401 this authenticator answers: the start of an SPNEGO exchange."""

REQUEST_TOKEN_KEY = web.RequestKey("gateway_auth_kerberos.mutual_token", bytes)
"""Where `KerberosAuthenticator.authenticate` leaves the acceptor's final token on the request,
for `KerberosAuthenticator.pre_response` to send back."""

_KEYTAB_VERSIONS = (b"\x05\x01", b"\x05\x02")
"""The first two bytes of every keytab file (format 0x05, version 1 or 2)."""

_GROUP_REFERENCE = re.compile(r"\\(\d+)|\\g<([^>]*)>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DISPLAY_FAILED = "gss_display_status call returned failure"
"""What python-gssapi says when a status code cannot be turned into words."""


def _clean(text: str) -> str:
    """``text`` without control characters: safe in one log line and one JSON reason."""
    return _CONTROL.sub("?", text)


@define(kw_only=True, frozen=True)
class PrincipalRule:
    """One rule of ``principal_map``: a principal that matches ``pattern`` as a whole (Python
    regular expression) becomes the user ``user``, a template that may use the pattern's groups
    (``\\1``, ``\\g<name>``)."""

    pattern: str
    user: str = r"\1"

    def __attrs_post_init__(self) -> None:
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError([f"pattern: not a regular expression: {exc}"]) from None
        for number, name in _GROUP_REFERENCE.findall(self.user):
            if number and int(number) > compiled.groups:
                raise ConfigError(
                    [f"user: refers to group {number}, but pattern has {compiled.groups}"]
                )
            if name and not name.isdigit() and name not in compiled.groupindex:
                raise ConfigError([f"user: refers to group {name!r}, which pattern lacks"])
            if name.isdigit() and int(name) > compiled.groups:
                raise ConfigError(
                    [f"user: refers to group {name}, but pattern has {compiled.groups}"]
                )

    def apply(self, principal: str) -> str | None:
        """The user name for ``principal``, or None when the pattern does not match it.

        Raises ValueError when ``user`` is a template Python cannot fill (a stray backslash).
        """
        match = re.fullmatch(self.pattern, principal)
        if match is None:
            return None
        try:
            return match.expand(self.user)
        except (re.error, IndexError) as exc:
            raise ValueError(
                f"principal_map rule {self.pattern!r} cannot make a user name from "
                f"{self.user!r}: {exc}"
            ) from None


@define(kw_only=True, frozen=True)
class KerberosAuthConfig(AuthConfig):
    """`[auth.kerberos]`: where the service keys are and how principals become user names.

    The keytab is checked when the config is loaded (``gateway config check``, start-up): it
    must be readable and hold a key for at least one ``<service_name>/<host>`` principal.
    """

    keytab: str = "dask_gateway.keytab"
    """The keytab holding the gateway's service keys (relative paths: from the working
    directory). Every ``<service_name>/<host>`` principal in it is accepted."""
    service_name: str = "HTTP"
    """The service part of the accepted principals; browsers and clients ask for ``HTTP``."""
    principal_map: list[PrincipalRule] = field(factory=list)
    """Rules turning a principal into a user name, tried in order; the first whose pattern
    matches the whole principal wins, and a principal no rule matches is refused. Empty (the
    default): the principal without its realm (``alice@EXAMPLE.ORG`` -> ``alice``)."""

    def check(self) -> list[str]:
        """Problems with the service name and the keytab (see `CheckedConfig`)."""
        if not self.service_name or any(c in self.service_name for c in "/@ "):
            return [f"service_name: {self.service_name!r} is not a service name (e.g. HTTP)"]
        problem = keytab_problem(self.keytab, self.service_name)
        return [] if problem is None else [f"keytab: {problem}"]


def map_principal(principal: str, rules: list[PrincipalRule]) -> str | None:
    """The user name of ``principal`` under ``rules`` (see `KerberosAuthConfig.principal_map`);
    None when rules are given and none matches. Raises ValueError from `PrincipalRule.apply`."""
    if not rules:
        name, at, _realm = principal.rpartition("@")
        return name if at else principal
    for rule in rules:
        user = rule.apply(principal)
        if user is not None:
            return user
    return None


def gss_reason(exc: BaseException) -> str:
    """What a GSSAPI error says, as one clean line: the mechanism's (minor) message, which
    names the real cause, or the generic (major) one with the minor code when the mechanism's
    message cannot be had."""
    major = getattr(exc, "maj_code", None)
    minor = getattr(exc, "min_code", 0)
    get_all = getattr(exc, "get_all_statuses", None)
    statuses: list[str] = []
    try:
        if minor and get_all is not None:
            statuses = [s for s in get_all(minor, False) if s and _DISPLAY_FAILED not in s]
        if not statuses and major is not None and get_all is not None:
            statuses = [s for s in get_all(major, True) if s and _DISPLAY_FAILED not in s]
            if statuses and minor:
                statuses[-1] = f"{statuses[-1].strip().rstrip('.')} (minor code {minor})"
    except Exception:  # noqa: BLE001 - a message, whatever the binding can give
        statuses = []
    text = "; ".join(str(s).strip().rstrip(".") for s in statuses) or str(exc)
    return _clean(" ".join(text.split()))


def acceptor_credentials(keytab: str, service_name: str) -> gssapi.Credentials:
    """Acceptor credentials for every ``<service_name>/<host>`` key in ``keytab``.

    A host-based name without a host (``HTTP``) matches any host in MIT Kerberos, so a client
    may name whichever of the keytab's hosts it dialled. Raises ``gssapi`` errors.
    """
    import gssapi

    name = gssapi.Name(service_name, gssapi.NameType.hostbased_service)
    return gssapi.Credentials(name=name, usage="accept", store={"keytab": keytab})


def keytab_problem(keytab: str, service_name: str) -> str | None:
    """Why ``keytab`` cannot serve ``service_name``, as one line, or None when it can."""
    path = Path(keytab).expanduser()
    try:
        with path.open("rb") as file:
            head = file.read(2)
    except OSError as exc:
        return f"cannot read the keytab {str(path)!r}: {exc.strerror or exc}"
    if head not in _KEYTAB_VERSIONS:
        return f"{str(path)!r} is not a keytab file"
    import gssapi

    try:
        acceptor_credentials(str(path.resolve()), service_name)
    except gssapi.exceptions.GSSError as exc:
        return (
            f"the keytab {str(path)!r} holds no usable key for {service_name}/<host>: "
            f"{gss_reason(exc)}"
        )
    return None


class Refused(Exception):
    """A Negotiate token that did not authenticate anyone; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KerberosAuthenticator(Authenticator):
    """Accepts ``Authorization: Negotiate <token>`` (SPNEGO or a bare Kerberos token) for any
    ``<service_name>/<host>`` principal in the keytab.

    No or another ``Authorization`` answers 401 ``WWW-Authenticate: Negotiate``; a token that
    does not authenticate (malformed, expired, for a key the keytab lacks) answers 401 and logs
    the reason. On success the principal is mapped to the user name and the acceptor's final
    token (mutual authentication) goes back in ``WWW-Authenticate: Negotiate <token>``.
    """

    name = "kerberos"

    def __init__(self, *, config: AuthConfig, context: GatewayContext, **kwargs: Any) -> None:
        super().__init__(config=config, context=context, **kwargs)
        if not isinstance(config, KerberosAuthConfig):
            raise TypeError(
                f"the kerberos authenticator needs a KerberosAuthConfig, got {config!r}"
            )
        self.settings = config
        self.keytab = str(Path(config.keytab).expanduser().resolve())
        self._credentials: gssapi.Credentials | None = None

    async def setup(self) -> None:
        import gssapi

        try:
            self._credentials = await asyncio.to_thread(
                acceptor_credentials, self.keytab, self.settings.service_name
            )
        except gssapi.exceptions.GSSError as exc:
            raise ConfigError(
                [
                    f"auth.kerberos.keytab: the keytab {self.keytab!r} holds no usable key for "
                    f"{self.settings.service_name}/<host>: {gss_reason(exc)}"
                ]
            ) from None

    async def cleanup(self) -> None:
        self._credentials = None

    async def authenticate(self, request: web.Request) -> User:
        header = request.headers.get("Authorization", "").strip()
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != SCHEME.lower():
            what = f"the {scheme[:32]!r} scheme" if scheme else "no credentials"
            raise Unauthorized(
                f"Kerberos authentication required (Authorization: Negotiate); got {what}",
                headers=CHALLENGE,
            )
        try:
            token = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            token = b""
        if not token:
            self._log_refusal(request, "the Negotiate token is empty or not base64")
            raise Unauthorized("malformed Negotiate token (not base64)", headers=CHALLENGE)
        try:
            principal, reply = await asyncio.to_thread(self._accept, token)
        except Refused as exc:
            self._log_refusal(request, exc.reason)
            raise Unauthorized(
                f"Kerberos authentication failed: {exc.reason}", headers=CHALLENGE
            ) from None
        try:
            username = map_principal(principal, self.settings.principal_map)
        except ValueError as exc:
            self._log_refusal(request, str(exc))
            raise Unauthorized(str(exc), headers=CHALLENGE) from None
        if username is None:
            reason = f"the principal {principal!r} matches no rule of principal_map"
            self._log_refusal(request, reason)
            raise Unauthorized(reason, headers=CHALLENGE)
        problem = username_problem(username)
        if problem is not None:
            reason = f"the principal {principal!r} maps to an unusable user name: {problem}"
            self._log_refusal(request, reason)
            raise Unauthorized(reason, headers=CHALLENGE)
        if reply:
            request[REQUEST_TOKEN_KEY] = reply
        log.debug("kerberos: %s authenticated as user %r", principal, username)
        return User(name=username)

    def pre_response(self, request: web.Request, response: web.StreamResponse) -> None:
        reply = request.get(REQUEST_TOKEN_KEY)
        if reply and not response.prepared:
            response.headers["WWW-Authenticate"] = (
                f"{SCHEME} {base64.b64encode(reply).decode('ascii')}"
            )

    def _accept(self, token: bytes) -> tuple[str, bytes | None]:
        """Run the acceptor on ``token`` (blocking: reads the keytab and the replay cache).

        Returns the initiator's principal and the token to send back; raises `Refused`.
        """
        import gssapi

        credentials = self._credentials
        if credentials is None:  # used before setup (tests that skip it): acquire now
            try:
                credentials = acceptor_credentials(self.keytab, self.settings.service_name)
            except gssapi.exceptions.GSSError as exc:
                raise Refused(f"the gateway cannot use its keytab: {gss_reason(exc)}") from None
            self._credentials = credentials
        context = gssapi.SecurityContext(creds=credentials, usage="accept")
        # Raise errors at once instead of returning SPNEGO's reject token and raising later.
        setattr(context, "__DEFER_STEP_ERRORS__", False)  # noqa: B010 - not in the stubs
        try:
            reply = context.step(token)
        except gssapi.exceptions.GSSError as exc:
            raise Refused(gss_reason(exc)) from None
        if not context.complete:
            raise Refused(
                "the client's mechanism needs more than one round trip, which Negotiate over "
                "HTTP does not carry here; use Kerberos"
            )
        return str(context.initiator_name), reply

    def _log_refusal(self, request: web.Request, reason: str) -> None:
        log.warning(
            "kerberos: refused a Negotiate login from %s to %s: %s",
            request.remote or "?",
            _clean(request.path)[:200],
            reason,
        )
