"""Kerberos (SPNEGO, ``Authorization: Negotiate``) login with the user's tickets (``kinit``).

Owns `KerberosAuth`, auth type ``kerberos`` through the ``gateway_client.auth`` entry points. It
needs the ``kerberos`` extra (``pip install 'gateway-client[kerberos]'``, which brings `gssapi`),
imported only when a `KerberosAuth` is made.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from .auth import GatewayAuth
from .errors import GatewayAuthError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import aiohttp

__all__ = ["KerberosAuth"]

SPNEGO_OID = "1.3.6.1.5.5.2"
"""The mechanism ``Negotiate`` stands for (RFC 4559); it carries a Kerberos token."""

INSTALL_HINT = (
    "KerberosAuth needs the gssapi package: pip install 'gateway-client[kerberos]' "
    "(it builds against MIT Kerberos' headers, e.g. Debian's libkrb5-dev)"
)


def _reason(exc: BaseException) -> str:
    """A GSSAPI error as one line, the mechanism's own words first."""
    minor = getattr(exc, "min_code", 0)
    major = getattr(exc, "maj_code", None)
    try:
        parts = list(exc.get_all_statuses(minor, False)) if minor else []  # type: ignore[attr-defined]
        if not parts and major is not None:
            parts = list(exc.get_all_statuses(major, True))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a message, whatever the binding can give
        parts = []
    text = "; ".join(str(p).strip().rstrip(".") for p in parts if p) or str(exc)
    return " ".join(text.split())


def _negotiate_tokens(resp: aiohttp.ClientResponse) -> tuple[bool, bytes | None]:
    """Whether ``resp`` offers ``Negotiate``, and the token it carries (None when bare)."""
    offered = False
    for value in resp.headers.getall("WWW-Authenticate", []):
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() != "negotiate":
            continue
        offered = True
        if rest.strip():
            try:
                return True, base64.b64decode(rest.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise GatewayAuthError(
                    f"the gateway at {resp.url.origin()} sent a Negotiate token that is not base64"
                ) from None
    return offered, None


class KerberosAuth(GatewayAuth):
    """Log in with a Kerberos ticket from the user's credential cache (run ``kinit`` first).

    The gateway's principal is ``<service_name>/<host>``, ``host`` being the host of the
    gateway address as dialled (``localhost``, ``gateway.example.org``, an address) unless
    ``hostname`` names another. With ``mutual_auth`` (the default) the gateway must prove its
    identity with its final token, or the answer is refused.

    Made through ``auth="kerberos"``, ``gateway.auth.type: kerberos`` or
    ``DASK_GATEWAY__AUTH__TYPE=kerberos``; ``gateway.auth.kwargs`` passes the arguments.
    """

    def __init__(
        self,
        service_name: str = "HTTP",
        hostname: str | None = None,
        mutual_auth: bool = True,
    ) -> None:
        try:
            import gssapi  # noqa: F401 - only to fail here, early, when it is missing
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT}: {exc}") from exc
        self.service_name = service_name
        self.hostname = hostname
        self.mutual_auth = mutual_auth

    def __repr__(self) -> str:
        return (
            f"KerberosAuth(service_name={self.service_name!r}, hostname={self.hostname!r}, "
            f"mutual_auth={self.mutual_auth!r})"
        )

    def pre_request(
        self, resp: aiohttp.ClientResponse | None
    ) -> Mapping[str, str] | tuple[Mapping[str, str], Any]:
        import gssapi

        if resp is not None:
            offered, _ = _negotiate_tokens(resp)
            if not offered:
                asked = ", ".join(resp.headers.getall("WWW-Authenticate", [])) or "nothing"
                raise GatewayAuthError(
                    f"the gateway at {resp.url.origin()} does not take Kerberos logins "
                    f"(it asks for: {asked}); use the auth type its authenticator expects"
                )
        host = self.hostname or (resp.url.host if resp is not None else None)
        if not host:
            raise GatewayAuthError("KerberosAuth needs the gateway's host name: pass hostname=")
        target = f"{self.service_name}/{host}"
        flags = int(gssapi.RequirementFlag.out_of_sequence_detection)
        if self.mutual_auth:
            flags |= gssapi.RequirementFlag.mutual_authentication
        try:
            context = gssapi.SecurityContext(
                name=gssapi.Name(f"{self.service_name}@{host}", gssapi.NameType.hostbased_service),
                usage="initiate",
                mech=gssapi.OID.from_int_seq(SPNEGO_OID),
                flags=flags,
            )
            # Raise a step's error at once (not from a later attribute access).
            setattr(context, "__DEFER_STEP_ERRORS__", False)  # noqa: B010 - not in the stubs
            token = context.step()
        except gssapi.exceptions.GSSError as exc:
            raise GatewayAuthError(
                f"cannot get a Kerberos ticket for {target}: {_reason(exc)}. "
                "Run kinit to log in to Kerberos (klist shows your tickets)."
            ) from None
        header = "Negotiate " + base64.b64encode(token or b"").decode("ascii")
        return {"Authorization": header}, context

    def post_response(self, resp: aiohttp.ClientResponse, context: Any = None) -> None:
        if context is None or resp.status >= 400:
            return
        import gssapi

        _, token = _negotiate_tokens(resp)
        if token is None:
            if self.mutual_auth:
                raise GatewayAuthError(
                    f"the gateway at {resp.url.origin()} did not prove its identity (no "
                    "Negotiate token in its answer); pass mutual_auth=False to accept that"
                )
            return
        try:
            context.step(token)
        except gssapi.exceptions.GSSError as exc:
            raise GatewayAuthError(
                f"the gateway at {resp.url.origin()} failed mutual authentication: {_reason(exc)}"
            ) from None
        if not context.complete:
            raise GatewayAuthError(
                f"the gateway at {resp.url.origin()} did not complete mutual authentication"
            )
