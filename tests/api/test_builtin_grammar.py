"""The turn grammar with the built-in tools on, through the real app and engine: python and the browser stay
callable when a grammar is active (a response format, a budget), a Responses `tool_choice` naming a built-in
tool forces a call to it (reasoning allowed first), and `allowed_tools` may list them. Scripts forced through
`test_force` pass the grammar's masks, so a scripted turn the grammar refuses fails instead of running."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import MODEL, Served
from tests.api.test_builtin_tools import PYTHON_TOOL, call, create, final, tooled

__all__ = ["tooled"]  # the fixture, shared with the built-in tools' own tests

ANSWER = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
    "additionalProperties": False,
}
JSON_ANSWER = {"format": {"type": "json_schema", "name": "n", "schema": ANSWER, "strict": True}}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
REASONING = "<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant"


def refuse(served: Served, scripts: list[str], **fields: Any) -> None:
    """The scripted turn cannot be sampled: the grammar's mask leaves no token the script forces."""
    with pytest.raises(openai.InternalServerError, match="no token can be sampled"):
        create(served, scripts, **fields)


def test_a_response_format_leaves_python_callable(tooled: Served) -> None:
    response = create(
        tooled,
        [call("python", "print(2 + 3)"), final('{"n": 5}')],
        text=JSON_ANSWER,
        include=["code_interpreter_call.outputs"],
    )
    assert response.status == "completed", response.error
    assert [item.type for item in response.output] == ["code_interpreter_call", "message"]
    assert response.output[0].outputs[0].logs.strip() == "5"
    assert json.loads(response.output_text) == {"n": 5}


def test_a_tool_choice_naming_code_interpreter_forces_a_python_call_after_reasoning(tooled: Served) -> None:
    forced = create(
        tooled,
        [REASONING + call("python", "print(6 * 7)"), final("42.")],
        tool_choice={"type": "code_interpreter"},
        tools=[PYTHON_TOOL, WEATHER],
        include=["code_interpreter_call.outputs"],
    )
    assert forced.status == "completed", forced.error
    assert [item.type for item in forced.output] == ["reasoning", "code_interpreter_call", "message"]
    assert forced.output[1].outputs[0].logs.strip() == "42"
    assert forced.tool_choice.type == "code_interpreter"
    # Once the call is made nothing is forced: the turn answers. An answer without the call is refused, and
    # so is a call to the function the choice did not name.
    for script in (
        [final("No call.")],
        ['<|channel|>commentary to=functions.get_weather<|message|>{"city": "Oslo"}<|call|>'],
    ):
        refuse(tooled, script, tool_choice={"type": "code_interpreter"}, tools=[PYTHON_TOOL, WEATHER])


def test_a_tool_choice_naming_web_search_forces_a_browser_call(tooled: Served) -> None:
    search = '<|channel|>analysis to=browser.search code<|message|>{"query": "borrowing"}<|call|>'
    for kind in ("web_search", "web_search_preview"):
        response = create(
            tooled,
            [search, final("Found it.")],
            tools=[{"type": kind}, PYTHON_TOOL],
            tool_choice={"type": kind},
        )
        assert response.status == "completed", response.error
        assert [item.type for item in response.output] == ["web_search_call", "message"]
        assert response.output[0].action.query == "borrowing"
        # python is not what the choice named.
        refuse(
            tooled,
            [call("python", "print(1)")],
            tools=[{"type": kind}, PYTHON_TOOL],
            tool_choice={"type": kind},
        )


def test_allowed_tools_may_list_built_in_tools(tooled: Served) -> None:
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "code_interpreter"}]}
    ran = create(
        tooled, [call("python", "print(1)"), final("One.")], tools=[PYTHON_TOOL, WEATHER], tool_choice=allowed
    )
    assert ran.status == "completed", ran.error
    assert [item.type for item in ran.output] == ["code_interpreter_call", "message"]
    only_functions = {
        "type": "allowed_tools",
        "mode": "auto",
        "tools": [{"type": "function", "name": "get_weather"}],
    }
    refuse(tooled, [call("python", "print(1)")], tools=[PYTHON_TOOL, WEATHER], tool_choice=only_functions)


@pytest.mark.parametrize(
    ("tool_choice", "param"),
    [
        ({"type": "code_interpreter"}, "tool_choice"),
        ({"type": "web_search_preview"}, "tool_choice"),
        (
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]},
            "tool_choice.tools[0].type",
        ),
    ],
)
def test_a_choice_naming_a_built_in_tool_not_enabled_is_a_400(
    tooled: Served, tool_choice: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "input": "Hi", "tools": [WEATHER], "tool_choice": tool_choice}
    response = httpx.post(tooled.base_url + "/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
