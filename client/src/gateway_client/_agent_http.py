"""The scheduler agent's HTTP API, through which the gateway forwards scale and adapt.

Owns the parsing of ``POST /api/comm`` bodies (`parse_comm`) and the tornado application that
serves it (`make_app`), with token checks in constant time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from tornado import web

MAX_BODY_BYTES = 64 * 1024


class CommError(ValueError):
    """A ``/api/comm`` body the agent cannot act on; the message names the problem."""


DEFAULT_GROUP = "default"
"""The worker group of a request that names none (the original gateway's only group)."""


@dataclass(frozen=True, kw_only=True)
class ScaleOp:
    count: int
    group: str = DEFAULT_GROUP


@dataclass(frozen=True, kw_only=True)
class AdaptOp:
    minimum: int | None
    maximum: int | None
    active: bool
    group: str = DEFAULT_GROUP


CommOp = ScaleOp | AdaptOp


def _count(body: dict[str, Any], key: str, *, required: bool) -> int | None:
    value = body.get(key)
    if value is None:
        if required:
            raise CommError(f"{key} is required")
        return None
    if type(value) is not int or value < 0:
        raise CommError(f"{key} must be a non-negative integer, got {json.dumps(value)}")
    return value


def _group(body: dict[str, Any]) -> str:
    value = body.get("group")
    if value is None:
        return DEFAULT_GROUP
    if not isinstance(value, str) or not value:
        raise CommError(f"group must be a worker group name, got {json.dumps(value)}")
    return value


def parse_comm(raw: bytes) -> CommOp:
    """The operation a ``/api/comm`` body asks for; raises `CommError` naming the problem.

    Keys other than those of the operation are ignored, so a newer gateway may add some.
    """
    try:
        body = json.loads(raw or b"")
    except ValueError as exc:
        raise CommError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CommError("the body must be a JSON object")
    op = body.get("op")
    if op == "scale":
        count = _count(body, "count", required=True)
        assert count is not None
        return ScaleOp(count=count, group=_group(body))
    if op == "adapt":
        minimum = _count(body, "minimum", required=False)
        maximum = _count(body, "maximum", required=False)
        if minimum is not None and maximum is not None and minimum > maximum:
            raise CommError(f"minimum ({minimum}) must not exceed maximum ({maximum})")
        active = body.get("active", True)
        if not isinstance(active, bool):
            raise CommError(f"active must be true or false, got {json.dumps(active)}")
        return AdaptOp(minimum=minimum, maximum=maximum, active=active, group=_group(body))
    if op is None:
        raise CommError("op is required: one of 'scale', 'adapt'")
    raise CommError(f"op must be one of 'scale', 'adapt', got {json.dumps(op)}")


CommHandlerFn = Callable[[CommOp], dict[str, Any]]


class _Refusal(web.HTTPError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(status)
        self.message = message


class _JSONHandler(web.RequestHandler):
    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        message = self._reason
        if exc_info is not None and isinstance(exc_info[1], _Refusal):
            message = exc_info[1].message
        self.finish(json.dumps({"error": message}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, _Refusal):  # refusals are answers, not errors of ours
            super().log_exception(typ, value, tb)

    def fail(self, status: int, message: str) -> NoReturn:
        """Answer ``status`` with ``{"error": message}``; nothing after this runs."""
        raise _Refusal(status, message)


class _CommHandler(_JSONHandler):
    def initialize(self, *, token: str, handle: CommHandlerFn) -> None:
        self._token = token.encode()
        self._handle = handle

    def _check_token(self) -> None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "token" or not credential.strip():
            self.set_header("WWW-Authenticate", "token")
            self.fail(401, "this route needs `Authorization: token <cluster token>`")
        if not hmac.compare_digest(credential.strip().encode(), self._token):
            self.fail(403, "the token is not this cluster's token")

    def post(self) -> None:
        self._check_token()
        try:
            op = parse_comm(self.request.body)
        except CommError as exc:
            self.fail(422, str(exc))
        self.finish(json.dumps(self._handle(op)))


class _HealthHandler(_JSONHandler):
    def get(self) -> None:
        self.finish(json.dumps({"status": "pass"}))


class _NotFoundHandler(_JSONHandler):
    def prepare(self) -> None:
        self.fail(404, f"no route {self.request.path}")


def make_app(*, token: str, handle: CommHandlerFn) -> web.Application:
    """``POST /api/comm`` (token checked, body parsed, then ``handle(op)``'s answer as JSON)
    and ``GET /api/health``; anything else is a JSON 404."""
    return web.Application(
        [
            (r"/api/comm", _CommHandler, {"token": token, "handle": handle}),
            (r"/api/health", _HealthHandler),
        ],
        default_handler_class=_NotFoundHandler,
        log_function=_quiet_log,
    )


def _quiet_log(handler: web.RequestHandler) -> None:
    """Keep the scheduler's log free of one line per gateway request."""
