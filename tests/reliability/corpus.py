"""The bad-input corpus: hand-written request bodies, as raw JSON text, for every body-taking route.

A case is `bad` (the server must answer 4xx in the OpenAI envelope) or `edge` (an extreme value inside the
documented range, or a field the API may ignore: a 2xx or a 4xx envelope are both sound answers; a 5xx or a
hang never is). Bodies are raw text so that what `json.dumps` cannot write is sent as a client could send it:
`Infinity`, `NaN`, lone UTF-16 surrogates (`"\\ud800"`), nesting deeper than a serializer would go.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from tests.api.conftest import MODEL

# A lone surrogate is not Unicode text: a request carrying one is malformed and is refused (400), in every
# string field, whether the server would have used the field or not. (Were replacing it with U+FFFD made the
# documented behaviour, set this to "edge": a 2xx is then sound too, a 5xx or a hang still never is.)
SURROGATE_KIND = "bad"
SURROGATE = "@@surrogate@@"  # placeholders replaced in the raw text
INF, NEG_INF, NAN = "@@inf@@", "@@-inf@@", "@@nan@@"
_RAW = {
    SURROGATE: "\\ud800",
    f'"{INF}"': "Infinity",
    f'"{NEG_INF}"': "-Infinity",
    f'"{NAN}"': "NaN",
}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: str  # raw JSON text (or not JSON at all)
    kind: str = "bad"  # "bad": 4xx; "edge": 2xx or 4xx


def raw(value: Any) -> str:
    text = json.dumps(value)
    for placeholder, replacement in _RAW.items():
        text = text.replace(placeholder, replacement)
    return text


CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"

BASE: dict[str, dict[str, Any]] = {
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    RESPONSES: {"model": MODEL, "input": "Hi", "max_output_tokens": 4},
    COMPLETIONS: {"model": MODEL, "prompt": "Hi", "max_tokens": 4},
    TOKENIZE: {"prompt": "Hi"},
    DETOKENIZE: {"tokens": [1, 2]},
}

_LABELS = {
    CHAT: "chat",
    RESPONSES: "responses",
    COMPLETIONS: "completions",
    TOKENIZE: "tokenize",
    DETOKENIZE: "detokenize",
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def _with(path: str, **fields: Any) -> dict[str, Any]:
    body = copy.deepcopy(BASE[path])
    body.update(fields)
    return body


def _cases() -> list[Case]:
    cases: list[Case] = []
    seen: set[str] = set()

    def add(name: str, path: str, body: Any, kind: str = "bad") -> None:
        label = f"{_LABELS[path]}:{name}"
        assert label not in seen, label
        seen.add(label)
        cases.append(Case(label, path, body if isinstance(body, str) else raw(body), kind))

    # -- not a JSON object at all, on every route -----------------------------------------------------------
    for path in BASE:
        for label, text in [
            ("empty body", ""),
            ("truncated", '{"model": '),
            ("null", "null"),
            ("array", "[]"),
            ("number", "5"),
            ("nested 5000 arrays", "[" * 5000 + "]" * 5000),
        ]:
            add(label, path, text)

    # -- chat: wrong types, out of range, empty, huge -------------------------------------------------------
    for field, values in {
        "model": [5, None, []],
        "messages": ["Hi", {}, [], [1], None, [None]],
        "temperature": ["hot", -1, 3, 1e308, -1e-300],
        "top_p": [0, -0.5, 1.5, "x"],
        "n": [0, -1, 9, 10**6, 10**30, 1.5, "two"],
        "max_tokens": [0, -5, 10**12, 10**30, "many", 1.5],
        "max_completion_tokens": [0, 10**12],
        "presence_penalty": [3, -3, "x"],
        "frequency_penalty": [1e308, -1e308],
        "seed": ["abc", 2**70, 1.5],
        "stop": [5, [5], {"a": 1}],
        "logit_bias": [{"abc": 1}, {"-1": 5}, {"999999999": 5}, {"1": "x"}, [], {"1": None}],
        "top_logprobs": [21, -1],
        "top_k": [-2, "x"],
        "min_p": [2, -1],
        "tools": [5, [5], [{"type": "function"}], [{"type": "retrieval", "function": {"name": "a"}}]],
        "tool_choice": ["sometimes", {"type": "function"}, 5],
        "reasoning_effort": ["extreme", 5],
        "stream": [5, "maybe"],
        "stream_options": ["x", {"include_usage": "x"}],
        "response_format": [5],
        "metadata": [{"a": 5}, "x"],
        "logprobs": ["x"],
    }.items():
        for value in values:
            add(f"{field}={json.dumps(value)[:30]}", CHAT, _with(CHAT, **{field: value}))
    for value, label in [
        (INF, "Infinity"),
        (NEG_INF, "-Infinity"),
        (NAN, "NaN"),
        (1e308, "1e308"),
        (-1e308, "-1e308"),
    ]:
        add(f"logit_bias={label}", CHAT, _with(CHAT, logit_bias={"1": value}))
    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p"):
        for value, label in [(INF, "Infinity"), (NAN, "NaN")]:
            add(f"{field}={label}", CHAT, _with(CHAT, **{field: value}))
    # Inside the documented ranges but at the edge of floating point: sampling must not blow up.
    add("temperature=1e-300", CHAT, _with(CHAT, temperature=1e-300, stream=True), "edge")
    add("top_p=1e-50", CHAT, _with(CHAT, top_p=1e-50, stream=True), "edge")
    add("temperature=1e-300 top_p=1e-50", CHAT, _with(CHAT, temperature=1e-300, top_p=1e-50), "edge")
    add("min_p=1 temperature=2", CHAT, _with(CHAT, min_p=1.0, temperature=2.0), "edge")
    add("top_k=0", CHAT, _with(CHAT, top_k=0), "edge")
    add(
        "logit_bias=100 on every sampled id",
        CHAT,
        _with(CHAT, logit_bias={str(i): 100 for i in range(300)}),
        "edge",
    )
    add("seed=-1", CHAT, _with(CHAT, seed=-1), "edge")
    add("stop=['']", CHAT, _with(CHAT, stop=[""]), "edge")
    add("tools=[]", CHAT, _with(CHAT, tools=[]), "edge")
    add("stop=[]", CHAT, _with(CHAT, stop=[]), "edge")

    # -- chat: messages --------------------------------------------------------------------------------------
    for role in ("wizard", "function", "ASSISTANT", "", 5, None):
        add(f"role={json.dumps(role)}", CHAT, _with(CHAT, messages=[{"role": role, "content": "Hi"}]))
    add("message without role", CHAT, _with(CHAT, messages=[{"content": "Hi"}]))
    for content in (
        5,
        {"a": 1},
        [5],
        [None],
        [{"type": "text", "text": 5}],
        [{"type": "text", "text": ["x"]}],
    ):
        add(
            f"content={json.dumps(content)[:30]}",
            CHAT,
            _with(CHAT, messages=[{"role": "user", "content": content}]),
        )
    add(
        "content part image_url on a text-only model",
        CHAT,
        _with(
            CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        ),
    )
    for calls in (
        "x",
        [{}],
        [5],
        [{"function": {"name": 5}}],
        [{"function": {"arguments": "{}"}}],
        [{"type": "web", "function": {"name": "a", "arguments": "{}"}}],
        [{"id": "c1", "type": "function", "function": "get_weather"}],
    ):
        history = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
        add(f"tool_calls={json.dumps(calls)[:30]}", CHAT, _with(CHAT, messages=history, tools=[WEATHER]))
    add("tool_call_id=5", CHAT, _with(CHAT, messages=[{"role": "tool", "tool_call_id": 5, "content": "x"}]))

    # -- chat: tools -----------------------------------------------------------------------------------------
    for name in ("", "has space", "x" * 65, 5, None):
        tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        add(f"tool name={json.dumps(name)[:20]}", CHAT, _with(CHAT, tools=[tool]))
    for params in ("x", 5, []):
        tool = {"type": "function", "function": {"name": "f", "parameters": params}}
        add(f"tool parameters={json.dumps(params)}", CHAT, _with(CHAT, tools=[tool]))
    deep = {"type": "function", "function": {"name": "deep", "parameters": deep_schema(450)}}
    add("tool schema 450 levels deep", CHAT, _with(CHAT, tools=[deep]))
    add(
        "tool schema 450 levels deep",
        TOKENIZE,
        {"messages": [{"role": "user", "content": "x"}], "tools": [deep]},
    )
    add(
        "tool schema 450 levels deep",
        RESPONSES,
        _with(RESPONSES, tools=[{"type": "function", "name": "deep", "parameters": deep_schema(450)}]),
    )
    add(
        "tool_choice names a tool not given",
        CHAT,
        _with(CHAT, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
    )
    add("tool_choice=required without tools", CHAT, _with(CHAT, tool_choice="required"))

    # -- lone surrogates in every string field ---------------------------------------------------------------
    s = f"a{SURROGATE}b"
    chat_strings = {
        "model": _with(CHAT, model=s),
        "messages[0].content": _with(CHAT, messages=[{"role": "user", "content": s}]),
        "messages[0].content[0].text": _with(
            CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": s}]}]
        ),
        "messages[0].name": _with(CHAT, messages=[{"role": "user", "content": "Hi", "name": s}]),
        "system content": _with(
            CHAT, messages=[{"role": "system", "content": s}, {"role": "user", "content": "Hi"}]
        ),
        "developer content": _with(
            CHAT, messages=[{"role": "developer", "content": s}, {"role": "user", "content": "Hi"}]
        ),
        "assistant reasoning_content": _with(
            CHAT,
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "ok", "reasoning_content": s},
                {"role": "user", "content": "Hi"},
            ],
        ),
        "tool_calls arguments": _with(
            CHAT,
            tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": s}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
        ),
        "tool message content": _with(
            CHAT,
            tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": s},
            ],
        ),
        "tool description": _with(
            CHAT, tools=[{"type": "function", "function": {"name": "f", "description": s}}]
        ),
        "tool parameter description": _with(
            CHAT,
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"a": {"type": "string", "description": s}},
                        },
                    },
                }
            ],
        ),
        "tool parameter name": _with(
            CHAT,
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {s: {"type": "string"}}},
                    },
                }
            ],
        ),
        "stop": _with(CHAT, stop=s),
        "stop list": _with(CHAT, stop=["x", s]),
        "user": _with(CHAT, user=s),
        "metadata value": _with(CHAT, metadata={"k": s}),
        "logit_bias key": _with(CHAT, logit_bias={s: 1}),
        "tool_choice name": _with(
            CHAT, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": s}}
        ),
        "reasoning_effort": _with(CHAT, reasoning_effort=s),
        "streamed content": _with(CHAT, messages=[{"role": "user", "content": s}], stream=True),
        "reversed pair": _with(CHAT, messages=[{"role": "user", "content": "\udc00\ud800"}]),
    }
    for name, body in chat_strings.items():
        text = raw(body) if name != "reversed pair" else raw(_with(CHAT)).replace('"Hi"', '"\\udc00\\ud800"')
        add(f"surrogate in {name}", CHAT, text, SURROGATE_KIND)
    for name, body in {
        "input": _with(RESPONSES, input=s),
        "instructions": _with(RESPONSES, instructions=s),
        "input[0].content": _with(RESPONSES, input=[{"role": "user", "content": s}]),
        "input[0].content[0].text": _with(
            RESPONSES, input=[{"role": "user", "content": [{"type": "input_text", "text": s}]}]
        ),
        "function_call_output": _with(
            RESPONSES,
            input=[
                {"role": "user", "content": "Hi"},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": s},
            ],
            tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        ),
        "tool description": _with(RESPONSES, tools=[{"type": "function", "name": "f", "description": s}]),
        "metadata value": _with(RESPONSES, metadata={"k": s}),
        "model": _with(RESPONSES, model=s),
        "streamed input": _with(RESPONSES, input=s, stream=True),
        "previous_response_id": _with(RESPONSES, previous_response_id=s),
    }.items():
        add(f"surrogate in {name}", RESPONSES, body, SURROGATE_KIND)
    for name, body in {
        "prompt": _with(COMPLETIONS, prompt=s),
        "prompt list": _with(COMPLETIONS, prompt=["x", s]),
        "stop": _with(COMPLETIONS, stop=s),
        "model": _with(COMPLETIONS, model=s),
        "streamed prompt": _with(COMPLETIONS, prompt=s, stream=True),
    }.items():
        add(f"surrogate in {name}", COMPLETIONS, body, SURROGATE_KIND)
    add("surrogate in prompt", TOKENIZE, {"prompt": s}, SURROGATE_KIND)
    add(
        "surrogate in messages content",
        TOKENIZE,
        {"messages": [{"role": "user", "content": s}]},
        SURROGATE_KIND,
    )
    add("surrogate in model", DETOKENIZE, {"tokens": [1], "model": s}, SURROGATE_KIND)

    # -- responses ---------------------------------------------------------------------------------------------
    for field, values in {
        "input": [
            5,
            None,
            [],
            [5],
            [{"type": "bogus"}],
            [{"type": "function_call"}],
            [{"role": "wizard", "content": "x"}],
        ],
        "max_output_tokens": [0, -1, 10**12, "x"],
        "temperature": [5, -1],
        "top_p": [0, 2],
        "tools": [5, [{"type": "function"}], [{"type": "function", "name": 5}], [{"name": "f"}]],
        "tool_choice": ["sometimes", {"type": "function", "name": "nope"}],
        "truncation": ["sometimes"],
        "reasoning": [{"effort": "max"}, "x"],
        "text": [{"format": 5}],
        "metadata": [{"a": 5}],
        "include": ["x"],
        "top_logprobs": [50],
        "stream": [5],
    }.items():
        for value in values:
            add(f"{field}={json.dumps(value)[:30]}", RESPONSES, _with(RESPONSES, **{field: value}))
    add("previous_response_id unknown", RESPONSES, _with(RESPONSES, previous_response_id="resp_nope"))
    add(
        "input item content part wrong type",
        RESPONSES,
        _with(RESPONSES, input=[{"role": "user", "content": [{"type": "input_text", "text": 5}]}]),
    )
    add(
        "function_call_output without call",
        RESPONSES,
        _with(RESPONSES, input=[{"type": "function_call_output", "call_id": "c9", "output": "x"}]),
    )
    add("missing input", RESPONSES, {"model": MODEL})

    # -- completions -----------------------------------------------------------------------------------------
    for field, values in {
        "prompt": [5, None, [], [[]], [-1], [10**9], [10**20], [[1, -5]], [1.5], [None], {"a": 1}],
        "max_tokens": [0, 10**12],
        "n": [0, 100],
        "logprobs": [21, -1, "x"],
        "echo": ["x"],
        "temperature": [9],
        "stop": [5],
    }.items():
        for value in values:
            add(f"{field}={json.dumps(value)[:30]}", COMPLETIONS, _with(COMPLETIONS, **{field: value}))
    add("logit_bias=Infinity", COMPLETIONS, _with(COMPLETIONS, logit_bias={"1": INF}))
    add("top_p=1e-50", COMPLETIONS, _with(COMPLETIONS, top_p=1e-50, stream=True), "edge")

    # -- tokenize / detokenize -------------------------------------------------------------------------------
    for body in (
        {},
        {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
        {"prompt": 5},
        {"messages": "x"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"},
        {"messages": [{"role": "user", "content": "x"}], "tools": [5]},
    ):
        add(json.dumps(body)[-50:], TOKENIZE, body)
    for tokens in ("x", [-1], [10**9], [1.5], [None], [2**70], {"a": 1}, None):
        add(f"tokens={json.dumps(tokens)[:20]}", DETOKENIZE, {"tokens": tokens})
    add("missing tokens", DETOKENIZE, {})
    add("tokens=[]", DETOKENIZE, {"tokens": []}, "edge")
    return cases


CASES = _cases()
