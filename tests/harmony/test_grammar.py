"""The whole-turn grammar on the real harmony vocabulary: the turns it accepts (every header spelling the model
writes), the tokens it refuses, and random walks under its masks that always end in a valid turn."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import numpy as np
import pytest
import tiktoken

from engine.constraint import (
    GrammarConstraint,
    apply_token_masks,
    apply_token_masks_reference,
    grammar_problem,
)
from engine.request import Grammar
from harmony import encoding as tok
from harmony.grammar import (
    ChoiceFormat,
    GrammarError,
    LarkFormat,
    RegexFormat,
    ResponseFormat,
    ToolSpec,
    grammar_tokenizer,
    namespace_recipients,
    turn_grammar,
)
from harmony.messages import Role
from harmony.parser import parse_completion_tokens

ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 20},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "rush": {"type": "boolean"},
    },
    "required": ["item", "count"],
    "additionalProperties": False,
}
WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    strict=True,
)
SEARCH = ToolSpec("search", {"type": "object", "properties": {"q": {"type": "string"}}}, strict=False)


@pytest.fixture(scope="module")
def lltok(enc: tiktoken.Encoding) -> llguidance.LLTokenizer:
    return grammar_tokenizer(enc)


def walk(enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, grammar: str, text: str) -> tuple[bool, str]:
    """Feed `text` (harmony, special tokens by name) token by token, checking each is allowed first: (all
    allowed and the turn complete, the first refused token's text or '')."""
    constraint = GrammarConstraint(Grammar(grammar, lltok))
    mask = np.zeros(constraint.words, dtype=np.int32)
    for token in enc.encode(text, allowed_special="all"):
        constraint.fill(mask)
        word, bit = divmod(token, 32)
        if not (int(mask[word]) >> bit) & 1:
            return False, enc.decode([token])
        constraint.advance(token)
    return constraint.finished, ""


FINAL_JSON = '{"item": "tea", "count": 2}'


@pytest.mark.parametrize(
    "turn",
    [
        f"<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>{FINAL_JSON}<|return|>",
        f"<|channel|>final <|constrain|>json<|message|>{FINAL_JSON}<|return|>",
        f"<|channel|>final<|constrain|>json<|message|>{FINAL_JSON}<|return|>",
        f"<|channel|>final json<|message|>{FINAL_JSON}<|return|>",
        "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>"
        '<|start|>assistant<|channel|>final<|message|>{"item": "x", "count": 9, "rush": true}<|return|>',
    ],
    ids=["analysis-then-final", "constrain-spaced", "constrain-joined", "bare-json", "two-analyses"],
)
def test_a_structured_final_answer_in_every_spelling_is_accepted(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, turn: str
) -> None:
    grammar = turn_grammar(response_format=ResponseFormat(ORDER))
    assert grammar is not None
    assert walk(enc, lltok, grammar, turn) == (True, "")


@pytest.mark.parametrize(
    ("turn", "refused"),
    [
        ('<|channel|>final<|message|>Sure! {"item"', "Sure"),
        ('<|channel|>final<|message|>{"item": "tea", "count": 10}', "10"),
        ('<|channel|>final<|message|>{"item": "tea", "count": 2, "extra": 1}', "extra"),
        ('<|channel|>final<|message|>{"item": "te<|end|>', "<|end|>"),
        (f"<|channel|>final<|message|>{FINAL_JSON}<|end|>", "<|end|>"),
        ("<|channel|>analysis<|message|>done<|return|>", "<|return|>"),
        ("<|channel|>analysis<|message|>done<|end|><|call|>", "<|call|>"),
        ("<|channel|>commentary to=functions.get_weather<|message|>", "comment"),
    ],
    ids=[
        "text-before-json",
        "out-of-range",
        "extra-property",
        "control-token-in-string",
        "wrong-end",
        "return-from-analysis",
        "call-after-analysis",
        "call-without-tools",
    ],
)
def test_a_structured_final_answer_refuses_what_breaks_it(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, turn: str, refused: str
) -> None:
    grammar = turn_grammar(response_format=ResponseFormat(ORDER))
    assert grammar is not None
    ok, token = walk(enc, lltok, grammar, turn)
    assert not ok
    assert token.strip() == refused, token


CALL_ARGS = '{"city": "Paris"}'


@pytest.mark.parametrize(
    "turn",
    [
        f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{CALL_ARGS}<|call|>",
        f"<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{CALL_ARGS}<|call|>",
        f" to=functions.get_weather<|channel|>commentary json<|message|>{CALL_ARGS}<|call|>",
        f"<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary<|message|>"
        f"Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather<|message|>{CALL_ARGS}<|call|>",
    ],
    ids=["channel-first", "no-space", "recipient-first", "reasoning-and-preamble-first"],
)
def test_a_required_call_in_every_spelling_is_accepted(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, turn: str
) -> None:
    grammar = turn_grammar(tools=[WEATHER, SEARCH], tool_choice="required")
    assert grammar is not None
    assert walk(enc, lltok, grammar, turn) == (True, "")


def test_required_refuses_a_final_answer_and_named_refuses_the_other_tool(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer
) -> None:
    required = turn_grammar(tools=[WEATHER, SEARCH], tool_choice="required")
    named = turn_grammar(tools=[WEATHER, SEARCH], tool_choice="search")
    assert required is not None
    assert named is not None
    assert not walk(enc, lltok, required, "<|channel|>final<|message|>Hi<|return|>")[0]
    assert not walk(enc, lltok, required, "<|channel|>commentary to=functions.delete<|message|>{}<|call|>")[0]
    assert not walk(
        enc, lltok, named, f"<|channel|>commentary to=functions.get_weather<|message|>{CALL_ARGS}<|call|>"
    )[0]
    assert walk(
        enc, lltok, named, '<|channel|>commentary to=functions.search<|message|>{"q": "x"}<|call|>'
    ) == (True, "")
    # A strict tool's arguments follow its schema.
    assert not walk(
        enc, lltok, required, '<|channel|>commentary to=functions.get_weather<|message|>{"town": "x"}'
    )[0]


def test_nothing_to_constrain_gives_no_grammar_and_bad_choices_are_refused() -> None:
    assert turn_grammar() is None
    assert turn_grammar(tools=[SEARCH]) is None  # auto, nothing strict: the model's own choice, unconstrained
    assert turn_grammar(tools=[WEATHER], tool_choice="none") is not None  # the tools shown but refused
    assert turn_grammar(tools=[WEATHER]) is not None  # a strict tool: its arguments are enforced if called
    with pytest.raises(GrammarError, match="not among the tools"):
        turn_grammar(tools=[WEATHER], tool_choice="nope")
    with pytest.raises(GrammarError, match="at least one tool"):
        turn_grammar(tool_choice="required")


def test_a_strict_schema_with_a_keyword_llguidance_cannot_enforce_is_an_error(
    lltok: llguidance.LLTokenizer,
) -> None:
    unsupported = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    strict = grammar_problem(Grammar(turn_grammar(response_format=ResponseFormat(unsupported)) or "", lltok))
    assert strict is not None
    assert "uniqueItems" in strict
    lenient = turn_grammar(response_format=ResponseFormat(unsupported, strict=False)) or ""
    assert grammar_problem(Grammar(lenient, lltok)) is None


def allowed_after(enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, grammar: str, text: str) -> set[int]:
    """The tokens `grammar` allows after `text` (which it must accept)."""
    constraint = GrammarConstraint(Grammar(grammar, lltok))
    for token in enc.encode(text, allowed_special="all"):
        constraint.advance(token)
    assert constraint.error is None, constraint.error
    mask = np.zeros(constraint.words, dtype=np.int32)
    constraint.fill(mask)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: enc.n_vocab]
    return set(np.flatnonzero(bits).tolist())


def test_a_reasoning_budget_closes_the_analysis_and_the_turn_goes_on_to_its_end(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer
) -> None:
    words = " one two three"
    assert len(enc.encode_ordinary(words)) == 3
    opened = "<|channel|>analysis<|message|>"
    budgeted = turn_grammar(reasoning_budget=3)
    assert budgeted is not None
    # Within the budget the reasoning is free; at it, only `<|end|>` may follow.
    assert len(allowed_after(enc, lltok, budgeted, opened + " one two")) > 190_000
    assert allowed_after(enc, lltok, budgeted, opened + words) == {tok.END}
    # Then the answer: a second analysis message would spend more than the budget.
    after = opened + words + "<|end|><|start|>assistant<|channel|>"
    assert walk(enc, lltok, budgeted, after + "final<|message|>Yes.<|return|>") == (True, "")
    assert not walk(enc, lltok, budgeted, after + "analysis<|message|>")[0]
    # A forced call follows the closed analysis; the budget never bounds the call's arguments.
    forced = turn_grammar(tools=[WEATHER], tool_choice="required", reasoning_budget=3)
    assert forced is not None
    call = (
        opened + words + "<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
        '<|message|>{"city": "a very long city name indeed, longer than three tokens"}<|call|>'
    )
    assert walk(enc, lltok, forced, call) == (True, "")
    # 0: no reasoning at all.
    none = turn_grammar(reasoning_budget=0)
    assert none is not None
    assert walk(enc, lltok, none, "<|channel|>final<|message|>Hi<|return|>") == (True, "")
    assert not walk(enc, lltok, none, opened)[0]
    with pytest.raises(GrammarError, match="negative"):
        turn_grammar(reasoning_budget=-1)


@pytest.mark.parametrize("budget", [1, 3])
def test_a_reasoning_run_to_its_budget_gets_the_closing_sentence(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, budget: int
) -> None:
    words = "".join([" one", " two", " three"][:budget])
    assert len(enc.encode_ordinary(words)) == budget
    opened = "<|channel|>analysis<|message|>"
    grammar = turn_grammar(reasoning_budget=budget, closing="  Time to answer. ")
    assert grammar is not None
    # The model may end its reasoning itself before the budget...
    assert tok.END in allowed_after(enc, lltok, grammar, opened)
    answer = "<|end|><|start|>assistant<|channel|>final<|message|>Yes.<|return|>"
    assert walk(enc, lltok, grammar, opened + answer) == (True, "")
    # ...and at the budget only the sentence (on a line of its own) may follow, then the end.
    at_budget = allowed_after(enc, lltok, grammar, opened + words)
    assert tok.END not in at_budget
    assert all(enc.decode([t]) in "\nTime" for t in at_budget), [enc.decode([t]) for t in at_budget]
    assert walk(enc, lltok, grammar, opened + words + "\nTime to answer." + answer) == (True, "")
    assert not walk(enc, lltok, grammar, opened + words + answer)[0]
    with pytest.raises(GrammarError, match="empty"):
        turn_grammar(reasoning_budget=budget, closing=" ")


@pytest.mark.parametrize(
    ("answer", "good", "bad"),
    [
        (ChoiceFormat(("red", "green", 'say "hi"')), 'say "hi"', "blue"),
        (RegexFormat(r"\d{3}-[a-z]+/x"), "123-abc/x", "12-abc/x"),
        (LarkFormat('start: item ("," item)*\nitem: "a" | "b"'), "a,b,a", "a,c"),
    ],
    ids=["choice", "regex", "lark"],
)
def test_the_final_answer_follows_a_choice_a_regex_or_a_lark_grammar(
    enc: tiktoken.Encoding,
    lltok: llguidance.LLTokenizer,
    answer: ChoiceFormat | RegexFormat | LarkFormat,
    good: str,
    bad: str,
) -> None:
    grammar = turn_grammar(response_format=answer)
    assert grammar is not None
    assert grammar_problem(Grammar(grammar, lltok)) is None
    thought = "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant"
    assert walk(enc, lltok, grammar, f"{thought}<|channel|>final<|message|>{good}<|return|>") == (True, "")
    assert not walk(enc, lltok, grammar, f"<|channel|>final<|message|>{bad}<|return|>")[0]


def test_a_malformed_regex_or_grammar_does_not_compile(lltok: llguidance.LLTokenizer) -> None:
    for answer in (RegexFormat("[a-z"), LarkFormat('start: "a'), LarkFormat("start: undefined")):
        problem = grammar_problem(Grammar(turn_grammar(response_format=answer) or "", lltok))
        assert problem is not None, answer


def test_without_a_format_the_final_answer_is_free_text_and_tool_choices_hold(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer
) -> None:
    strict_auto = turn_grammar(tools=[WEATHER, SEARCH])
    assert strict_auto is not None
    assert walk(enc, lltok, strict_auto, "<|channel|>final<|message|>Any text {at all<|return|>") == (
        True,
        "",
    )
    none = turn_grammar(tools=[WEATHER, SEARCH], tool_choice="none")
    assert none is not None
    assert walk(enc, lltok, none, "<|channel|>final<|message|>Fine.<|return|>") == (True, "")
    assert not walk(enc, lltok, none, '<|channel|>commentary to=functions.search<|message|>{"q": "x"}')[0]
    # allowed_tools: only the listed tools may be called, freely (auto) or necessarily (required).
    narrowed = turn_grammar(tools=[WEATHER, SEARCH], allowed=["search"])
    assert narrowed is not None
    assert walk(enc, lltok, narrowed, "<|channel|>final<|message|>Fine.<|return|>") == (True, "")
    assert not walk(
        enc, lltok, narrowed, f"<|channel|>commentary to=functions.get_weather<|message|>{CALL_ARGS}"
    )[0]
    must = turn_grammar(tools=[WEATHER, SEARCH], tool_choice="required", allowed=["search"])
    assert must is not None
    assert not walk(enc, lltok, must, "<|channel|>final<|message|>Fine.<|return|>")[0]
    assert walk(
        enc, lltok, must, '<|channel|>commentary to=functions.search<|message|>{"q": "x"}<|call|>'
    ) == (
        True,
        "",
    )
    with pytest.raises(GrammarError, match="not among the tools"):
        turn_grammar(tools=[WEATHER], allowed=["nope"])
    with pytest.raises(GrammarError, match="at least one tool it may call"):
        turn_grammar(tools=[WEATHER, SEARCH], tool_choice="search", allowed=["get_weather"])


@pytest.mark.parametrize("seed", range(6))
def test_random_walks_under_the_mask_end_in_valid_turns(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer, seed: int
) -> None:
    """Sample uniformly among the allowed tokens (leaning towards closing the JSON), as a model that ignores
    its logits would: every walk that ends is a turn our parser reads, with a final answer the schema
    accepts or a call whose arguments its tool's schema accepts."""
    rng = random.Random(seed)
    required = seed % 2 == 1
    grammar = (
        turn_grammar(tools=[WEATHER], tool_choice="required")
        if required
        else turn_grammar(response_format=ResponseFormat(ORDER))
    )
    assert grammar is not None
    constraint = GrammarConstraint(Grammar(grammar, lltok))
    mask = np.zeros(constraint.words, dtype=np.int32)
    # A short path into the answer, then free choices: reasoning walks would take too long to end by chance.
    start = (
        "<|channel|>commentary to=functions.get_weather<|message|>"
        if required
        else "<|channel|>final<|message|>"
    )
    tokens = enc.encode(start, allowed_special="all")
    for token in tokens:
        constraint.advance(token)
    closing = {
        t for t in range(enc.n_vocab - 1000) if enc.decode_single_token_bytes(t) in (b'"', b"}", b'"}', b",")
    }
    for _ in range(400):
        if constraint.finished:
            break
        constraint.fill(mask)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: enc.n_vocab]
        allowed = np.flatnonzero(bits)
        preferred = [t for t in allowed.tolist() if t in closing or t in (tok.RETURN, tok.CALL)]
        token = rng.choice(preferred if preferred and rng.random() < 0.7 else allowed.tolist())
        constraint.advance(token)
        tokens.append(token)
        assert constraint.error is None
    assert constraint.finished, enc.decode(tokens)[-200:]
    (message,) = parse_completion_tokens(enc, tokens, Role.ASSISTANT, strict=False)
    document = json.loads(message.text)
    jsonschema.validate(document, WEATHER.parameters if required else ORDER)


def test_batched_mask_application_equals_its_twin() -> None:
    import torch

    from model.kernels.token_bitmask import apply_bitmask_torch

    rng = np.random.default_rng(0)
    vocab = 100
    words = (vocab + 31) // 32 + 1  # a mask may name tokens past the model's rows
    # Rows that allow about half, almost all, almost none and all of the tokens (a row without a grammar).
    half = rng.integers(-(2**31), 2**31, size=words, dtype=np.int64).astype(np.int32)
    most = np.full(words, -1, dtype=np.int32)
    most[1] = ~np.int32(1 << 5)
    few = np.zeros(words, dtype=np.int32)
    few[2] = -(2**31) | (1 << 3)  # tokens 67 and 95
    free = np.full(words, -1, dtype=np.int32)
    for masks in (np.stack([free, half, free, few]), np.stack([most, few, half, half])):
        logits = torch.randn(4, vocab)
        expected = logits.clone()
        apply_token_masks_reference(expected, masks)
        apply_token_masks(logits, torch.from_numpy(masks))
        assert torch.equal(logits, expected)
        unpacked = expected.clone()
        apply_bitmask_torch(unpacked, torch.from_numpy(masks))  # the device path, run on the host
        assert torch.equal(unpacked, expected)
    assert torch.isinf(logits[1]).sum() == vocab - 2
    assert torch.isinf(logits[0]).sum() == 1


def test_built_in_tools_are_recipients_of_the_turn(
    enc: tiktoken.Encoding, lltok: llguidance.LLTokenizer
) -> None:
    """python (free code) and the browser's functions (JSON of their schemas) are calls the turn may end in,
    in the spellings the model writes; forcing one leaves only its calls; allowed names narrow them."""
    from harmony.messages import browser_tool_namespace, python_tool_namespace

    recipients = [
        *namespace_recipients(python_tool_namespace()),
        *namespace_recipients(browser_tool_namespace()),
    ]
    assert [r.name for r in recipients] == ["python", "browser.search", "browser.open", "browser.find"]
    python = " to=python<|channel|>analysis<|message|>print(2 + 3)<|call|>"
    python_channel_first = "<|channel|>analysis to=python code<|message|>x = 1\nprint(x)<|call|>"
    search = '<|channel|>analysis to=browser.search code<|message|>{"query": "rust", "topn": 3}<|call|>'
    search_json = ' to=browser.search<|channel|>commentary <|constrain|>json<|message|>{"query": "x"}<|call|>'
    reasoned = "<|channel|>analysis<|message|>Let me compute.<|end|><|start|>assistant"
    answer = "<|channel|>final<|message|>Five.<|return|>"
    call = '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Oslo"}<|call|>'

    # With a response format (so a grammar is built), the built-in calls stay open alongside the answer.
    formatted = turn_grammar(response_format=ResponseFormat(ORDER), recipients=recipients)
    assert formatted is not None
    for turn in (python, python_channel_first, search, search_json, reasoned + python):
        assert walk(enc, lltok, formatted, turn) == (True, ""), turn
    assert not walk(
        enc, lltok, formatted, '<|channel|>analysis to=browser.search<|message|>{"topn": 3}<|call|>'
    )[0]
    assert not walk(enc, lltok, formatted, " to=browser.delete<|channel|>analysis<|message|>{}<|call|>")[0]

    # A tool choice forcing python: reasoning first, then only python's call.
    forced = turn_grammar(
        tools=[WEATHER],
        tool_choice="required",
        allowed=[],
        recipients=recipients,
        allowed_recipients=["python"],
    )
    assert forced is not None
    assert walk(enc, lltok, forced, reasoned + python) == (True, "")
    for refused in (answer, call, search):
        assert not walk(enc, lltok, forced, refused)[0], refused
    # Forcing the browser by its namespace allows its three functions and nothing else.
    browsing = turn_grammar(recipients=recipients, tool_choice="required", allowed_recipients=["browser"])
    assert browsing is not None
    assert walk(enc, lltok, browsing, search) == (True, "")
    assert not walk(enc, lltok, browsing, python)[0]
    # 'none' calls nothing; an unknown allowed name is refused.
    only_answer = turn_grammar(
        recipients=recipients, tool_choice="none", response_format=ResponseFormat(ORDER)
    )
    assert only_answer is not None
    assert not walk(enc, lltok, only_answer, python)[0]
    with pytest.raises(GrammarError, match="'shell'"):
        turn_grammar(recipients=recipients, tool_choice="required", allowed_recipients=["shell"])
    # Nothing to constrain: no grammar at all.
    assert turn_grammar(recipients=recipients) is None
