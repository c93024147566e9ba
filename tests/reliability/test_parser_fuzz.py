"""10,000 fuzzed model-output token streams through the harmony streaming parser (tolerant mode) and the chat
output parser built on it: no exception, whatever the ids (text, special and reserved tokens, ids past the
vocabulary), and the deltas each parser reports add up to what it kept."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import pytest

from harmony import encoding as tok
from harmony.encoding import load_harmony_encoding
from harmony.messages import Role
from harmony.parser import StreamParser
from server.harmony_chat import ChatOutputParser, DeltaKind

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
