"""How the client proves who the user is to the gateway: the auth classes and their lookup.

Owns `GatewayAuth` (the extension point), `BasicAuth`, `JupyterHubAuth`, and `get_auth`, which
turns the `auth` argument or the `gateway.auth` config into an instance.
"""

from __future__ import annotations

import getpass
import importlib
import importlib.metadata
import os
from base64 import b64encode
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import dask

from .config import format_template

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AUTH_ENTRY_POINT_GROUP", "BasicAuth", "GatewayAuth", "JupyterHubAuth", "get_auth"]

#: Packages add auth types (e.g. ``kerberos``) under this entry-point group; the value is a
#: GatewayAuth subclass, the name is what ``gateway.auth.type`` says.
AUTH_ENTRY_POINT_GROUP = "gateway_client.auth"


class GatewayAuth:
    """Base class of the ways to authenticate with the gateway.

    The client first sends a request without credentials unless the class is ``preemptive``
    (and a session cookie from an earlier login is sent whenever there is one). When the gateway
    answers 401, the client calls ``pre_request(resp)``, repeats the request once with the
    headers it returns, then calls ``post_response(new_resp, context)``.

    A subclass implements ``pre_request``; it returns the headers to add, or, as the original
    dask-gateway client's auth classes do, a ``(headers, context)`` pair whose ``context`` is
    handed to ``post_response`` (Kerberos uses it to check the server's final token).
    """

    #: Send ``pre_request(None)``'s headers on a session's first request instead of waiting
    #: for a 401: saves a round trip for schemes that need nothing from the server's challenge.
    preemptive: bool = False

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(kwargs)}")

    def pre_request(
        self, resp: aiohttp.ClientResponse | None
    ) -> Mapping[str, str] | tuple[Mapping[str, str], Any]:
        """The headers that authenticate the next request; ``resp`` is the 401 answer, if any."""
        raise NotImplementedError(f"{type(self).__name__} does not implement pre_request")

    def post_response(self, resp: aiohttp.ClientResponse, context: Any = None) -> None:
        """Called with the answer to the authenticated request; raise if it proves a forgery."""


def split_auth_result(
    result: Mapping[str, str] | tuple[Mapping[str, str], Any] | None,
) -> tuple[dict[str, str], Any]:
    """``pre_request``'s answer as ``(headers, context)``, whichever form it came in."""
    if result is None:
        return {}, None
    if isinstance(result, tuple):
        headers, context = result
        return dict(headers or {}), context
    return dict(result), None


class BasicAuth(GatewayAuth):
    """HTTP Basic authentication, for the gateway's ``simple`` authenticator.

    ``username`` defaults to the local user, ``password`` to empty.
    """

    preemptive = True

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self.username = getpass.getuser() if username is None else username
        self.password = "" if password is None else password

    def pre_request(self, resp: aiohttp.ClientResponse | None) -> Mapping[str, str]:
        pair = f"{self.username}:{self.password}".encode()
        return {"Authorization": "Basic " + b64encode(pair).decode("ascii")}

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r})"


class JupyterHubAuth(GatewayAuth):
    """A JupyterHub API token, by default the ``JUPYTERHUB_API_TOKEN`` of a single-user server."""

    preemptive = True

    def __init__(self, api_token: str | None = None) -> None:
        if api_token is None:
            api_token = os.environ.get("JUPYTERHUB_API_TOKEN")
        if not api_token:
            raise ValueError(
                "JupyterHubAuth needs an API token: pass api_token= or set JUPYTERHUB_API_TOKEN"
            )
        self.api_token = api_token

    def pre_request(self, resp: aiohttp.ClientResponse | None) -> Mapping[str, str]:
        return {"Authorization": "jupyterhub " + self.api_token}

    def __repr__(self) -> str:
        return "JupyterHubAuth(api_token=<hidden>)"


_BUILTIN: dict[str, type[GatewayAuth]] = {"basic": BasicAuth, "jupyterhub": JupyterHubAuth}


def _auth_class(name: str) -> Callable[..., Any]:
    if name in _BUILTIN:
        return _BUILTIN[name]
    for ep in importlib.metadata.entry_points(group=AUTH_ENTRY_POINT_GROUP, name=name):
        return ep.load()
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"cannot import auth class {name!r}: {exc}") from exc
    known = sorted(
        set(_BUILTIN)
        | {ep.name for ep in importlib.metadata.entry_points(group=AUTH_ENTRY_POINT_GROUP)}
    )
    raise ValueError(
        f"unknown auth type {name!r}; available: {', '.join(known)}. Other types come from "
        f"packages registering the {AUTH_ENTRY_POINT_GROUP!r} entry-point group "
        "(e.g. kerberos), or give the dotted path of a GatewayAuth subclass"
    )


def get_auth(auth: GatewayAuth | str | type[GatewayAuth] | None = None) -> GatewayAuth:
    """A GatewayAuth from an instance, a type name, a class, or (None) the ``gateway.auth`` config.

    Keyword arguments from ``gateway.auth.kwargs`` (templates filled) are passed to the class
    whenever the instance is built here.
    """
    if isinstance(auth, GatewayAuth):
        return auth
    if auth is None:
        auth = dask.config.get("gateway.auth.type", None) or "basic"
    factory: Callable[..., Any]
    if isinstance(auth, str):
        factory = _auth_class(auth)
    elif callable(auth):
        factory = auth
    else:
        raise TypeError(f"auth must be a GatewayAuth, a type name or a class, got {auth!r}")
    kwargs = dask.config.get("gateway.auth.kwargs", None) or {}
    instance = factory(**{k: format_template(v) for k, v in kwargs.items()})
    if not isinstance(instance, GatewayAuth):
        raise TypeError(f"auth must build a GatewayAuth, got {instance!r}")
    return instance
