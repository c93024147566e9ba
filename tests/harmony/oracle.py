"""Our harmony types as the official `openai-harmony` package's, and back: the tests compare against it, and
benchmarks/harmony_bench.py times what a caller holding our messages would pay to use it."""

from __future__ import annotations

from collections.abc import Sequence

import openai_harmony as oh

from harmony.messages import (
    Author,
    ChannelConfig,
    Content,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
    TextContent,
    ToolNamespaceConfig,
)


def _namespaces(tools: dict[str, ToolNamespaceConfig] | None) -> dict[str, oh.ToolNamespaceConfig] | None:
    if tools is None:
        return None
    return {
        key: oh.ToolNamespaceConfig(
            name=ns.name,
            description=ns.description,
            tools=[
                oh.ToolDescription(name=t.name, description=t.description, parameters=t.parameters)
                for t in ns.tools
            ],
        )
        for key, ns in tools.items()
    }


def _channel_config(config: ChannelConfig | None) -> oh.ChannelConfig | None:
    if config is None:
        return None
    return oh.ChannelConfig(
        valid_channels=list(config.valid_channels), channel_required=config.channel_required
    )


def _content(item: Content) -> oh.Content:
    if isinstance(item, TextContent):
        return oh.TextContent(text=item.text)
    if isinstance(item, SystemContent):
        return oh.SystemContent(
            model_identity=item.model_identity,
            reasoning_effort=None
            if item.reasoning_effort is None
            else oh.ReasoningEffort(item.reasoning_effort.title()),
            knowledge_cutoff=item.knowledge_cutoff,
            conversation_start_date=item.conversation_start_date,
            channel_config=_channel_config(item.channel_config),
            tools=_namespaces(item.tools),
        )
    assert isinstance(item, DeveloperContent)
    # The oracle has no response formats; tests that use them compare against a TextContent instead.
    assert not item.response_formats
    return oh.DeveloperContent(instructions=item.instructions, tools=_namespaces(item.tools))


def to_oracle(message: Message) -> oh.Message:
    """The same message as an `openai-harmony` object."""
    return oh.Message(
        author=oh.Author(role=oh.Role(message.author.role.value), name=message.author.name),
        content=[_content(c) for c in message.content],
        channel=message.channel,
        recipient=message.recipient,
        content_type=message.content_type,
    )


def oracle_conversation(messages: Sequence[Message]) -> oh.Conversation:
    return oh.Conversation.from_messages([to_oracle(m) for m in messages])


def from_oracle(message: oh.Message) -> Message:
    """An oracle-parsed message back in our types (text content only, as parsers produce)."""
    assert all(isinstance(c, oh.TextContent) for c in message.content)
    return Message(
        Author(Role(message.author.role.value), message.author.name),
        [TextContent(c.text) for c in message.content],
        message.channel,
        message.recipient,
        message.content_type,
    )
