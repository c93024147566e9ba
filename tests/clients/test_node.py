"""The JavaScript clients, run by Node.js from tests/clients/node (packages pinned in its package-lock.json): the
Vercel AI SDK (`ai` + `@ai-sdk/openai`, both its Chat Completions and Responses providers, generateText and
streamText) and the OpenAI Agents SDK for JavaScript (`@openai/agents`). Each script runs a one-tool agent
against the server and prints what the SDK returned, which the test checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import MODEL
from tests.clients.conftest import (
    ANSWER,
    ANSWER_REASONING,
    TOOL_NAME,
    TOOL_REASONING,
    ScriptedServer,
    run_node,
    tool_then_answer,
)


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_ai_sdk(scripted: ScriptedServer, node_modules: Path, api: str, mode: str) -> None:
    scripted.model.script = tool_then_answer
    result = run_node("ai_sdk.mjs", scripted.v1, MODEL, api, mode)

    assert result["executed"] == [{"city": "Paris"}]
    assert result["toolCalls"] == [{"name": TOOL_NAME, "input": {"city": "Paris"}}]
    assert result["text"] == ANSWER
    assert result["finishReason"] == "stop"
    assert result["steps"] == 2
    assert result["outputTokens"] > 0
    if api == "responses":
        # The AI SDK sends the first turn's reasoning and tool call back as references to the stored response's
        # items (its default), which the server resolves. (It reads reasoning only from `summary` parts, which
        # gpt-oss's raw reasoning does not fill, so its `reasoningText` stays empty.)
        _, second = scripted.requests("/v1/responses")
        assert "previous_response_id" not in second
        kinds = [item.get("type", "message") for item in second["input"]]
        assert kinds == ["message", "item_reference", "item_reference", "function_call_output"]
        assert [item["id"][:3] for item in second["input"][1:3]] == ["rs_", "fc_"]
    else:
        assert len(scripted.requests("/v1/chat/completions")) == 2


@pytest.mark.parametrize("mode", ["plain", "stream"])
@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_js(scripted: ScriptedServer, node_modules: Path, api: str, mode: str) -> None:
    scripted.model.script = tool_then_answer
    result = run_node("agents.mjs", scripted.v1, MODEL, api, mode)

    assert result["executed"] == [{"city": "Paris"}]
    assert result["toolCalls"] == [{"name": TOOL_NAME, "arguments": {"city": "Paris"}}]
    assert result["finalOutput"] == ANSWER
    assert "tool_call_output_item" in result["items"]
    assert result["items"][-1] == "message_output_item"
    # What gpt-oss's compatibility test requires of the raw model output (non-streamed: a streamed run keeps
    # no raw responses), and of the raw stream events.
    if mode == "plain":
        assert result["reasoning"] == [TOOL_REASONING, ANSWER_REASONING]
    else:
        assert result["streamedReasoning"] == TOOL_REASONING + ANSWER_REASONING
    path = "/v1/responses" if api == "responses" else "/v1/chat/completions"
    assert len(scripted.requests(path)) == 2
