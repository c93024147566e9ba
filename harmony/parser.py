"""Streaming parser: sampled token ids in, harmony messages and per-token text deltas out.

Two modes share one state machine (expect-start, header, content):

* strict: the official parser's behaviour on well-formed input and its errors (`HarmonyParseError`) on
  malformed headers and stray tokens, for validating prompts and test data;
* tolerant (the default, for model output): never raises. A malformed or unknown header, a missing
  `<|message|>`, stray tokens between messages, unknown ids, text after a stop token all become text or a
  clean new message; each such event is counted in `anomalies` and logged.

Tolerant mode never turns a control token into text: a special or reserved token where it has no meaning
(inside a message, in a header, between messages) is dropped, so no `<|...|>` markup reaches a message's
text. A header is read as a header only while it has a header's shape (a role, ` to=RECIPIENT`,
`<|channel|>NAME`, a content type); as soon as it cannot be one (the model wrote plain text, or forgot
`<|message|>` and went on writing), the words that do fit a header are kept as the header and the rest becomes
the message's text, streamed from then on. A header that never reached `<|message|>` and holds nothing but
header words is not text at all: it becomes a message with no text.

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
RECIPIENT_PREFIX = "to="
# A completion's first header (its role already given by the prompt) that holds only whitespace after this
# many tokens is read as text: the model is writing plain text, not harmony.
UNSTRUCTURED_AFTER = 4


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
    # The recipient was written ` to=NAME`, not a bare word that the official reading takes for one (a lone
    # content type such as `<|constrain|>json` after the channel reads as the recipient).
    addressed: bool = False


@dataclass(slots=True)
class ParsedMessage:
    """A completed message with the raw token ids it was made of (for usage counts and auditing)."""

    message: Message
    header_tokens: list[int] = field(default_factory=list)
    content_tokens: list[int] = field(default_factory=list)
    # `<|end|>`, `<|return|>` or `<|call|>`; None when the stream ended or broke off mid-message.
    end_token: int | None = None


def _is_special(token: int) -> bool:
    """A special or reserved token of the vocabulary (not an id past it, which reads as U+FFFD)."""
    return tok.START_OF_TEXT <= token <= tok.MAX_TOKEN_ID


@dataclass(slots=True)
class _HeaderScan:
    """Tolerant mode: what the tokens of a header that has not reached `<|message|>` look like so far."""

    # They can still be a header, or the start of one.
    plausible: bool
    # How many leading tokens surely belong to the header (a role word, `<|channel|>` and its name,
    # `<|constrain|>` and its word, a ` to=` recipient); read as text, the message starts after them.
    split: int
    role: Role | None = None
    channel: str | None = None


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
    addressed = False
    if parts:
        count = len(parts)
        last = parts.pop()
        if last.startswith(RECIPIENT_PREFIX):
            recipient, addressed = last[3:], True
        elif count == 1:
            recipient = last
        else:
            content_type = last
            if parts:
                word = parts.pop()
                addressed = word.startswith(RECIPIENT_PREFIX)
                recipient = word[3:] if addressed else word
    if parts:
        problem(f'unexpected tokens remaining in message header: Some("{" ".join(parts)}")')
    return Header(Author(role, name), recipient, channel, content_type, addressed), problems


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
        # Each header token's own text ("" for a control token), for reading the header's shape.
        self._header_pieces: list[str] = []
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
        self._step(token)
        return self

    def process_eos(self) -> StreamParser:
        """The stream ended: finish the message being read."""
        self.deltas = []
        if self.state is StreamState.CONTENT:
            self._finish(None)
        elif self.state is StreamState.HEADER:
            if self.strict:
                raise HarmonyParseError("Unexpected EOS while waiting for message header to complete")
            self._header_ended(None)
        return self

    # -- the state machine ----------------------------------------------------------------------------------

    def _step(self, token: int) -> None:
        if self.state is StreamState.CONTENT:
            self._in_content(token)
        elif self.state is StreamState.HEADER:
            self._in_header(token)
        else:
            self._expecting_start(token)

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
            self._set_header([token])
        elif _is_special(token):
            self.dropped_tokens.append(token)
            self._anomaly(f"control token {token} between messages; dropped")
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
            self._header_ended(token)
        elif token == tok.START:
            self._header_ended(None)
            self.dropped_tokens.append(token)
            self.state = StreamState.HEADER
        elif token == tok.CHANNEL and tok.CHANNEL in self._header_tokens:
            self._anomaly("a second <|channel|> in a header; read as the start of a new message")
            self._header_ended(None)
            self._next_role = self._default_role
            self.state = StreamState.HEADER
            self._set_header([token])
        elif _is_special(token) and token not in (tok.CHANNEL, tok.CONSTRAIN):
            self.dropped_tokens.append(token)
            self._anomaly(f"control token {token} in a header; dropped")
        else:
            self._header_tokens.append(token)
            self._header_pieces.append(self._piece(token))
            scan = self._scan_header()
            if not scan.plausible or len(self._header_tokens) > self.max_header_tokens:
                self._header_as_text(scan)

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
                self._set_header([token])
                return
            if _is_special(token):
                self.dropped_tokens.append(token)
                self._anomaly(f"control token {token} inside a message; dropped")
                return
        self._append_content(token)

    def _append_content(self, token: int) -> None:
        self._content_tokens.append(token)
        self._emit(self._decoder.decode(self._token_bytes(token)))

    def _emit(self, text: str) -> None:
        if text:
            assert self._header is not None
            self._content_parts.append(text)
            self.deltas.append((self._header, text))

    def _set_header(self, tokens: list[int]) -> None:
        self._header_tokens = tokens
        self._header_pieces = [self._piece(t) for t in tokens]

    def _scan_header(self) -> _HeaderScan:
        """Tolerant mode: read the shape of the header tokens so far (see the module docstring).

        Words are runs of text tokens; a token that starts with whitespace starts a new one. A header is at
        most: a role word (when the role is not already known), `<|channel|>` and its name, a ` to=`
        recipient, two further words (a recipient without `to=`, a content type) and `<|constrain|>` with its
        word. When the role is known (a completion's first header), something other than a recipient before
        the channel, or only whitespace past `UNSTRUCTURED_AFTER` tokens, means plain text.
        """
        tokens, pieces = self._header_tokens, self._header_pieces
        role_known = self._next_role is not None
        scan = _HeaderScan(True, 0)
        recipient = False
        others = 0
        words = 0
        i, n = 0, len(tokens)
        while i < n:
            token = tokens[i]
            if token in (tok.CHANNEL, tok.CONSTRAIN):
                # The marker's value: the text right after it, up to whitespace or `<`; the tokens that spell
                # it (one that straddles the end included) belong to the header.
                value, i = "", i + 1
                while i < n and not _is_special(tokens[i]):
                    piece = pieces[i]
                    stop = next((k for k, ch in enumerate(piece) if ch.isspace() or ch == "<"), None)
                    if stop == 0:
                        break
                    value += piece[:stop]
                    i += 1
                    if stop is not None:
                        break
                if token == tok.CHANNEL:
                    scan.channel = value or None
                scan.split = i
                continue
            word, j = "", i
            while j < n and not _is_special(tokens[j]) and not (word.strip() and pieces[j][:1].isspace()):
                word += pieces[j]
                j += 1
            word = word.strip(_ASCII_WHITESPACE)
            growing = j == n  # the last word may still grow
            i = j
            if not word:
                continue
            words += 1
            if words == 1 and not role_known:
                if word in _ROLES:
                    scan.role = _ROLES[word]
                    scan.split = j
                continue  # a tool's name (a tool result's header), or a role still being written
            if word.startswith(RECIPIENT_PREFIX) or (growing and RECIPIENT_PREFIX.startswith(word)):
                if recipient:
                    scan.plausible = False
                    return scan
                recipient = True
                if word.startswith(RECIPIENT_PREFIX):
                    scan.split = j
                continue
            others += 1
            if others > 2 or (role_known and scan.channel is None and not recipient):
                scan.plausible = False
                return scan
        if role_known and not words and tok.CHANNEL not in tokens and n > UNSTRUCTURED_AFTER:
            scan.plausible = False
        return scan

    def _header_as_text(self, scan: _HeaderScan) -> None:
        """Tolerant mode: the header tokens are no header (plain text, or a header the model went on writing
        without `<|message|>`): the words that fit a header stay its header, the rest opens the message's
        text, which goes on with the tokens that follow."""
        self._anomaly("a header turned into text; read as a message without <|message|>")
        tokens = self._header_tokens
        role = self._next_role or scan.role or self._default_role
        self._begin_content(Header(Author(role), channel=scan.channel), tokens[: scan.split])
        for token in tokens[scan.split :]:
            # Read as the message's own tokens: text goes on, while a `<|channel|>` the scan stopped short
            # of (it found no header before reaching it: " to<|channel|>" after a known role) starts a new
            # message.
            self._step(token)

    def _header_ended(self, end_token: int | None) -> None:
        """Tolerant mode: a header ended (a stop token, `<|start|>`, a second `<|channel|>` or the end of the
        stream) without `<|message|>`, still shaped like a header: a message with no text, since nothing the
        model wrote in it was meant for the reader. Unless none of it is surely header (a short answer such as
        "to", which could have begun ` to=`): then it is text."""
        tokens = self._header_tokens
        if not any(t not in (tok.START, tok.CHANNEL) for t in tokens):
            self._set_header([])
            self.dropped_tokens.extend(tokens)
            if end_token is not None:
                self.dropped_tokens.append(end_token)
            if tokens or end_token is not None:
                self._anomaly("an empty header")
            self._next_role = None
            self.state = StreamState.EXPECT_START
            return
        scan = self._scan_header()
        if scan.split == 0:
            self._header_as_text(scan)
        else:
            self._anomaly("a header without <|message|>; read as a message with no text")
            role = self._next_role or scan.role or self._default_role
            self._begin_content(Header(Author(role), channel=scan.channel), tokens)
        self._finish(end_token)

    def _begin_content(self, header: Header, header_tokens: list[int]) -> None:
        self._header = header
        self._header_tokens = header_tokens
        self._header_pieces = []
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

    def _piece(self, token: int) -> str:
        """A header token's own text, for reading the header's shape: "" for a control token."""
        if _is_special(token):
            return ""
        try:
            return self._encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")
        except KeyError:
            return "\ufffd"

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
