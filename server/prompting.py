"""What the chat and Responses services share: rendering a conversation and budgeting the output."""

from __future__ import annotations

from harmony.render import Renderer
from server.errors import APIError, bad_request
from server.harmony_chat import to_harmony
from server.protocol import ChatMessage, Tool
from server.settings import ServerSettings


def render_prompt(
    renderer: Renderer,
    settings: ServerSettings,
    messages: list[ChatMessage],
    tools: list[Tool] | None,
    effort: str | None,
    *,
    param: str,
) -> list[int]:
    """The prompt ids for a conversation; a history that cannot be rendered is a 400 naming `param`."""
    conversation = to_harmony(
        messages,
        tools or None,
        effort=effort,
        date_setting=settings.conversation_date,
        default_effort=settings.default_reasoning_effort,
    )
    try:
        return renderer.render_for_completion(conversation)
    except ValueError as error:
        raise bad_request(f"the conversation cannot be rendered: {error}", param=param) from error


def output_budget(
    prompt_len: int, requested: int | None, max_model_len: int, *, prompt_param: str, tokens_param: str
) -> int:
    """The output token limit: what was asked for, or all the context left; 400 `context_length_exceeded`
    when the prompt leaves no room or the request asks for more than is left."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens; this model's context is {max_model_len} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"the prompt ({prompt_len} tokens) plus {tokens_param} ({requested}) exceeds this model's "
            f"context of {max_model_len} tokens",
            param=tokens_param,
            code="context_length_exceeded",
        )
    return requested or room


def check_sizes(settings: ServerSettings, messages: int, tools: int, *, messages_param: str) -> None:
    """The per-request limits on messages (or input items) and tools."""
    if messages > settings.max_messages:
        raise bad_request(
            f"at most {settings.max_messages} messages per request, got {messages}", messages_param
        )
    if tools > settings.max_tools:
        raise bad_request(f"at most {settings.max_tools} tools per request, got {tools}", "tools")
