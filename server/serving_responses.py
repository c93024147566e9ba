"""`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`, its `input_items` and `cancel`: the Responses
API on the chat machinery.

Input items become the same chat messages the chat endpoint takes (a `function_call` item is an assistant tool
call, a `function_call_output` a tool result, a `reasoning` item assistant reasoning), so `to_harmony` renders
both APIs alike and a Responses tool loop's prompt extends the previous one just as a chat loop's does.

One async generator produces the Responses event sequence (created, in_progress, each item's added / part /
delta / done events, then completed, incomplete or failed); a streamed request sends it as SSE, a plain one
keeps only the final response. Stored responses keep their whole conversation (the chain's input items, then
their output items), so `previous_response_id` rebuilds exactly the prompt the client would get by sending
everything itself; `instructions` apply to one request only, as with OpenAI.

A stored response is visible through GET from the moment it starts (in progress: the output so far). A
background response runs as its own task, bounded by the same admission as every request, and outlives the
client that asked for it (not the server: shutdown cuts it); its events are kept while it runs, so any number
of streams can follow it and a client that lost its stream resumes after the last event it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from sse_starlette import EventSourceResponse

from engine.constraint import Grammar
from engine.request import FinishReason, RequestError, RequestOutput, SamplingParams
from harmony import encoding as tok
from harmony.grammar import Recipient, namespace_recipients
from harmony.messages import Message
from harmony.messages import ResponseFormat as HarmonyResponseFormat
from server.async_engine import Admission, AsyncEngine, EngineFailure
from server.builtin_tools import (
    BROWSER,
    BUILTIN_TYPES,
    CODE_INTERPRETER_TYPE,
    OUTPUTS_INCLUDE,
    PYTHON,
    SOURCES_INCLUDE,
    BuiltinRequest,
    Citations,
    ResponseTools,
    ToolExchange,
    ToolResult,
    builtin_call,
    continuation_tokens,
    make_builtin_tools,
)
from server.errors import APIError, ParamNames, bad_request, engine_failure, not_found
from server.harmony_chat import Delta, DeltaKind
from server.mcp_tools import (
    MCP_ITEM_TYPES,
    MCP_TYPE,
    McpRequest,
    McpResponse,
    McpTools,
    mcp_call_item,
    sent_call,
)
from server.protocol import (
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    InputItemsQuery,
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
    final_format,
    logprob_json,
    output_budget,
    requested_schema,
    stop_strings,
)
from server.settings import ServerSettings
from server.streaming import sse, sse_json

logger = logging.getLogger(__name__)

# How many responses the in-memory store keeps before it forgets the oldest.
DEFAULT_STORE_SIZE = 1024

# Text parts accepted in message items; anything else (images, files, audio) is refused with a 400.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
_REASONING_PARTS = frozenset({"reasoning_text", "summary_text", "text"})
# The `include` value that asks for the answer tokens' logprobs.
LOGPROBS_INCLUDE = "message.output_text.logprobs"


# -- the store -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]
    # The conversation the response answered: its chain's input items, then its own request's input.
    input_items: list[dict[str, Any]]
    # By item id (an answered MCP call also by its approval request's id), the built-in and MCP tool calls of
    # its conversation and output as the model read them (for the prompts of the responses that continue it).
    exchanges: dict[str, ToolExchange] = field(default_factory=dict)


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

    def exchange(self, item_id: str) -> ToolExchange | None:
        """The call and answer behind a stored `code_interpreter_call`, `web_search_call` or `mcp_call` item
        (or an answered MCP call's approval request)."""
        with self._lock:
            for stored in reversed(self._entries.values()):
                found = stored.exchanges.get(item_id)
                if found is not None:
                    return found
        return None

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


def items_to_messages(
    items: list[ResponsesInputItem],
    *,
    first_own: int = 0,
    exchanges: Mapping[str, ToolExchange] | None = None,
) -> list[ChatMessage | Message]:
    """The chat messages for Responses input items (item_references already resolved).

    Items before `first_own` came from a stored chain; an error in them names `previous_response_id`. A
    built-in or MCP tool's item becomes the harmony call and tool message the model read (`exchanges`, by item
    id, or for an answered MCP call by its approval request's id; or, for a `code_interpreter_call` or
    `mcp_call` a client sends back with its outputs, its code and logs or its arguments and output), so that
    the prompt is the one harmony renders for the whole conversation; one whose text is not known (a
    `web_search_call` from elsewhere: its item holds no page) is left out, call and answer together.
    """
    messages: list[ChatMessage | Message] = []
    calls: set[str] = set()
    answered: set[str] = set()  # approval requests answered in the conversation
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
            last = messages[-1] if messages else None
            if (
                isinstance(last, ChatMessage)
                and last.role == "assistant"
                and (last.content is not None or last.tool_calls)
            ):
                # The assistant's text before its call was a preamble on the commentary channel (where the
                # model wrote it); the call joins that message, which renders it so, not as a final answer.
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item.type in ("code_interpreter_call", "web_search_call"):
            # The server's own tool traffic of an earlier turn: analysis-channel messages, which harmony drops
            # from a later turn's prompt when they come before the conversation's first final answer.
            exchange = (exchanges or {}).get(item.id or "") or _sent_exchange(item)
            if exchange is not None:
                messages.extend(exchange.messages())
        elif item.type == "mcp_call":
            # A call to an MCP server's tool: on the commentary channel, which harmony keeps in later turns;
            # one the client approved is shown where its answer was given.
            if (item.model_extra or {}).get("approval_request_id") not in answered:
                exchange = (exchanges or {}).get(item.id or "") or sent_call(item)
                if exchange is not None:
                    messages.extend(exchange.messages())
        elif item.type == "mcp_approval_response":
            # The call an earlier turn answered (run or refused), in the order the answers came, as that
            # turn's prompt had them. This request's own answers go in once carried out (`_with_approved`).
            request_id = str((item.model_extra or {}).get("approval_request_id") or "")
            answered.add(request_id)
            exchange = (exchanges or {}).get(request_id) if i < first_own else None
            if exchange is not None:
                messages.extend(exchange.messages())
        elif item.type in MCP_ITEM_TYPES:
            continue  # listings and approval requests: nothing the model read
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


def _sent_exchange(item: ResponsesInputItem) -> ToolExchange | None:
    """A `code_interpreter_call` item as a client sends it back: its code, and the logs of its outputs (what
    the model read, when the response had `include: ["code_interpreter_call.outputs"]`)."""
    extra = item.model_extra or {}
    code, outputs = extra.get("code"), extra.get("outputs")
    if item.type != "code_interpreter_call" or not isinstance(code, str) or not isinstance(outputs, list):
        return None
    logs = [o.get("logs") for o in outputs if isinstance(o, dict) and o.get("type") == "logs"]
    if not logs or not all(isinstance(text, str) for text in logs):
        return None
    return ToolExchange("python", code, "".join(logs))


# -- stored input items --------------------------------------------------------------------------------------

_ID_PREFIXES = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_", "function_call_output": "fco_"}


def stored_item(item: ResponsesInputItem) -> dict[str, Any]:
    """An input item as the store keeps it and `input_items` lists it: OpenAI's item shape, with an id (one
    is given to an item sent without). Its text is unchanged, so the conversation rebuilt from the stored
    items renders the same prompt."""
    out = item.model_dump(exclude_none=True)
    out.setdefault("id", _ID_PREFIXES.get(item.type, "item_") + secrets.token_hex(12))
    if item.type == "message":
        role = out["role"] = item.role or "user"
        kind = "output_text" if role == "assistant" else "input_text"
        content = item.content
        parts = [ResponsesContentPart(type=kind, text=content)] if isinstance(content, str) else content or []
        out["content"] = [_stored_part(part, kind) for part in parts]
        out.setdefault("status", "completed")
    elif item.type in ("function_call", "function_call_output"):
        out.setdefault("status", "completed")
    elif item.type == "reasoning":
        out.setdefault("summary", [])
    return out


def _stored_part(part: ResponsesContentPart, kind: str) -> dict[str, Any]:
    out = part.model_dump(exclude_none=True)
    if part.type in ("text", "input_text", "output_text"):
        out["type"] = kind
        out.setdefault("text", "")
    if out["type"] == "output_text":
        out.setdefault("annotations", [])
    return out


# -- the service ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ToolChoice:
    """A request's tool choice as the turn grammar takes it: a mode or a function's name, the functions and
    the built-in tools (by namespace) it may call (None: every one offered), and its echo."""

    choice: str
    allowed: list[str] | None
    allowed_builtin: list[str] | None
    echo: Any

    @property
    def relaxed(self) -> _ToolChoice:
        """The choice for the turn's engine requests after a built-in call: a call was made, so nothing is
        forced any more (what allowed_tools allows stays allowed)."""
        if self.choice != "required":
            return self
        if isinstance(self.echo, dict) and self.echo.get("type") == "allowed_tools":
            return dataclasses.replace(self, choice="auto")
        return _ToolChoice("auto", None, None, self.echo)


def _builtin_namespace(tool_type: str) -> str:
    """The harmony namespace of a built-in tool type: python for code_interpreter, browser for web search."""
    return PYTHON if tool_type == CODE_INTERPRETER_TYPE else BROWSER


def _enabled_builtins(request: ResponsesRequest) -> set[str]:
    """The namespaces of the built-in tools `request` enables."""
    return {_builtin_namespace(tool.type) for tool in request.tools or [] if tool.type in BUILTIN_TYPES}


def _mcp_target(request: ResponsesRequest, label: Any, name: Any, param: str) -> str:
    """The recipient a tool choice naming an MCP server (`label`) and maybe one of its tools (`name`) allows:
    the server's namespace, or that tool. A 400 at `param` when no mcp tool of the request has the label."""
    labels = {
        (tool.model_extra or {}).get("server_label") for tool in request.tools or [] if tool.type == MCP_TYPE
    }
    if not isinstance(label, str) or label not in labels:
        raise bad_request(
            f"tool_choice names the MCP server {label!r}, which is not among the tools",
            param=f"{param}.server_label",
        )
    if name is not None and not isinstance(name, str):
        raise bad_request("an MCP tool's name must be a string", param=f"{param}.name")
    return f"{label}.{name}" if name else label


def _mcp_choice(request: ResponsesRequest, choice: ResponsesToolChoice) -> _ToolChoice:
    """`{"type": "mcp", "server_label": ..., "name": ...}`: a call to that MCP server's tool (to any of its
    tools without a name) is forced, the model reasoning first as for a built-in tool."""
    label = (choice.model_extra or {}).get("server_label")
    target = _mcp_target(request, label, choice.name, "tool_choice")
    echo: dict[str, Any] = {"type": MCP_TYPE, "server_label": label}
    if choice.name is not None:
        echo["name"] = choice.name
    return _ToolChoice("required", [], [target], echo)


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
    # The built-in tools the server runs for this response (python, browser), if any.
    builtin: BuiltinRequest = field(default_factory=BuiltinRequest)
    # The built-in calls of its conversation, as the model read them (by item id), stored with it.
    exchanges: dict[str, ToolExchange] = field(default_factory=dict)
    # Its MCP servers and the calls it approved, if any (`server.mcp_tools`).
    mcp: McpRequest | None = None
    # The grammar of the turn's engine requests after a built-in call (a forced choice is met by then).
    after_builtin: Grammar | None = None
    # With approved calls: the prompt before them. `prompt` holds the calls without their answers until
    # they have run (`ResponsesService.prepare`), then with them.
    conversation_prompt: list[int] | None = None
    # The approved calls' answers left the model no room to write: the response ends at once, incomplete.
    no_room: bool = False


@dataclass(slots=True)
class _OpenItem:
    item: dict[str, Any]
    index: int
    text: list[str] = field(default_factory=list)
    call_index: int = -1
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)


class OutputBuilder:
    """Turns one generation's deltas into output items and the stream events that build them.

    Events are fresh dicts (items deep-copied) without `sequence_number`; the caller numbers them.
    """

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self.open: _OpenItem | None = None
        # A built-in tool call being written (see `_feed_builtin`), and the container python calls run in.
        self.builtin: _OpenItem | None = None
        self.container: str | None = None
        # With the browser on, the answer's citation marks become annotations (see `_cited`).
        self.citations: Citations | None = None
        # With MCP servers on, their calls become `mcp_call` (or `mcp_approval_request`) items.
        self.mcp: McpResponse | None = None
        self._held_logprobs: list[dict[str, Any]] = []

    @property
    def calls(self) -> int:
        """The function calls begun so far."""
        return sum(item["type"] == "function_call" for item in self.output)

    def feed(self, delta: Delta, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The events for `delta`; `logprobs` are those of the answer tokens that produced it."""
        if delta.kind in (DeltaKind.BUILTIN_CALL_START, DeltaKind.BUILTIN_CALL_ARGUMENTS):
            return self._feed_builtin(delta)
        # Anything else after a built-in call's text: that message was not a call (it did not end in
        # `<|call|>`), and nothing ran.
        events = self.close_builtin("incomplete")
        if delta.kind is DeltaKind.CONTENT and self.citations is not None:
            return [*events, *self._cited(delta, logprobs)]
        return [*events, *self._feed(delta, logprobs)]

    def _cited(self, delta: Delta, logprobs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """An answer delta with its citation marks rewritten, and an `annotation.added` event for each."""
        assert self.citations is not None
        text, found = self.citations.feed(delta.text)
        self._held_logprobs += logprobs or []
        if not text:
            return []
        held, self._held_logprobs = self._held_logprobs, []
        current = self.open
        offset = (
            len("".join(current.text)) if current is not None and current.item["type"] == "message" else 0
        )
        events = self._feed(Delta(DeltaKind.CONTENT, text), held)
        current = self.open
        assert current is not None
        for annotation in found:
            annotation["start_index"] += offset
            annotation["end_index"] += offset
            current.annotations.append(annotation)
            events.append(
                {
                    "type": "response.output_text.annotation.added",
                    "item_id": current.item["id"],
                    "output_index": current.index,
                    "content_index": 0,
                    "annotation_index": len(current.annotations) - 1,
                    "annotation": dict(annotation),
                }
            )
        return events

    def _feed(self, delta: Delta, logprobs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
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
        current.logprobs += logprobs or []
        return [*events, {"type": "response.output_text.delta", **base, "logprobs": logprobs or []}]

    def _add(self, item: dict[str, Any], call_index: int = -1) -> list[dict[str, Any]]:
        index = len(self.output)
        self.output.append(item)
        self.open = _OpenItem(item, index, call_index=call_index)
        events = [{"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}]
        if item["type"] in ("message", "reasoning"):
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

    def snapshot(self) -> list[dict[str, Any]]:
        """The output so far, the open item with its text so far (a copy; the builder goes on)."""
        out = copy.deepcopy(self.output)
        if self.open is not None:
            item, text = out[self.open.index], "".join(self.open.text)
            if item["type"] == "function_call":
                item["arguments"] = text
            else:
                item["content"] = [_part(item["type"], text, self.open.logprobs, self.open.annotations)]
        if self.builtin is not None and self.builtin.index >= 0:
            key = "arguments" if self.builtin.item["type"] == "mcp_call" else "code"
            out[self.builtin.index][key] = "".join(self.builtin.text)
        return out

    # -- built-in tool calls -------------------------------------------------------------------------------
    #
    # A python call is shown as it is written: its `code_interpreter_call` item is added at the call's
    # header and its code streams as `code_interpreter_call_code.delta`. A browser call's item waits for the
    # call's end, when its arguments (the action) are whole. Then `begin_builtin` (before the tool runs) and
    # `end_builtin` (with its result) emit the rest of the item's events.

    def _feed_builtin(self, delta: Delta) -> list[dict[str, Any]]:
        if delta.kind is DeltaKind.BUILTIN_CALL_ARGUMENTS:
            current = self.builtin
            assert current is not None, "a built-in call's text follows its start"
            current.text.append(delta.text)
            if current.index < 0:
                return []
            kind = (
                "mcp_call_arguments" if current.item["type"] == "mcp_call" else "code_interpreter_call_code"
            )
            return [
                {
                    "type": f"response.{kind}.delta",
                    "item_id": current.item["id"],
                    "output_index": current.index,
                    "delta": delta.text,
                }
            ]
        events = [*self.close_builtin("incomplete"), *self.close("completed")]
        if self.mcp is not None and self.mcp.handles(delta.name):
            return [*events, *self._start_mcp(delta.name)]
        if delta.name != "python":
            item = {"id": "ws_" + secrets.token_hex(12), "type": "web_search_call", "status": "in_progress"}
            self.builtin = _OpenItem(item, -1)
            return events
        item = {
            "id": "ci_" + secrets.token_hex(12),
            "type": "code_interpreter_call",
            "code": "",
            "container_id": self.container,
            "outputs": None,
            "status": "in_progress",
        }
        index = len(self.output)
        self.output.append(item)
        self.builtin = _OpenItem(item, index)
        base = {"item_id": item["id"], "output_index": index}
        return [
            *events,
            {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)},
            {"type": "response.code_interpreter_call.in_progress", **base},
        ]

    def _start_mcp(self, recipient: str) -> list[dict[str, Any]]:
        """An MCP call's header: its `mcp_call` item, shown as its arguments are written; or, for a tool that
        needs approval, nothing until the call ends (`approval_request`)."""
        assert self.mcp is not None
        label, name = self.mcp.split(recipient)
        if self.mcp.needs_approval(recipient):
            self.builtin = _OpenItem(
                {"type": "mcp_approval_request", "server_label": label, "name": name}, -1
            )
            return []
        item = mcp_call_item(label, name)
        index = len(self.output)
        self.output.append(item)
        self.builtin = _OpenItem(item, index)
        return [
            {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)},
            {"type": "response.mcp_call.in_progress", "item_id": item["id"], "output_index": index},
        ]

    def approval_request(self) -> list[dict[str, Any]]:
        """A call to a tool that needs approval ended: an `mcp_approval_request` item, not the call."""
        current, self.builtin = self.builtin, None
        assert current is not None
        assert current.item["type"] == "mcp_approval_request"
        item = {
            "id": "mcpr_" + secrets.token_hex(12),
            "type": "mcp_approval_request",
            "server_label": current.item["server_label"],
            "name": current.item["name"],
            "arguments": "".join(current.text),
        }
        index = len(self.output)
        self.output.append(item)
        return [
            {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)},
            {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)},
        ]

    def mcp_preamble(self, request: McpRequest) -> list[dict[str, Any]]:
        """Before the model writes: an `mcp_list_tools` item for each server listed for this request, then
        an `mcp_call` item for each call the request approved (already run)."""
        events: list[dict[str, Any]] = []
        for server in request.servers.values():
            if server.listed is None:
                continue
            item = copy.deepcopy(server.listed)
            index = len(self.output)
            self.output.append(item)
            base = {"item_id": item["id"], "output_index": index}
            events += [
                {"type": "response.output_item.added", "output_index": index, "item": {**item, "tools": []}},
                {"type": "response.mcp_list_tools.in_progress", **base},
                {"type": "response.mcp_list_tools.completed", **base},
                {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)},
            ]
        for approved in request.approved:
            if approved.item is None:
                continue
            item = copy.deepcopy(approved.item)
            index = len(self.output)
            self.output.append(item)
            base = {"item_id": item["id"], "output_index": index}
            started = {**item, "status": "in_progress", "output": None, "error": None}
            events += [
                {"type": "response.output_item.added", "output_index": index, "item": started},
                {"type": "response.mcp_call.in_progress", **base},
                {"type": "response.mcp_call_arguments.done", **base, "arguments": item["arguments"]},
                {"type": f"response.mcp_call.{item['status']}", **base},
                {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)},
            ]
        return events

    def begin_builtin(self, action: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The call ended (`<|call|>`) and its tool is about to run: a python call's code is done and being
        interpreted; an MCP call's arguments are done; a browser call's item appears, searching, with
        `action`."""
        current = self.builtin
        assert current is not None
        item = current.item
        if item["type"] == "mcp_call":
            arguments = item["arguments"] = "".join(current.text)
            item["status"] = "calling"
            base = {"item_id": item["id"], "output_index": current.index}
            return [{"type": "response.mcp_call_arguments.done", **base, "arguments": arguments}]
        if item["type"] == "code_interpreter_call":
            code = item["code"] = "".join(current.text)
            item["status"] = "interpreting"
            base = {"item_id": item["id"], "output_index": current.index}
            return [
                {"type": "response.code_interpreter_call_code.done", **base, "code": code},
                {"type": "response.code_interpreter_call.interpreting", **base},
            ]
        item["action"] = action
        current.index = len(self.output)
        self.output.append(item)
        base = {"item_id": item["id"], "output_index": current.index}
        return [
            {
                "type": "response.output_item.added",
                "output_index": current.index,
                "item": copy.deepcopy(item),
            },
            {"type": "response.web_search_call.in_progress", **base},
            {"type": "response.web_search_call.searching", **base},
        ]

    def end_builtin(self, result: ToolResult, include_outputs: bool) -> list[dict[str, Any]]:
        """The tool ran: the item's result and its completed events."""
        current, self.builtin = self.builtin, None
        assert current is not None
        assert current.index >= 0
        item = current.item
        item["status"] = "completed" if result.ok else "failed"
        base = {"item_id": item["id"], "output_index": current.index}
        if item["type"] == "mcp_call":  # its output and error were set as it ran (`run_call`)
            done = {"type": f"response.mcp_call.{item['status']}", **base}
        elif item["type"] == "code_interpreter_call":
            item["outputs"] = [{"type": "logs", "logs": result.text}] if include_outputs else None
            done = {"type": "response.code_interpreter_call.completed", **base}
        else:
            item["action"] = result.action
            done = {"type": "response.web_search_call.completed", **base}
        item_done = {"type": "response.output_item.done", "output_index": current.index}
        return [done, {**item_done, "item": copy.deepcopy(item)}]

    def close_builtin(self, status: str) -> list[dict[str, Any]]:
        """Drop a built-in call that will not run (the response ended first, or the message was no call):
        a python item shown so far ends with `status`; a browser call never shown is forgotten."""
        current, self.builtin = self.builtin, None
        if current is None or current.index < 0:
            return []
        item = current.item
        item["arguments" if item["type"] == "mcp_call" else "code"] = "".join(current.text)
        item["status"] = status
        return [
            {"type": "response.output_item.done", "output_index": current.index, "item": copy.deepcopy(item)}
        ]

    def close(self, status: str) -> list[dict[str, Any]]:
        """Finish the open item (if any) with `status`: its done events."""
        events: list[dict[str, Any]] = self.close_builtin("incomplete")
        current, self.open = self.open, None
        if current is None:
            return events
        item, index = current.item, current.index
        if item["type"] == "message" and self.citations is not None and self.citations.pending:
            held = self.citations.flush()  # the answer ended inside what looked like a citation mark
            current.text.append(held)
            base = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append({"type": "response.output_text.delta", **base, "delta": held, "logprobs": []})
        text = "".join(current.text)
        item["status"] = status
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
                done = {
                    "type": "response.output_text.done",
                    **base,
                    "text": text,
                    "logprobs": current.logprobs,
                }
                events.append(copy.deepcopy(done))
            part = _part(item["type"], text, current.logprobs, current.annotations)
            events.append({"type": "response.content_part.done", **base, "part": copy.deepcopy(part)})
            item["content"] = [part]
        events.append(
            {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)}
        )
        return events


def _part(
    item_type: str,
    text: str,
    logprobs: list[dict[str, Any]] | None = None,
    annotations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    if item_type == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {
        "type": "output_text",
        "text": text,
        "annotations": copy.deepcopy(annotations or []),
        "logprobs": list(logprobs or []),
    }


_TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}


@dataclass(slots=True, eq=False)
class Run:
    """One response being generated. Owned by the event loop: what GET shows while it runs (`snapshot`),
    and, for a background response, its numbered events, which any number of streams follow."""

    prepared: PreparedResponse
    response: dict[str, Any]
    # The answer as the client gets it: parsed, and cut at a stop string.
    choice: ChoiceOutput
    builder: OutputBuilder = field(default_factory=OutputBuilder)
    cached: int = 0
    task: asyncio.Task[None] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    # The built-in tools of this response, if it enabled any, and its MCP servers.
    tools: ResponseTools | None = None
    mcp: McpResponse | None = None
    # Prompt tokens of all its engine requests (a tool loop makes one per step), and why it is incomplete when
    # not for its token budget.
    input_tokens: int = 0
    incomplete_reason: str | None = None
    # By item id, the built-in calls it ran as the model read them (stored with it).
    exchanges: dict[str, ToolExchange] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.response["id"]

    @property
    def background(self) -> bool:
        return self.task is not None

    def snapshot(self) -> dict[str, Any]:
        out = copy.deepcopy({**self.response, "output": []})
        out["output"] = self.builder.snapshot()
        return out

    def record(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = len(self.events)
        self.events.append(event)
        self.notify()

    def notify(self) -> None:
        """Wake the streams that wait for this run's next event (each waits on the event it found)."""
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncGenerator[dict[str, Any], None]:
        """The recorded events after sequence number `after`, then each as it comes, until the run ends."""
        index = after + 1
        while True:
            waiter = self.changed
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.done:
                return
            await waiter.wait()


# How long shutdown waits for the background responses it cut to record how they ended.
_SHUTDOWN_WAIT_S = 5.0


class ResponsesService(Serving[ResponsesRequest, PreparedResponse]):
    """Responses, stored ones, and those in progress. A response being generated is a `Run` in `live`
    (when stored) until it ends, then its final object goes to the store; GET finds either. A background
    response runs as a task of its own, holding its admission, until it ends or is cancelled."""

    def __init__(
        self,
        engine: AsyncEngine,
        encoding: tiktoken.Encoding,
        settings: ServerSettings,
        max_model_len: int,
        workers: Workers,
        processors_hook: ProcessorsHook | None = None,
        store_size: int = DEFAULT_STORE_SIZE,
        *,
        on_anomalies: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            engine, encoding, settings, max_model_len, workers, processors_hook, on_anomalies=on_anomalies
        )
        self.store = ResponseStore(store_size)
        self.builtin = make_builtin_tools(settings, lambda text: len(encoding.encode_ordinary(text)))
        self.mcp = McpTools(settings)
        # What each request being prepared needs of its MCP servers, by id() of the request: gathered on the
        # event loop (`prepare`: network), read by `_prepare` on a render worker.
        self._mcp_ready: dict[int, McpRequest] = {}
        # Stored responses being generated, by id; only the event loop touches it.
        self.live: dict[str, Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- preparing ------------------------------------------------------------------------------------------

    def param_names(self, request: ResponsesRequest) -> ParamNames:
        return {
            "prompt": "input",
            "max_tokens": "max_output_tokens",
            "logprobs": "top_logprobs",
            "grammar": "text.format",
        }

    def _check_unsupported(self, request: ResponsesRequest) -> None:
        if request.background and not request.store:
            raise bad_request("background responses must be stored: set store to true", param="background")
        for value in request.include or []:
            if value not in _SUPPORTED_INCLUDES:
                raise bad_request(f"include {value!r} is not supported", param="include")
        if request.truncation == "auto":
            raise bad_request("truncation 'auto' is not supported; use 'disabled'", param="truncation")

    def _tools(self, request: ResponsesRequest) -> list[Tool]:
        tools = []
        for i, tool in enumerate(request.tools or []):
            if tool.type in BUILTIN_TYPES or tool.type == MCP_TYPE:
                continue  # run by the server (`server.builtin_tools`, `server.mcp_tools`)
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

    def _tool_choice(self, request: ResponsesRequest, names: list[str]) -> _ToolChoice:
        """The turn grammar's tool choice for `request`, whose function tools are `names`."""
        choice = request.tool_choice
        if choice is None:
            return _ToolChoice("auto", None, None, "auto")
        if isinstance(choice, ResponsesToolChoice):
            if choice.type == "allowed_tools":
                return self._allowed_tools(request, choice, names)
            if choice.type in BUILTIN_TYPES:
                # A built-in tool forced: the model may reason first, then must call it (and nothing else).
                namespace = _builtin_namespace(choice.type)
                if namespace not in _enabled_builtins(request):
                    raise bad_request(
                        f"tool_choice names {choice.type!r}, which is not among the tools",
                        param="tool_choice",
                    )
                return _ToolChoice("required", [], [namespace], {"type": choice.type})
            if choice.type == MCP_TYPE:
                return _mcp_choice(request, choice)
            if choice.type != "function" or not choice.name:
                raise bad_request(
                    f"tool_choice of type {choice.type!r} is not supported; use auto, none, required, "
                    "{'type': 'function', 'name': ...}, {'type': 'code_interpreter'}, "
                    "{'type': 'web_search'}, {'type': 'mcp', 'server_label': ...} or "
                    "{'type': 'allowed_tools', ...}",
                    param="tool_choice",
                )
            if choice.name not in names:
                raise bad_request(
                    f"tool_choice names {choice.name!r}, which is not among the tools", param="tool_choice"
                )
            return _ToolChoice(choice.name, None, None, {"type": "function", "name": choice.name})
        if choice == "required" and not names and not _enabled_builtins(request):
            raise bad_request("tool_choice 'required' needs at least one tool", param="tool_choice")
        return _ToolChoice(choice, None, None, choice)

    @staticmethod
    def _allowed_tools(
        request: ResponsesRequest, choice: ResponsesToolChoice, names: list[str]
    ) -> _ToolChoice:
        """`{"type": "allowed_tools", "mode": "auto" | "required", "tools": [{"type": "function", "name":
        ...}, {"type": "code_interpreter"}, ...]}`: the model may call only the tools listed (all stay in the
        prompt, which keeps the prompt cache warm as the list changes), and must call one when the mode is
        `required`."""
        if choice.mode is None:
            raise bad_request("allowed_tools needs a mode: auto or required", param="tool_choice.mode")
        if not choice.tools:
            raise bad_request("allowed_tools needs at least one tool", param="tool_choice.tools")
        allowed: list[str] = []
        builtin: list[str] = []
        for i, tool in enumerate(choice.tools):
            kind = tool.get("type", "function")
            if kind in BUILTIN_TYPES:
                namespace = _builtin_namespace(kind)
                if namespace not in _enabled_builtins(request):
                    raise bad_request(
                        f"allowed_tools names {kind!r}, which is not among the tools",
                        param=f"tool_choice.tools[{i}].type",
                    )
                builtin.append(namespace)
                continue
            if kind == MCP_TYPE:
                param = f"tool_choice.tools[{i}]"
                builtin.append(_mcp_target(request, tool.get("server_label"), tool.get("name"), param))
                continue
            name = tool.get("name")
            if kind != "function" or not isinstance(name, str):
                raise bad_request(
                    "allowed_tools lists function tools by name ({'type': 'function', 'name': ...}), "
                    "built-in tools by type ({'type': 'code_interpreter'}, {'type': 'web_search'}) and MCP "
                    "servers by label ({'type': 'mcp', 'server_label': ..., 'name': ...})",
                    param=f"tool_choice.tools[{i}]",
                )
            if name not in names:
                raise bad_request(
                    f"allowed_tools names {name!r}, which is not among the tools",
                    param=f"tool_choice.tools[{i}].name",
                )
            allowed.append(name)
        echo = {"type": "allowed_tools", "mode": choice.mode, "tools": choice.tools}
        return _ToolChoice(choice.mode, allowed, builtin, echo)

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

    def conversation(
        self, request: ResponsesRequest
    ) -> tuple[list[ChatMessage | Message], list[dict[str, Any]], dict[str, ToolExchange]]:
        """The chat messages to render, the input items to store with the response, and the built-in tool
        calls among them as the model read them (by item id)."""
        chain: list[dict[str, Any]] = []
        exchanges: dict[str, ToolExchange] = {}
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id)
            if previous is None:
                if request.previous_response_id in self.live:
                    raise bad_request(
                        f"Response {request.previous_response_id!r} is still in progress; continue from it "
                        "once it has ended.",
                        param="previous_response_id",
                    )
                raise not_found(
                    f"Response with id {request.previous_response_id!r} not found.",
                    param="previous_response_id",
                )
            chain = [*previous.input_items, *previous.response["output"]]
            exchanges = dict(previous.exchanges)
        if isinstance(request.input, str):
            own = [ResponsesInputItem(type="message", role="user", content=request.input)]
        else:
            own = self._resolve(request.input)
        for item in own:
            # Items a client sends back from a stored response: the store knows what the model read.
            if item.type in ("code_interpreter_call", "web_search_call", "mcp_call") and item.id:
                found = self.store.exchange(item.id)
                if found is not None:
                    exchanges[item.id] = found
        items = [ResponsesInputItem.model_validate(item) for item in chain] + own
        messages = items_to_messages(items, first_own=len(chain), exchanges=exchanges)
        if request.instructions:
            messages.insert(0, ChatMessage(role="developer", content=request.instructions))
        stored = chain + [stored_item(item) for item in own]
        return messages, stored, exchanges

    # Stop strings end the answer the client sees, not the raw output (see `ChoiceOutput`).
    engine_stops = False

    def _grammar(
        self, request: ResponsesRequest, tools: list[Tool], choice: _ToolChoice, recipients: list[Recipient]
    ) -> Grammar | None:
        """The turn's grammar: the answer held to `text.format` or `structured_outputs`, the tool choice
        and strict tools enforced, the built-in tools' `recipients` callable as the choice allows, the
        reasoning within its budget (None: nothing to constrain)."""
        fmt = request.text.format if request.text is not None else None
        answer, field = final_format(
            fmt.type if fmt is not None else "text",
            fmt.json_schema if fmt is not None else None,
            fmt.strict if fmt is not None else None,
            request,
            "text.format",
        )
        return self.turn_constraint(
            answer,
            tools,
            choice.choice,
            allowed=choice.allowed,
            recipients=recipients,
            allowed_recipients=choice.allowed_builtin,
            budget=request.thinking_token_budget,
            effort=request.reasoning.effort if request.reasoning else None,
            field=field,
            tool_field="tools[{i}].parameters",
        )

    async def prepare(self, request: ResponsesRequest) -> tuple[PreparedResponse, Admission]:
        """As every API's, with the request's MCP servers listed first (network, so here on the event loop,
        before the render worker declares their tools) and its approval answers checked; the calls it
        approves run last, once every check that can refuse the request (the render's, the admission's)
        has passed, so that a refused request has had no side effect."""
        previous = self.store.get(request.previous_response_id or "")
        if previous is None and request.previous_response_id is not None:
            return await super().prepare(request)  # which says why it cannot be continued
        # Refused fields are refused before any MCP server is reached.
        self._check_unsupported(request)
        chain = [*previous.input_items, *previous.response["output"]] if previous is not None else []
        own = request.input if isinstance(request.input, list) else []
        ready = await self.mcp.ready(request.tools or [], chain, own)
        if ready is None:
            return await super().prepare(request)
        self._mcp_ready[id(request)] = ready
        try:
            prepared, admission = await super().prepare(request)
        finally:
            del self._mcp_ready[id(request)]
        if ready.answers:
            try:
                await self._carry_out(prepared)
            except BaseException:  # cancelled while a call ran: the slots go back
                admission.release()
                raise
        return prepared, admission

    async def _carry_out(self, prepared: PreparedResponse) -> None:
        """Run the approved calls and put their answers into the prompt (after its checks, which counted the
        calls but not the answers: an answer that leaves no room ends the response as the tool loop does),
        keeping each exchange with the response for the turns that continue it."""
        assert prepared.mcp is not None
        assert prepared.conversation_prompt is not None
        mcp = prepared.mcp = await self.mcp.carry_out(prepared.mcp)
        exchanges = [approved.exchange for approved in mcp.approved]
        prepared.prompt = await self.workers.run(self._with_approved, prepared.conversation_prompt, exchanges)
        for approved in mcp.approved:
            # Found by its answer in a chain, and by its item when a client sends that back alone.
            prepared.exchanges[approved.request_id] = approved.exchange
            if approved.item is not None:
                prepared.exchanges[approved.item["id"]] = approved.exchange
        room = self.max_model_len - len(prepared.prompt)
        if prepared.request.max_output_tokens is not None:
            room = min(room, prepared.request.max_output_tokens)
        if room < 1:
            prepared.no_room = True
        else:
            prepared.params = dataclasses.replace(prepared.params, max_tokens=room)

    def _prepare(self, request: ResponsesRequest) -> tuple[PreparedResponse, list[EngineRequest]]:
        self._check_unsupported(request)
        stops = stop_strings(request.stop)
        tools = self._tools(request)
        names = [t.function.name for t in tools]
        choice = self._tool_choice(request, names)
        messages, input_items, exchanges = self.conversation(request)
        builtin = self.builtin.parse(request.tools or [], input_items)
        offered = tools if request.tool_choice != "none" else None
        fmt = request.text.format if request.text is not None else None
        shown = (
            HarmonyResponseFormat(fmt.name, fmt.json_schema, fmt.description)
            if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None
            else requested_schema(request)
        )
        effort = request.reasoning.effort if request.reasoning else None
        mcp = self._mcp_ready.get(id(request))
        namespaces = {**self.builtin.namespaces(builtin), **(mcp.namespaces() if mcp is not None else {})}
        prompt = self.render(messages, offered, effort, shown, namespaces)
        conversation_prompt = None
        if mcp is not None and mcp.answers:
            # Checked with the approved calls, not yet their answers: those come once the calls have run.
            conversation_prompt = prompt
            prompt = self._with_approved(prompt, [answer.call for answer in mcp.answers])
        max_tokens = output_budget(len(prompt), request.max_output_tokens, self.max_model_len)
        # With 'none' the model is shown no tools, and a call it makes anyway is not returned.
        recipients = [r for namespace in namespaces.values() for r in namespace_recipients(namespace)]
        grammar = self._grammar(request, offered or [], choice, recipients)
        # After a built-in call the turn goes on in a new engine request, with nothing forced any more.
        relaxed = choice.relaxed
        after_builtin = (
            grammar if relaxed == choice else self._grammar(request, offered or [], relaxed, recipients)
        )
        try:
            logit_bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
        except ValueError as error:
            raise RequestError("logit_bias keys must be token ids", "logit_bias") from error
        params = self.sampling_params(
            request,
            max_tokens,
            stop_token_ids=sorted(tok.STOP_TOKENS_FOR_ASSISTANT_ACTIONS),
            logprobs=_logprobs(request),
            top_k=max(request.top_k or 0, 0),
            min_p=request.min_p or 0.0,
            logit_bias=logit_bias,
            grammar=grammar,
        )
        # What `sampling_params` takes from chat's and completions' own fields, this API has too.
        params = dataclasses.replace(
            params,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
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
        ] + [dict(echo) for echo in builtin.echo]
        if mcp is not None:
            tool_dicts += mcp.echo
        effort = (
            request.reasoning.effort if request.reasoning else None
        ) or self.settings.default_reasoning_effort
        shown_names = frozenset(names if offered else [])
        prepared = PreparedResponse(
            request,
            prompt,
            params,
            input_items,
            tool_dicts,
            choice.echo,
            effort,
            shown_names,
            stops,
            builtin,
            exchanges,
            mcp,
            after_builtin,
            conversation_prompt,
        )
        return prepared, [(prompt, params)]

    def _with_approved(self, prompt: list[int], calls: list[ToolExchange]) -> list[int]:
        """The prompt with the calls the request answered and their results where the model made them: after
        the conversation (which ends with the response that asked), before the next assistant message."""
        tail = [tok.START, *self.encoding.encode_ordinary("assistant")]
        assert prompt[-len(tail) :] == tail
        body = prompt[: -len(tail)]
        for call in calls:
            for message in call.messages():
                body += self.renderer.render_message(message)
        return body + tail

    # -- running --------------------------------------------------------------------------------------------

    def _response(self, prepared: PreparedResponse, response_id: str, created_at: int) -> dict[str, Any]:
        request = prepared.request
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": "queued",
            "completed_at": None,
            "model": request.model,  # the base model or the LoRA adapter it named
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
            "top_logprobs": request.top_logprobs,
            "tool_choice": prepared.tool_choice,
            "tools": prepared.tools,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": prepared.effort, "summary": None},
            "store": request.store,
            "text": {"format": _format_echo(request)},
            "truncation": "disabled",
            "background": bool(request.background),
            "user": request.user,
            "usage": None,
        }

    def _start(self, prepared: PreparedResponse) -> Run:
        """A new run for `prepared`, visible through GET from now on if the response is stored."""
        response = self._response(prepared, "resp_" + secrets.token_hex(12), int(time.time()))
        builtin = prepared.builtin
        mcp = prepared.mcp
        labels = mcp.labels if mcp is not None else frozenset()
        choice = ChoiceOutput(
            self.encoding,
            prepared.offered,
            prepared.stops,
            prepared.request.include_stop_str_in_output,
            builtin.namespaces | labels,
            on_anomalies=self.on_anomalies,
        )
        run = Run(prepared, response, choice)
        if mcp is not None:
            run.mcp = run.builder.mcp = McpResponse(self.mcp, mcp)
        if builtin.namespaces:
            run.tools = self.builtin.start(
                builtin,
                prepared.request.previous_response_id,
                sources=SOURCES_INCLUDE in (prepared.request.include or []),
            )
            run.builder.container = run.tools.container
            if run.tools.browser is not None:
                run.builder.citations = Citations(run.tools.browser)
        if prepared.request.store:
            self.live[run.id] = run
        return run

    async def events(self, run: Run) -> AsyncGenerator[dict[str, Any], None]:
        """The stream events of one run, unnumbered; the last is completed, incomplete or failed.

        However the run ends (its consumer gone or cancelled included: it is then "cancelled"), its final
        object goes to the store, if stored, before anything else sees the end.
        """
        prepared = run.prepared
        limit = prepared.request.max_tool_calls
        finish: FinishReason | None = None
        failure: APIError | None = None
        ended = False
        try:
            run.response["status"] = "in_progress"
            yield {"type": "response.created", "response": run.snapshot()}
            yield {"type": "response.in_progress", "response": run.snapshot()}
            if prepared.mcp is not None:
                for event in run.builder.mcp_preamble(prepared.mcp):
                    yield event
            try:
                # One engine request, then one more after each built-in tool call the server runs, its prompt
                # the previous one extended by what the model wrote and the tool's message (the prefix cache
                # holds the rest of the turn).
                prompt, params, step = prepared.prompt, prepared.params, 0
                if prepared.no_room:
                    finish = FinishReason.LENGTH
                while not prepared.no_room:
                    rid = run.id if step == 0 else f"{run.id}-{step}"
                    run.input_tokens += len(prompt)
                    cached_before = run.cached
                    generated: list[int] = []
                    capped = False
                    stream = self.engine.generate(prompt, params, rid)
                    async with contextlib.aclosing(stream):
                        async for output in stream:
                            if run.choice.stopped:
                                continue  # what the engine made before the abort took effect
                            run.cached = cached_before + output.num_cached_tokens
                            generated += output.new_token_ids
                            deltas = self._deltas(run, output)
                            if run.choice.stopped:
                                finish = FinishReason.STOP
                                if not output.finished:
                                    self.engine.abort(rid)
                            elif output.finished:
                                finish = output.finish_reason
                                deltas += [(d, []) for d in run.choice.finish()]
                            for delta, logprobs in deltas:
                                if delta.kind is DeltaKind.TOOL_CALL_START and limit is not None:
                                    # A call past the limit is dropped, and the response ends there.
                                    capped = run.builder.calls >= limit
                                    if capped:
                                        break
                                for event in run.builder.feed(delta, logprobs):
                                    yield event
                            if capped:
                                break
                    if capped or run.choice.stopped or finish is not FinishReason.STOP:
                        break
                    call = self._builtin_call(run, generated)
                    if call is None:
                        break
                    pending = run.builder.builtin
                    if pending is not None and pending.item["type"] == "mcp_approval_request":
                        # Not run: the response ends asking; a request approving it goes on from here.
                        for event in run.builder.approval_request():
                            yield event
                        break
                    begun = self._begin_builtin(run, call)
                    if begun is None:
                        break
                    for event in begun:
                        yield event
                    result = await self._run_builtin(run, call)
                    assert run.builder.builtin is not None
                    run.exchanges[run.builder.builtin.item["id"]] = ToolExchange.of(call, result.text)
                    for event in run.builder.end_builtin(
                        result, OUTPUTS_INCLUDE in (prepared.request.include or [])
                    ):
                        yield event
                    # Tokenized on a render worker, as every prompt is: never on the event loop.
                    tool_tokens = await self.workers.run(self._tool_tokens, call, result)
                    prompt = prompt + generated + tool_tokens
                    step += 1
                    next_params = self._step_params(run, prompt, step)
                    if next_params is None:
                        finish = FinishReason.LENGTH
                        break
                    params = next_params
                    run.choice.next_request()
            except EngineFailure as error:
                logger.error("response %s failed: %s", run.id, error)
                failure = engine_failure(error)
            incomplete = finish is FinishReason.LENGTH or run.incomplete_reason is not None
            status = "failed" if failure else "incomplete" if incomplete else "completed"
            ended = True
            for event in self._finish(run, status, failure):
                yield event
        finally:
            if not ended:  # its consumer left, or it was cancelled, before it ended
                self._finish(run, "cancelled")

    # -- the built-in tool loop -----------------------------------------------------------------------------

    def _builtin_call(self, run: Run, generated: list[int]) -> Message | None:
        """The built-in or MCP tool call the engine request ended on, or None."""
        if run.builder.builtin is None:
            return None
        return builtin_call(self.encoding, generated, run.tools, run.mcp)

    def _begin_builtin(self, run: Run, call: Message) -> list[dict[str, Any]] | None:
        """The events before the call runs, or None when the response may run no more tool calls (it then
        ends as incomplete, the call not run)."""
        assert call.recipient is not None
        request = run.prepared.request
        limit = self.settings.max_builtin_tool_calls
        if request.max_tool_calls is not None:
            limit = min(limit, request.max_tool_calls)
        calls = (run.tools.calls if run.tools is not None else 0) + (
            run.mcp.calls if run.mcp is not None else 0
        )
        if calls >= limit:
            logger.info("response %s: built-in tool call limit (%d) reached", run.id, limit)
            run.incomplete_reason = "max_tool_calls"
            return None
        action = None
        if run.tools is not None and run.tools.handles(call.recipient) and call.recipient != "python":
            action = run.tools.action(call.recipient.removeprefix("browser."), call.text)
        return run.builder.begin_builtin(action)

    async def _run_builtin(self, run: Run, call: Message) -> ToolResult:
        assert call.recipient is not None
        if run.mcp is not None and run.mcp.handles(call.recipient):
            current = run.builder.builtin
            assert current is not None
            text = await run.mcp.run(call.recipient, call.text, current.item)
            return ToolResult(text, current.item["status"] == "completed")
        assert run.tools is not None
        try:
            return await run.tools.run(call.recipient, call.text)
        except (OSError, RuntimeError) as error:  # the sandbox could not start: the model reads why
            logger.error("response %s: %s failed: %s", run.id, call.recipient, error)
            action = run.tools.action(call.recipient.removeprefix("browser."), call.text)
            return ToolResult(f"[the tool failed: {error}]", False, run.tools.container, action)

    def _tool_tokens(self, call: Message, result: ToolResult) -> list[int]:
        """The tool's message as harmony renders it, then the next assistant message's start."""
        return continuation_tokens(self.renderer, self.encoding, call, result.text)

    def _step_params(self, run: Run, prompt: list[int], step: int) -> SamplingParams | None:
        """The next engine request's parameters: the output budget left (None when none is), and the test
        hook's processors for this step."""
        request, params = run.prepared.request, run.prepared.params
        room = self.max_model_len - len(prompt)
        if request.max_output_tokens is not None:
            room = min(room, request.max_output_tokens - run.choice.tokens)
        if room < 1:
            return None
        # Responses sets no processors of its own: only the hook's, made for this step of the loop.
        hook = self.processors_hook
        processors = hook.make(request.model_extra or {}, step) if hook is not None else []
        return dataclasses.replace(
            params, max_tokens=room, logits_processors=processors, grammar=run.prepared.after_builtin
        )

    def _deltas(self, run: Run, output: RequestOutput) -> list[tuple[Delta, list[dict[str, Any]]]]:
        """A step's deltas, each with the logprobs of the answer tokens that produced it (a token's goes with
        the first answer delta it gave, as chat's do)."""
        logprobs = output.logprobs or []
        wanted = run.prepared.params.logprobs is not None
        out: list[tuple[Delta, list[dict[str, Any]]]] = []
        for i, token in enumerate(output.new_token_ids):
            entry = logprob_json(self.encoding, logprobs[i]) if wanted and i < len(logprobs) else None
            for delta in run.choice.feed(token):
                if entry is not None and delta.kind is DeltaKind.CONTENT:
                    out.append((delta, [entry]))
                    entry = None
                else:
                    out.append((delta, []))
            if run.choice.stopped:
                break
        return out

    def _finish(self, run: Run, status: str, failure: APIError | None = None) -> list[dict[str, Any]]:
        """End `run` with `status`: close its open item, store its final object, and return the events that
        end its stream (none for "cancelled", for which the Responses stream has no event)."""
        run.choice.finish()  # for the reasoning token count (if not yet); what it still held is not output
        events = run.builder.close("completed" if status == "completed" else "incomplete")
        response = run.response
        response["output"] = run.builder.output
        # Every engine request's prompt counts (a built-in tool loop reads the turn again at each step; the
        # prefix cache holds it, as `cached_tokens` says).
        prompt_tokens = run.input_tokens or len(run.prepared.prompt)
        response["usage"] = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": run.cached, "cache_write_tokens": 0},
            "output_tokens": run.choice.tokens,
            "output_tokens_details": {"reasoning_tokens": run.choice.reasoning_tokens},
            "total_tokens": prompt_tokens + run.choice.tokens,
        }
        response["status"] = status
        if failure is not None:
            response["error"] = {"code": failure.type, "message": failure.message}
        elif status == "incomplete":
            response["incomplete_details"] = {"reason": run.incomplete_reason or "max_output_tokens"}
        elif status == "completed":
            response["completed_at"] = int(time.time())
        if run.prepared.request.store:
            exchanges = {**run.prepared.exchanges, **run.exchanges}
            self.store.put(StoredResponse(copy.deepcopy(response), run.prepared.input_items, exchanges))
            if run.tools is not None:
                self.builtin.remember(run.id, run.tools)
        self.live.pop(run.id, None)
        run.done = True
        run.notify()
        if status in _TERMINAL_EVENTS:
            events.append({"type": _TERMINAL_EVENTS[status], "response": response})
        return events

    async def create(self, request: ResponsesRequest) -> dict[str, Any]:
        prepared, admission = await self.prepare(request)
        run = self._start(prepared)
        if request.background:
            self._launch(run, admission)
            return run.snapshot()
        final: dict[str, Any] | None = None
        try:
            async for event in self.events(run):
                final = event
        finally:
            admission.release()
        assert final is not None
        if final["type"] == "response.failed":
            raise EngineFailure(final["response"]["error"]["message"])
        return final["response"]

    async def stream(self, request: ResponsesRequest) -> EventSourceResponse:
        """Validates first (errors raise before any byte is sent), then streams the events. A background
        stream follows its run, which goes on if the client leaves."""
        prepared, admission = await self.prepare(request)
        run = self._start(prepared)
        if request.background:
            self._launch(run, admission)
            return sse(_sse(run.follow(-1)), self.settings, lambda: None, self.engine)
        return sse(_sse(_numbered(self.events(run))), self.settings, admission.release, self.engine)

    def _launch(self, run: Run, admission: Admission) -> None:
        task = asyncio.create_task(self._in_background(run), name=f"response {run.id}")
        run.task = task
        self._tasks.add(task)
        task.add_done_callback(lambda _: self._background_ended(run, task, admission))

    async def _in_background(self, run: Run) -> None:
        try:
            async for event in self.events(run):
                run.record(event)
        except asyncio.CancelledError:
            logger.info("background response %s cancelled", run.id)  # `events` recorded it as cancelled

    def _background_ended(self, run: Run, task: asyncio.Task[None], admission: Admission) -> None:
        """However its task ended (cancelled before it began included), a background run gives back its
        admission and leaves `live` with a final status."""
        admission.release()
        self._tasks.discard(task)
        if not run.done:
            self._finish(run, "cancelled")

    async def shutdown(self) -> None:
        """Cut the background responses in progress (a background response does not outlive the server):
        each ends as failed, its engine request aborted. The python sessions are closed after them."""
        try:
            await self._cut_background()
        finally:
            await self.builtin.close()

    async def _cut_background(self) -> None:
        tasks = set(self._tasks)
        if not tasks:
            return
        self.engine.cut_all("the server is shutting down")
        _, pending = await asyncio.wait(tasks, timeout=_SHUTDOWN_WAIT_S)
        for task in pending:  # not yet generating: nothing to cut
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_SHUTDOWN_WAIT_S)

    # -- stored and running responses ----------------------------------------------------------------------

    def retrieve(self, response_id: str) -> dict[str, Any]:
        run = self.live.get(response_id)
        if run is not None:
            return run.snapshot()
        stored = self.store.get(response_id)
        if stored is None:
            raise not_found(f"Response with id {response_id!r} not found.", param="response_id")
        return stored.response

    def follow(self, response_id: str, starting_after: int | None) -> EventSourceResponse:
        """`GET /v1/responses/{id}?stream=true`: the events of a background response in progress, after
        `starting_after`."""
        run = self.live.get(response_id)
        if run is None or not run.background:
            self.retrieve(response_id)  # a 404 for an unknown response
            raise bad_request(
                "only a background response in progress can be streamed; retrieve it without stream",
                param="stream",
            )
        return sse(
            _sse(run.follow(-1 if starting_after is None else starting_after)),
            self.settings,
            lambda: None,
            self.engine,
        )

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """Cancel a background response: its engine request is aborted (its KV freed) and it ends as
        cancelled with the output so far. A background response that has already ended is returned as it
        is; any other response cannot be cancelled (a 400, as OpenAI answers)."""
        run = self.live.get(response_id)
        if run is not None and run.task is not None:
            run.task.cancel()
            await asyncio.wait({run.task})
            return self.retrieve(response_id)
        response = self.retrieve(response_id)
        if not response.get("background"):
            raise bad_request(
                "Only responses created with background=true can be cancelled.", param="response_id"
            )
        return response

    def input_items(self, response_id: str, query: InputItemsQuery) -> dict[str, Any]:
        """A page of the items the response answered (its chain's, then its own input), OpenAI's list."""
        for value in query.include or []:
            if value not in _SUPPORTED_INCLUDES:
                raise bad_request(f"include {value!r} is not supported", param="include")
        run = self.live.get(response_id)
        if run is not None:
            items = run.prepared.input_items
        else:
            stored = self.store.get(response_id)
            if stored is None:
                raise not_found(f"Response with id {response_id!r} not found.", param="response_id")
            items = stored.input_items
        ordered = items if query.order == "asc" else items[::-1]
        ids = [item["id"] for item in ordered]
        start, end = 0, len(ordered)
        for name, cursor in (("after", query.after), ("before", query.before)):
            if cursor is None:
                continue
            if cursor not in ids:
                raise bad_request(f"{name} names no item of this response: {cursor!r}", param=name)
            if name == "after":
                start = ids.index(cursor) + 1
            else:
                end = ids.index(cursor)
        window = ordered[start:end]
        page = copy.deepcopy(window[: query.limit])
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(window) > query.limit,
        }

    def delete(self, response_id: str) -> dict[str, Any]:
        if response_id in self.live:
            raise bad_request(
                "the response is still in progress; cancel it or wait for it to end", param="response_id"
            )
        if not self.store.delete(response_id):
            raise not_found(f"Response with id {response_id!r} not found.", param="response_id")
        self.builtin.forget(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}


# `include` values we honour, or that need nothing from us (we never produce encrypted reasoning).
_SUPPORTED_INCLUDES = frozenset(
    {"reasoning.encrypted_content", LOGPROBS_INCLUDE, OUTPUTS_INCLUDE, SOURCES_INCLUDE}
)


def _logprobs(request: ResponsesRequest) -> int | None:
    """The top alternatives to report with each answer token, or None for no logprobs: they come with
    `include: ["message.output_text.logprobs"]`, or with a `top_logprobs` above 0 (asking for the top
    tokens is asking for logprobs)."""
    if LOGPROBS_INCLUDE in (request.include or []) or request.top_logprobs:
        return request.top_logprobs or 0
    return None


# Each wrapper closes what it wraps when it is closed itself (the client left), so that `events` records the
# run as cancelled and aborts its engine request then, not whenever the abandoned generator is collected.


async def _numbered(events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[dict[str, Any], None]:
    async with contextlib.aclosing(events):
        sequence = 0
        async for event in events:
            event["sequence_number"] = sequence
            sequence += 1
            yield event


async def _sse(events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[dict[str, str]]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield {"event": event["type"], "data": sse_json(event)}


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
