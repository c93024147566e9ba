"""Conversations to prompt token ids, exactly as the official harmony renderer produces them.

Tokens are produced piece by piece: every text piece (role, recipient, channel, each content item) is
tokenized on its own with `encode_ordinary`, and control tokens are inserted by id. Text that merely looks
like a special token (`<|end|>` typed by a user) therefore stays ordinary text, and the token boundaries are
the ones the model was trained on. Re-encoding the decoded prompt would not give the same ids in general.
"""

from __future__ import annotations

from collections.abc import Sequence

import tiktoken

from harmony import encoding as tok
from harmony.messages import (
    Content,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
    TextContent,
    ToolNamespaceConfig,
)
from harmony.schema import json_compact, json_schema_to_typescript

CONSTRAIN_MARKER = "<|constrain|>"


class RenderError(ValueError):
    """A conversation that cannot be rendered (for example a tool message without a name)."""


def rust_lines(text: str) -> list[str]:
    r"""Rust's `str::lines()`: lines end at `\n` or `\r\n`; a final empty piece is dropped, and a lone `\r`
    at the very end (not followed by `\n`) stays part of the last line."""
    pieces = text.split("\n")
    last = pieces.pop()
    lines = [p[:-1] if p.endswith("\r") else p for p in pieces]
    if last:
        lines.append(last)
    return lines


def tools_section(namespaces: dict[str, ToolNamespaceConfig]) -> str:
    """The `# Tools` section: namespaces sorted by key (byte order), tools in their given order."""
    parts = ["# Tools"]
    for key in sorted(namespaces, key=lambda k: k.encode()):
        namespace = namespaces[key]
        lines = [f"## {namespace.name}\n"]
        if namespace.description is not None:
            for line in rust_lines(namespace.description):
                lines.append(f"// {line}" if namespace.tools else line)
        if namespace.tools:
            lines.append(f"namespace {namespace.name} {{\n")
            for tool in namespace.tools:
                lines.extend(f"// {line}" for line in rust_lines(tool.description))
                if tool.parameters is not None:
                    signature = json_schema_to_typescript(tool.parameters, "")
                    lines.append(f"type {tool.name} = (_: {signature}) => any;\n")
                else:
                    lines.append(f"type {tool.name} = () => any;\n")
            lines.append(f"}} // namespace {namespace.name}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def system_text(content: SystemContent, conversation_has_function_tools: bool) -> str:
    sections = []
    top = []
    if content.model_identity is not None:
        top.append(content.model_identity)
    if content.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.conversation_start_date is not None:
        top.append(f"Current date: {content.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {content.reasoning_effort.value}")
    if content.tools:
        sections.append(tools_section(content.tools))
    config = content.channel_config
    if config is not None and config.valid_channels:
        channels = f"# Valid channels: {', '.join(config.valid_channels)}."
        if config.channel_required:
            channels += " Channel must be included for every message."
        if conversation_has_function_tools:
            channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(channels)
    return "\n\n".join(sections)


def developer_text(content: DeveloperContent) -> str:
    """Instructions, then tools, then response formats.

    The official library has no response formats; the layout here follows harmony's format description (a
    `# Response Formats` section at the end of the developer message, one `## name` per format, an optional
    `// description` line, then the schema as compact JSON).
    """
    sections = []
    if content.instructions is not None:
        sections += ["# Instructions", content.instructions]
    if content.tools:
        sections.append(tools_section(content.tools))
    if content.response_formats:
        formats = ["# Response Formats"]
        for fmt in content.response_formats:
            body = (
                ""
                if fmt.description is None
                else "".join(f"// {line}\n" for line in rust_lines(fmt.description))
            )
            formats += [f"## {fmt.name}", body + json_compact(fmt.schema)]
        sections.append("\n\n".join(formats))
    return "\n\n".join(sections)


def has_function_tools(messages: Sequence[Message]) -> bool:
    """Whether any developer message declares a non-empty `functions` namespace (sets the channel note)."""
    for message in messages:
        for item in message.content:
            if isinstance(item, DeveloperContent) and item.tools:
                functions = item.tools.get("functions")
                if functions is not None and functions.tools:
                    return True
    return False


class Renderer:
    """Renders messages with one `o200k_harmony` encoding. Stateless apart from the encoding."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self._encode = encoding.encode_ordinary

    def _content_text(self, item: Content, role: Role, conversation_has_function_tools: bool) -> str:
        if isinstance(item, TextContent):
            return item.text
        if isinstance(item, SystemContent):
            if role is not Role.SYSTEM:
                raise RenderError(f"SystemContent may only appear in system messages, found in {role.value}")
            return system_text(item, conversation_has_function_tools)
        if isinstance(item, DeveloperContent):
            if role is not Role.DEVELOPER:
                raise RenderError(
                    f"DeveloperContent may only appear in developer messages, found in {role.value}"
                )
            return developer_text(item)
        raise RenderError(f"unknown content item {type(item).__name__}")

    def render_message(self, message: Message, *, conversation_has_function_tools: bool = False) -> list[int]:
        """One message: `<|start|>{header}<|message|>{content}<|end|>` (or `<|call|>` for a tool call)."""
        encode = self._encode
        role = message.author.role
        tokens = [tok.START]
        if role is Role.TOOL:
            if message.author.name is None:
                raise RenderError("a tool message needs the tool's name as its author name")
            tokens += encode(message.author.name)
        else:
            tokens += encode(role.value)
            if message.author.name is not None:
                tokens += encode(":" + message.author.name)
        if message.recipient is not None and message.recipient != "all":
            tokens += encode(" to=" + message.recipient)
        if message.channel is not None:
            tokens.append(tok.CHANNEL)
            tokens += encode(message.channel)
        if message.content_type is not None:
            if message.content_type.startswith(CONSTRAIN_MARKER):
                tokens += encode(" ")
                tokens.append(tok.CONSTRAIN)
                rest = message.content_type[len(CONSTRAIN_MARKER) :]
                if rest:
                    tokens += encode(rest)
            else:
                tokens += encode(" " + message.content_type)
        tokens.append(tok.MESSAGE)
        for item in message.content:
            tokens += encode(self._content_text(item, role, conversation_has_function_tools))
        # A recipient (even "all", which is not printed) makes an assistant message a call.
        tokens.append(tok.CALL if role is Role.ASSISTANT and message.recipient is not None else tok.END)
        return tokens

    def render_conversation(
        self, messages: Sequence[Message], *, auto_drop_analysis: bool = True
    ) -> list[int]:
        """All messages, dropping analysis that a final answer has superseded.

        The rule, as upstream: when the last assistant message is on the final channel, analysis messages
        (of any role) before the first final-channel message are dropped. Analysis after that first final
        message, commentary, tool calls and tool results are kept.
        """
        function_tools = has_function_tools(messages)
        first_final = None
        if auto_drop_analysis:
            last_assistant = next((m for m in reversed(messages) if m.author.role is Role.ASSISTANT), None)
            if last_assistant is not None and last_assistant.channel == "final":
                first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
        tokens: list[int] = []
        for i, message in enumerate(messages):
            if first_final is not None and i < first_final and message.channel == "analysis":
                continue
            tokens += self.render_message(message, conversation_has_function_tools=function_tools)
        return tokens

    def render_for_completion(
        self,
        messages: Sequence[Message],
        next_role: Role = Role.ASSISTANT,
        *,
        auto_drop_analysis: bool = True,
    ) -> list[int]:
        """The prompt for sampling the next message: the conversation, then `<|start|>{next_role}`."""
        tokens = self.render_conversation(messages, auto_drop_analysis=auto_drop_analysis)
        tokens.append(tok.START)
        tokens += self._encode(next_role.value)
        return tokens

    def render_for_training(
        self, messages: Sequence[Message], *, auto_drop_analysis: bool = True
    ) -> list[int]:
        """The conversation as a training example: a trailing final answer ends in `<|return|>`."""
        tokens = self.render_conversation(messages, auto_drop_analysis=auto_drop_analysis)
        if messages and messages[-1].author.role is Role.ASSISTANT and messages[-1].channel == "final":
            # Whatever ended it (`<|call|>` too, for a final message with a recipient), as upstream.
            tokens[-1] = tok.RETURN
        return tokens
