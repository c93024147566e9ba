"""`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`: the Responses API on the chat machinery.

Input items become the same chat messages the chat endpoint takes (a `function_call` item is an assistant tool
call, a `function_call_output` a tool result, a `reasoning` item assistant reasoning), so `to_harmony` renders
both APIs alike and a Responses tool loop's prompt extends the previous one just as a chat loop's does.

One async generator produces the Responses event sequence (created, in_progress, each item's added / part /
delta / done events, then completed, incomplete or failed); a streamed request sends it as SSE, a plain one
keeps only the final response. Stored responses keep their whole conversation (the chain's input items, then
their output items), so `previous_response_id` rebuilds exactly the prompt the client would get by sending
everything itself; `instructions` apply to one request only, as with OpenAI.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from sse_starlette import EventSourceResponse

from engine.request import FinishReason, SamplingParams
from harmony import encoding as tok
from harmony.messages import ResponseFormat as HarmonyResponseFormat
from server.async_engine import AsyncEngine, EngineFailure
from server.errors import APIError, ParamNames, bad_request, engine_failure, not_found
from server.harmony_chat import Delta, DeltaKind
from server.protocol import (
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    ResponsesContentPart,
    ResponsesInputItem,
    ResponsesRequest,
    ResponsesToolChoice,
    Tool,
    ToolCall,
)
from server.serving import (
    ChoiceOutput,
    EngineRequest,
    ProcessorsHook,
    Serving,
    Workers,
    output_budget,
    stop_strings,
)
from server.settings import ServerSettings
from server.streaming import sse
from server.tool_choice import tool_choice_processors

logger = logging.getLogger(__name__)

# How many responses the in-memory store keeps before it forgets the oldest.
DEFAULT_STORE_SIZE = 1024

# Text parts accepted in message items; anything else (images, files, audio) is refused with a 400.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
_REASONING_PARTS = frozenset({"reasoning_text", "summary_text", "text"})
# `include` values that need nothing from us (we never produce encrypted reasoning).
_HARMLESS_INCLUDES = {"reasoning.encrypted_content"}


# -- the store -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]
    # The conversation the response answered: its chain's input items, then its own request's input.
    input_items: list[dict[str, Any]]


class ResponseStore:
    """Stored responses in insertion order, bounded in count: the oldest is forgotten first.

    Written on the event loop and read by the render workers (a request's conversation is built there), so
    a lock guards the entries; what it hands out is never changed once stored.
    """

    def __init__(self, capacity: int = DEFAULT_STORE_SIZE) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse) -> None:
        with self._lock:
            self._entries[stored.response["id"]] = stored
            self._entries.move_to_end(stored.response["id"])
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None

    def item(self, item_id: str) -> dict[str, Any] | None:
        """An item of a stored response's output or input, by its id (for `item_reference`)."""
        with self._lock:
            for stored in reversed(self._entries.values()):
                for item in (*stored.response["output"], *stored.input_items):
                    if item.get("id") == item_id:
                        return item
        return None


# -- input items to chat messages ----------------------------------------------------------------------------


def _text_of(
    parts: str | list[ResponsesContentPart] | None, param: str, allowed: frozenset[str] = _TEXT_PARTS
) -> str:
    if parts is None:
        return ""
    if isinstance(parts, str):
        return parts
    for j, part in enumerate(parts):
        if part.type not in allowed:
            raise bad_request(
                f"content parts of type {part.type!r} are not supported", param=f"{param}[{j}].type"
            )
    return "".join(part.text or "" for part in parts)


def _required(item: ResponsesInputItem, name: str, where: str) -> str:
    value = getattr(item, name)
    if value is None:
        raise bad_request(f"{item.type} items need {name}", param=f"{where}.{name}")
    return value


def items_to_messages(items: list[ResponsesInputItem], *, first_own: int = 0) -> list[ChatMessage]:
    """The chat messages for Responses input items (item_references already resolved).

    Items before `first_own` came from a stored chain; an error in them names `previous_response_id`.
    """
    messages: list[ChatMessage] = []
    calls: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i - first_own}]" if i >= first_own else "previous_response_id"

        if item.type == "message":
            role = item.role or "user"
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"unknown role {role!r}", param=f"{where}.role")
            messages.append(ChatMessage(role=role, content=_text_of(item.content, f"{where}.content")))
        elif item.type == "reasoning":
            parts = item.content if isinstance(item.content, list) and item.content else item.summary
            text = _text_of(parts, f"{where}.content", _REASONING_PARTS)
            if text:
                messages.append(ChatMessage(role="assistant", reasoning=text))
        elif item.type == "function_call":
            call_id = _required(item, "call_id", where)
            calls.add(call_id)
            call = ToolCall(
                id=call_id,
                function=FunctionCall(name=_required(item, "name", where), arguments=item.arguments or ""),
            )
            messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item.type == "function_call_output":
            call_id = _required(item, "call_id", where)
            if call_id not in calls:
                raise bad_request(
                    f"call_id {call_id!r} matches no earlier function_call item", param=f"{where}.call_id"
                )
            text = _text_of(item.output, f"{where}.output")
            messages.append(ChatMessage(role="tool", tool_call_id=call_id, content=text))
        else:
            raise bad_request(f"input items of type {item.type!r} are not supported", param=f"{where}.type")
    return messages


# -- the service ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PreparedResponse:
    request: ResponsesRequest
    prompt: list[int]
    params: SamplingParams
    # This request's conversation (chain then own input), as stored with the response.
    input_items: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: Any
    effort: str
    # The functions the model was shown (its calls to anything else are not returned).
    offered: frozenset[str]
    # Matched against the answer (see `ChoiceOutput`), not by the engine.
    stops: list[str]


@dataclass(slots=True)
class _OpenItem:
    item: dict[str, Any]
    index: int
    text: list[str] = field(default_factory=list)
    call_index: int = -1


class OutputBuilder:
    """Turns one generation's deltas into output items and the stream events that build them.

    Events are fresh dicts (items deep-copied) without `sequence_number`; the caller numbers them.
    """

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self.open: _OpenItem | None = None

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta.kind is DeltaKind.TOOL_CALL_START:
            events += self.close("completed")
            item = {
                "id": "fc_" + secrets.token_hex(12),
                "type": "function_call",
                "call_id": delta.call_id,
                "name": delta.name,
                "arguments": "",
                "status": "in_progress",
            }
            events += self._add(item, call_index=delta.index)
            return events
        if delta.kind is DeltaKind.TOOL_CALL_ARGUMENTS:
            current = self.open
            assert current is not None, "arguments follow their call"
            assert current.call_index == delta.index, "arguments follow their call"
            current.text.append(delta.text)
            item_id, index = current.item["id"], current.index
            return [
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item_id,
                    "output_index": index,
                    "delta": delta.text,
                }
            ]
        kind = "reasoning" if delta.kind is DeltaKind.REASONING else "message"
        if self.open is None or self.open.item["type"] != kind:
            events += self.close("completed")
            if kind == "reasoning":
                item = {
                    "id": "rs_" + secrets.token_hex(12),
                    "type": "reasoning",
                    "summary": [],
                    "content": [],
                    "status": "in_progress",
                }
            else:
                item = {
                    "id": "msg_" + secrets.token_hex(12),
                    "type": "message",
                    "role": "assistant",
                    "status": "in_progress",
                    "content": [],
                }
            events += self._add(item)
        current = self.open
        assert current is not None
        current.text.append(delta.text)
        base = {
            "item_id": current.item["id"],
            "output_index": current.index,
            "content_index": 0,
            "delta": delta.text,
        }
        if kind == "reasoning":
            return [*events, {"type": "response.reasoning_text.delta", **base}]
        return [*events, {"type": "response.output_text.delta", **base, "logprobs": []}]

    def _add(self, item: dict[str, Any], call_index: int = -1) -> list[dict[str, Any]]:
        index = len(self.output)
        self.output.append(item)
        self.open = _OpenItem(item, index, call_index=call_index)
        events = [{"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}]
        if item["type"] != "function_call":
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": _part(item["type"], ""),
                }
            )
        return events

    def close(self, status: str) -> list[dict[str, Any]]:
        """Finish the open item (if any) with `status`: its done events."""
        current, self.open = self.open, None
        if current is None:
            return []
        item, index, text = current.item, current.index, "".join(current.text)
        item["status"] = status
        events: list[dict[str, Any]] = []
        if item["type"] == "function_call":
            item["arguments"] = text
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "name": item["name"],
                    "arguments": text,
                }
            )
        else:
            base = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if item["type"] == "reasoning":
                events.append({"type": "response.reasoning_text.done", **base, "text": text})
            else:
                events.append({"type": "response.output_text.done", **base, "text": text, "logprobs": []})
            part = _part(item["type"], text)
            events.append({"type": "response.content_part.done", **base, "part": part})
            item["content"] = [copy.deepcopy(part)]
        events.append(
            {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)}
        )
        return events


def _part(item_type: str, text: str) -> dict[str, Any]:
    if item_type == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesService(Serving[ResponsesRequest, PreparedResponse]):
    def __init__(
        self,
        engine: AsyncEngine,
        encoding: tiktoken.Encoding,
        settings: ServerSettings,
        max_model_len: int,
        workers: Workers,
        processors_hook: ProcessorsHook | None = None,
        store_size: int = DEFAULT_STORE_SIZE,
    ) -> None:
        super().__init__(engine, encoding, settings, max_model_len, workers, processors_hook)
        self.store = ResponseStore(store_size)

    # -- preparing ------------------------------------------------------------------------------------------

    def param_names(self, request: ResponsesRequest) -> ParamNames:
        return {
            "prompt": "input",
            "max_tokens": "max_output_tokens",
            "logprobs": "top_logprobs",
            "grammar": "text.format",
        }

    def _check_unsupported(self, request: ResponsesRequest) -> None:
        if request.background:
            raise bad_request("background responses are not supported", param="background")
        for value in request.include or []:
            if value not in _HARMLESS_INCLUDES:
                raise bad_request(f"include {value!r} is not supported", param="include")
        if request.top_logprobs:
            raise bad_request("top_logprobs is not supported for responses", param="top_logprobs")
        if request.truncation == "auto":
            raise bad_request("truncation 'auto' is not supported; use 'disabled'", param="truncation")
        for key in ("conversation", "prompt"):
            if (request.model_extra or {}).get(key) is not None:
                raise bad_request(f"{key} is not supported", param=key)

    def _tools(self, request: ResponsesRequest) -> list[Tool]:
        tools = []
        for i, tool in enumerate(request.tools or []):
            if tool.type != "function":
                raise bad_request(
                    f"tools of type {tool.type!r} are not supported; only 'function' tools are",
                    param=f"tools[{i}].type",
                )
            try:
                definition = FunctionDefinition(
                    name=tool.name or "",
                    description=tool.description,
                    parameters=tool.parameters,
                    strict=tool.strict,
                )
            except ValueError as error:
                raise bad_request(
                    "function names must be 1 to 64 letters, digits, '_', '.' or '-'",
                    param=f"tools[{i}].name",
                ) from error
            tools.append(Tool(function=definition))
        return tools

    def _tool_choice(self, request: ResponsesRequest, names: list[str]) -> tuple[str | None, Any]:
        """The choice for `tool_choice_processors` (None, a mode or a function name), and its echo."""
        choice = request.tool_choice
        if choice is None:
            return None, "auto"
        if isinstance(choice, ResponsesToolChoice):
            if choice.type != "function" or not choice.name:
                raise bad_request(
                    f"tool_choice of type {choice.type!r} is not supported; use auto, none, required or "
                    "{'type': 'function', 'name': ...}",
                    param="tool_choice",
                )
            if choice.name not in names:
                raise bad_request(
                    f"tool_choice names {choice.name!r}, which is not among the tools", param="tool_choice"
                )
            return choice.name, {"type": "function", "name": choice.name}
        if choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs at least one tool", param="tool_choice")
        return choice, choice

    def _resolve(self, items: list[ResponsesInputItem]) -> list[ResponsesInputItem]:
        out = []
        for i, item in enumerate(items):
            if item.type == "item_reference":
                found = self.store.item(item.id or "")
                if found is None:
                    raise APIError(
                        404,
                        f"Item with id {item.id!r} not found.",
                        type="not_found_error",
                        param=f"input[{i}].id",
                        code="not_found",
                    )
                item = ResponsesInputItem.model_validate(found)
            out.append(item)
        return out

    def conversation(self, request: ResponsesRequest) -> tuple[list[ChatMessage], list[dict[str, Any]]]:
        """The chat messages to render, and the input items to store with the response."""
        chain: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id)
            if previous is None:
                raise not_found(
                    f"Response with id {request.previous_response_id!r} not found.",
                    param="previous_response_id",
                )
            chain = [*previous.input_items, *previous.response["output"]]
        if isinstance(request.input, str):
            own = [ResponsesInputItem(type="message", role="user", content=request.input)]
        else:
            own = self._resolve(request.input)
        items = [ResponsesInputItem.model_validate(item) for item in chain] + own
        messages = items_to_messages(items, first_own=len(chain))
        if request.instructions:
            messages.insert(0, ChatMessage(role="developer", content=request.instructions))
        stored = chain + [item.model_dump(exclude_none=True) for item in own]
        return messages, stored

    # Stop strings end the answer the client sees, not the raw output (see `ChoiceOutput`).
    engine_stops = False

    def _prepare(self, request: ResponsesRequest) -> tuple[PreparedResponse, list[EngineRequest]]:
        self._check_unsupported(request)
        stops = stop_strings(request.stop)
        tools = self._tools(request)
        names = [t.function.name for t in tools]
        choice, choice_echo = self._tool_choice(request, names)
        messages, input_items = self.conversation(request)
        offered = tools if request.tool_choice != "none" else None
        fmt = request.text.format if request.text is not None else None
        shown = (
            HarmonyResponseFormat(fmt.name, fmt.json_schema, fmt.description)
            if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None
            else None
        )
        effort = request.reasoning.effort if request.reasoning else None
        prompt = self.render(messages, offered, effort, shown)
        max_tokens = output_budget(len(prompt), request.max_output_tokens, self.max_model_len)
        grammar = (
            None
            if fmt is None
            else self.turn_constraint(
                fmt.type,
                fmt.json_schema,
                bool(fmt.strict) if fmt.type == "json_schema" else True,
                tools,
                choice or "auto",
            )
        )
        params = self.sampling_params(
            request,
            max_tokens,
            stop_token_ids=sorted(tok.STOP_TOKENS_FOR_ASSISTANT_ACTIONS),
            # With a grammar the whole turn, the tool choice included, is enforced by it.
            processors=[] if grammar is not None else tool_choice_processors(self.encoding, choice, names),
            grammar=grammar,
        )
        tool_dicts = [
            {
                "type": "function",
                "name": t.function.name,
                "description": t.function.description,
                "parameters": t.function.parameters,
                "strict": t.function.strict,
            }
            for t in tools
        ]
        effort = (
            request.reasoning.effort if request.reasoning else None
        ) or self.settings.default_reasoning_effort
        shown_names = frozenset(names if offered else [])
        prepared = PreparedResponse(
            request, prompt, params, input_items, tool_dicts, choice_echo, effort, shown_names, stops
        )
        return prepared, [(prompt, params)]

    # -- running --------------------------------------------------------------------------------------------

    def _response(self, prepared: PreparedResponse, response_id: str, created_at: int) -> dict[str, Any]:
        request = prepared.request
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": "in_progress",
            "completed_at": None,
            "model": self.settings.served_model_name,
            "output": [],
            "error": None,
            "incomplete_details": None,
            "instructions": request.instructions,
            "metadata": request.metadata or {},
            "parallel_tool_calls": True
            if request.parallel_tool_calls is None
            else request.parallel_tool_calls,
            "temperature": prepared.params.temperature,
            "top_p": prepared.params.top_p,
            "tool_choice": prepared.tool_choice,
            "tools": prepared.tools,
            "max_output_tokens": request.max_output_tokens,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": prepared.effort, "summary": None},
            "store": request.store,
            "text": {"format": _format_echo(request)},
            "truncation": "disabled",
            "background": False,
            "user": request.user,
            "usage": None,
        }

    async def events(self, prepared: PreparedResponse) -> AsyncIterator[dict[str, Any]]:
        """The stream events of one response, unnumbered; the last is completed, incomplete or failed.

        A stored response is saved before its terminal event is handed out.
        """
        response_id = "resp_" + secrets.token_hex(12)
        response = self._response(prepared, response_id, int(time.time()))
        yield {"type": "response.created", "response": copy.deepcopy(response)}
        yield {"type": "response.in_progress", "response": copy.deepcopy(response)}

        choice = ChoiceOutput(
            self.encoding, prepared.offered, prepared.stops, prepared.request.include_stop_str_in_output
        )
        builder = OutputBuilder()
        cached = 0
        finish: FinishReason | None = None
        failure: APIError | None = None
        try:
            async for output in self.engine.generate(prepared.prompt, prepared.params, response_id):
                if choice.stopped:
                    continue  # what the engine made before the abort took effect
                deltas: list[Delta] = []
                for token in output.new_token_ids:
                    deltas += choice.feed(token)
                    if choice.stopped:
                        finish = FinishReason.STOP
                        if not output.finished:
                            self.engine.abort(response_id)
                        break
                cached = output.num_cached_tokens
                if output.finished and not choice.stopped:
                    finish = output.finish_reason
                    deltas += choice.finish()
                for delta in deltas:
                    for event in builder.feed(delta):
                        yield event
        except EngineFailure as error:
            logger.error("response %s failed: %s", response_id, error)
            failure = engine_failure(error)

        truncated = finish is FinishReason.LENGTH
        for event in builder.close("incomplete" if truncated or failure else "completed"):
            yield event
        response["output"] = builder.output
        response["usage"] = {
            "input_tokens": len(prepared.prompt),
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": choice.tokens,
            "output_tokens_details": {"reasoning_tokens": choice.output.reasoning_tokens},
            "total_tokens": len(prepared.prompt) + choice.tokens,
        }
        if failure is not None:
            response["status"] = "failed"
            response["error"] = {"code": failure.type, "message": failure.message}
            terminal = "response.failed"
        elif truncated:
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
            terminal = "response.incomplete"
        else:
            response["status"] = "completed"
            response["completed_at"] = int(time.time())
            terminal = "response.completed"
        if prepared.request.store:
            self.store.put(StoredResponse(copy.deepcopy(response), prepared.input_items))
        yield {"type": terminal, "response": response}

    async def create(self, request: ResponsesRequest) -> dict[str, Any]:
        prepared, admission = await self.prepare(request)
        final: dict[str, Any] | None = None
        try:
            async for event in self.events(prepared):
                final = event
        finally:
            admission.release()
        assert final is not None
        if final["type"] == "response.failed":
            raise EngineFailure(final["response"]["error"]["message"])
        return final["response"]

    async def stream(self, request: ResponsesRequest) -> EventSourceResponse:
        """Validates first (errors raise before any byte is sent), then streams the events."""
        prepared, admission = await self.prepare(request)
        return sse(self._sse_events(prepared), self.settings, admission.release, self.engine)

    async def _sse_events(self, prepared: PreparedResponse) -> AsyncIterator[dict[str, str]]:
        sequence = 0
        async for event in self.events(prepared):
            event["sequence_number"] = sequence
            sequence += 1
            yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}

    def retrieve(self, response_id: str) -> dict[str, Any]:
        stored = self.store.get(response_id)
        if stored is None:
            raise not_found(f"Response with id {response_id!r} not found.", param="response_id")
        return stored.response

    def delete(self, response_id: str) -> dict[str, Any]:
        if not self.store.delete(response_id):
            raise not_found(f"Response with id {response_id!r} not found.", param="response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}


def _format_echo(request: ResponsesRequest) -> dict[str, Any]:
    """`text.format` as the response object repeats it."""
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return {"type": fmt.type if fmt is not None else "text"}
    return {
        "type": "json_schema",
        "name": fmt.name,
        "schema": fmt.json_schema,
        "description": fmt.description,
        "strict": fmt.strict,
    }
