"""Every error leaves the server in the OpenAI envelope: `{"error": {"message", "type", "param", "code"}}`.

Routes and services raise `APIError`; FastAPI's own validation errors (a 422 `{"detail": ...}` by default)
become 400 `invalid_request_error` with `param` naming the field. Nothing else is turned into a response here:
an unexpected exception is logged and answered with a plain 500 in the same envelope.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.async_engine import QueueFull

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code="not_found")


def _param_of(location: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`."""
    parts = [p for p in location if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        body = APIError(429, str(error), type="rate_limit_error", code="queue_full").body()
        return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = tuple(first.get("loc", ()))
        # pydantic names union members in the location (`str`, `list[...]`); they are not fields.
        location = tuple(p for p in location if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES)))
        param = _param_of(location)
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return JSONResponse(bad_request(message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status = error.status_code
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        message = error.detail if isinstance(error.detail, str) else HTTPStatus(status).phrase
        return JSONResponse(APIError(status, message, type=kind).body(), status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(
            APIError(500, "internal server error", type="server_error").body(), status_code=500
        )


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal", "union"}
