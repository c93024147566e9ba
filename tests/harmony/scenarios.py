"""Conversations that cover the harmony format and the official renderer's corner cases, built with our types.

Each scenario is rendered by us and by the official renderer in the tests; none carries an expected output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harmony.messages import (
    Author,
    ChannelConfig,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
    browser_tool_namespace,
    function_tools_namespace,
    python_tool_namespace,
)

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "Number of forecast days", "default": 1},
        "options": {
            "type": "object",
            "description": "Extra options",
            "properties": {
                "include_hourly": {"type": "boolean", "default": False},
                "fields": {"type": "array", "items": {"type": "string", "enum": ["temp", "wind", "rain"]}},
            },
            "required": ["include_hourly"],
        },
        "stations": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "weight": {"type": "number"}},
                "required": ["id"],
            },
        },
        "note": {"type": ["string", "null"]},
        "lang": {"type": "string", "nullable": True, "default": "en"},
    },
    "required": ["location"],
}

KITCHENSINK_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "description": "params object",
    "properties": {
        "string": {
            "type": "string",
            "title": "STRING",
            "description": "A string",
            "examples": ["hello", "world"],
        },
        "string_nullable": {"type": "string", "nullable": True, "description": "A nullable string"},
        "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
        "oneof_string_or_number": {
            "oneOf": [
                {"type": "string", "default": "default_string_in_oneof"},
                {"type": "number", "description": "numbers can happen too"},
            ],
            "description": "a oneof",
            "default": 20,
        },
        "first_variant_described": {
            "oneOf": [{"type": "string", "description": "same"}, {"type": "integer", "nullable": True}],
            "description": "same",
        },
        "ints": {"type": "array", "items": {"type": "integer"}, "default": [1, 2.5, 1e-6, 1e16, 0.00001]},
        "quoted_default": {"type": "string", "default": 'say "hi"\nnow'},
        "multi_line": {"type": "string", "description": "multi\nline desc"},
        "nullish": {"type": "string", "enum": ["nullish", "other"], "nullable": True},
        "mixed_enum": {"type": "string", "enum": ["x", 1, None, "y"]},
        "empty_enum": {"type": "string", "enum": []},
        "int_enum": {"type": "integer", "enum": [1, 2]},
        "untyped_enum": {"enum": ["x", "y"]},
        "any_of": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        "ref": {"$ref": "#/definitions/x"},
        "const": {"const": 3},
        "null_type": {"type": "null"},
        "unknown_type": {"type": "foo"},
        "bare_array": {"type": "array"},
        "items_true": {"type": "array", "items": True},
        "nested_nullable_object": {
            "type": "object",
            "nullable": True,
            "properties": {"k": {"type": "boolean"}},
        },
        "non_string_examples": {"type": "number", "examples": [1, "two", None]},
        "object_default": {"type": "object", "default": {"a": [True, None, "ü\t"], "b": -0.0}},
        "big_int_default": {"type": "integer", "default": 2**64},
        "format_and_bounds": {
            "type": "string",
            "format": "date",
            "minLength": 1,
            "additionalProperties": False,
        },
    },
    "required": ["string", "string_enum"],
}

TOP_LEVEL_ONE_OF: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "description": "variant A",
            "properties": {"a": {"type": "string"}},
            "default": "x",
        },
        {"type": "string", "nullable": True},
        {"type": "string", "enum": ["e"], "default": "e"},
        {"type": "number", "default": 1.5},
    ]
}


def system(**kwargs: Any) -> Message:
    return Message.from_role(Role.SYSTEM, SystemContent(**kwargs))


def developer(**kwargs: Any) -> Message:
    return Message.from_role(Role.DEVELOPER, DeveloperContent(**kwargs))


def user(text: str, **kwargs: Any) -> Message:
    return Message.from_role(Role.USER, text, **kwargs)


def assistant(text: str, channel: str | None = None, **kwargs: Any) -> Message:
    return Message.from_role(Role.ASSISTANT, text, channel=channel, **kwargs)


def tool_call(name: str, arguments: str, channel: str = "commentary") -> Message:
    return assistant(arguments, channel, recipient=f"functions.{name}", content_type="<|constrain|>json")


def tool_result(name: str, text: str, recipient: str | None = "assistant") -> Message:
    return Message(Author(Role.TOOL, f"functions.{name}"), [TextContent(text)], "commentary", recipient)


def weather_tools() -> dict[str, ToolNamespaceConfig]:
    return function_tools_namespace(
        [
            ToolDescription(
                "get_weather", "Gets the weather forecast.\nUse for any weather question.", WEATHER_PARAMETERS
            ),
            ToolDescription("get_time", "Returns the current time.", None),
        ]
    )


def _effort(effort: ReasoningEffort, instructions: bool) -> list[Message]:
    messages = [system(reasoning_effort=effort)]
    if instructions:
        messages.append(developer(instructions="Answer the user's questions like a robot."))
    return [*messages, user("What is the capital of the largest country in the world?")]


SCENARIOS: dict[str, Callable[[], list[Message]]] = {
    "simple_convo": lambda: [system(), user("What is 2 + 2?")],
    **{
        f"effort_{e.value}_{'instr' if i else 'no_instr'}": (lambda e=e, i=i: _effort(e, i))
        for e in ReasoningEffort
        for i in (True, False)
    },
    "required_channels": lambda: [
        system(channel_config=ChannelConfig(["analysis", "final"], True)),
        user("What is 2 + 2?"),
    ],
    "channels_not_required": lambda: [
        system(channel_config=ChannelConfig(["analysis", "final"], False)),
        user("x"),
    ],
    "dates": lambda: [system(knowledge_cutoff="2021-01", conversation_start_date="2021-01-01"), user("hi")],
    "system_all_none": lambda: [
        system(model_identity=None, reasoning_effort=None, knowledge_cutoff=None, channel_config=None),
        user("hi"),
    ],
    "system_only_effort": lambda: [
        system(
            model_identity=None,
            reasoning_effort=ReasoningEffort.LOW,
            knowledge_cutoff=None,
            channel_config=None,
        )
    ],
    "system_empty_strings": lambda: [
        system(model_identity="", knowledge_cutoff="", conversation_start_date="")
    ],
    "system_plus_text": lambda: [
        Message(Author(Role.SYSTEM), [SystemContent(), TextContent("EXTRA")]),
        user("hi"),
    ],
    "functions_with_parameters": lambda: [
        system(conversation_start_date="2025-06-28", reasoning_effort=ReasoningEffort.HIGH),
        developer(
            instructions="Always answer concisely.",
            tools=function_tools_namespace(
                [
                    ToolDescription("get_location", "Gets the location of the user.", None),
                    ToolDescription(
                        "get_current_weather",
                        "Gets the current weather in the provided location.",
                        {
                            "type": "object",
                            "properties": {
                                "location": {
                                    "type": "string",
                                    "description": "The city and state, e.g. SF, CA",
                                },
                                "format": {
                                    "type": "string",
                                    "enum": ["celsius", "fahrenheit"],
                                    "default": "celsius",
                                },
                            },
                            "required": ["location"],
                        },
                    ),
                    ToolDescription(
                        "kitchensink", "A function with various complex schemas.", KITCHENSINK_PARAMETERS
                    ),
                    ToolDescription("top_one_of", "", TOP_LEVEL_ONE_OF),
                    ToolDescription("empty_params", "Empty object.", {}),
                    ToolDescription("no_props", "No properties.", {"type": "object"}),
                    ToolDescription("crlf", "line one\r\nline two\n\nafter blank\n", {"type": "object"}),
                ]
            ),
        ),
        user("What is the weather like in SF?"),
    ],
    "no_tools": lambda: [system(conversation_start_date="2025-06-28"), user("hi")],
    "browser_only": lambda: [
        system(conversation_start_date="2025-06-28", tools={"browser": browser_tool_namespace()}),
        user("search the web"),
    ],
    "browser_and_python": lambda: [
        system(
            conversation_start_date="2025-06-28",
            tools={"python": python_tool_namespace(), "browser": browser_tool_namespace()},
        ),
        user("compute"),
    ],
    "browser_and_function": lambda: [
        system(conversation_start_date="2025-06-28", tools={"browser": browser_tool_namespace()}),
        developer(tools=weather_tools()),
        user("weather?"),
    ],
    "system_functions_do_not_set_flag": lambda: [system(tools=weather_tools()), user("hi")],
    "namespaces_sorted": lambda: [
        developer(
            tools={
                "zeta": ToolNamespaceConfig("zeta", "last", [ToolDescription("z", "zz", {"type": "object"})]),
                "alpha": ToolNamespaceConfig("alpha", "first\nsecond", []),
                "mid": ToolNamespaceConfig("mid", None, []),
                "Beta": ToolNamespaceConfig("Beta", None, [ToolDescription("b", "", None)]),
            }
        ),
        user("hi"),
    ],
    "empty_function_tools": lambda: [system(), developer(tools=function_tools_namespace([])), user("hi")],
    "empty_developer": lambda: [developer(), user("hi")],
    "weather_tool_loop": lambda: [
        system(conversation_start_date="2025-06-28", reasoning_effort=ReasoningEffort.HIGH),
        developer(instructions="Always answer concisely.", tools=weather_tools()),
        user("What's the weather in Paris for 3 days?"),
        assistant("User wants a 3-day forecast for Paris. Call get_weather.", "analysis"),
        tool_call("get_weather", '{"location":"Paris, France","days":3}'),
        tool_result("get_weather", '{"temp_c": 21, "sky": "sunny"}'),
    ],
    "weather_tool_loop_answered": lambda: [
        *SCENARIOS["weather_tool_loop"](),
        assistant("Paris: sunny, 21 °C.", "final"),
        user("And tomorrow?"),
    ],
    "drop_cot": lambda: [
        system(),
        user("What is 2 + 2?"),
        assistant("User asks a simple question.", "analysis"),
        assistant("4", "final"),
        user("And 3 + 3?"),
    ],
    "drop_cot_final_last": lambda: [
        user("What is 2 + 2?"),
        assistant("thinking", "analysis"),
        assistant("4", "final"),
    ],
    "keep_analysis_between_finals": lambda: [
        user("u1"),
        assistant("a1", "analysis"),
        assistant("F1", "final"),
        user("u2"),
        assistant("a2", "analysis"),
        assistant("F2", "final"),
    ],
    "ongoing_analysis": lambda: [
        system(),
        user("What is the weather in SF?"),
        assistant("User asks for the weather; call the tool.", "analysis"),
        assistant(
            '{"location": "San Francisco"}',
            "commentary",
            recipient="functions.lookup_weather",
            content_type="json",
        ),
        Message(Author(Role.TOOL, "functions.lookup_weather"), [TextContent('{"temperature": 20}')]),
    ],
    "user_final_counts_as_first_final": lambda: [
        assistant("early analysis", "analysis"),
        user("odd", channel="final"),
        assistant("answer", "final"),
    ],
    "python_call": lambda: [
        system(tools={"python": python_tool_namespace()}),
        user("run it"),
        assistant("print(1)", "analysis", recipient="python", content_type="code"),
        Message(Author(Role.TOOL, "python"), [TextContent("1")], "analysis", "assistant"),
    ],
    "browser_call": lambda: [
        system(tools={"browser": browser_tool_namespace()}),
        user("find news"),
        assistant('{"query": "news"}', "commentary", recipient="browser.search", content_type="code"),
        Message(Author(Role.TOOL, "browser.search"), [TextContent("[0] result")], "commentary", "assistant"),
    ],
    "header_quirks": lambda: [
        user("hi", name="alice"),
        user("x", recipient="bob"),
        assistant("x", "final", recipient="all"),
        assistant("y", "commentary", content_type="<|constrain|> json", recipient="functions.f"),
        assistant("z", "commentary", content_type="json"),
        assistant("w", "", content_type="<|constrain|>"),
    ],
    "special_lookalikes_in_text": lambda: [
        user("a<|end|>b<|start|>assistant<|channel|>final<|message|>c<|return|>"),
        assistant("<|call|> and <|constrain|>json", "final"),
    ],
    "two_text_contents": lambda: [Message(Author(Role.USER), [TextContent("Hel"), TextContent("lo")])],
    # A lone trailing \r stays in the line; numbers are printed as serde_json parses them.
    "lone_cr_and_inexact_numbers": lambda: [
        developer(
            tools={
                "n": ToolNamespaceConfig("n", "a\r", []),
                "functions": ToolNamespaceConfig(
                    "functions",
                    None,
                    [
                        ToolDescription(
                            "f",
                            "desc\r",
                            {
                                "type": "object",
                                "properties": {
                                    "x": {"type": "number", "default": 1e-39},
                                    "y": {"type": "number", "default": 98086.13498954405},
                                    "z": {"type": "integer", "default": 9700000000000000000001},
                                    "w": {"type": "array", "default": [-(2**63) - 1, 0.1, 2**63]},
                                },
                            },
                        )
                    ],
                ),
            }
        ),
        user("hi"),
    ],
    "training_final_with_recipient": lambda: [user("x"), assistant("y", "final", recipient="all")],
    "unicode_crlf_emoji": lambda: [
        user("naïve café 👩‍👩‍👧‍👦 🇫🇷 Ωμέγα 漢字\r\n\ttabs  and   spaces\u2028line sep\u00a0nbsp"),
        assistant("“quotes” — dashes… 1234567 'll 're", "final"),
    ],
}
