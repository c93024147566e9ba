"""LiteLLM's `completion` with the `openai/` model prefix and `api_base`: the OpenAI-compatible route most
LiteLLM users take to a self-hosted server. A tool call, the answer with reasoning, non-streamed and streamed."""

from __future__ import annotations

import json
from typing import Any

import litellm
import pytest

from tests.api.conftest import MODEL
from tests.clients.conftest import ANSWER, ANSWER_REASONING, TOOL_NAME, ScriptedServer, tool_then_answer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "Gets the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
# LiteLLM's own pydantic models warn about TypedDict qualifiers as they are built: nothing about the server.
pytestmark = pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning")
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _complete(base: str, messages: list[dict[str, Any]], stream: bool) -> Any:
    kwargs = {"model": "openai/" + MODEL, "api_base": base, "api_key": "unused", "messages": messages}
    response = litellm.completion(**kwargs, tools=TOOLS, stream=stream)
    if not stream:
        return response
    return litellm.stream_chunk_builder(list(response), messages=messages)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_tool_call_then_answer(scripted: ScriptedServer, stream: bool) -> None:
    scripted.model.script = tool_then_answer
    first = _complete(scripted.v1, QUESTION, stream).choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.function.name == TOOL_NAME
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id

    # LiteLLM keeps the response message's fields it has no name for (here `reasoning`) in
    # `provider_specific_fields`, and sends them back with the message on the next turn.
    history = [
        *QUESTION,
        first.message,  # as LiteLLM's tool-calling guide does: the returned message, appended as it is
        {"role": "tool", "tool_call_id": call.id, "content": "sunny in Paris"},
    ]
    answer = _complete(scripted.v1, history, stream)
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    # LiteLLM maps the server's `reasoning` onto its own `reasoning_content`.
    assert answer.choices[0].message.reasoning_content == ANSWER_REASONING
    assert answer.usage.completion_tokens > 0
