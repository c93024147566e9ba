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

import tiktoken
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from engine.core import EngineCore
from harmony.encoding import load_harmony_encoding
from server.errors import APIError, install_error_handlers
from server.logs import REQUEST_ID
from server.routes import router
from server.serving import ProcessorsHook
from server.settings import ServerSettings
from server.state import ServerState

logger = logging.getLogger(__name__)


def _refusal(request: Request, settings: ServerSettings) -> JSONResponse | None:
    """A response refusing the request before any route runs, or None."""
    # CORS preflights carry no credentials; the CORS middleware answers them.
    if settings.api_key is not None and request.url.path.startswith("/v1/") and request.method != "OPTIONS":
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            error = APIError(
                401, "a valid API key is required (Authorization: Bearer ...)", code="invalid_api_key"
            )
            return JSONResponse(error.body(), status_code=401)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
        error = APIError(
            413, f"the request body is over {settings.max_request_bytes} bytes", code="request_too_large"
        )
        return JSONResponse(error.body(), status_code=413)
    return None


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
            state.services.engine.shutdown()

    app = FastAPI(title="gpt-oss-server", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )

    app.include_router(router)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        """Request ids, the API key, the body size limit, and the request log and count, in one place."""
        token = REQUEST_ID.set(request.headers.get("x-request-id") or "req-" + secrets.token_hex(6))
        started = time.perf_counter()
        try:
            response = _refusal(request, state.settings) or await call_next(request)
            response.headers["x-request-id"] = REQUEST_ID.get()
            endpoint = request.scope.get("route").path if request.scope.get("route") else "other"
            state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            logger.info(
                "%s %s %d %.1f ms",
                request.method,
                request.url.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
            return response
        finally:
            REQUEST_ID.reset(token)

    return app
