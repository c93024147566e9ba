"""Loading and unloading LoRA adapters while the server runs, in vLLM's shape: `POST /v1/load_lora_adapter`
`{lora_name, lora_path}` and `POST /v1/unload_lora_adapter` `{lora_name}`, each answered with a line of text.

Behind the API key like every route. The adapter's files are read and checked on a worker thread; the engine
thread then puts it into a free slot of the model's adapter stacks between two steps, so no forward ever
sees half an adapter. An adapter that requests are running with is not unloaded (a 400 saying how many):
its slot must not be refilled under them, and a client that wants it gone can retry once they end.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from engine.core import EngineCore
from engine.request import LoraNotFound, LoraRefused
from model.lora import AdapterError, check_unmerged, read_adapter
from server.errors import bad_request, not_found
from server.routes import Ready, State, _errors
from server.state import Services

router = APIRouter()


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, description="the name requests give as their `model`")
    lora_path: str = Field(
        min_length=1, description="the adapter's directory on the server, in PEFT's format"
    )


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


# The answer is a line of text, as vLLM's; errors keep the OpenAI envelope.
_TEXT = {200: {"description": "a line saying what was done", "content": {"text/plain": {}}}}


@router.post("/v1/load_lora_adapter", responses={**_TEXT, **_errors(400, 401, 413, 503)})
async def load_lora_adapter(body: LoadLoraAdapterRequest, state: State, services: Ready) -> PlainTextResponse:
    if body.lora_name == state.settings.served_model_name:
        raise bad_request(f"{body.lora_name!r} is the base model's name", param="lora_name")
    await load_adapter(services, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses={**_TEXT, **_errors(400, 401, 404, 413, 503)})
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, services: Ready) -> PlainTextResponse:
    await unload_adapter(services, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def load_adapter(services: Services, name: str, path: str) -> None:
    """Read, check and load the adapter at `path` as `name`; an `APIError` (400) says what is wrong."""
    core = services.engine.engine
    if not core.config.max_loras:
        raise bad_request("this server keeps no room for LoRA adapters (start it with --max-loras)")
    try:
        updates = await asyncio.to_thread(read_adapter, path, core.model.config)
        check_unmerged(updates, core.config.max_lora_rank, core.config.lora_experts)
    except AdapterError as error:
        raise bad_request(f"the adapter at {path!r} cannot be served: {error}", param="lora_path") from error

    def install(engine: EngineCore) -> None:
        engine.load_lora(name, updates, path)

    try:
        await services.engine.call(install)
    except LoraRefused as error:
        raise bad_request(str(error), param=error.field) from error


async def unload_adapter(services: Services, name: str) -> None:
    """Unload the adapter `name`: a 404 if none is loaded, a 400 while requests run with it (admitted ones
    included: `AsyncEngine.unload_lora`)."""
    try:
        await services.engine.unload_lora(name)
    except LoraNotFound as error:
        raise not_found(str(error), param=error.field) from error
    except LoraRefused as error:
        raise bad_request(str(error), param=error.field) from error
