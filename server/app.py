"""The FastAPI app. `create_app(engine, settings)` builds it around an engine; no module globals hold state.

Routes are thin: they validate the body (pydantic), hand it to a service, and return what the service built.
Errors from anywhere leave through `server.errors` in the OpenAI envelope.
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
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine.core import EngineCore
from harmony.encoding import load_harmony_encoding
from server.async_engine import AsyncEngine
from server.errors import APIError, bad_request, install_error_handlers
from server.logs import REQUEST_ID
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from server.serving_chat import ChatService, ProcessorsHook
from server.serving_completions import CompletionService, register_completions_routes
from server.serving_responses import ResponsesService, register_responses_routes
from server.settings import ServerSettings
from server.streaming import data_events, sse

logger = logging.getLogger(__name__)


class ServerState:
    """What the routes need, owned by the app: the engine bridge and the services built on it."""

    def __init__(
        self, settings: ServerSettings, encoding: tiktoken.Encoding, processors_hook: ProcessorsHook | None
    ) -> None:
        self.settings = settings
        self.processors_hook = processors_hook
        self.encoding = encoding
        self.created = int(time.time())
        self.engine: AsyncEngine | None = None
        self.chat: ChatService | None = None
        self.responses: ResponsesService | None = None
        self.completions: CompletionService | None = None
        self.raw_engine: EngineCore | None = None
        self.metrics = Metrics(lambda: self.raw_engine)

    def attach(self, engine: EngineCore) -> None:
        self.raw_engine = engine
        self.engine = AsyncEngine(
            engine,
            max_in_flight=engine.config.max_num_seqs + self.settings.max_waiting_requests,
            on_finished=lambda p, o, ttft, e2e: self.metrics.observe_request(
                prompt_tokens=p, output_tokens=o, ttft=ttft, e2e=e2e
            ),
        )
        self.chat = ChatService(
            self.engine, self.encoding, self.settings, engine.max_model_len, self.processors_hook
        )
        self.responses = ResponsesService(
            self.engine, self.encoding, self.settings, engine.max_model_len, self.processors_hook
        )
        self.completions = CompletionService(self.engine, self.encoding, self.settings, engine.max_model_len)

    def ready_chat(self) -> ChatService:
        if self.chat is None:
            raise _loading()
        return self.chat

    def ready_completions(self) -> CompletionService:
        if self.completions is None:
            raise _loading()
        return self.completions


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


def _loading() -> APIError:
    return APIError(503, "the model is still loading", type="server_error", code="model_loading")


def create_app(
    engine: EngineCore | None,
    settings: ServerSettings | None = None,
    *,
    encoding: tiktoken.Encoding | None = None,
    processors_hook: ProcessorsHook | None = None,
) -> FastAPI:
    """The app around `engine`. With None, it answers 503 until `app.state.server.attach(engine)`.

    `processors_hook`, if given, adds logits processors to each chat request's choices (the seam through
    which tests make the real model say chosen harmony sequences).
    """
    state = ServerState(settings or ServerSettings(), encoding or load_harmony_encoding(), processors_hook)
    if engine is not None:
        state.attach(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if state.engine is not None:
            state.engine.shutdown()

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

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": state.settings.served_model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "gpt-oss-server",
        }
        if state.settings.model_note:
            entry["note"] = state.settings.model_note
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        chat = state.ready_chat()
        if body.stream:
            lines = await chat.stream(body)
            return sse(data_events(lines), state.settings)
        return await chat.complete(body)

    register_completions_routes(app, state.ready_completions)

    register_responses_routes(app, state)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            tokens = state.encoding.encode_ordinary(body.prompt)
        else:
            chat = state.ready_chat()
            assert body.messages is not None
            request = ChatCompletionRequest(
                model=state.settings.served_model_name,
                messages=body.messages,
                tools=body.tools,
                reasoning_effort=body.reasoning_effort,
            )
            tokens = chat.render(request)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": _max_len(state)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if any(not 0 <= t < state.encoding.n_vocab for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {state.encoding.n_vocab})", param="tokens")
        return {"prompt": state.encoding.decode(body.tokens)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

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


def _max_len(state: ServerState) -> int | None:
    return state.chat.max_model_len if state.chat is not None else None
