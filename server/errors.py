"""Every error leaves the server in the OpenAI envelope: `{"error": {"message", "type", "param", "code"}}`.

Routes and services raise `APIError`, which carries its status and `param`. A request the engine (or a
service, in the engine's terms) refuses is a `RequestError` naming an engine-level field; `request_error`
turns it into an `APIError` through the API's table of parameter names, so each API names its own fields
(chat's prompt is `messages`, Responses' is `input`). FastAPI's own validation errors (a 422 `{"detail": ...}`
by default) become 400 `invalid_request_error` with `param` naming the field; a full queue is a 429 with
`Retry-After`; an engine failure is a 500 `server_error`, or, once a stream has started, the same error object
in the stream. Anything else is logged and answered with a plain 500 in the same envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.request import RequestError, RequestRejected
from server.async_engine import EngineFailure, QueueFull, ReaderTooSlow, ShuttingDown

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


class ClientGone(Exception):
    """The client closed the connection before its (non-streamed) response was ready."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code="not_found")


def model_loading() -> APIError:
    return APIError(503, "the model is still loading", type="server_error", code="model_loading")


class ContextLengthExceeded(RequestRejected):
    """The prompt, or the prompt plus the output asked for, does not fit the model's context."""


# An API's names for the engine-level fields of `RequestError.field` (a field missing here keeps its name).
ParamNames = Mapping[str, str]


def request_error(error: RequestError, names: ParamNames) -> APIError:
    """The 400 for a request refused in the engine's terms, naming the field as the API calls it."""
    param = None if error.field is None else names.get(error.field, error.field)
    code = "context_length_exceeded" if isinstance(error, ContextLengthExceeded) else None
    return APIError(400, str(error), param=param, code=code)


def engine_failure(error: EngineFailure) -> APIError:
    """The engine failed while running the request, or the server cut it to shut down: the client's request
    was fine."""
    if isinstance(error, ShuttingDown):
        return APIError(503, str(error), type="server_error", code="server_shutting_down")
    if isinstance(error, ReaderTooSlow):
        return APIError(503, str(error), type="server_error", code="client_too_slow")
    return APIError(500, str(error), type="server_error")


def _param_of(location: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`; a query parameter is named alone, as the
    body's fields are (`("query", "limit")` -> `limit`)."""
    parts = [p for p in location if p != "body"]
    if parts and parts[0] in ("query", "path"):
        parts = parts[1:]
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

    @app.exception_handler(EngineFailure)
    async def failed(request: Request, error: EngineFailure) -> JSONResponse:
        api_error = engine_failure(error)
        return JSONResponse(api_error.body(), status_code=api_error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # Of a union's errors (`content` is a string or a list of parts) the deepest says what is wrong: a
        # part's unsupported type, not that the list is not a string.
        first = max(error.errors(), key=lambda e: len(e.get("loc", ())), default={})
        location = tuple(first.get("loc", ()))
        # pydantic names union members in the location (`str`, `list[...]`); they are not fields.
        location = tuple(p for p in location if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES)))
        param = _param_of(location)
        # A validator's own reason, without pydantic's "Value error, " in front of it.
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
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
        # The headers carry what the status needs, as 405's `Allow`.
        return JSONResponse(
            APIError(status, message, type=kind).body(), status_code=status, headers=error.headers
        )

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") is what the log and metrics then show.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(
            APIError(500, "internal server error", type="server_error").body(), status_code=500
        )


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal", "union"}
