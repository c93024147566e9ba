"""OpenAI chat messages to harmony prompts; harmony output tokens back to reasoning, content and tool calls.

Rendering follows the official renderer's conventions so that a tool loop's prompt extends the previous one
(the prefix cache then hits): assistant reasoning becomes an analysis message, an answer a final message, each
tool call a commentary message to `functions.NAME` with content type `<|constrain|>json` (ending in
`<|call|>`), and each tool result a message from `functions.NAME` to the assistant on the commentary channel.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import tiktoken

from harmony.messages import (
    Author,
    DeveloperContent,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
    function_tools_namespace,
)
from harmony.parser import Header, StreamParser
from server.errors import bad_request
from server.protocol import ChatMessage, Tool

logger = logging.getLogger(__name__)

FUNCTIONS_PREFIX = "functions."


def conversation_date(setting: str | None) -> str | None:
    """The system message's `Current date:`: today in UTC for "today", a fixed date, or None for no line."""
    if setting == "today":
        return datetime.now(UTC).strftime("%Y-%m-%d")
    return setting


def system_message(
    effort: str | None,
    date_setting: str | None,
    default_effort: str = "medium",
    builtin_tools: dict[str, ToolNamespaceConfig] | None = None,
) -> Message:
    """The system message; built-in tools (browser, python) are declared here, as harmony places them."""
    content = SystemContent(
        reasoning_effort=ReasoningEffort(effort or default_effort),
        conversation_start_date=conversation_date(date_setting),
        tools=builtin_tools or None,
    )
    return Message.from_role(Role.SYSTEM, content)


def to_harmony(
    messages: Sequence[ChatMessage | Message],
    tools: list[Tool] | None,
    *,
    effort: str | None,
    date_setting: str | None,
    default_effort: str = "medium",
    response_format: ResponseFormat | None = None,
    builtin_tools: dict[str, ToolNamespaceConfig] | None = None,
) -> list[Message]:
    """The harmony conversation for a chat request (raises a 400 `APIError` for an inconsistent history).
    A `response_format` goes into the developer message's `# Response Formats`, where harmony tells the
    model the shape its answer must take; `builtin_tools` (the server-run browser and python namespaces)
    into the system message. A harmony `Message` in `messages` is taken as it is (a built-in tool's call or
    answer that an earlier turn of a Responses chain had)."""
    instructions = [
        m.text()
        for m in messages
        if isinstance(m, ChatMessage) and m.role in ("system", "developer") and m.text()
    ]
    out = [system_message(effort, date_setting, default_effort, builtin_tools)]
    namespace = None
    if tools:
        namespace = function_tools_namespace(
            [
                ToolDescription(t.function.name, t.function.description or "", t.function.parameters)
                for t in tools
            ]
        )
    if instructions or namespace or response_format:
        developer = DeveloperContent(
            instructions="\n\n".join(instructions) if instructions else None,
            tools=namespace,
            response_formats=[response_format] if response_format else [],
        )
        out.append(Message.from_role(Role.DEVELOPER, developer))

    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if m.role in ("system", "developer"):
            continue
        if m.role == "user":
            out.append(Message.from_role(Role.USER, m.text()))
        elif m.role == "assistant":
            reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
            if reasoning:
                out.append(Message.from_role(Role.ASSISTANT, reasoning, channel="analysis"))
            if m.tool_calls:
                if m.text():  # a preamble before the calls
                    out.append(Message.from_role(Role.ASSISTANT, m.text(), channel="commentary"))
                for call in m.tool_calls:
                    call_names[call.id] = call.function.name
                    out.append(
                        Message.from_role(
                            Role.ASSISTANT,
                            call.function.arguments,
                            channel="commentary",
                            recipient=FUNCTIONS_PREFIX + call.function.name,
                            content_type="<|constrain|>json",
                        )
                    )
            elif m.content is not None or m.refusal is not None or not reasoning:
                out.append(Message.from_role(Role.ASSISTANT, m.text(), channel="final"))
        else:  # tool, or the deprecated function result, which names its function
            by_id = call_names.get(m.tool_call_id or "")
            name = m.name if m.role == "function" else by_id or m.name
            if name is None:
                raise bad_request(
                    f"messages[{i}]: tool_call_id {m.tool_call_id!r} matches no earlier assistant tool call",
                    param=f"messages[{i}].tool_call_id",
                )
            out.append(
                Message(
                    Author(Role.TOOL, FUNCTIONS_PREFIX + name),
                    [TextContent(m.text())],
                    "commentary",
                    "assistant",
                )
            )
    return out


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class DeltaKind(StrEnum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_CALL_START = "tool_call_start"
    TOOL_CALL_ARGUMENTS = "tool_call_arguments"
    # A message to a tool the client did not offer: not sent at all (see `ChatOutputParser`).
    DROPPED = "dropped"
    # A call to a tool the server runs itself (`python`, `browser.search`): its start (`name` the recipient)
    # and its text (the code, or the JSON arguments).
    BUILTIN_CALL_START = "builtin_call_start"
    BUILTIN_CALL_ARGUMENTS = "builtin_call_arguments"


@dataclass(slots=True)
class Delta:
    kind: DeltaKind
    text: str = ""
    index: int = 0  # tool calls: their index among this choice's calls
    call_id: str = ""
    name: str = ""


@dataclass(slots=True)
class ToolCallOut:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ChatOutput:
    """What one choice said so far, and its deltas as they come."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    reasoning_tokens: int = 0
    anomalies: int = 0


class ChatOutputParser:
    """One per choice: feeds the sampled tokens to a tolerant harmony parser and sorts what comes out.

    A message to `functions.NAME`, NAME one of the `tools` the model was shown, is a tool call. A message to
    any other tool (a function that was not offered, or any ` to=` recipient: a built-in tool such as
    `browser.search` or `python`) is never a tool call: a client cannot run a tool it did not offer and
    would fail on its name, as OpenAI never returns one. On the analysis channel it is the model's reasoning
    like any other; anywhere else it is dropped (counted in `anomalies` and logged), since its text was
    written for that tool, not for the reader. Other messages are reasoning (analysis) or the answer (final,
    commentary preambles, and text the model wrote without a proper header), including those whose lone
    content type (`<|channel|>final <|constrain|>json`) the header reading takes for a recipient.

    `builtins` names the built-in tool namespaces the server runs for this request (`python`, `browser`): a
    message addressed ` to=python` or ` to=browser.FUNCTION` is then a built-in call, whatever its channel.
    """

    def __init__(
        self, encoding: tiktoken.Encoding, tools: Collection[str] = (), builtins: Collection[str] = ()
    ) -> None:
        self.parser = StreamParser(encoding, Role.ASSISTANT)
        self.output = ChatOutput()
        self.tools = frozenset(tools)
        self.builtins = frozenset(builtins)
        # By id() of the message header: the header (kept, so no later header can reuse its id), the call and
        # its index among this choice's calls.
        self._calls: dict[int, tuple[Header, ToolCallOut, int]] = {}
        # By id() of the header of each message dropped so far (kept for the same reason), logged once each.
        self._dropped: dict[int, Header] = {}

    def _kind_of(self, header: Header) -> DeltaKind:
        recipient = header.recipient or ""
        if header.addressed and recipient.split(".", 1)[0] in self.builtins:
            return DeltaKind.BUILTIN_CALL_ARGUMENTS
        to_function = recipient.startswith(FUNCTIONS_PREFIX)
        if to_function and recipient.removeprefix(FUNCTIONS_PREFIX) in self.tools:
            return DeltaKind.TOOL_CALL_ARGUMENTS
        if (to_function or (header.addressed and recipient != "all")) and header.channel != "analysis":
            return DeltaKind.DROPPED
        if header.channel == "analysis":
            return DeltaKind.REASONING
        return DeltaKind.CONTENT

    def feed(self, token: int) -> list[Delta]:
        parser = self.parser
        before = parser.current_header
        parser.process(token)
        deltas: list[Delta] = []
        after = parser.current_header
        if after is not None and after is not before:
            self._opened(after, deltas)
        for header, text in parser.deltas:
            if id(header) not in self._calls:
                self._opened(header, deltas)
            self._text(header, text, deltas)
        return deltas

    def finish(self) -> list[Delta]:
        """The stream ended: flush what the parser still holds."""
        self.parser.process_eos()
        deltas: list[Delta] = []
        for header, text in self.parser.deltas:
            self._text(header, text, deltas)
        self.output.anomalies = self.parser.anomalies + len(self._dropped)
        # Every token of an analysis message counts as reasoning: header, `<|message|>`, text and its end.
        self.output.reasoning_tokens = sum(
            len(p.header_tokens) + 1 + len(p.content_tokens) + (p.end_token is not None)
            for p in self.parser.parsed
            if p.message.channel == "analysis"
        )
        return deltas

    def _opened(self, header: Header, deltas: list[Delta]) -> None:
        kind = self._kind_of(header)
        if kind is DeltaKind.DROPPED and id(header) not in self._dropped:
            self._dropped[id(header)] = header
            logger.warning(
                "malformed harmony output: a message to %r, which is no tool the request offered; dropped",
                header.recipient,
            )
        if kind is DeltaKind.BUILTIN_CALL_ARGUMENTS and id(header) not in self._calls:
            builtin = ToolCallOut(new_call_id(), header.recipient or "")
            self._calls[id(header)] = (header, builtin, -1)
            deltas.append(Delta(DeltaKind.BUILTIN_CALL_START, call_id=builtin.id, name=builtin.name))
            return
        if kind is not DeltaKind.TOOL_CALL_ARGUMENTS or id(header) in self._calls:
            return
        call = ToolCallOut(new_call_id(), (header.recipient or "")[len(FUNCTIONS_PREFIX) :])
        index = len(self.output.tool_calls)
        self._calls[id(header)] = (header, call, index)
        self.output.tool_calls.append(call)
        deltas.append(Delta(DeltaKind.TOOL_CALL_START, index=index, call_id=call.id, name=call.name))

    def _text(self, header: Header, text: str, deltas: list[Delta]) -> None:
        kind = self._kind_of(header)
        if kind is DeltaKind.DROPPED:
            return
        if kind in (DeltaKind.TOOL_CALL_ARGUMENTS, DeltaKind.BUILTIN_CALL_ARGUMENTS):
            _, call, index = self._calls[id(header)]
            call.arguments += text
            deltas.append(Delta(kind, text, index=index, call_id=call.id, name=call.name))
        elif kind is DeltaKind.REASONING:
            self.output.reasoning.append(text)
            deltas.append(Delta(kind, text))
        else:
            self.output.content.append(text)
            deltas.append(Delta(kind, text))
