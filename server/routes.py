"""Every route of the server, on one router. Routes are thin: they validate the body (pydantic), hand it to a
service reached through the `services` dependency (a 503 while the model loads), and return what it built."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from server.bodies import OffLoopJsonRoute
from server.errors import ClientGone, bad_request, not_found
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    InputItemsQuery,
    ResponsesRequest,
    TokenizeRequest,
    invalid_field,
    unknown_fields,
)
from server.state import ServerState, Services

RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")

router = APIRouter(route_class=OffLoopJsonRoute)
logger = logging.getLogger(__name__)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` for these error statuses, each in the OpenAI envelope."""
    return {status: {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}


_ERROR_MEANINGS = {
    400: "invalid request: `error.param` names the field (validation errors are 400 too, never 422)",
    401: "a valid API key is required (when the server has one)",
    404: "unknown model, response or item",
    413: "the request body is over the size limit",
    429: "too many requests in flight; retry after `Retry-After` seconds",
    500: "the engine failed while running the request",
    503: "the model is still loading, or the server is shutting down",
}
# What every generating route can answer besides 200 (`stream: true` answers with an event stream).
_GENERATION_ERRORS = _errors(400, 401, 404, 413, 429, 500, 503)


def checked(body: RequestT, state: ServerState, request: Request) -> RequestT:
    """`body`, unless a field holds what no later stage can take (a lone surrogate, a runaway nesting) or is
    one no request model declares. An unknown field is a 400 naming it; with `ignore_unknown_fields` it is
    logged and named in the response's `x-ignored-fields` header (set by the app's middleware)."""
    found = invalid_field(body)
    if found is not None:
        param, message = found
        raise bad_request(message, param=param)
    hook = state.processors_hook
    unknown = unknown_fields(body, hook.fields if hook is not None else ())
    if unknown:
        names = ", ".join(unknown)
        if not state.settings.ignore_unknown_fields:
            raise bad_request(
                f"unknown field{'s' if len(unknown) > 1 else ''}: {names}; this server does not take "
                "it (see the README's Request fields; --ignore-unknown-fields accepts and ignores them)",
                param=unknown[0],
                code="unknown_field",
            )
        # Field names are the client's text: escaped as JSON escapes them, to be one log line and a valid
        # header value.
        shown = json.dumps(names)[1:-1]
        logger.warning("%s %s: ignored unknown fields: %s", request.method, request.url.path, shown)
        request.state.ignored_fields = shown
    return body


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result; if the client goes away first, `work` is cancelled (which aborts its engine requests
    and frees their blocks) and `ClientGone` raised. A non-streamed response is written only at its end, so
    nothing else would notice that nobody is waiting for it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone()
    return task.result()


async def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def services(state: Annotated[ServerState, Depends(server_state)]) -> Services:
    return state.ready()


State = Annotated[ServerState, Depends(server_state)]
Ready = Annotated[Services, Depends(services)]


@router.get("/health")
async def health(state: State) -> JSONResponse:
    if state.services is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    stopped = state.services.engine.stopped_because
    if stopped is not None:  # every request would fail: the orchestrator should restart the server
        return JSONResponse({"status": "engine stopped", "error": stopped}, status_code=503)
    return JSONResponse({"status": "ok", "builtin_tools": state.services.responses.builtin.describe()})


def _model_object(state: ServerState) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": state.settings.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "gpt-oss-server",
    }
    if state.settings.model_note:
        entry["note"] = state.settings.model_note
    return entry


def _model_objects(state: ServerState) -> list[dict[str, Any]]:
    """The base model, then each LoRA adapter loaded, naming the base as its `parent` and its directory as its
    `root` (as vLLM lists them)."""
    objects = [_model_object(state)]
    if state.services is not None:
        for adapter in state.services.engine.engine.loras.values():
            objects.append(
                {
                    "id": adapter.name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "gpt-oss-server",
                    "parent": state.settings.served_model_name,
                    "root": adapter.path,
                }
            )
    return objects


@router.get("/v1/models", responses=_errors(401))
async def models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": _model_objects(state)}


@router.get("/v1/models/{model_id:path}", responses=_errors(401, 404))
async def model(model_id: str, state: State) -> dict[str, Any]:
    """The model object (`client.models.retrieve()`), for the id the generating routes take."""
    objects = _model_objects(state)
    found = next((o for o in objects if o["id"] == model_id), None)
    if found is None:
        served = ", ".join(repr(o["id"]) for o in objects)
        raise not_found(f"the model {model_id!r} does not exist; this server serves {served}", param="model")
    return found


@router.get("/version")
async def version() -> dict[str, str]:
    """The server's version, from its package metadata (as vLLM's `/version`)."""
    return {"version": importlib.metadata.version("gpt-oss-server")}


@router.get("/tokenizer_info", responses=_errors(401))
async def tokenizer_info(state: State) -> dict[str, Any]:
    """The tokenizer's configuration in the shape of Hugging Face's `tokenizer_config.json`, as vLLM's
    `/tokenizer_info` (lm-eval reads it to use the server's tokenizer). gpt-oss's published tokenizer ends an
    answer with `<|return|>` and pads with `<|endoftext|>`; the prompt comes from the harmony renderer, not
    from a chat template, so there is none to give."""
    max_model_len = state.services.chat.max_model_len if state.services is not None else None
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "encoding": state.encoding.name,
        "vocab_size": state.encoding.n_vocab,
        "model_max_length": max_model_len,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }


@router.post("/v1/chat/completions", response_model=None, responses=_GENERATION_ERRORS)
async def chat_completions(
    body: ChatCompletionRequest, ready: Ready, state: State, request: Request
) -> dict[str, Any] | EventSourceResponse:
    body = checked(body, state, request)
    if body.stream:
        return await ready.chat.stream(body)
    return await unless_disconnected(request, ready.chat.complete(body))


@router.post("/v1/completions", response_model=None, responses=_GENERATION_ERRORS)
async def completions(
    body: CompletionRequest, ready: Ready, state: State, request: Request
) -> dict[str, Any] | EventSourceResponse:
    body = checked(body, state, request)
    if body.stream:
        return await ready.completions.stream(body)
    return await unless_disconnected(request, ready.completions.complete(body))


@router.post("/v1/responses", response_model=None, responses=_GENERATION_ERRORS)
async def create_response(
    body: ResponsesRequest, ready: Ready, state: State, request: Request
) -> dict[str, Any] | EventSourceResponse:
    body = checked(body, state, request)
    if body.stream:
        return await ready.responses.stream(body)
    return await unless_disconnected(request, ready.responses.create(body))


@router.get("/v1/responses/{response_id}", response_model=None, responses=_errors(400, 401, 404, 503))
async def retrieve_response(
    response_id: str,
    ready: Ready,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> dict[str, Any] | EventSourceResponse:
    """The response as it is now (in progress: the output so far); with `stream`, a background response's
    events after `starting_after`, then each as it comes."""
    if stream:
        return ready.responses.follow(response_id, starting_after)
    return ready.responses.retrieve(response_id)


@router.get("/v1/responses/{response_id}/input_items", responses=_errors(400, 401, 404, 503))
async def response_input_items(
    response_id: str, query: Annotated[InputItemsQuery, Query()], ready: Ready
) -> dict[str, Any]:
    return ready.responses.input_items(response_id, query)


@router.post("/v1/responses/{response_id}/cancel", responses=_errors(400, 401, 404, 413, 503))
async def cancel_response(response_id: str, ready: Ready) -> dict[str, Any]:
    return await ready.responses.cancel(response_id)


@router.delete("/v1/responses/{response_id}", responses=_errors(401, 404, 503))
async def delete_response(response_id: str, ready: Ready) -> dict[str, Any]:
    return ready.responses.delete(response_id)


def _json(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


# Token ids written per call of the JSON encoder: C code holds the GIL for a whole call, so a million ids
# written at once would stall the event loop for as long even from a worker thread; slices let it run between.
_IDS_PER_SLICE = 1 << 15


def _ids_json(ids: list[int]) -> bytes:
    slices = (json.dumps(ids[i : i + _IDS_PER_SLICE])[1:-1] for i in range(0, len(ids), _IDS_PER_SLICE))
    return ("[" + ",".join(slices) + "]").encode()


@router.post("/tokenize", response_model=None, responses=_errors(400, 401, 413, 503))
async def tokenize(body: TokenizeRequest, state: State, request: Request) -> Response:
    """Plain text works while the model loads; messages are rendered as chat renders them."""
    body = checked(body, state, request)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", param="prompt")
    if body.prompt is not None:
        limit = state.settings.max_prompt_chars
        if len(body.prompt) > limit:
            raise bad_request(
                f"the prompt is {len(body.prompt)} characters; at most {limit} are taken",
                param="prompt",
            )
        tokens = await state.workers.run(state.encoding.encode_ordinary, body.prompt)
    else:
        assert body.messages is not None
        chat = ChatCompletionRequest(
            model=state.settings.served_model_name,
            messages=body.messages,
            tools=body.tools,
            reasoning_effort=body.reasoning_effort,
        )
        tokens = await state.ready().chat.prompt(chat)
        if not body.add_generation_prompt:
            tokens = tokens[: -len(state.ready().chat.generation_prompt)]
    max_model_len = state.services.chat.max_model_len if state.services is not None else None
    # A megabyte prompt's ids take as long to write as JSON as to find: that happens off the loop too.
    ids = await state.workers.run(_ids_json, tokens)
    tail = _json({"count": len(tokens), "max_model_len": max_model_len})
    return Response(b'{"tokens":' + ids + b"," + tail[1:], media_type="application/json")


@router.post("/detokenize", response_model=None, responses=_errors(400, 401, 413))
async def detokenize(body: DetokenizeRequest, state: State, request: Request) -> Response:
    body = checked(body, state, request)
    if any(not 0 <= t < state.encoding.n_vocab for t in body.tokens):
        raise bad_request(f"token ids must be in [0, {state.encoding.n_vocab})", param="tokens")
    text = await state.workers.run(state.encoding.decode, body.tokens)
    return Response(await state.workers.run(_json, {"prompt": text}), media_type="application/json")


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
