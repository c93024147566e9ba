"""Render, then parse: the assistant's messages come back as they went in, for every scenario."""

from __future__ import annotations

import pytest
import tiktoken

from harmony.messages import Message, Role, TextContent
from harmony.parser import parse_completion_tokens
from harmony.render import Renderer
from tests.harmony.scenarios import SCENARIOS


def _round_trippable(message: Message) -> bool:
    """Headers that do not read back as written, by our parser or the official one, are left out."""
    return (
        message.author.role is Role.ASSISTANT
        and message.recipient != "all"  # "all" is not printed
        and message.channel != ""  # `<|channel|>` with no value does not parse
        and " " not in (message.content_type or "")  # `<|constrain|> json` (a space) reads back as `json`
        # A content type without a recipient reads back as the recipient (a lone header word is a recipient).
        and (message.content_type is None or message.recipient is not None)
    )


def _as_parsed(message: Message) -> Message:
    """Parsers produce one text item per message."""
    return Message(
        message.author, [TextContent(message.text)], message.channel, message.recipient, message.content_type
    )


SPEAKING = sorted(name for name, build in SCENARIOS.items() if any(_round_trippable(m) for m in build()))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", SPEAKING)
def test_assistant_messages_round_trip(
    name: str, strict: bool, enc: tiktoken.Encoding, renderer: Renderer
) -> None:
    messages = [m for m in SCENARIOS[name]() if _round_trippable(m)]
    # The completion starts after `<|start|>assistant`, as when the model generates it.
    tokens = renderer.render_conversation(messages, auto_drop_analysis=False)[2:]
    assert parse_completion_tokens(enc, tokens, Role.ASSISTANT, strict=strict) == [
        _as_parsed(m) for m in messages
    ]


def _tool_results(name: str) -> list[Message]:
    """Tool results with a recipient: without one the header is a lone name, which reads as an unknown role."""
    return [m for m in SCENARIOS[name]() if m.author.role is Role.TOOL and m.recipient is not None]


ANSWERING = sorted(name for name in SCENARIOS if _tool_results(name))


@pytest.mark.parametrize("name", ANSWERING)
def test_tool_results_round_trip(name: str, enc: tiktoken.Encoding, renderer: Renderer) -> None:
    results = _tool_results(name)
    tokens = renderer.render_conversation(results)
    assert parse_completion_tokens(enc, tokens, None, strict=True) == [_as_parsed(m) for m in results]


def test_the_round_trip_covers_the_assistant_scenarios() -> None:
    assert {"weather_tool_loop", "python_call", "browser_call", "keep_analysis_between_finals"} <= set(
        SPEAKING
    )
    assert {"weather_tool_loop", "python_call", "browser_call"} <= set(ANSWERING)
