"""Errors in OpenAI's format, and the ASGI guard in front of the app (body size limit, request counts).

Every exception a request can raise ends here as ``{"error": {"message", "type", "param", "code"}}``: schema
problems and tachy's typed errors (TachyError) as 400, ContextLengthError with OpenAI's
``context_length_exceeded`` code, routing errors with their own status; only a bug in tachy is a 500.
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, TachyError
from .metrics import Metrics
from .schemas import error_body

log = logging.getLogger("tachy.server")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
FASTAPI_PARSE_ERROR = "There was an error parsing the body"   # FastAPI's detail when json.loads fails otherwise


class ApiError(Exception):
    """An error answered in OpenAI's format with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


class ClientGone(Exception):
    """The client closed the connection while its request waited or ran."""


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def field_path(loc: tuple) -> str | None:
    """An error location as OpenAI's ``param``: the body's field names and list indices, without the
    union-member tags pydantic puts between them (``prompt.list[int].0`` is ``prompt.0``)."""
    names = [str(x) for x in loc if isinstance(x, int)
             or (x != "body" and re.fullmatch(r"[a-z_][a-z0-9_]*", x) and x not in _TYPE_TAGS)]
    return ".".join(names) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                            code="invalid_json").response()
        if first.get("loc") == ("body",) and not isinstance(exc.body, dict):   # pydantic: "a valid dictionary"
            return ApiError(400, _not_an_object(exc.body), code="invalid_json").response()
        param = field_path(first.get("loc", ()))
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid body")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(ContextLengthError)
    async def too_long(request: Request, exc: ContextLengthError) -> JSONResponse:
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded").response()

    @app.exception_handler(TachyError)
    async def tachy_error(request: Request, exc: TachyError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == FASTAPI_PARSE_ERROR:   # json.loads raised, not JSONDecodeError
            return ApiError(400, "the JSON body could not be parsed: nested deeper than 1000 levels, or a number "
                                 "of more than 4300 digits?", code="invalid_json").response()
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> JSONResponse:
        return JSONResponse(error_body("client closed the request"), status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)


def _not_an_object(body) -> str:
    """Why a body that is not a JSON object was refused. Bytes: it was not parsed at all, because its
    Content-Type is not JSON (``curl -d`` sends a form's, ``application/x-www-form-urlencoded``)."""
    if isinstance(body, (bytes, bytearray)):
        return "the body was not read as JSON: send it with Content-Type: application/json"
    kinds = {type(None): "null or nothing", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return f"the body must be a JSON object of the request's fields, got {kinds.get(type(body), 'another value')}"


class BodyGuard:
    """ASGI middleware: reads request bodies up to ``max_body_bytes`` (413 beyond, before the app parses
    anything) and counts responses by endpoint and status for /metrics."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive)
                if body is None:
                    too_large = ApiError(413, f"request body over {self.max_body_bytes} bytes",
                                         code="body_too_large").response()
                    return await too_large(scope, receive, counted_send)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.count_request(endpoint, status[0])

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that hands the buffered body over once, then listens to the client (for disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
