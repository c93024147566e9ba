"""The OpenAI Agents SDK (Python): a one-tool agent through the Responses and the Chat Completions models,
streamed and not. The model calls the tool, the SDK runs it and sends its result back, the model answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents import (
    Agent,
    ItemHelpers,
    Model,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from agents.items import ReasoningItem, ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI

from tests.api.conftest import MODEL
from tests.clients.conftest import ANSWER, TOOL_NAME, ScriptedServer, tool_then_answer

PROMPT = "What is the weather in Paris?"


def _model(kind: str, base_url: str) -> Model:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    if kind == "responses":
        return OpenAIResponsesModel(model=MODEL, openai_client=client)
    return OpenAIChatCompletionsModel(model=MODEL, openai_client=client)


async def _run(
    kind: str, base_url: str, streamed: bool, chain: bool = False
) -> tuple[Any, list[dict[str, str]]]:
    calls: list[dict[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Gets the current weather in a city."""
        calls.append({"city": city})
        return f"sunny in {city}"

    agent = Agent(
        name="weather",
        instructions="Answer with the tool's help.",
        tools=[get_weather],
        model=_model(kind, base_url),
        model_settings=ModelSettings(temperature=0.0),
    )
    options: dict[str, Any] = {"run_config": RunConfig(tracing_disabled=True), "max_turns": 4}
    if chain:
        options["auto_previous_response_id"] = True
    if not streamed:
        return await Runner.run(agent, PROMPT, **options), calls
    result = Runner.run_streamed(agent, PROMPT, **options)
    async for _ in result.stream_events():
        pass
    return result, calls


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_tool_agent(scripted: ScriptedServer, kind: str, streamed: bool) -> None:
    scripted.model.script = tool_then_answer
    result, calls = asyncio.run(_run(kind, scripted.v1, streamed))

    assert calls == [{"city": "Paris"}]
    assert result.final_output == ANSWER
    tool_calls = [item for item in result.new_items if isinstance(item, ToolCallItem)]
    assert [call.raw_item.name for call in tool_calls] == [TOOL_NAME]  # type: ignore[union-attr]
    outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert [o.output for o in outputs] == ["sunny in Paris"]
    assert ItemHelpers.text_message_outputs(result.new_items) == ANSWER
    if kind == "responses":
        # The Responses model keeps the model's reasoning as items (the chat model has no such item).
        assert any(isinstance(item, ReasoningItem) for item in result.new_items)
    # Two model calls: the tool call, then the answer with the tool's output in the conversation.
    path = "/v1/responses" if kind == "responses" else "/v1/chat/completions"
    sent = scripted.requests(path)
    assert len(sent) == 2
    assert all(body.get("stream", False) is streamed for body in sent)


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_tool_agent_chained_by_previous_response_id(scripted: ScriptedServer, streamed: bool) -> None:
    """With `auto_previous_response_id` the SDK's second turn sends only the tool's output and the first
    response's id: the server rebuilds the conversation (reasoning and tool call included) from its store."""
    scripted.model.script = tool_then_answer
    result, calls = asyncio.run(_run("responses", scripted.v1, streamed, chain=True))

    assert calls == [{"city": "Paris"}]
    assert result.final_output == ANSWER
    first, second = scripted.requests("/v1/responses")
    assert "previous_response_id" not in first
    assert second["previous_response_id"].startswith("resp_")
    assert [item["type"] for item in second["input"]] == ["function_call_output"]
    assert result.last_response_id is not None
    assert result.last_response_id != second["previous_response_id"]
