"""Errors of `kllama api` in OpenAI's shape, and the guards that keep a client's mistake from becoming a 500.

* Every refusal is `{"error": {"message", "type", "param", "code"}}` with its HTTP status, rendered as ASCII JSON
  (a request's invalid text can never make the error body itself unencodable).
* An unexpected exception inside a route becomes a 500 with a fixed message (details go to the log only), answered
  by the route itself: Starlette's last-resort handler would re-raise after replying, and uvicorn then closes the
  keep-alive connection under the client's next request.
* `BodyLimit` answers 413 before a body over `API_MAX_BODY_BYTES` is read into memory.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kllama.errors import KllamaError

logger = logging.getLogger(__name__)

# HTTP status -> OpenAI error type
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "requests", 500: "server_error",
}
INTERNAL_ERROR = "The server had an error while processing your request; the details are in the server's log."


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: lone surrogates cannot break the encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for `status`."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body with `status`."""
    return AsciiJSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, OpenAI error body) for an exception raised while answering: a user-fixable KllamaError is a 400
    carrying its message; anything else is a 500 whose text stays in the log."""
    if isinstance(exc, ApiError):
        return exc.status, error_body(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, KllamaError):
        return 400, error_body(400, str(exc), None, getattr(exc, "code", None))
    return 500, error_body(500, INTERNAL_ERROR)


# Exceptions with a handler of their own (answered by Starlette's ExceptionMiddleware, connection kept).
HANDLED = (ApiError, KllamaError, RequestValidationError, StarletteHTTPException)


class SafeRoute(APIRoute):
    """A route that answers an unexpected exception with a 500 JSON body itself (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def safe(request: Request) -> Response:
            try:
                return await handler(request)
            except HANDLED:
                raise
            except Exception:  # noqa: BLE001 - logged with its traceback, answered without its text
                logger.exception("%s %s failed", request.method, request.url.path)
                return error_response(500, INTERNAL_ERROR)

        return safe


def install_error_handlers(app: FastAPI) -> None:
    """Render every refusal in OpenAI's shape; route the app's routes through `SafeRoute`."""
    app.router.route_class = SafeRoute

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON; send a JSON object.", None, "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", param, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(KllamaError)
    async def _kllama_error(request: Request, exc: KllamaError) -> JSONResponse:
        status, body = error_for(exc)
        return AsciiJSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:  # outside routes (middleware)
        logger.exception("request failed")
        return error_response(500, INTERNAL_ERROR)


class BodyLimit:
    """ASGI middleware: answer 413 for a request body over `limit` bytes, before it is held in memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): read up to the limit here, then hand the body on.
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"The request body is larger than this server's limit of {self.limit} bytes "
                                  "(API_MAX_BODY_BYTES); send a shorter conversation.", None, "request_too_large",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)
