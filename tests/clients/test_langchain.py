"""LangChain's OpenAI chat model, through the Responses API (`use_responses_api=True`) and Chat Completions:
a tool call, the tool's result sent back, the answer; invoked and streamed."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.api.conftest import MODEL
from tests.clients.conftest import (
    ANSWER,
    ANSWER_REASONING,
    TOOL_NAME,
    TOOL_REASONING,
    ScriptedServer,
    tool_then_answer,
)


@tool
def get_weather(city: str) -> str:
    """Gets the current weather in a city."""
    return f"sunny in {city}"


def _reasoning(message: BaseMessage) -> list[str]:
    """The reasoning texts LangChain kept in a message's standard content blocks."""
    texts = []
    for block in message.content_blocks:  # type: ignore[attr-defined]
        if block["type"] == "reasoning":
            parts = block.get("extras", {}).get("content", [])
            texts.append(block.get("reasoning") or "".join(p["text"] for p in parts))
    return texts


def _stream(model: object, messages: list[BaseMessage]) -> AIMessageChunk:
    chunks = list(model.stream(messages))  # type: ignore[attr-defined]
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    return whole


@pytest.mark.parametrize("responses", [True, False], ids=["responses", "chat"])
def test_tool_call_then_answer(scripted: ScriptedServer, responses: bool) -> None:
    scripted.model.script = tool_then_answer
    llm = ChatOpenAI(
        model=MODEL, base_url=scripted.v1, api_key="unused", max_retries=0, use_responses_api=responses
    )
    model = llm.bind_tools([get_weather])
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Paris?")]

    call = model.invoke(messages)
    assert isinstance(call, AIMessage)
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [(TOOL_NAME, {"city": "Paris"})]
    messages += [
        call,
        ToolMessage(get_weather.invoke(call.tool_calls[0]["args"]), tool_call_id=call.tool_calls[0]["id"]),
    ]

    answer = model.invoke(messages)
    assert answer.text == ANSWER
    assert not answer.tool_calls
    streamed = _stream(model, messages)
    assert streamed.text == ANSWER
    assert not streamed.tool_calls
    if responses:
        # The Responses API hands LangChain the reasoning as items, which it keeps and sends back.
        assert _reasoning(call) == [TOOL_REASONING]
        assert _reasoning(answer) == [ANSWER_REASONING]
        sent = scripted.requests("/v1/responses")[1]["input"]
        assert [item["type"] for item in sent] == [
            "message",
            "reasoning",
            "function_call",
            "function_call_output",
        ]
    else:
        sent = scripted.requests("/v1/chat/completions")[1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] > 0


def test_streamed_tool_call(scripted: ScriptedServer) -> None:
    """LangChain rebuilds a tool call from streamed argument chunks (Chat Completions deltas with `index`)."""
    scripted.model.script = tool_then_answer
    llm = ChatOpenAI(model=MODEL, base_url=scripted.v1, api_key="unused", max_retries=0)
    call = _stream(llm.bind_tools([get_weather]), [HumanMessage("What is the weather in Paris?")])
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [(TOOL_NAME, {"city": "Paris"})]
    assert call.tool_calls[0]["id"]
