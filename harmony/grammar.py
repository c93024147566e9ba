"""One grammar for a whole assistant turn, in llguidance's Lark dialect: structured outputs and enforced tool
calls without ever constraining the reasoning.

The grammar starts at the first generated token (after the prompt's ``<|start|>assistant``) and describes
the entire harmony output: any number of free ``analysis`` messages (and, when tools are offered,
``commentary`` preambles), then the turn's end, which is one of

* the ``final`` message, whose body matches the answer's format (a JSON Schema, a regex, one of a list of
  choices or a Lark grammar; free text when there is none) and ends with ``<|return|>``;
* one call ``to=functions.NAME`` on the commentary channel, whose JSON arguments match that tool's parameters
  and end with ``<|call|>`` (the model makes at most one call per turn: ``<|call|>`` ends it);
* one call to another recipient the request enables (harmony's built-in ``python`` and ``browser.*``, or any
  namespace of tools: a :class:`Recipient`), on the analysis or commentary channel, its message JSON for a
  namespace's typed tool or free text (python's code), also ending with ``<|call|>``.

Harmony's control tokens appear in the grammar by name, and a regex can never match one, so free reasoning
cannot swallow an ``<|end|>`` and a JSON string can never contain a control token. The header spellings the
model writes are all accepted: the recipient before or after the channel, and the content type as
`` <|constrain|>json``, ``<|constrain|>json`` or `` json``.

The reasoning can be given a budget: the analysis message is then bounded by llguidance's ``max_tokens`` on
its body, so when the budget is spent the grammar allows only ``<|end|>`` and the turn goes on to its end
(the final answer, or the call a forced tool choice asks for). A turn has at most one analysis message under
a budget, so the budget bounds all the reasoning; a budget of 0 leaves the analysis out. A commentary
preamble is held to one message and the same bound, so the answer always comes (0: no preamble either).

The model makes at most one call per turn (``<|call|>`` ends it), so ``parallel_tool_calls: false`` holds by
construction.

:func:`turn_grammar` returns None when nothing needs constraining (free text with tools left to the model's
choice, no strict tool and no budget), so an unconstrained request costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.tiktoken
import tiktoken

from harmony import encoding as tok
from harmony.messages import ToolNamespaceConfig

# The whitespace JSON may carry between its tokens: what compact, spaced (`", "`, `": "`) and indented JSON
# write (one space, or a line break and its indentation), nothing more. Unbounded whitespace is how a model
# under a JSON grammar loops forever without closing the object, and even a bounded run of any whitespace
# lets an unsure model spend a dozen tokens on every gap.
WHITESPACE = "\\x20?|\\r?\\n(\\x20{0,32}|\\t{0,8})"


class GrammarError(ValueError):
    """A schema or choice the grammar cannot express; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the request offers: its name, its parameters' JSON Schema and whether they are enforced."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False


@dataclass(frozen=True, slots=True)
class Recipient:
    """A tool the model addresses outside ``functions``: `name` as written after ``to=`` (``python``,
    ``browser.search``), and what its message holds: JSON matching `schema` (the schema the model was shown,
    enforced leniently) or, when None, free text (python's code)."""

    name: str
    schema: dict[str, Any] | None = None

    @property
    def namespace(self) -> str:
        return self.name.split(".", 1)[0]


def namespace_recipients(namespace: ToolNamespaceConfig) -> list[Recipient]:
    """The recipients a tool namespace of the system message offers: ``NAMESPACE.TOOL`` for each typed tool
    (arguments: its parameters, any object when it declares none), or the namespace itself with free text
    when it declares no tools (python)."""
    if not namespace.tools:
        return [Recipient(namespace.name)]
    return [
        Recipient(f"{namespace.name}.{tool.name}", tool.parameters or {"type": "object"})
        for tool in namespace.tools
    ]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the final answer must be: JSON matching `schema` (any JSON object when None)."""

    schema: dict[str, Any] | None = None
    strict: bool = True


@dataclass(frozen=True, slots=True)
class RegexFormat:
    """The final answer matches `pattern` (Rust regex syntax, anchored at both ends)."""

    pattern: str


@dataclass(frozen=True, slots=True)
class ChoiceFormat:
    """The final answer is exactly one of `choices`."""

    choices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LarkFormat:
    """The final answer is a sentence of `grammar` (Lark, llguidance's dialect, with its own `start`)."""

    grammar: str


FinalFormat = ResponseFormat | RegexFormat | ChoiceFormat | LarkFormat


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


def schema_grammar(schema: dict[str, Any], strict: bool = True) -> str:
    """A grammar of JSON matching `schema` alone: checks a tool's schema on its own, so that a schema the
    turn's grammar cannot enforce is reported as that tool's."""
    return "%llguidance {}\nstart: " + _json_rule(schema, strict) + "\n"


def _quoted(text: str) -> str:
    return json.dumps(text)


def _final_body(answer: FinalFormat) -> str:
    """The rule of the final answer's body for `answer`."""
    if isinstance(answer, ResponseFormat):
        return _json_rule(answer.schema, answer.strict)
    if isinstance(answer, RegexFormat):
        return "/" + llguidance.regex_to_lark(answer.pattern) + "/"
    if isinstance(answer, ChoiceFormat):
        if not answer.choices:
            raise GrammarError("choice needs at least one choice")
        return " | ".join(_quoted(c) for c in answer.choices)
    return "%lark {\n" + answer.grammar + "\n}"


def turn_grammar(
    *,
    response_format: FinalFormat | None = None,
    tools: list[ToolSpec] | None = None,
    tool_choice: str = "auto",
    allowed: Collection[str] | None = None,
    reasoning_budget: int | None = None,
    closing: str | None = None,
    recipients: list[Recipient] | None = None,
    allowed_recipients: Collection[str] | None = None,
) -> str | None:
    """The Lark grammar of the turn, or None when nothing is constrained.

    `tool_choice`: ``"auto"`` (the final answer or a call to any tool), ``"none"`` (the final answer only),
    ``"required"`` (a call to one of the tools) or a tool's name (a call to that tool). `allowed` narrows the
    tools that may be called to those named (the others stay in the prompt). Strict tools get their arguments
    enforced; the others any JSON object. `reasoning_budget`: the most tokens the analysis may take (0: no
    analysis). `closing`: a short sentence written into the analysis, on a line of its own, when it runs to
    its budget, before the grammar closes it (None: the analysis is closed as it stands).

    `recipients`: the other tools the model may address (built-in tools, tool namespaces), callable as the
    functions are under `tool_choice` (never under ``"none"``, nor under a function's name). When
    `allowed_recipients` is given only those named may be called, by recipient or by namespace (``browser``
    allows every ``browser.*``): a tool choice forcing a built-in tool is ``"required"`` with no allowed
    function and that tool's recipients allowed."""
    tools = tools or []
    names = [tool.name for tool in tools]
    if tool_choice not in ("auto", "none", "required") and tool_choice not in names:
        raise GrammarError(f"tool_choice {tool_choice!r} is not among the tools")
    if reasoning_budget is not None and reasoning_budget < 0:
        raise GrammarError("the reasoning budget cannot be negative")
    if closing is not None and not closing.strip():
        raise GrammarError("the closing sentence is empty")
    unknown = sorted(set(allowed or ()) - set(names))
    if unknown:
        raise GrammarError(f"the allowed tools name {unknown[0]!r}, which is not among the tools")
    callable_tools = [
        t
        for t in tools
        if tool_choice != "none"
        and tool_choice in ("auto", "required", t.name)
        and (allowed is None or t.name in allowed)
    ]
    recipients = recipients or []
    known = {r.name for r in recipients} | {r.namespace for r in recipients}
    unknown = sorted(set(allowed_recipients or ()) - known)
    if unknown:
        raise GrammarError(f"the allowed tools name {unknown[0]!r}, which is not among the tools")
    callable_recipients = [
        r
        for r in recipients
        if tool_choice in ("auto", "required")
        and (allowed_recipients is None or {r.name, r.namespace} & set(allowed_recipients))
    ]
    if tool_choice not in ("auto", "none") and not callable_tools and not callable_recipients:
        raise GrammarError(f"tool_choice {tool_choice!r} needs at least one tool it may call")
    may_answer = tool_choice in ("auto", "none")
    constrained = (
        response_format is not None
        or reasoning_budget is not None
        or len(callable_tools) < len(tools)  # 'none', a named tool, or a narrowed set: the rest are refused
        or len(callable_recipients) < len(recipients)
        or not may_answer
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
    ]
    if reasoning_budget is None:
        rules.append('analysis: <|channel|> "analysis" <|message|> FREE <|end|> <|start|> "assistant"')
    elif reasoning_budget > 0 and closing is None:
        # A rule's `max_tokens` bounds the tokens of its text: when they are spent, only `<|end|>` may follow.
        rules.append(f"thought[max_tokens={reasoning_budget}]: FREE")
        rules.append('analysis: <|channel|> "analysis" <|message|> thought <|end|> <|start|> "assistant"')
    elif reasoning_budget > 0:
        # The text has two readings until one dies: `early`, which the model ends itself, and `spent`, which
        # only the closing sentence may follow. With both bounded by the budget the model could still end at
        # it without the sentence, so `early` is bounded one token shorter: at the budget only `spent` is
        # left and the sentence is written. (As llguidance reads two bounded texts side by side, `early` may
        # end up to two tokens short of the budget, so a reasoning one token short goes on by one.)
        ended = "<|end|>"
        if reasoning_budget > 1:
            rules.append(f"early[max_tokens={reasoning_budget - 1}]: FREE")
            ended = "early <|end|>"
        rules.append(f"spent[max_tokens={reasoning_budget}]: FREE")
        sentence = _quoted("\n" + closing.strip())
        rules.append(f"thought: {ended} | spent {sentence} <|end|>")
        rules.append('analysis: <|channel|> "analysis" <|message|> thought <|start|> "assistant"')
    preambles = bool(tools or recipients) and reasoning_budget != 0
    if preambles:
        body = "FREE" if reasoning_budget is None else "aside"
        if reasoning_budget is not None:
            rules.append(f"aside[max_tokens={reasoning_budget}]: FREE")
        rules.append(f'preamble: <|channel|> "commentary" <|message|> {body} <|end|> <|start|> "assistant"')
    if may_answer:
        ends.append("final")
        if response_format is None:
            rules.append('final: <|channel|> "final" <|message|> FREE <|return|>')
        else:
            rules.append('final: <|channel|> "final" ct? <|message|> final_body <|return|>')
            rules.append("final_body: " + _final_body(response_format))
    for i, tool in enumerate(callable_tools):
        recipient = _quoted(f" to=functions.{tool.name}")
        rules.append(
            f'call_{i}: ( <|channel|> "commentary" {recipient} ct? '
            f'| {recipient} <|channel|> "commentary" ct? ) <|message|> args_{i} <|call|>'
        )
        schema = tool.parameters if tool.strict and tool.parameters else None
        rules.append(f"args_{i}: " + _json_rule(schema, tool.strict))
        ends.append(f"call_{i}")
    if callable_recipients:
        # Built-in tools are called on the analysis channel (commentary too), their content type written as
        # ` code` for python or as JSON's.
        rules.append('tool_channel: "analysis" | "commentary"')
        rules.append('tool_ct: ct | " code"')
    for i, recipient in enumerate(callable_recipients):
        to = _quoted(f" to={recipient.name}")
        rules.append(
            f"tool_{i}: ( <|channel|> tool_channel {to} tool_ct? "
            f"| {to} <|channel|> tool_channel tool_ct? ) <|message|> tool_body_{i} <|call|>"
        )
        body = "FREE" if recipient.schema is None else _json_rule(recipient.schema, strict=False)
        rules.append(f"tool_body_{i}: {body}")
        ends.append(f"tool_{i}")
    if reasoning_budget is None:
        start = "(analysis | preamble)* end_msg" if preambles else "analysis* end_msg"
    else:
        # Under a budget, one analysis message at most: its bound is then the bound on all the reasoning. A
        # preamble (also text before the answer) is held to one message and the same bound.
        parts = ["analysis?", "preamble?"] if preambles else ["analysis?"] if reasoning_budget > 0 else []
        start = " ".join([*parts, "end_msg"])
    rules.insert(1, f"start: {start}")
    rules.insert(2, "end_msg: " + " | ".join(ends))
    return "\n".join(rules) + "\n"


def grammar_tokenizer(encoding: tiktoken.Encoding) -> llguidance.LLTokenizer:
    """llguidance's view of the harmony vocabulary, control tokens included by name, ending a turn on
    ``<|return|>`` or ``<|call|>``. Building it takes a second or two: once per process."""
    return llguidance.tiktoken.lltokenizer_from_encoding(
        encoding, n_vocab=encoding.n_vocab, eos_token=[tok.RETURN, tok.CALL]
    )
