"""The server's HTTP contract, apart from its routes: one JSON error shape, statuses by error class, request ids,
a token guard, slow-client limits, and the connection guard uvicorn runs with.

Every error, whatever raised it, is answered as
    {"detail": "<message>", "error": {"message": "<message>", "type": "<kind>", "code": <status>, "request_id": "<id>"}}
(`detail` for FastAPI-style clients, `error` as OpenAI's clients read it), and every response carries its request id
in `X-Request-ID`. A 500 tells the client only its request id; the log has the traceback under the same id.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from typing import Annotated, Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from deltatune.apps.serve.batching import Timeout
from deltatune.errors import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    DataError,
    DeltatuneError,
    MergeError,
    RunError,
    UnsupportedModelError,
)

log = logging.getLogger("deltatune.serve")

# Library errors by class: the client's mistake is a 4xx naming it; a state conflict is a 409.
STATUS_BY_ERROR: list[tuple[type[DeltatuneError], int]] = [
    (AdapterNotFoundError, 404),
    (ConfigError, 400),
    (DataError, 400),
    (CheckpointError, 400),
    (UnsupportedModelError, 400),
    (MergeError, 409),
    (RunError, 409),
    (DeltatuneError, 400),
]

KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def status_for(err: DeltatuneError) -> int:
    return next(status for cls, status in STATUS_BY_ERROR if isinstance(err, cls))


def status_of(err: BaseException) -> int:
    """The status any exception is answered with."""
    if isinstance(err, StarletteHTTPException):
        return err.status_code
    if isinstance(err, DeltatuneError):
        return status_for(err)
    return 504 if isinstance(err, Timeout) else 500


def request_id(scope_or_request: Any) -> str:
    scope = scope_or_request.scope if isinstance(scope_or_request, Request) else scope_or_request
    return scope.get("state", {}).get("request_id", "")


def error_response(
    status: int, message: str, rid: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {
        "detail": message,
        "error": {"message": message, "type": KINDS.get(status, "error"), "code": status, "request_id": rid},
    }
    if status in (408, 413):  # the rest of the body may still be on its way: do not read it, close
        headers = {**(headers or {}), "Connection": "close"}
    return JSONResponse(body, status, headers=headers)


def valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"the text holds a lone surrogate (\\u{ord(text[err.start]):04x} at {err.start}); send valid Unicode"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
"""A request string that can be encoded as UTF-8 (JSON's \\ud800 escapes can smuggle in lone surrogates)."""


def token_matches(token: str | None, authorization: str | None) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (compared in constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    return (
        token is not None
        and scheme.lower() == "bearer"
        and secrets.compare_digest(given.encode(), token.encode())
    )


def install_error_handlers(app) -> None:
    """HTTP errors, validation errors and library errors as the JSON shape above."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        return error_response(err.status_code, message, request_id(request), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        # Only locations and messages: the offending input (NaN, a 10 MB string) is not echoed back.
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
        message = "Invalid request: " + "; ".join(problems)
        if any(e.get("type") == "extra_forbidden" for e in err.errors()):
            message += " (this server refuses fields it would not act on)"
        return error_response(422, message, request_id(request))

    @app.exception_handler(DeltatuneError)
    async def library_error(request: Request, err: DeltatuneError):
        return error_response(status_for(err), str(err), request_id(request))

    @app.exception_handler(Timeout)
    async def timed_out(request: Request, err: Timeout):
        return error_response(504, f"{err} (--request-timeout)", request_id(request))


class RequestGuard:
    """Pure ASGI middleware in front of the app: gives each request an id, asks for the token (with
    `protect_all`), drops a client that stalls while sending its body, and turns any unexpected exception into a
    logged 500 that shows the client its request id and nothing else."""

    def __init__(
        self, app, token: str | None, protect_all: bool, body_timeout_s: float, max_body_bytes: int
    ) -> None:
        self.app, self.token, self.protect_all = app, token, protect_all
        self.body_timeout_s, self.max_body_bytes = body_timeout_s, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        headers = dict(scope.get("headers", []))
        if self.protect_all and scope["path"] != "/health":
            if not token_matches(self.token, headers.get(b"authorization", b"").decode("latin-1")):
                message = "This server requires 'Authorization: Bearer <token>' on every endpoint."
                return await error_response(401, message, rid)(scope, receive, send_with_id)
        too_big = f"The request body is over the limit of {self.max_body_bytes} bytes (--max-body-bytes)."
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:  # refused from the header, body unread
            return await error_response(413, too_big, rid)(scope, receive, send_with_id)

        body_done, received = False, 0

        async def receive_in_time():
            nonlocal body_done, received
            if body_done:  # after the body only a disconnect can come; wait for it as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise HTTPException(
                    408, f"The request body did not arrive within {self.body_timeout_s:g} s; closing."
                ) from None
            if message["type"] == "http.request":  # a body without Content-Length is counted as it comes
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_big)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, receive_in_time, send_with_id)
        except Exception as err:  # noqa: BLE001 - the last line of defence: log it, answer it, keep serving
            log.error("request %s %s %s failed", rid, scope.get("method"), scope.get("path"), exc_info=err)
            if not started:
                message = f"Internal error; the server log has the details under request id {rid}."
                await error_response(500, message, rid)(scope, receive, send_with_id)


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that hold no running request and have not sent a complete
    request head within `header_timeout_s` of connecting or of their first byte: silent and half-sent
    connections would otherwise hold a descriptor forever (uvicorn times out only idle keep-alive connections)."""

    class GuardedH11(H11Protocol):
        _guard: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._between_requests():
                self._arm()
            elif self._guard is not None:
                self._guard.cancel()
                self._guard = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._guard is not None:
                self._guard.cancel()
                self._guard = None
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._guard is None:
                self._guard = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            self._guard = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11
