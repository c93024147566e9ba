"""The streaming parser: strict mode against the official parser, tolerant mode against its own promises."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import openai_harmony as oh
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmony import encoding as tok
from harmony.messages import Author, Message, Role, TextContent
from harmony.parser import (
    UNSTRUCTURED_AFTER,
    HarmonyParseError,
    StreamParser,
    StreamState,
    parse_completion_tokens,
    parse_header,
)
from harmony.render import Renderer
from tests.harmony.oracle import from_oracle
from tests.harmony.scenarios import SCENARIOS

NAMES = sorted(SCENARIOS)
_STATES = {
    oh.StreamState.EXPECT_START: StreamState.EXPECT_START,
    oh.StreamState.HEADER: StreamState.HEADER,
    oh.StreamState.CONTENT: StreamState.CONTENT,
}


def _encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def _oracle_parse(oracle: oh.HarmonyEncoding, tokens: list[int], role: Role | None) -> list[Message] | str:
    """The official parser's messages, or its error's text when it refuses the tokens."""
    try:
        parsed = oracle.parse_messages_from_completion_tokens(
            tokens, None if role is None else oh.Role(role.value)
        )
    except oh.HarmonyError as error:
        return str(error)
    return [from_oracle(m) for m in parsed]


def _ours_strict(enc: tiktoken.Encoding, tokens: list[int], role: Role | None) -> list[Message] | str:
    """Our strict parser's messages, or its error's text, to compare with `_oracle_parse`."""
    try:
        return parse_completion_tokens(enc, tokens, role, strict=True)
    except HarmonyParseError as error:
        return str(error)


@pytest.mark.parametrize("name", NAMES)
def test_strict_parse_of_rendered_conversations_matches_oracle(
    name: str, enc: tiktoken.Encoding, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    tokens = renderer.render_conversation(SCENARIOS[name](), auto_drop_analysis=False)
    assert _ours_strict(enc, tokens, None) == _oracle_parse(oracle, tokens, None)


def _assert_same_stream_state(ours: StreamParser, theirs: oh.StreamableParser) -> None:
    assert ours.state is _STATES[theirs.state]
    assert (ours.current_role and ours.current_role.value) == (
        theirs.current_role and theirs.current_role.value
    )
    assert ours.current_channel == theirs.current_channel
    assert ours.current_recipient == theirs.current_recipient
    assert ours.current_content_type == theirs.current_content_type
    assert ours.last_content_delta == theirs.last_content_delta
    assert ours.current_content == theirs.current_content


def _stream_against_oracle(
    enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding, tokens: list[int], role: Role | None
) -> int | None:
    """Feeds both streaming parsers the same tokens and compares them after each one.

    Returns the index of the token the official parser refused, or None when it read them all. A refusal is
    compared too: ours must refuse that same token with the same words, and both must agree on the messages
    read before it.
    """
    ours = StreamParser(enc, role, strict=True)
    theirs = oh.StreamableParser(oracle, None if role is None else oh.Role(role.value))
    refused = None
    for at, token in enumerate(tokens):
        try:
            theirs.process(token)
        except oh.HarmonyError as error:
            with pytest.raises(HarmonyParseError, match=re.escape(str(error))):
                ours.process(token)
            refused = at
            break
        ours.process(token)
        _assert_same_stream_state(ours, theirs)
    else:
        theirs.process_eos()
        ours.process_eos()
        _assert_same_stream_state(ours, theirs)
    assert ours.messages == [from_oracle(m) for m in theirs.messages]
    return refused


def _completion(renderer: Renderer, name: str) -> list[int]:
    """The scenario's assistant messages as the model would generate them: the prompt ended in
    `<|start|>assistant`, so the first header comes without those two tokens."""
    messages = [m for m in SCENARIOS[name]() if m.author.role is Role.ASSISTANT]
    return renderer.render_conversation(messages, auto_drop_analysis=False)[2:]


SPEAKING = sorted(name for name in NAMES if any(m.author.role is Role.ASSISTANT for m in SCENARIOS[name]()))


@pytest.mark.parametrize("name", SPEAKING)
def test_streamed_completion_matches_oracle_token_by_token(
    name: str, enc: tiktoken.Encoding, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    _stream_against_oracle(enc, oracle, _completion(renderer, name), Role.ASSISTANT)


@pytest.mark.parametrize("name", NAMES)
def test_streamed_conversation_matches_oracle_token_by_token(
    name: str, enc: tiktoken.Encoding, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    """Every message of every scenario, system and developer ones included, read with no role given."""
    tokens = renderer.render_conversation(SCENARIOS[name](), auto_drop_analysis=False)
    _stream_against_oracle(enc, oracle, tokens, None)


def test_streaming_comparisons_cover_completions_and_refusals(
    enc: tiktoken.Encoding, renderer: Renderer, oracle: oh.HarmonyEncoding
) -> None:
    """The completion cases are the scenarios that have assistant messages, and the refusal branch runs,
    after complete messages: the official parser refuses a header with words left over in a completion, and
    a tool result's header without a recipient when it reads a whole conversation."""
    assert {"weather_tool_loop", "python_call", "browser_call", "header_quirks"} <= set(SPEAKING)
    assert "simple_convo" not in SPEAKING
    for tokens, role in [
        (_completion(renderer, "header_quirks"), Role.ASSISTANT),
        (renderer.render_conversation(SCENARIOS["ongoing_analysis"](), auto_drop_analysis=False), None),
    ]:
        refused = _stream_against_oracle(enc, oracle, tokens, role)
        assert refused is not None
        assert {tok.END, tok.CALL, tok.RETURN} & set(tokens[:refused]), "a message ends before the refusal"


def test_delta_trace_of_analysis_then_final(enc: tiktoken.Encoding) -> None:
    """Analysis then final: one delta per content token, None on header and stop tokens."""
    text = (
        '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|>'
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
    )
    tokens = _encode(enc, text)
    parser = StreamParser(enc, Role.ASSISTANT, strict=True)
    seen = []
    for token in tokens:
        parser.process(token)
        seen.append((parser.state, parser.current_channel, parser.last_content_delta))
    assert seen[0] == (StreamState.HEADER, None, None)
    assert seen[2] == (StreamState.CONTENT, "analysis", None)
    assert seen[3] == (StreamState.CONTENT, "analysis", "User")
    end = tokens.index(tok.END)
    assert seen[end] == (StreamState.EXPECT_START, None, None)
    assert seen[-1] == (StreamState.EXPECT_START, None, None)
    assert [m.channel for m in parser.messages] == ["analysis", "final"]
    assert parser.messages[1].text == "2 + 2 = 4."
    assert [p.end_token for p in parser.parsed] == [tok.END, tok.RETURN]


HEADER_CASES = [
    "assistant to=functions.X<|channel|>commentary <|constrain|>json",
    "assistant<|channel|>commentary to=functions.X<|constrain|>json",
    "assistant<|channel|>commentary json",
    "assistant<|channel|>analysis code",
    "assistant python",
    "assistant<|channel|>commentary<|constrain|>json",
    "assistant<|channel|>final extra words",
    "assistant<|channel|>final three extra words",
    "functions.get_weather to=assistant<|channel|>commentary",
    "functions.lookup_weather",
    "tool",
    "user:alice",
    "assistant<|channel|>final<|channel|>analysis",
    "assistant<|channel|> final",
    "",
    "  assistant \u00a0<|channel|>final\t",
    "system to=x y z",
    "to=functions.f<|channel|>commentary",
    "developer\u2003word",
]


@pytest.mark.parametrize("header", HEADER_CASES)
@pytest.mark.parametrize("role", [None, Role.ASSISTANT, Role.USER])
def test_header_quirks_match_oracle(
    header: str, role: Role | None, enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding
) -> None:
    tokens = ([] if role is not None else [tok.START]) + _encode(enc, header + "<|message|>body<|end|>")
    assert _ours_strict(enc, tokens, role) == _oracle_parse(oracle, tokens, role)


def test_strict_errors_carry_the_official_messages(enc: tiktoken.Encoding) -> None:
    with pytest.raises(HarmonyParseError, match="Unknown role: user:alice"):
        parse_header("user:alice", None, strict=True)
    with pytest.raises(
        HarmonyParseError, match=r'unexpected tokens remaining in message header: Some\("I"\)'
    ):
        parse_completion_tokens(
            enc,
            _encode(enc, "I must refuse<|end|><|start|>assistant<|channel|>final<|message|>No."),
            strict=True,
        )
    with pytest.raises(HarmonyParseError, match="Unexpected token 1 while expecting start token 200006"):
        parse_completion_tokens(
            enc, [tok.START, *_encode(enc, "user<|message|>x<|end|>"), 1], None, strict=True
        )
    with pytest.raises(HarmonyParseError, match="Unexpected EOS while waiting for message header"):
        parse_completion_tokens(enc, _encode(enc, "<|channel|>final"), strict=True)
    with pytest.raises(HarmonyParseError, match="no channel value"):
        parse_header("assistant<|channel|> final", None, strict=True)


# -- UTF-8 -----------------------------------------------------------------------------------------------


def _deltas(
    enc: tiktoken.Encoding, tokens: Sequence[int], *, strict: bool = False
) -> tuple[list[str | None], StreamParser]:
    parser = StreamParser(enc, Role.ASSISTANT, strict=strict)
    out = []
    for t in tokens:
        parser.process(t)
        out.append(parser.last_content_delta)
    parser.process_eos()
    return out, parser


def test_a_delta_never_splits_a_character(enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding) -> None:
    text = "💖 Ωμέγα 👩‍👩‍👧‍👦 漢字 🇫🇷"
    body = enc.encode_ordinary(text)
    assert any(
        len(enc.decode_single_token_bytes(t).decode("utf-8", "replace")) != 1
        or "\ufffd" in enc.decode_single_token_bytes(t).decode("utf-8", "replace")
        for t in body
    )
    tokens = _encode(enc, "<|channel|>final<|message|>") + body + [tok.RETURN]
    deltas, parser = _deltas(enc, tokens, strict=True)
    texts = [d for d in deltas if d]
    assert "".join(texts) == text == parser.messages[0].text
    assert all("\ufffd" not in d for d in texts)
    theirs = oh.StreamableParser(oracle, oh.Role.ASSISTANT)
    for t, ours in zip(tokens, deltas, strict=True):
        theirs.process(t)
        assert ours == theirs.last_content_delta


def test_invalid_utf8_is_replaced_and_deltas_still_add_up(
    enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding
) -> None:
    # 9552 is the bytes [32, 240, 159]: a space and the first half of a 4-byte character.
    tokens = [
        *_encode(enc, "<|channel|>final<|message|>"),
        9552,
        9552,
        *enc.encode_ordinary("worked"),
        tok.END,
    ]
    deltas, parser = _deltas(enc, tokens)
    assert parser.messages[0].text == " \ufffd \ufffdworked"
    assert "".join(d for d in deltas if d) == parser.messages[0].text
    assert parser.messages == [
        from_oracle(m) for m in oracle.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    ]


def test_incomplete_character_at_eos_is_flushed(enc: tiktoken.Encoding) -> None:
    tokens = [*_encode(enc, "<|channel|>final<|message|>Hi"), 9552]
    deltas, parser = _deltas(enc, tokens)
    assert deltas[-1] == " "
    assert parser.messages[0].text == "Hi \ufffd"
    assert parser.parsed[0].end_token is None


def test_out_of_vocab_ids_become_replacement_characters(enc: tiktoken.Encoding) -> None:
    tokens = [*_encode(enc, "<|channel|>final<|message|>a"), 2**32 - 1, *enc.encode_ordinary("b"), tok.RETURN]
    _, parser = _deltas(enc, tokens)
    assert parser.messages[0].text == "a\ufffdb"
    assert parser.anomalies == 1


# -- tolerant mode ----------------------------------------------------------------------------------------


def _tolerant(enc: tiktoken.Encoding, text: str, role: Role | None = Role.ASSISTANT) -> StreamParser:
    return StreamParser(enc, role).process_all(_encode(enc, text)).process_eos()


def _summary(parser: StreamParser) -> list[tuple[str, str | None, str | None, str]]:
    return [(m.author.role.value, m.channel, m.recipient, m.text) for m in parser.messages]


def _well_formed(name: str) -> list[Message]:
    """The scenario's assistant messages with a channel, and a content type that is one word (the
    `<|constrain|> json` spelling with a space reads back differently, so it is not well-formed output)."""
    return [
        m
        for m in SCENARIOS[name]()
        if m.author.role is Role.ASSISTANT and m.channel and " " not in (m.content_type or "")
    ]


WELL_FORMED = [name for name in NAMES if _well_formed(name)]


@pytest.mark.parametrize("name", WELL_FORMED)
def test_well_formed_output_parses_the_same_in_both_modes(
    name: str, enc: tiktoken.Encoding, renderer: Renderer
) -> None:
    tokens = renderer.render_conversation(_well_formed(name), auto_drop_analysis=False)[2:]
    strict = StreamParser(enc, Role.ASSISTANT, strict=True).process_all(tokens).process_eos()
    tolerant = StreamParser(enc, Role.ASSISTANT).process_all(tokens).process_eos()
    assert strict.messages
    assert tolerant.messages == strict.messages
    assert tolerant.anomalies == 0


def test_well_formed_cases_cover_the_assistant_scenarios() -> None:
    assert {"weather_tool_loop", "python_call", "browser_call", "keep_analysis_between_finals"} <= set(
        WELL_FORMED
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A missing <|message|>: the header's role and channel are kept, the rest is text.
        (
            "I must refuse<|end|><|start|>assistant<|channel|>final<|message|>No.<|return|>",
            [("assistant", None, None, "I must refuse"), ("assistant", "final", None, "No.")],
        ),
        # A header that never reached <|message|>: what fits a header's shape is no text; what goes past it is.
        ("<|channel|>commentary Hello there<|end|>", [("assistant", "commentary", None, "")]),
        (
            "<|channel|>commentary Hello there, friend<|end|>",
            [("assistant", "commentary", None, " Hello there, friend")],
        ),
        (
            '<|channel|>commentary to=functions.f <|constrain|>json{"a": 1, "b": 2}<|call|>',
            [("assistant", "commentary", None, ' 1, "b": 2}')],
        ),
        # Text after a stop token without <|start|>: a new message of its own.
        (
            "<|channel|>final<|message|>A<|end|>stray text",
            [("assistant", "final", None, "A"), ("assistant", None, None, "stray text")],
        ),
        # A new message begun without <|end|>.
        (
            "<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final<|message|>ok<|return|>",
            [("assistant", "analysis", None, "think"), ("assistant", "final", None, "ok")],
        ),
        (
            "<|channel|>analysis<|message|>think<|channel|>final<|message|>ok<|return|>",
            [("assistant", "analysis", None, "think"), ("assistant", "final", None, "ok")],
        ),
        # An unknown role word and leftover header words do not lose the message.
        (
            "<|channel|>final<|message|>A<|end|><|start|>asistant<|channel|>final<|message|>B<|return|>",
            [("assistant", "final", None, "A"), ("tool", "final", None, "B")],
        ),
        # Leftover header words: past a recipient and a content type, words are text (the `<|message|>` after
        # them is then a stray control token, dropped).
        (
            "<|channel|>final one two three<|message|>B<|return|>",
            [("assistant", "final", None, " one two threeB")],
        ),
        # Stray control tokens between messages are dropped; text is kept.
        (
            "<|channel|>final<|message|>A<|end|><|end|><|message|><|start|>assistant<|channel|>final<|message|>B<|return|>",
            [("assistant", "final", None, "A"), ("assistant", "final", None, "B")],
        ),
        # Control tokens inside content are dropped, never shown as their text.
        (
            "<|channel|>final<|message|>x<|message|>y<|constrain|>z<|reserved_200100|><|endoftext|><|return|>",
            [("assistant", "final", None, "xyz")],
        ),
        # Plain text with no harmony structure is the answer, even what could have begun a recipient; a second
        # <|channel|> starts a new message.
        ("Just text.<|return|>", [("assistant", None, None, "Just text.")]),
        ("to<|return|>", [("assistant", None, None, "to")]),
        ("\n<|return|>", [("assistant", None, None, "\n")]),
        (
            " to=functions.f<|channel|>commentary<|channel|>analysis<|message|>x<|end|>",
            [("assistant", "commentary", None, ""), ("assistant", "analysis", None, "x")],
        ),
        # A header cut off by the end of the stream still yields its text.
        ("<|channel|>final words never opened", [("assistant", "final", None, " words never opened")]),
        ("<|channel|><|message|>x<|end|>", [("assistant", None, None, "x")]),
    ],
)
def test_tolerant_mode_recovers(
    enc: tiktoken.Encoding, text: str, expected: list[tuple[str, str | None, str | None, str]]
) -> None:
    parser = _tolerant(enc, text)
    assert _summary(parser) == expected
    assert parser.anomalies > 0


def test_a_header_that_never_ends_becomes_text_after_the_limit(enc: tiktoken.Encoding) -> None:
    body = enc.encode_ordinary(" word" * 100)
    parser = StreamParser(enc, Role.ASSISTANT, max_header_tokens=16)
    deltas = []
    for t in [tok.CHANNEL, *enc.encode_ordinary("final"), *body]:
        parser.process(t)
        deltas.append(parser.last_content_delta)
    # Text streams once the header limit is passed, not only at the end.
    assert parser.state is StreamState.CONTENT
    assert parser.current_channel == "final"
    assert parser.current_content == " word" * (len(parser.current_content) // 5)
    assert sum(1 for d in deltas if d) > 50
    parser.process(tok.RETURN)
    assert parser.messages[0].text == " word" * 100


def _first_delta_at(enc: tiktoken.Encoding, tokens: list[int]) -> int | None:
    """The index of the token whose `process` call gave the first text delta."""
    parser = StreamParser(enc, Role.ASSISTANT)
    for at, token in enumerate(tokens):
        if parser.process(token).deltas:
            return at
    return None


def test_plain_text_streams_from_its_first_token(enc: tiktoken.Encoding) -> None:
    """A model that writes no harmony at all is not held back as a would-be header: text that cannot start a
    header streams at once, leading whitespace after at most `UNSTRUCTURED_AFTER` tokens, and what a header can
    start with (` to=`) only until it stops looking like one."""
    assert _first_delta_at(enc, enc.encode_ordinary("Hello there, how are you?")) == 0
    newlines = [enc.encode_ordinary("\n")[0]] * 10 + enc.encode_ordinary("Hi")
    assert _first_delta_at(enc, newlines) == UNSTRUCTURED_AFTER
    to_be = enc.encode_ordinary("to be or not to be")
    assert _first_delta_at(enc, to_be) == 1
    parser = StreamParser(enc, Role.ASSISTANT).process_all([*to_be, tok.RETURN])
    assert _summary(parser) == [("assistant", None, None, "to be or not to be")]


def test_a_forgotten_message_token_still_streams_the_answer(enc: tiktoken.Encoding) -> None:
    """`<|channel|>final` and then the answer without `<|message|>`: the answer streams once the words stop
    fitting a header (a recipient and a content type at most), under the channel read."""
    tokens = _encode(enc, "<|channel|>final The answer is four.")
    # The third word after the channel cannot be a header's: it streams with the two before it.
    assert _first_delta_at(enc, tokens) == len(_encode(enc, "<|channel|>final The answer is")) - 1
    parser = StreamParser(enc, Role.ASSISTANT).process_all([*tokens, tok.RETURN])
    assert _summary(parser) == [("assistant", "final", None, " The answer is four.")]


def test_tool_call_header_is_read_in_any_order(enc: tiktoken.Encoding) -> None:
    for text in (
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"a":1}<|call|>',
        ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"a":1}<|call|>',
    ):
        parser = _tolerant(enc, text)
        message = parser.messages[0]
        assert (message.channel, message.recipient, message.content_type) == (
            "commentary",
            "functions.get_weather",
            "<|constrain|>json",
        )
        assert parser.parsed[0].end_token == tok.CALL
        assert parser.anomalies == 0


# -- fuzz: the tolerant parser never raises and never loses text ------------------------------------------

_CONTROL = [tok.START, tok.END, tok.MESSAGE, tok.CHANNEL, tok.RETURN, tok.CALL, tok.CONSTRAIN]
_SPECIAL = range(tok.START_OF_TEXT, tok.MAX_TOKEN_ID + 1)

token_ids = st.one_of(
    st.integers(0, tok.VOCAB_SIZE - 1),
    st.sampled_from(_CONTROL),
    st.integers(tok.START_OF_TEXT, tok.MAX_TOKEN_ID),
    st.integers(tok.N_VOCAB, 2**32 - 1),
)


@st.composite
def mangled_outputs(draw: st.DrawFn, enc: tiktoken.Encoding, renderer: Renderer) -> list[int]:
    """Well-formed assistant output, then cut, spliced and salted with random and control tokens."""
    name = draw(st.sampled_from(NAMES))
    messages = [m for m in SCENARIOS[name]() if m.author.role is Role.ASSISTANT]
    tokens = renderer.render_conversation(messages, auto_drop_analysis=False)[2:] if messages else []
    tokens = list(tokens)
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(tokens)))
        tokens[at:at] = draw(st.lists(token_ids, max_size=4))
    if tokens and draw(st.booleans()):
        tokens = tokens[: draw(st.integers(0, len(tokens)))]
    if draw(st.booleans()):
        tokens += draw(st.lists(token_ids, max_size=30))
    return tokens


def _token_bytes(enc: tiktoken.Encoding, token: int) -> bytes:
    try:
        return enc.decode_single_token_bytes(token)
    except KeyError:
        return "\ufffd".encode()


def _check_accounting(
    enc: tiktoken.Encoding, tokens: list[int], parser: StreamParser, deltas: list[str]
) -> None:
    accounted: Counter[int] = Counter(parser.dropped_tokens)
    for p in parser.parsed:
        accounted.update(p.header_tokens)
        accounted.update(p.content_tokens)
        if p.end_token is not None:
            accounted[p.end_token] += 1
    assert accounted == Counter(tokens), "every token is accounted for exactly once"
    assert all(t in _SPECIAL for t in parser.dropped_tokens), "only control tokens are ever dropped"
    for p in parser.parsed:
        expected = b"".join(_token_bytes(enc, t) for t in p.content_tokens).decode("utf-8", "replace")
        assert p.message.text == expected
    assert "".join(deltas) == "".join(m.text for m in parser.messages)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), role=st.sampled_from([Role.ASSISTANT, None]))
def test_fuzzed_streams_never_raise_and_never_lose_text(
    data: st.DataObject, role: Role | None, enc: tiktoken.Encoding, renderer: Renderer
) -> None:
    tokens = data.draw(st.one_of(mangled_outputs(enc, renderer), st.lists(token_ids, max_size=60)))
    parser = StreamParser(enc, role, max_header_tokens=data.draw(st.integers(1, 64)))
    deltas = []
    for t in tokens:
        parser.process(t)
        deltas.extend(text for _, text in parser.deltas)
        assert parser.state in StreamState
    parser.process_eos()
    deltas.extend(text for _, text in parser.deltas)
    assert parser.state is StreamState.EXPECT_START
    _check_accounting(enc, tokens, parser, deltas)


def test_a_channel_the_header_scan_stopped_short_of_starts_a_new_message(enc: tiktoken.Encoding) -> None:
    """After a known role, " to" then `<|channel|>` is no header (a word before the channel that is no
    recipient): the text is a message, and the `<|channel|>` begins the next one, whose call still parses."""
    tokens = [316, *_encode(enc, "<|channel|>=browser.search<|channel|>commentary code<|message|>")]
    tokens += [*enc.encode_ordinary('{"query": "news"}'), tok.CALL]
    parser = StreamParser(enc, Role.ASSISTANT)
    deltas = []
    for t in tokens:
        parser.process(t)
        deltas.extend(text for _, text in parser.deltas)
    parser.process_eos()
    deltas.extend(text for _, text in parser.deltas)
    _check_accounting(enc, tokens, parser, deltas)
    assert parser.messages[0].text == " to"
    assert parser.messages[-1].channel == "commentary"
    assert parser.messages[-1].text == '{"query": "news"}'


def test_process_returns_the_deltas_owner(enc: tiktoken.Encoding) -> None:
    """Each delta names the header of the message it went to, even when that message just closed."""
    parser = StreamParser(enc, Role.ASSISTANT)
    parser.process_all(_encode(enc, "<|channel|>final<|message|>"))
    parser.process(9552)
    ((header, text),) = parser.deltas
    assert (header.channel, text) == ("final", " ")
    parser.process(tok.RETURN)
    ((header, text),) = parser.deltas
    assert (header.channel, text) == ("final", "\ufffd")


def test_parsed_messages_keep_their_raw_tokens(enc: tiktoken.Encoding) -> None:
    body = enc.encode_ordinary("Some reasoning here.")
    tokens = [*_encode(enc, "<|channel|>analysis<|message|>"), *body, tok.END]
    parser = StreamParser(enc, Role.ASSISTANT).process_all(tokens)
    assert parser.parsed[0].content_tokens == body
    assert parser.parsed[0].end_token == tok.END
    assert parser.messages[0] == Message(
        Author(Role.ASSISTANT), [TextContent("Some reasoning here.")], "analysis"
    )
