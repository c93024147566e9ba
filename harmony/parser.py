"""Streaming parser: sampled token ids in, harmony messages and per-token text deltas out.

Two modes share one state machine (expect-start, header, content):

* strict: the official parser's behaviour on well-formed input and its errors (`HarmonyParseError`) on
  malformed headers and stray tokens, for validating prompts and test data;
* tolerant (the default, for model output): never raises. A malformed or unknown header, a missing
  `<|message|>`, stray tokens between messages, unknown ids, text after a stop token all become text or a
  clean new message; each such event is counted in `anomalies` and logged.

Every token fed is accounted for exactly once: in some message's `header_tokens`, `content_tokens` or
`end_token`, or (control tokens only) in `dropped_tokens`. Text tokens are never dropped. A message's text is
the UTF-8 decoding (invalid bytes replaced) of its content tokens' bytes, and the deltas reported per token
concatenate to exactly that text; a delta never splits a character, since an incremental decoder holds back
incomplete sequences. Unlike the official parser, content is not re-encoded, an id outside the vocabulary
becomes U+FFFD without swallowing the rest of the message, and bytes after invalid UTF-8 are not held back.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

import tiktoken

from harmony import encoding as tok
from harmony.messages import Author, Message, Role, TextContent

logger = logging.getLogger(__name__)

_ROLES = {r.value: r for r in Role}
# ASCII whitespace as Rust's `split_ascii_whitespace` sees it (not Python's `str.split()`).
_ASCII_WHITESPACE = " \t\n\x0c\r"
_REPLACEMENT = "\ufffd".encode()
CHANNEL_MARKER = "<|channel|>"
CONSTRAIN_MARKER = "<|constrain|>"


class HarmonyParseError(ValueError):
    """Strict mode only: the token stream is not well-formed harmony."""


class StreamState(IntEnum):
    EXPECT_START = 0
    HEADER = 1
    CONTENT = 2


@dataclass(slots=True)
class Header:
    author: Author
    recipient: str | None = None
    channel: str | None = None
    content_type: str | None = None


@dataclass(slots=True)
class ParsedMessage:
    """A completed message with the raw token ids it was made of (for usage counts and auditing)."""

    message: Message
    header_tokens: list[int] = field(default_factory=list)
    content_tokens: list[int] = field(default_factory=list)
    # `<|end|>`, `<|return|>` or `<|call|>`; None when the stream ended or broke off mid-message.
    end_token: int | None = None


def _split_ascii_whitespace(text: str) -> list[str]:
    parts, current = [], []
    for ch in text:
        if ch in _ASCII_WHITESPACE:
            if current:
                parts.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        parts.append("".join(current))
    return parts


def parse_header(text: str, role: Role | None, *, strict: bool) -> tuple[Header, list[str]]:
    """Parse a decoded header (the text between `<|start|>` and `<|message|>`).

    Returns the header and a list of problems. In strict mode any problem raises `HarmonyParseError` with the
    official parser's message; in tolerant mode the best reading is returned with the problems listed.
    """
    problems: list[str] = []

    def problem(message: str) -> None:
        if strict:
            raise HarmonyParseError(message)
        problems.append(message)

    channel = None
    index = text.find(CHANNEL_MARKER)
    if index >= 0:
        after = text[index + len(CHANNEL_MARKER) :]
        end = next((i for i, ch in enumerate(after) if ch.isspace() or ch == "<"), len(after))
        if end == 0:
            problem("channel marker present but no channel value found in header")
        else:
            channel = after[:end]
        text = text[:index] + after[end:]
    text = text.strip()
    if CONSTRAIN_MARKER in text:
        text = text.replace(CONSTRAIN_MARKER, " " + CONSTRAIN_MARKER).strip()
    parts = _split_ascii_whitespace(text)

    name = None
    if role is None:
        if not parts:
            problem("message header did not contain a role")
            role = Role.ASSISTANT
        else:
            word = parts[0]
            if word in _ROLES:
                role = _ROLES[word]
                # As upstream: a tool role read from the header is named by that word (`tool`).
                name = word if role is Role.TOOL else None
            elif len(parts) > 1 or word.startswith("to="):
                # `functions.get_weather to=assistant`: a tool result, named by its first word.
                parts.pop(0)
                role, name = Role.TOOL, word
            else:
                problem(f"Unknown role: {word}")
                # Tolerantly read as a tool name, as the renderer writes a tool result without recipient.
                parts.pop(0)
                role, name = Role.TOOL, word
    assert role is not None
    if parts and parts[0] == role.value:
        parts.pop(0)

    recipient = content_type = None
    if parts:
        count = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif count == 1:
            recipient = last
        else:
            content_type = last
            if parts:
                word = parts.pop()
                recipient = word[3:] if word.startswith("to=") else word
    if parts:
        problem(f'unexpected tokens remaining in message header: Some("{" ".join(parts)}")')
    return Header(Author(role, name), recipient, channel, content_type), problems


class StreamParser:
    """Feed sampled token ids one at a time; read the current message's fields and the latest text delta.

    `role` is the role of the first message when the prompt already ended in `<|start|>{role}` (the usual
    completion case), so its header is read without a `<|start|>`; None expects a `<|start|>` first.
    """

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        role: Role | None = Role.ASSISTANT,
        *,
        strict: bool = False,
        max_header_tokens: int = 64,
    ) -> None:
        self._encoding = encoding
        self.strict = strict
        self.max_header_tokens = max_header_tokens
        self._default_role = role or Role.ASSISTANT
        self._next_role: Role | None = role
        self.state = StreamState.HEADER if role is not None else StreamState.EXPECT_START
        self._header_tokens: list[int] = []
        self._header: Header | None = None
        self._content_tokens: list[int] = []
        self._content_parts: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[int] = []
        self.parsed: list[ParsedMessage] = []
        self.dropped_tokens: list[int] = []
        self.anomalies = 0
        # The text each `process` call added, per message it went to (usually one entry, or none).
        self.deltas: list[tuple[Header, str]] = []

    # -- what a caller reads -------------------------------------------------------------------------------

    @property
    def messages(self) -> list[Message]:
        return [p.message for p in self.parsed]

    @property
    def current_header(self) -> Header | None:
        """The header of the message being read; a new object for every message."""
        return self._header

    @property
    def current_role(self) -> Role | None:
        if self._header is not None:
            return self._header.author.role
        return self._next_role

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._header is not None else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._header is not None else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._header is not None else None

    @property
    def last_content_delta(self) -> str | None:
        """The text the last `process` call added, or None when it added none (as upstream)."""
        return "".join(text for _, text in self.deltas) if self.deltas else None

    @property
    def current_content(self) -> str:
        """The text of the message being read so far (bytes of an incomplete character not included)."""
        return "".join(self._content_parts)

    # -- feeding --------------------------------------------------------------------------------------------

    def process_all(self, tokens: Iterable[int]) -> StreamParser:
        for token in tokens:
            self.process(token)
        return self

    def process(self, token: int) -> StreamParser:
        self.tokens.append(token)
        self.deltas = []
        if self.state is StreamState.CONTENT:
            self._in_content(token)
        elif self.state is StreamState.HEADER:
            self._in_header(token)
        else:
            self._expecting_start(token)
        return self

    def process_eos(self) -> StreamParser:
        """The stream ended: finish the message being read."""
        self.deltas = []
        if self.state is StreamState.CONTENT:
            self._finish(None)
        elif self.state is StreamState.HEADER:
            if self.strict:
                raise HarmonyParseError("Unexpected EOS while waiting for message header to complete")
            self._header_without_message(None)
        return self

    # -- the state machine ----------------------------------------------------------------------------------

    def _anomaly(self, what: str) -> None:
        self.anomalies += 1
        logger.warning("malformed harmony output: %s", what)

    def _expecting_start(self, token: int) -> None:
        if token == tok.START:
            self.dropped_tokens.append(token)
            self.state = StreamState.HEADER
            return
        if self.strict:
            raise HarmonyParseError(f"Unexpected token {token} while expecting start token {tok.START}")
        if token in tok.STOP_TOKENS or token == tok.MESSAGE:
            self.dropped_tokens.append(token)
            self._anomaly(f"stray control token {token} between messages")
        elif token == tok.CHANNEL:
            self._anomaly("a message began with <|channel|> instead of <|start|>")
            self._next_role = self._default_role
            self.state = StreamState.HEADER
            self._header_tokens = [token]
        else:
            self._anomaly(f"text outside a message (token {token}); kept as a new message")
            self._begin_content(Header(Author(self._default_role)), [])
            self._in_content(token)

    def _in_header(self, token: int) -> None:
        if token == tok.MESSAGE:
            self.dropped_tokens.append(token)
            text = self._decode_lossy(self._header_tokens)
            header, problems = parse_header(text, self._next_role, strict=self.strict)
            for problem in problems:
                self._anomaly(f"{problem} (header {text!r})")
            self._begin_content(header, self._header_tokens)
            return
        if self.strict:
            self._header_tokens.append(token)
            return
        if token in tok.STOP_TOKENS:
            self._header_without_message(token)
        elif token == tok.START:
            self._header_without_message(None)
            self.dropped_tokens.append(token)
            self.state = StreamState.HEADER
        else:
            self._header_tokens.append(token)
            if len(self._header_tokens) > self.max_header_tokens:
                self._header_without_message(None, keep_open=True)

    def _in_content(self, token: int) -> None:
        if token in tok.STOP_TOKENS:
            self._finish(token)
            return
        if not self.strict:
            if token == tok.START:
                self._anomaly("a new message began without <|end|>")
                self._finish(None)
                self.dropped_tokens.append(token)
                self.state = StreamState.HEADER
                return
            if token == tok.CHANNEL:
                self._anomaly("<|channel|> inside a message; read as the start of a new one")
                self._finish(None)
                self._next_role = self._default_role
                self.state = StreamState.HEADER
                self._header_tokens = [token]
                return
            if tok.START_OF_TEXT <= token <= tok.MAX_TOKEN_ID:
                self._anomaly(f"control token {token} inside a message; kept as its text")
        self._append_content(token)

    def _append_content(self, token: int) -> None:
        self._content_tokens.append(token)
        self._emit(self._decoder.decode(self._token_bytes(token)))

    def _emit(self, text: str) -> None:
        if text:
            assert self._header is not None
            self._content_parts.append(text)
            self.deltas.append((self._header, text))

    def _header_without_message(self, end_token: int | None, *, keep_open: bool = False) -> None:
        """Tolerant mode: a header that never reached `<|message|>` is read as a message of its own.

        A known role word and a `<|channel|>` with its value are taken as the header; every later token is
        the message's text. With `keep_open` (the header grew too long) the message stays open for more text.
        """
        tokens = self._header_tokens
        self._header_tokens = []
        if not any(t not in (tok.START, tok.CHANNEL) for t in tokens):
            self.dropped_tokens.extend(tokens)
            if end_token is not None:
                self.dropped_tokens.append(end_token)
            if tokens or end_token is not None:
                self._anomaly("an empty header")
            self._next_role = None
            self.state = StreamState.EXPECT_START
            return
        self._anomaly("a header without <|message|>; its text kept as the message")
        role = self._next_role or self._default_role
        split = 0
        if self._next_role is None and tokens[0] != tok.CHANNEL:
            word = self._decode_lossy(tokens[:1]).strip()
            if word in _ROLES:
                role, split = _ROLES[word], 1
        channel = None
        if tok.CHANNEL in tokens:
            # The channel is the text after the marker up to whitespace or `<`; the tokens that spell it
            # (including one that straddles that boundary) belong to the header, the rest is text.
            at = tokens.index(tok.CHANNEL)
            value = ""
            for end in range(at + 1, len(tokens)):
                piece = self._decode_lossy(tokens[end : end + 1])
                stop = next((i for i, ch in enumerate(piece) if ch.isspace() or ch == "<"), None)
                if tokens[end] >= tok.START_OF_TEXT or stop == 0:
                    break
                value += piece[:stop]
                split = end + 1
                if stop is not None:
                    break
            channel = value or None
            if channel is None:
                split = at + 1
        header_tokens, content_tokens = tokens[:split], tokens[split:]
        self._begin_content(Header(Author(role), channel=channel), header_tokens)
        for token in content_tokens:
            self._append_content(token)  # control tokens here are kept as their text
        if not keep_open:
            self._finish(end_token)

    def _begin_content(self, header: Header, header_tokens: list[int]) -> None:
        self._header = header
        self._header_tokens = header_tokens
        self._next_role = None
        self.state = StreamState.CONTENT

    def _finish(self, end_token: int | None) -> None:
        assert self._header is not None
        # Bytes of an incomplete character left at the end become U+FFFD, reported as this call's delta.
        self._emit(self._decoder.decode(b"", final=True))
        header = self._header
        message = Message(
            header.author,
            [TextContent("".join(self._content_parts))],
            header.channel,
            header.recipient,
            header.content_type,
        )
        self.parsed.append(ParsedMessage(message, self._header_tokens, self._content_tokens, end_token))
        self._header = None
        self._header_tokens = []
        self._content_tokens = []
        self._content_parts = []
        self._decoder.reset()
        self.state = StreamState.EXPECT_START

    # -- bytes ----------------------------------------------------------------------------------------------

    def _token_bytes(self, token: int) -> bytes:
        try:
            return self._encoding.decode_single_token_bytes(token)
        except KeyError:
            if not self.strict:
                self._anomaly(f"token id {token} is not in the vocabulary")
            return _REPLACEMENT

    def _decode_lossy(self, tokens: list[int]) -> str:
        return b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def parse_completion_tokens(
    encoding: tiktoken.Encoding,
    tokens: Iterable[int],
    role: Role | None = Role.ASSISTANT,
    *,
    strict: bool = False,
) -> list[Message]:
    """Parse a whole completion (with or without its stop token) into messages."""
    return StreamParser(encoding, role, strict=strict).process_all(tokens).process_eos().messages
