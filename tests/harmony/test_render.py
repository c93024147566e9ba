"""Prompt token ids, byte-identical with the official renderer on every scenario."""

from __future__ import annotations

import openai_harmony as oh
import pytest
import tiktoken

from harmony.messages import (
    Author,
    DeveloperContent,
    Message,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    function_tools_namespace,
)
from harmony.render import Renderer, RenderError, developer_text, has_function_tools, rust_lines
from harmony.schema import MAX_SCHEMA_DEPTH, SchemaTooDeep, json_schema_to_typescript
from tests.harmony.oracle import oracle_conversation, to_oracle
from tests.harmony.scenarios import SCENARIOS, WEATHER_PARAMETERS, system, user

NAMES = sorted(SCENARIOS)


def _config(drop: bool) -> oh.RenderConversationConfig:
    return oh.RenderConversationConfig(auto_drop_analysis=drop)


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_completion_prompt_matches_oracle(
    name: str, drop: bool, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    messages = SCENARIOS[name]()
    expected = oracle.render_conversation_for_completion(
        oracle_conversation(messages), oh.Role.ASSISTANT, _config(drop)
    )
    assert renderer.render_for_completion(messages, auto_drop_analysis=drop) == expected


@pytest.mark.parametrize("name", NAMES)
def test_conversation_and_training_match_oracle(
    name: str, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    messages = SCENARIOS[name]()
    conversation = oracle_conversation(messages)
    assert renderer.render_conversation(messages) == oracle.render_conversation(conversation, _config(True))
    assert renderer.render_for_training(messages) == oracle.render_conversation_for_training(
        conversation, _config(True)
    )


@pytest.mark.parametrize("name", NAMES)
def test_single_messages_match_oracle(name: str, renderer: Renderer, oracle: oh.HarmonyEncoding) -> None:
    for message in SCENARIOS[name]():
        for flag in (False, True):
            expected = oracle.render(
                to_oracle(message), render_options=oh.RenderOptions(conversation_has_function_tools=flag)
            )
            assert renderer.render_message(message, conversation_has_function_tools=flag) == expected


def test_the_weather_tool_loop_prompt_reads_as_expected(renderer: Renderer, enc: tiktoken.Encoding) -> None:
    """The tool loop's 347-token prompt, read as text: what the model sees, spelled out where the oracle
    comparisons only compare ids."""
    tokens = renderer.render_for_completion(SCENARIOS["weather_tool_loop"]())
    text = enc.decode(tokens)
    assert len(tokens) == 347
    assert text.startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    )
    assert "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text
    assert "options?:     // Extra options\n{\n    include_hourly: boolean, // default: false\n" in text
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        in text
    )
    assert text.endswith("<|start|>assistant")
    # The tool call ends in <|call|>, the tool result in <|end|>.
    assert tokens.count(200012) == 1


def test_tool_loop_prompt_extends_the_previous_prompt(renderer: Renderer) -> None:
    """A tool loop's next prompt extends the previous one (less `<|start|>assistant`): prefix reuse."""
    before = renderer.render_for_completion(SCENARIOS["weather_tool_loop"]()[:-2])
    after = renderer.render_for_completion(SCENARIOS["weather_tool_loop"]())
    assert after[: len(before) - 2] == before[:-2]


def test_system_and_developer_content_in_the_wrong_role_is_refused(
    renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    wrong_system = Message(Author(Role.DEVELOPER), [SystemContent()])
    with pytest.raises(
        RenderError, match="SystemContent may only appear in system messages, found in developer"
    ):
        renderer.render_message(wrong_system)
    with pytest.raises(RuntimeError, match="SystemContent may only appear"):
        oracle.render(to_oracle(wrong_system))
    with pytest.raises(RenderError, match="DeveloperContent may only appear in developer messages"):
        renderer.render_message(Message(Author(Role.USER), [DeveloperContent()]))


def test_tool_message_without_name_is_refused(renderer: Renderer, oracle: oh.HarmonyEncoding) -> None:
    nameless = Message(Author(Role.TOOL), [TextContent("{}")])
    with pytest.raises(RenderError, match="name"):
        renderer.render_message(nameless)
    with pytest.raises(RuntimeError, match="Tools should have a name"):
        oracle.render(to_oracle(nameless))


def test_function_tools_flag_comes_only_from_developer_functions() -> None:
    assert has_function_tools(SCENARIOS["browser_and_function"]())
    assert not has_function_tools(SCENARIOS["system_functions_do_not_set_flag"]())
    assert not has_function_tools(SCENARIOS["empty_function_tools"]())


def test_rust_lines_semantics() -> None:
    assert rust_lines("") == []
    assert rust_lines("\n") == [""]
    assert rust_lines("a\r\nb\n") == ["a", "b"]
    assert rust_lines("a\n\nb") == ["a", "", "b"]
    # Python's splitlines would split these; Rust's lines() does not.
    assert rust_lines("a\x0bb\u2028c\x1cd") == ["a\x0bb\u2028c\x1cd"]


def test_response_formats_follow_the_tools(renderer: Renderer, oracle: oh.HarmonyEncoding) -> None:
    """Our documented layout for structured outputs, tokenized as one piece with the rest of the message."""
    content = DeveloperContent(
        instructions="Be brief.",
        tools=function_tools_namespace([]),
        response_formats=[
            ResponseFormat(
                "shopping_list", {"type": "object", "properties": {"items": {"type": "array"}}}, "entries"
            ),
            ResponseFormat("weather", WEATHER_PARAMETERS),
        ],
    )
    text = developer_text(content)
    assert text.startswith(
        "# Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\n\n# Response Formats\n\n"
    )
    shopping = '{"type":"object","properties":{"items":{"type":"array"}}}'
    assert f"## shopping_list\n\n// entries\n{shopping}\n\n## weather\n\n{{" in text
    as_text = Message(Author(Role.DEVELOPER), [TextContent(text)])
    ours = renderer.render_message(Message(Author(Role.DEVELOPER), [content]))
    assert ours == oracle.render(to_oracle(as_text))


def test_training_render_replaces_only_a_final_answers_end(
    renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    answered = [*SCENARIOS["drop_cot"]()[:-1]]
    assert renderer.render_for_training(answered)[-1] == 200002
    assert renderer.render_for_training(SCENARIOS["weather_tool_loop"]())[-1] == 200007
    calling = [system(), user("x"), SCENARIOS["weather_tool_loop"]()[4]]
    assert renderer.render_for_training(calling)[-1] == 200012
    assert renderer.render_for_training(calling) == oracle.render_conversation_for_training(
        oracle_conversation(calling), _config(True)
    )


def test_a_schema_nested_too_deep_is_a_value_error_not_a_recursion_error() -> None:
    schema: dict = {"type": "string"}
    for _ in range(450):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(SchemaTooDeep):
        json_schema_to_typescript(schema)
    shallow: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH // 2 - 1):  # two JSON levels per object level
        shallow = {"type": "object", "properties": {"a": shallow}}
    assert json_schema_to_typescript(shallow).count("a?: ") == MAX_SCHEMA_DEPTH // 2 - 1
