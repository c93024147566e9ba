"""The FastAPI app. `create_app(engine, settings)` builds it around an engine; no module globals hold state.

The routes are in `server.routes`, what they reach in `server.state`; here are the middleware (request ids,
the API key, the body limit, the request log and count) and the error handlers, through which errors from
anywhere leave in the OpenAI envelope.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import tiktoken
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.core import EngineCore
from harmony.encoding import load_harmony_encoding
from server.errors import APIError, install_error_handlers
from server.logs import REQUEST_ID
from server.page import PAGE_PATHS, page_router
from server.routes import router
from server.routes_lora import router as lora_router
from server.serving import CLIENT, ProcessorsHook
from server.settings import ServerSettings
from server.state import ServerState

logger = logging.getLogger(__name__)


# Routes anyone may call when an API key is set: the load balancer's probe. `/metrics` joins them unless the
# settings protect it (it carries counts and latencies only, and the deployment's Prometheus scrapes it), and
# so do the chat page's files when it is served (they carry no secret; the page sends the key it is given).
_OPEN_PATHS = frozenset({"/health"})


def _bearer_token(request: Request) -> bytes | None:
    """The token of an `Authorization: Bearer ...` header as the client sent its bytes, or None.

    The scheme is case-insensitive (RFC 9110 11.1). The token stays bytes: Starlette decodes headers as
    latin-1, so re-encoding the decoded text as UTF-8 would refuse a non-ASCII key a UTF-8 client sent right.
    """
    raw = next((v for k, v in request.scope["headers"] if k == b"authorization"), None)
    if raw is None:
        return None
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()


def _needs_key(request: Request, settings: ServerSettings) -> bool:
    if settings.api_key is None:
        return False
    path = request.url.path
    if path in _OPEN_PATHS or (settings.chat_page and path in PAGE_PATHS):
        return False
    return not (path == "/metrics" and settings.metrics_access == "public")


def _refusal(request: Request, settings: ServerSettings) -> JSONResponse | None:
    """A response refusing the request before any route runs, or None."""
    if _needs_key(request, settings):
        assert settings.api_key is not None
        given = _bearer_token(request)
        # The key is matched as UTF-8 bytes, in constant time.
        if given is None or not hmac.compare_digest(given, settings.api_key.encode()):
            error = APIError(
                401, "a valid API key is required (Authorization: Bearer ...)", code="invalid_api_key"
            )
            return JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
        return JSONResponse(_too_large(settings).body(), status_code=413)
    return None


def _client_id(request: Request, settings: ServerSettings) -> str:
    """Who sent `request`, for its share of the in-flight bound: the configured header's value (a proxy's
    client id or forwarded address), else the peer's address."""
    if settings.client_id_header is not None:
        value = request.headers.get(settings.client_id_header)
        if value:
            return "header:" + value
    return "peer:" + (request.client.host if request.client is not None else "")


def _too_large(settings: ServerSettings) -> APIError:
    return APIError(
        413, f"the request body is over {settings.max_request_bytes} bytes", code="request_too_large"
    )


class BodyLimit:
    """Reads the whole request body before the app sees it, and answers 413 once it passes the limit.

    The `Content-Length` check in `_refusal` cannot see a chunked upload (no length is sent), so the bytes are
    counted as they arrive. Buffering costs nothing the routes would not spend anyway: every body is JSON,
    parsed whole. The app then reads the buffered body, and after it the connection's own messages (so a
    disconnect still reaches whoever waits for it).
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        # One deadline for the whole body: a body sent a byte now and then would hold its connection for ever.
        deadline = anyio.current_time() + self.settings.request_read_timeout
        while True:
            with anyio.move_on_at(deadline) as waiting:
                message = await receive()
            if waiting.cancelled_caught:
                error = APIError(
                    408,
                    f"the request body did not arrive within {self.settings.request_read_timeout:g} s",
                    code="request_timeout",
                )
                await JSONResponse(error.body(), status_code=408, headers={"Connection": "close"})(
                    scope, receive, send
                )
                return
            if message["type"] == "http.disconnect":
                return  # the client left before its request was whole: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_request_bytes:
                await JSONResponse(_too_large(self.settings).body(), status_code=413)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def buffered() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, buffered, send)


class Guard:
    """Request ids, the client's id, the API key, and the request log and count, in one place.

    Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, whose `call_next` runs the app in a task of its
    own and spawns another for every chunk of the body it passes on: for a 16 MB body that held the event
    loop for a quarter of a second, and every stream and /health with it."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        settings = self.state.settings
        token = REQUEST_ID.set(request.headers.get("x-request-id") or "req-" + secrets.token_hex(6))
        client = CLIENT.set(_client_id(request, settings))
        started = time.perf_counter()
        status = 500  # unless a response starts: an error no handler caught

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = REQUEST_ID.get()
                ignored = scope.get("state", {}).get("ignored_fields")
                if ignored:
                    headers["x-ignored-fields"] = ignored
            await send(message)

        try:
            refusal = _refusal(request, settings)
            if refusal is not None:
                await refusal(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            self.state.metrics.requests.labels(endpoint, str(status)).inc()
            logger.info(
                "%s %s %d %.1f ms",
                request.method,
                request.url.path,
                status,
                (time.perf_counter() - started) * 1000,
            )
            CLIENT.reset(client)
            REQUEST_ID.reset(token)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 it documents on every route with a body: validation errors leave as
    400 in the OpenAI envelope (see `server.errors`)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    engine: EngineCore | None,
    settings: ServerSettings | None = None,
    *,
    encoding: tiktoken.Encoding | None = None,
    processors_hook: ProcessorsHook | None = None,
) -> FastAPI:
    """The app around `engine`. With None, it answers 503 until `app.state.server.attach(engine)`.

    `processors_hook`, if given, adds logits processors to each request's choices (the seam through which
    tests make the real model say chosen harmony sequences).
    """
    state = ServerState(settings or ServerSettings(), encoding or load_harmony_encoding(), processors_hook)
    if engine is not None:
        state.attach(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if state.services is not None:
            await state.services.responses.shutdown()
            state.services.engine.shutdown()
        state.workers.shutdown()

    app = FastAPI(title="gpt-oss-server", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(lora_router)
    if state.settings.chat_page:
        app.include_router(page_router())
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Inside `Guard` (added after it, so wrapped by it): a body is read only once the API key is checked.
    app.add_middleware(BodyLimit, settings=state.settings)
    app.add_middleware(Guard, state=state)

    if state.settings.cors_origins:
        # Outermost (added last): preflights, which carry no credentials, are answered before the API key is
        # asked for, and the refusals `Guard` makes (401, 413) carry the CORS headers too, so a page on
        # another origin can read why it was refused instead of seeing a bare network error.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "x-ignored-fields"],
        )
    return app
