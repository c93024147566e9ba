"""One grammar for a whole assistant turn, in llguidance's Lark dialect: structured outputs and enforced tool
calls without ever constraining the reasoning.

The grammar starts at the first generated token (after the prompt's ``<|start|>assistant``) and describes
the entire harmony output: any number of free ``analysis`` messages (and, when tools are offered,
``commentary`` preambles), then the turn's end, which is one of

* the ``final`` message, whose body matches the response format's JSON Schema (or is free text when there is
  none) and ends with ``<|return|>``;
* one call ``to=functions.NAME`` on the commentary channel, whose JSON arguments match that tool's parameters
  and end with ``<|call|>`` (the model makes at most one call per turn: ``<|call|>`` ends it).

Harmony's control tokens appear in the grammar by name, and a regex can never match one, so free reasoning
cannot swallow an ``<|end|>`` and a JSON string can never contain a control token. The header spellings the
model writes are all accepted: the recipient before or after the channel, and the content type as
`` <|constrain|>json``, ``<|constrain|>json`` or `` json``.

:func:`turn_grammar` returns None when nothing needs constraining (free text with tools left to the model's
choice and no strict tool), so an unconstrained request costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.tiktoken
import tiktoken

from harmony import encoding as tok

# JSON between tokens may carry at most this much whitespace in a row: unbounded whitespace is how a model
# under a JSON grammar loops forever without closing the object.
WHITESPACE = "[\\x20\\x0A\\x0D\\x09]{0,16}"


class GrammarError(ValueError):
    """A schema or choice the grammar cannot express; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the request offers: its name, its parameters' JSON Schema and whether they are enforced."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the final answer must be: JSON matching `schema` (any JSON object when None)."""

    schema: dict[str, Any] | None = None
    strict: bool = True


def _json_rule(schema: dict[str, Any] | None, strict: bool) -> str:
    """The llguidance `%json` directive for `schema` (None: any object), whitespace bounded; `strict` False
    lets llguidance skip keywords it cannot enforce instead of refusing the schema."""
    base: dict[str, Any] = {"type": "object"} if schema is None else dict(schema)
    guidance = dict(base.get("x-guidance", {}))
    guidance["whitespace_pattern"] = WHITESPACE
    if not strict:
        guidance["lenient"] = True
    base["x-guidance"] = guidance
    return "%json " + json.dumps(base, ensure_ascii=True, separators=(",", ":"))


def _quoted(text: str) -> str:
    return json.dumps(text)


def turn_grammar(
    *,
    response_format: ResponseFormat | None = None,
    tools: list[ToolSpec] | None = None,
    tool_choice: str = "auto",
) -> str | None:
    """The Lark grammar of the turn, or None when nothing is constrained.

    `tool_choice`: ``"auto"`` (the final answer or a call to any tool), ``"none"`` (the final answer only),
    ``"required"`` (a call to one of the tools) or a tool's name (a call to that tool). Strict tools get their
    arguments enforced; the others any JSON object."""
    tools = tools or []
    names = [tool.name for tool in tools]
    if tool_choice not in ("auto", "none", "required") and tool_choice not in names:
        raise GrammarError(f"tool_choice {tool_choice!r} is not among the tools")
    if tool_choice == "required" and not tools:
        raise GrammarError("tool_choice 'required' needs at least one tool")
    callable_tools = (
        [] if tool_choice == "none" else [t for t in tools if tool_choice in ("auto", "required", t.name)]
    )
    may_answer = tool_choice in ("auto", "none")
    constrained = (
        response_format is not None
        or tool_choice not in ("auto", "none")
        or any(tool.strict for tool in callable_tools)
    )
    if not constrained:
        return None

    ends = []
    rules = [
        "%llguidance {}",
        "",
        "FREE: /(?s:.*)/",
        'ct: " "? <|constrain|> "json" | " json"',
        'analysis: <|channel|> "analysis" <|message|> FREE <|end|> <|start|> "assistant"',
    ]
    prefix = ["analysis"]
    if tools:
        rules.append('preamble: <|channel|> "commentary" <|message|> FREE <|end|> <|start|> "assistant"')
        prefix.append("preamble")
    if may_answer:
        ends.append("final")
        if response_format is None:
            rules.append('final: <|channel|> "final" <|message|> FREE <|return|>')
        else:
            rules.append('final: <|channel|> "final" ct? <|message|> final_body <|return|>')
            rules.append("final_body: " + _json_rule(response_format.schema, response_format.strict))
    for i, tool in enumerate(callable_tools):
        recipient = _quoted(f" to=functions.{tool.name}")
        rules.append(
            f'call_{i}: ( <|channel|> "commentary" {recipient} ct? '
            f'| {recipient} <|channel|> "commentary" ct? ) <|message|> args_{i} <|call|>'
        )
        schema = tool.parameters if tool.strict and tool.parameters else None
        rules.append(f"args_{i}: " + _json_rule(schema, tool.strict))
        ends.append(f"call_{i}")
    rules.insert(1, f"start: ({' | '.join(prefix)})* end_msg")
    rules.insert(2, "end_msg: " + " | ".join(ends))
    return "\n".join(rules) + "\n"


def grammar_tokenizer(encoding: tiktoken.Encoding) -> llguidance.LLTokenizer:
    """llguidance's view of the harmony vocabulary, control tokens included by name, ending a turn on
    ``<|return|>`` or ``<|call|>``. Building it takes a second or two: once per process."""
    return llguidance.tiktoken.lltokenizer_from_encoding(
        encoding, n_vocab=encoding.n_vocab, eos_token=[tok.RETURN, tok.CALL]
    )
