"""Property tests: our tokenizer, renderer and schema printer against the official `openai-harmony` oracle.

Hypothesis generates conversations, JSON Schemas, texts and token lists (see `strategies.py`); every one is
rendered, encoded or decoded by us and by the oracle, and the token ids must be identical. A mismatch is shown
as decoded text first (a readable diff), then as ids.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import openai_harmony as oh
import pytest
import tiktoken
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harmony import encoding as tok
from harmony.messages import (
    Author,
    DeveloperContent,
    Message,
    Role,
    ToolDescription,
    ToolNamespaceConfig,
    browser_tool_namespace,
    function_tools_namespace,
    python_tool_namespace,
)
from harmony.render import Renderer
from tests.harmony.oracle import oracle_conversation, to_oracle
from tests.harmony.strategies import conversations, text, texts, top_level_schemas

# Every test here runs against the oracle; the example counts are the point, so they are fixed, not profiles.
# HARMONY_PROPERTY_SCALE=N multiplies them for a deeper local search (the default run stays at these counts).
_SCALE = max(1, int(os.environ.get("HARMONY_PROPERTY_SCALE", "1")))
N_CONVERSATIONS = 500 * _SCALE
N_SCHEMAS = 500 * _SCALE
N_TEXTS = 500 * _SCALE
N_TOKEN_LISTS = 500 * _SCALE

_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def assert_same_tokens(enc: tiktoken.Encoding, ours: Sequence[int], theirs: Sequence[int]) -> None:
    """Equal ids; on failure, the decoded texts are compared first so the diff is readable."""
    if list(ours) != list(theirs):
        assert enc.decode(ours) == enc.decode(theirs)
        assert list(ours) == list(theirs)


def _config(drop: bool) -> oh.RenderConversationConfig:
    return oh.RenderConversationConfig(auto_drop_analysis=drop)


# -- conversations -------------------------------------------------------------------------------------------


@settings(max_examples=N_CONVERSATIONS, **_SETTINGS)
@given(messages=conversations(), next_role=st.sampled_from(Role))
def test_conversation_renders_match_oracle(
    messages: list[Message],
    next_role: Role,
    enc: tiktoken.Encoding,
    renderer: Renderer,
    oracle: oh.HarmonyEncoding,
) -> None:
    conversation = oracle_conversation(messages)
    for drop in (True, False):
        assert_same_tokens(
            enc,
            renderer.render_for_completion(messages, next_role, auto_drop_analysis=drop),
            oracle.render_conversation_for_completion(conversation, oh.Role(next_role.value), _config(drop)),
        )
        assert_same_tokens(
            enc,
            renderer.render_conversation(messages, auto_drop_analysis=drop),
            oracle.render_conversation(conversation, _config(drop)),
        )
        assert_same_tokens(
            enc,
            renderer.render_for_training(messages, auto_drop_analysis=drop),
            oracle.render_conversation_for_training(conversation, _config(drop)),
        )
    for message in messages:
        theirs = to_oracle(message)
        for flag in (False, True):
            assert_same_tokens(
                enc,
                renderer.render_message(message, conversation_has_function_tools=flag),
                oracle.render(theirs, render_options=oh.RenderOptions(conversation_has_function_tools=flag)),
            )


# -- JSON Schema to TypeScript -------------------------------------------------------------------------------


def _oracle_tool_message(name: str, description: str, parameters: Any) -> oh.Message:
    """A developer message with one function tool, built without pydantic's check that parameters is a dict
    (the Rust side takes any JSON value there)."""
    tool = oh.ToolDescription.model_construct(name=name, description=description, parameters=parameters)
    namespace = oh.ToolNamespaceConfig.model_construct(name="functions", description=None, tools=[tool])
    content = oh.DeveloperContent.model_construct(instructions=None, tools={"functions": namespace})
    return oh.Message(author=oh.Author(role=oh.Role.DEVELOPER), content=[content])


def _oracle_render(oracle: oh.HarmonyEncoding, message: oh.Message) -> list[int]:
    with warnings.catch_warnings():
        # model_construct with a non-dict `parameters` makes pydantic warn while serializing it; harmless.
        warnings.simplefilter("ignore")
        return oracle.render(message)


@settings(max_examples=N_SCHEMAS, **_SETTINGS)
@given(schema=top_level_schemas())
@example(schema={"type": "object", "properties": {"d": {"type": "number", "default": 1e-7}}})
@example(schema={"type": "object", "properties": {"d": {"default": [1e16, 0.00001, -0.0, 2**64, 2**70]}}})
@example(schema={"type": "object", "properties": {"s": {"type": "string", "default": 'a "b"\r\nc'}}})
@example(schema={"type": "array", "items": True})
@example(schema=True)
@example(schema=None)
def test_schema_renders_match_oracle(
    schema: Any, enc: tiktoken.Encoding, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    ours = Message(
        Author(Role.DEVELOPER),
        [DeveloperContent(tools=function_tools_namespace([ToolDescription("f", "tool\ndesc", schema)]))],
    )
    theirs = _oracle_tool_message("f", "tool\ndesc", schema)
    assert_same_tokens(enc, renderer.render_message(ours), _oracle_render(oracle, theirs))


# -- tokenizer -----------------------------------------------------------------------------------------------


@settings(max_examples=N_TEXTS, **_SETTINGS)
@given(value=st.one_of(text, texts(30)))
def test_encoding_matches_oracle(value: str, enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding) -> None:
    # The oracle refuses special-token text unless told otherwise; `disallowed_special=()` is encode_ordinary.
    assert enc.encode_ordinary(value) == oracle.encode(value, allowed_special=set(), disallowed_special=())
    assert enc.encode(value, allowed_special="all") == oracle.encode(value, allowed_special="all")


def _byte_tokens() -> list[int]:
    """The 256 single-byte tokens: lists of them exercise every kind of invalid UTF-8."""
    from harmony.encoding import load_harmony_encoding

    encoding = load_harmony_encoding()
    return [encoding.encode_single_token(bytes([b])) for b in range(256)]


BYTE_TOKENS = _byte_tokens()
token_ids = st.one_of(
    st.integers(0, tok.MAX_TOKEN_ID),
    st.integers(tok.START_OF_TEXT, tok.MAX_TOKEN_ID),  # special and reserved ids
    st.sampled_from(BYTE_TOKENS),
    st.sampled_from([9552, 132990, 177591, 200006, 200018, 201088]),  # partial characters, specials, edges
)


@settings(max_examples=N_TOKEN_LISTS, **_SETTINGS)
@given(ids=st.lists(token_ids, max_size=40))
def test_decoding_matches_oracle(ids: list[int], enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding) -> None:
    assert enc.decode(ids) == oracle.decode(ids)  # invalid UTF-8 replaced the same way
    try:
        strict = enc.decode_bytes(ids).decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(oh.HarmonyError):
            oracle.decode_utf8(ids)
    else:
        assert oracle.decode_utf8(ids) == strict


def test_every_special_id_decodes_like_the_oracle(enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding) -> None:
    ids = list(range(tok.START_OF_TEXT, tok.N_VOCAB))
    assert [enc.decode([i]) for i in ids] == [oracle.decode([i]) for i in ids]


# -- the built-in tool namespaces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "name"), [(browser_tool_namespace(), "browser"), (python_tool_namespace(), "python")]
)
def test_builtin_namespaces_equal_the_oracles(ours: ToolNamespaceConfig, name: str) -> None:
    theirs = getattr(oh.ToolNamespaceConfig, name)()
    assert theirs.name == ours.name
    assert theirs.description == ours.description
    assert [(t.name, t.description, t.parameters) for t in theirs.tools] == [
        (t.name, t.description, t.parameters) for t in ours.tools
    ]
