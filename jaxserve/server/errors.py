"""OpenAI-style error objects, and the handlers that turn every kind of bad input into one.

Every failure the client can cause becomes a 4xx whose `error.param` names the offending field;
the only 5xx left are the server's own (an engine failure, 500; no engine, 503).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

# SamplingParams and Engine.add_request start their messages with the field: "top_p=1.5: ..."
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.]*)\s*[=:]")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def from_value_error(cls, e: ValueError) -> "APIError":
        """A ValueError from SamplingParams or the engine, which name the field first."""
        message = str(e)
        m = _FIELD_PREFIX.match(message)
        code = "context_length_exceeded" if "context window" in message else None
        return cls(400, message, m.group(1) if m else None, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class ErrorJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        # ASCII-escaped: a message may quote client text that is not encodable as UTF-8.
        return json.dumps(content, ensure_ascii=True).encode("ascii")


def error_response(e: APIError) -> ErrorJSONResponse:
    return ErrorJSONResponse(e.body(), status_code=e.status, headers=e.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc) -> list:
    # pydantic puts the tried union member in the location ("prompt", "list[int]", 0): drop it.
    return [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]


def _most_specific(errors: list) -> dict:
    """Of the errors about the first bad field, the deepest: for a union such as `prompt`
    (text or token ids) the member the client meant fails deeper than the others."""
    if not errors:
        return {"loc": ("body",), "msg": "invalid request", "type": ""}
    field = tuple(errors[0].get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    return max(same, key=lambda e: len(_field_path(e.get("loc", ()))))


def validation_error(e: RequestValidationError, content_type: str = "application/json") -> APIError:
    first = _most_specific(e.errors())
    path = _field_path(first.get("loc", ()))
    if path[:1] == ["body"]:
        path = path[1:]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", None, "invalid_json")
    if not path:
        if "json" not in content_type:
            return APIError(400, "send the request body as a JSON object with Content-Type: application/json")
        if kind == "missing":
            return APIError(400, "a JSON object request body is required")
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', '')}")
    field = ".".join(path)
    return APIError(400, f"{field}: {first.get('msg', 'invalid value')}", path[0], kind or None)


def install(app: FastAPI) -> None:
    """Registers the handlers that make every error an OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return error_response(validation_error(e, request.headers.get("content-type", "")))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        # FastAPI raises 400 for bodies it cannot parse at all, Starlette 404/405 for bad routes.
        message = "the request body could not be parsed" if e.status_code == 400 else str(e.detail)
        return error_response(APIError(e.status_code, message, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error serving %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}"))


class BodyLimit:
    """ASGI middleware: a body over max_bytes gets an OpenAI-style 413 before any route reads it.

    (Starlette's own limit answers in plain text.) A declared Content-Length is checked up
    front; a chunked body is buffered up to the limit, then replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(APIError(413, f"the request body is larger than {self.max_bytes} bytes"))
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)   # the server holds the body to its length
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return   # the client went away
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()
        await self.app(scope, replay, send)
