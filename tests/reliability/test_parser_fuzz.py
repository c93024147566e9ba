"""Fuzzed model-output token streams through the harmony streaming parser (tolerant mode), the chat output
parser built on it and the Responses output builder.

10,000 seeded random streams: no exception, whatever the ids (text, special and reserved tokens, ids past the
vocabulary), and the deltas each parser reports add up to what it kept. Then hypothesis, mixing control tokens,
pieces of harmony headers (calls to offered functions, to others, to built-in tools) and text that spells no
markup itself: no `<|...|>` text in any field a client gets, and no call to a function that was not offered.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmony import encoding as tok
from harmony.encoding import load_harmony_encoding
from harmony.messages import Role
from harmony.parser import StreamParser
from server.harmony_chat import ChatOutputParser, DeltaKind
from server.serving_responses import OutputBuilder

STREAMS = 10_000
MAX_LEN = 48
SEED = 20261206

SPECIAL = [
    tok.START,
    tok.END,
    tok.MESSAGE,
    tok.CHANNEL,
    tok.CONSTRAIN,
    tok.RETURN,
    tok.CALL,
    tok.END_OF_TEXT,
    tok.START_OF_TEXT,
]


def _fragments(encoding) -> list[list[int]]:
    """Pieces of well-formed harmony, so that fuzzed streams reach deep states (headers, tool calls)."""
    texts = [
        "<|channel|>final<|message|>",
        "<|channel|>analysis<|message|>",
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
        " to=functions.f<|channel|>commentary<|message|>",
        "<|start|>assistant",
        "<|end|>",
        "<|call|>",
        "<|return|>",
        '{"city": "Par',
        "héllo wörld ✓ ",
        "assistant",
        "<|channel|>",
    ]
    return [encoding.encode(t, allowed_special="all") for t in texts]


def _stream(rng: random.Random, fragments: list[list[int]]) -> list[int]:
    tokens: list[int] = []
    length = rng.randint(0, MAX_LEN)
    while len(tokens) < length:
        pick = rng.random()
        if pick < 0.30:
            tokens.extend(rng.choice(fragments))
        elif pick < 0.55:
            tokens.append(rng.choice(SPECIAL))
        elif pick < 0.65:
            tokens.append(rng.randint(tok.VOCAB_SIZE, tok.MAX_TOKEN_ID))  # every special and reserved id
        elif pick < 0.70:
            tokens.append(rng.randint(tok.N_VOCAB, tok.N_VOCAB + 10_000))  # past the vocabulary
        else:
            tokens.append(rng.randrange(tok.VOCAB_SIZE))  # ordinary text tokens, incl. partial UTF-8
    return tokens[:MAX_LEN]


def test_fuzzed_token_streams_never_raise(
    caplog: pytest.LogCaptureFixture, summary: Callable[[str], None]
) -> None:
    caplog.set_level(logging.ERROR)  # tolerant mode logs every anomaly as a warning: thousands here
    encoding = load_harmony_encoding()
    rng = random.Random(SEED)
    fragments = _fragments(encoding)
    started = time.perf_counter()
    exceptions: list[str] = []
    mismatches: list[str] = []
    tokens_fed = anomalies = 0
    for index in range(STREAMS):
        tokens = _stream(rng, fragments)
        tokens_fed += len(tokens)
        role = Role.ASSISTANT if index % 2 else None
        try:
            parser = StreamParser(encoding, role, strict=False)
            texts: list[str] = []
            for token in tokens:
                parser.process(token)
                texts.extend(text for _, text in parser.deltas)
            parser.process_eos()
            texts.extend(text for _, text in parser.deltas)
            anomalies += parser.anomalies
            kept = "".join(str(part.text) for m in parser.messages for part in m.content)
            if "".join(texts) != kept:
                mismatches.append(f"stream {index} {tokens}: deltas {''.join(texts)!r} != messages {kept!r}")

            chat = ChatOutputParser(encoding)
            deltas = [d for token in tokens for d in chat.feed(token)] + chat.finish()
            content = "".join(d.text for d in deltas if d.kind is DeltaKind.CONTENT)
            if content != "".join(chat.output.content):
                mismatches.append(f"stream {index} {tokens}: chat content deltas != output content")
        except Exception as error:
            exceptions.append(f"stream {index} {tokens}: {type(error).__name__}: {error}")
    elapsed = time.perf_counter() - started
    summary(
        f"{STREAMS} fuzzed streams, {tokens_fed} tokens (seed {SEED}, <= {MAX_LEN} each) through StreamParser "
        f"(tolerant) and ChatOutputParser: {len(exceptions)} exceptions, {len(mismatches)} delta mismatches, "
        f"{anomalies} anomalies tolerated; {elapsed:.1f} s"
    )
    assert not exceptions, f"{len(exceptions)} of {STREAMS} streams raised, e.g.:\n" + "\n".join(
        exceptions[:5]
    )
    assert not mismatches, f"{len(mismatches)} streams' deltas differ from what was kept:\n" + "\n".join(
        mismatches[:5]
    )


# -- hypothesis: what a client gets holds no markup and no call it cannot run ------------------------------

OFFERED = frozenset({"get_weather", "get_time"})
HEADER_PIECES = [
    "<|channel|>final<|message|>",
    "<|channel|>analysis<|message|>",
    "<|channel|>commentary<|message|>",
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
    " to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>",
    "<|channel|>commentary to=functions.delete_all <|constrain|>json<|message|>",
    " to=browser.search<|channel|>commentary code<|message|>",
    " to=python<|channel|>analysis code<|message|>",
    " to=functions.get_weather",
    " to=",
    "<|start|>assistant",
    "<|start|>assistant to=functions.get_weather",
    "<|channel|>",
    "commentary",
    "final",
    "<|constrain|>json",
    "<|end|>",
    "<|call|>",
    "<|return|>",
    '{"city": "Paris"}',
]
CONTROL = [tok.START, tok.END, tok.MESSAGE, tok.CHANNEL, tok.CONSTRAIN, tok.RETURN, tok.CALL]


@functools.cache
def _encoding() -> tiktoken.Encoding:
    return load_harmony_encoding()


@functools.cache
def _plain_text_ids() -> list[int]:
    """Ordinary tokens that cannot help spell `<|` or `|>`: any markup in the output came from a control token."""
    encoding = _encoding()
    return [
        t
        for t in range(tok.VOCAB_SIZE)
        if b"<" not in (raw := encoding.decode_single_token_bytes(t)) and b"|" not in raw
    ]


@functools.cache
def _parts() -> st.SearchStrategy[list[int]]:
    """One piece of a fuzzed output: a header piece, a control, special or unknown id, or a few text tokens."""
    encoding = _encoding()
    pieces = [encoding.encode(p, allowed_special="all") for p in HEADER_PIECES]
    text = _plain_text_ids()
    return st.one_of(
        st.sampled_from(pieces),
        st.sampled_from(CONTROL).map(lambda t: [t]),
        st.integers(tok.START_OF_TEXT, tok.MAX_TOKEN_ID).map(lambda t: [t]),
        st.integers(tok.N_VOCAB, tok.N_VOCAB + 1000).map(lambda t: [t]),
        st.lists(st.integers(0, len(text) - 1).map(text.__getitem__), min_size=1, max_size=6),
    )


@st.composite
def model_outputs(draw: st.DrawFn) -> list[int]:
    return [t for part in draw(st.lists(_parts(), max_size=40)) for t in part]


def _assert_clean(text: str, where: str) -> None:
    assert "<|" not in text, f"markup in {where}: {text!r}"
    assert "|>" not in text, f"markup in {where}: {text!r}"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=model_outputs())
def test_no_markup_and_no_call_to_a_tool_not_offered(tokens: list[int]) -> None:
    logging.getLogger("harmony.parser").setLevel(logging.ERROR)  # every anomaly is a warning: many here
    logging.getLogger("server.harmony_chat").setLevel(logging.ERROR)
    chat = ChatOutputParser(_encoding(), OFFERED)
    deltas = [d for t in tokens for d in chat.feed(t)] + chat.finish()
    out = chat.output
    _assert_clean("".join(out.content), "content")
    _assert_clean("".join(out.reasoning), "reasoning")
    for call in out.tool_calls:
        assert call.name in OFFERED
        _assert_clean(call.arguments, "arguments")
    for delta in deltas:
        _assert_clean(delta.text + delta.name, f"a {delta.kind} delta")

    builder = OutputBuilder()
    events = [e for d in deltas for e in builder.feed(d)] + builder.close("completed")
    _assert_clean(json.dumps(builder.output, ensure_ascii=False), "the Responses output")
    _assert_clean(json.dumps(events, ensure_ascii=False), "the Responses events")
    assert {i["name"] for i in builder.output if i["type"] == "function_call"} <= OFFERED
