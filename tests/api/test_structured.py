"""Structured outputs over HTTP on the real engine: a json_schema response format is enforced by the grammar
(the random model's answers that finish validate), shown to the model in the developer message, and the SDK's
parse() helper returns the parsed object."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field, ValidationError

from harmony.encoding import load_harmony_encoding
from harmony.messages import ResponseFormat
from harmony.render import Renderer
from server.harmony_chat import to_harmony
from server.protocol import ChatMessage
from tests.api.conftest import MODEL, Served
from tests.api.schema_corpus import CORPUS

USER = [{"role": "user", "content": "Is the sky blue?"}]


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(8):
        choice = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
            },
            temperature=1.5,
            seed=seed,
            max_tokens=40,
        ).choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    assert finished > 0, "no answer finished within the budget"


def test_the_schema_reaches_the_developer_message() -> None:
    """Harmony tells the model the answer's shape in the developer message's `# Response Formats`."""
    conversation = to_harmony(
        [ChatMessage(role="user", content="Is the sky blue?")],
        None,
        effort=None,
        date_setting=None,
        response_format=ResponseFormat("verdict", SCHEMA),
    )
    enc = load_harmony_encoding()
    text = enc.decode(Renderer(enc).render_for_completion(conversation))
    assert "# Response Formats" in text
    assert "## verdict" in text
    assert '"confidence"' in text


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=9)


def test_the_sdk_parse_helper_returns_the_object(client: openai.OpenAI) -> None:
    parsed = None
    for seed in range(8):
        try:
            completion = client.chat.completions.parse(
                model=MODEL, messages=USER, response_format=Verdict, temperature=1.5, seed=seed, max_tokens=40
            )
        except openai.LengthFinishReasonError:  # still reasoning at the budget: the random model's way
            continue
        parsed = completion.choices[0].message.parsed
        break
    assert isinstance(parsed, Verdict)


def test_responses_text_format_answers_validate_and_parse(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(8):
        response = client.responses.create(
            model=MODEL,
            input="Is the sky blue?",
            text={"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}},
            temperature=1.5,
            max_output_tokens=40,
            extra_body={"seed": seed},
        )
        assert response.text.format.type == "json_schema"
        if response.status == "completed":
            finished += 1
            jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert finished > 0, "no response completed within the budget"
    parsed = None
    for seed in range(8):
        try:
            result = client.responses.parse(
                model=MODEL,
                input="Is the sky blue?",
                text_format=Verdict,
                temperature=1.5,
                max_output_tokens=40,
                extra_body={"seed": seed},
            )
        except ValidationError:  # cut by max_output_tokens mid-answer: the SDK parses what there is
            continue
        if result.status == "completed":
            parsed = result.output_parsed
            break
    assert isinstance(parsed, Verdict)


# -- tool choice and strict tools, through the turn grammar ---------------------------------------------------

CITY = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
STRICT_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather.", "parameters": CITY, "strict": True},
}
OTHER_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Now.", "parameters": None}}


def test_a_required_call_may_follow_reasoning_and_its_strict_arguments_validate(
    client: openai.OpenAI,
) -> None:
    """No forcing: the random model reasons (within its budget), then must call; its arguments follow the
    strict tool's schema. Chat and Responses alike."""
    for seed in range(4):
        choice = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[STRICT_TOOL, OTHER_TOOL],  # type: ignore[list-item]
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=48,
            extra_body={"thinking_token_budget": 4},
        ).choices[0]
        # A call always comes (get_time's free arguments may still be running at the token limit).
        (call,) = choice.message.tool_calls or []
        assert choice.finish_reason in ("tool_calls", "length"), choice
        if call.function.name == "get_weather":
            assert choice.finish_reason == "tool_calls", choice
            jsonschema.validate(json.loads(call.function.arguments), CITY)
        named = client.responses.create(
            model=MODEL,
            input="Weather?",
            tools=[{"type": "function", **STRICT_TOOL["function"]}],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            temperature=1.0,
            max_output_tokens=48,
            extra_body={"seed": seed, "thinking_token_budget": 4},
        )
        calls = [item for item in named.output if item.type == "function_call"]
        assert [c.name for c in calls] == ["get_weather"], named.output
        if named.status == "completed":  # else cut by the token limit (the random model loves whitespace)
            jsonschema.validate(json.loads(calls[0].arguments), CITY)


def test_responses_allowed_tools_narrow_the_calls_and_are_echoed(
    client: openai.OpenAI, served: Served
) -> None:
    tools = [
        {"type": "function", **STRICT_TOOL["function"]},
        {"type": "function", "name": "get_time", "description": "Now.", "parameters": {"type": "object"}},
    ]
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    for seed in range(3):
        body = {"model": MODEL, "input": "Time?", "tools": tools, "tool_choice": choice, "seed": seed}
        body |= {"max_output_tokens": 40, "thinking_token_budget": 3, "temperature": 1.0}
        response = httpx.post(served.base_url + "/v1/responses", json=body, timeout=60).json()
        assert response["tool_choice"] == choice
        calls = [item for item in response["output"] if item["type"] == "function_call"]
        assert [c["name"] for c in calls] == ["get_time"], response["output"]
    bad = {**choice, "tools": [{"type": "function", "name": "nope"}]}
    refused = httpx.post(
        served.base_url + "/v1/responses",
        json={"model": MODEL, "input": "x", "tools": tools, "tool_choice": bad},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tool_choice.tools[0].name"


def test_a_strict_tool_schema_that_cannot_be_enforced_is_refused_naming_the_tool(served: Served) -> None:
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}, "strict": True},
    }
    body = {"model": MODEL, "messages": USER, "tools": [OTHER_TOOL, tool]}
    response = httpx.post(served.base_url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools[1].function.parameters"
    assert "uniqueItems" in error["message"]
    lenient = {**tool, "function": {**tool["function"], "strict": False}}
    body = {"model": MODEL, "messages": USER, "tools": [lenient], "max_tokens": 1}
    assert httpx.post(served.base_url + "/v1/chat/completions", json=body).status_code == 200


# -- the reasoning budget ----------------------------------------------------------------------------------


def test_the_reasoning_stays_within_its_budget_and_the_answer_begins(
    client: openai.OpenAI, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 5
    enc = served.encoding
    for seed in range(4):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=1.0,
            seed=seed,
            max_tokens=30,
            extra_body={"thinking_token_budget": budget, "return_token_ids": True},
        )
        ids = completion.choices[0].model_extra["token_ids"]  # type: ignore[index]
        text = enc.decode(ids)
        if text.startswith("<|channel|>analysis"):
            opened = ids.index(enc.encode("<|message|>", allowed_special="all")[0]) + 1
            assert ids.index(enc.encode("<|end|>", allowed_special="all")[0]) - opened <= budget, text
        assert "<|channel|>final<|message|>" in text, text
    # The server's default applies when the request names none; 0 leaves the reasoning out.
    monkeypatch.setattr(served.app.state.server.settings, "thinking_token_budget", 0)
    for seed in range(2):
        response = client.responses.create(
            model=MODEL, input="Hi", temperature=1.0, max_output_tokens=12, extra_body={"seed": seed}
        )
        assert response.usage is not None
        assert response.usage.output_tokens_details.reasoning_tokens == 0
        assert [item.type for item in response.output] == ["message"], response.output


def test_the_budget_per_effort_and_the_closing_sentence(
    client: openai.OpenAI, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's budget per reasoning effort applies to requests of that effort that name none (a
    request's own wins; an effort it does not name takes the general default); a reasoning that runs to its
    budget gets the closing sentence before the answer begins."""
    settings = served.app.state.server.settings
    monkeypatch.setattr(settings, "thinking_token_budget_by_effort", {"low": 0, "high": 6})
    monkeypatch.setattr(settings, "thinking_token_budget", 3)
    monkeypatch.setattr(settings, "thinking_budget_closing", "Enough; answering.")
    enc = served.encoding

    def turn(seed: int, effort: str | None, budget: int | None = None) -> tuple[str, str]:
        extra: dict[str, Any] = {"return_token_ids": True}
        if budget is not None:
            extra["thinking_token_budget"] = budget
        completion = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=1.0,
            seed=seed,
            max_tokens=40,
            extra_body=extra,
            **({"reasoning_effort": effort} if effort else {}),  # type: ignore[arg-type]
        )
        text = enc.decode(completion.choices[0].model_extra["token_ids"])  # type: ignore[index]
        analysis = re.match(r"<\|channel\|>analysis<\|message\|>(.*?)<\|end\|>", text, re.S)
        return (analysis.group(1) if analysis else ""), text

    closing = "\nEnough; answering."
    reasoned = {"high": 0, "medium": 0, "own": 0}
    for seed in range(6):
        assert turn(seed, "low")[1].startswith("<|channel|>final"), "low: no reasoning"
        for key, effort, budget, bound in (
            ("high", "high", None, 6),
            ("medium", None, None, 3),
            ("own", "low", 2, 2),
        ):
            analysis, text = turn(seed, effort, budget)
            assert "<|channel|>final<|message|>" in text, text
            if analysis:  # the random model almost never ends its reasoning itself: it runs to the budget
                reasoned[key] += 1
                assert analysis.endswith(closing), (key, text)
                # +1: encoding the decoded text again may split a token at the seam with the sentence.
                assert len(enc.encode_ordinary(analysis[: -len(closing)])) <= bound + 1, (key, text)
    assert all(reasoned.values()), reasoned
    response = client.responses.create(
        model=MODEL, input="Hi", temperature=1.0, max_output_tokens=12, reasoning={"effort": "low"}
    )
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_negative_budget_is_refused_naming_it(served: Served, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "thinking_token_budget": -1}
    body |= {"messages": USER} if "chat" in path else {"input": "Hi"}
    response = httpx.post(served.base_url + path, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "thinking_token_budget"


# -- vLLM's structured_outputs and guided_* ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "accepts"),
    [
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
        ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"regex": r"[0-9]{2}-[a-c]"}}, lambda t: re.fullmatch(r"[0-9]{2}-[a-c]", t)),
        ({"guided_regex": r"(yes|no)!"}, lambda t: t in ("yes!", "no!")),
        (
            {"structured_outputs": {"json": SCHEMA}},
            lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
        ),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"structured_outputs": {"grammar": 'start: "a" ("," "b")?'}}, lambda t: t in ("a", "a,b")),
        ({"guided_grammar": "start: D D\nD: /[0-9]/"}, lambda t: re.fullmatch(r"[0-9]{2}", t)),
    ],
    ids=[
        "choice",
        "guided_choice",
        "regex",
        "guided_regex",
        "json",
        "guided_json",
        "grammar",
        "guided_grammar",
    ],
)
def test_structured_outputs_hold_the_answer_on_both_apis(
    client: openai.OpenAI, extra: dict[str, Any], accepts: Callable[[str], Any]
) -> None:
    finished = 0
    for seed in range(3):
        choice = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=1.0,
            seed=seed,
            max_tokens=32,
            extra_body={**extra, "thinking_token_budget": 3},
        ).choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            assert accepts(choice.message.content or ""), choice.message.content
        response = client.responses.create(
            model=MODEL,
            input="Hi",
            temperature=1.0,
            max_output_tokens=32,
            extra_body={**extra, "seed": seed, "thinking_token_budget": 3},
        )
        if response.status == "completed":
            finished += 1
            assert accepts(response.output_text), response.output_text
    assert finished >= 3, "few answers finished"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs.regex"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"grammar": 'start: "a'}}, "structured_outputs.grammar"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
        (
            {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
            "guided_choice",
        ),
    ],
)
def test_a_malformed_output_constraint_is_a_400_naming_its_field(
    served: Served, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "messages": USER, **extra}
    response = httpx.post(served.base_url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if "response_format" in extra:
        return
    body = {"model": MODEL, "input": "Hi", **extra}
    response = httpx.post(served.base_url + "/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def _slow_schema() -> dict[str, Any]:
    """A schema no test compiled before, whose grammar takes tens of milliseconds to compile."""
    tag = uuid.uuid4().hex
    properties = {
        f"p{tag}_{i}": {"type": "string", "pattern": f"^[a-z]{{1,{i % 7 + 9}}}[0-9]+x{i}$"}
        for i in range(1000)
    }
    return {"type": "object", "properties": properties, "required": list(properties)}


def test_a_grammar_past_its_compile_budget_is_a_400_and_the_server_goes_on(
    client: openai.OpenAI, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(served.app.state.server.settings, "grammar_compile_timeout", 1e-6)
    # Names no other test uses (a compiled grammar is remembered, and a remembered one costs no time at all),
    # and enough of them that the compile takes tens of milliseconds: far past the budget, whatever the
    # scheduler does with the threads.
    fresh = _slow_schema()
    body = {
        "model": MODEL,
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": fresh}},
    }
    # The first structured request of a process builds the grammar's view of the vocabulary (seconds on a
    # busy machine), before the compile the budget is about.
    response = httpx.post(served.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format"
    assert "longer than" in error["message"]
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices[0]


# -- the corpus: 30 schemas, both APIs, streamed and not, the random model left to itself -----------------


def test_a_corpus_of_schemas_validates_on_both_apis_streamed_and_not(aclient: openai.AsyncOpenAI) -> None:
    """Every answer that finishes validates against its schema; most finish within a small token budget
    (a budget of 4 reasoning tokens, then the JSON)."""

    async def chat(schema: dict[str, Any], seed: int, stream: bool) -> tuple[str, str]:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "messages": USER,
            "temperature": 1.0,
            "seed": seed,
            "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "extra_body": {"thinking_token_budget": 4},
        }
        if not stream:
            choice = (await aclient.chat.completions.create(**kwargs)).choices[0]
            return choice.finish_reason, choice.message.content or ""
        text, finish = "", ""
        async for chunk in await aclient.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return finish, text

    async def responses(schema: dict[str, Any], seed: int, stream: bool) -> tuple[str, str]:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "input": "Hi",
            "temperature": 1.0,
            "max_output_tokens": 64,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}},
            "extra_body": {"seed": seed, "thinking_token_budget": 4},
        }
        if not stream:
            response = await aclient.responses.create(**kwargs)
        else:
            text = ""
            async for event in await aclient.responses.create(stream=True, **kwargs):
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type in ("response.completed", "response.incomplete"):
                    response = event.response
            assert response.output_text == text  # the deltas add up to the answer
        return ("stop" if response.status == "completed" else "length"), response.output_text

    gate = asyncio.Semaphore(16)

    async def one(i: int, schema: dict[str, Any]) -> tuple[int, str, str, str]:
        api = (chat, responses)[i % 2]
        stream = (i // 2) % 2 == 1
        async with gate:
            finish, text = await api(schema, i, stream)
        return i, f"{api.__name__}{' streamed' if stream else ''}", finish, text

    async def run() -> list[tuple[int, str, str, str]]:
        jobs = [one(i * 4 + k, schema) for i, schema in enumerate(CORPUS) for k in range(4)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    finished = 0
    for i, how, finish, text in results:
        schema = CORPUS[i // 4]
        if finish == "stop":
            finished += 1
            try:
                jsonschema.validate(json.loads(text), schema)
            except (ValueError, jsonschema.ValidationError) as error:
                raise AssertionError(f"schema {i // 4} ({how}): {text!r}: {error}") from error
    assert finished >= len(results) * 0.8, f"{finished} of {len(results)} finished"


def test_the_sdk_streaming_parse_helpers_return_the_object(client: openai.OpenAI) -> None:
    """`chat.completions.stream(response_format=Model)` and `responses.stream(text_format=Model)` parse the
    streamed answer into the model."""
    parsed: list[object] = []
    for seed in range(6):
        try:
            with client.chat.completions.stream(
                model=MODEL,
                messages=USER,
                response_format=Verdict,
                temperature=1.0,
                seed=seed,
                max_tokens=40,
                extra_body={"thinking_token_budget": 4},
            ) as stream:
                deltas = [e for e in stream if e.type == "content.delta"]
                completion = stream.get_final_completion()
        except openai.LengthFinishReasonError:
            continue
        assert deltas
        parsed.append(completion.choices[0].message.parsed)
        break
    for seed in range(6):
        with client.responses.stream(
            model=MODEL,
            input="Is the sky blue?",
            text_format=Verdict,
            temperature=1.0,
            max_output_tokens=40,
            extra_body={"seed": seed, "thinking_token_budget": 4},
        ) as rstream:
            response = rstream.get_final_response()
        if response.status == "completed":
            parsed.append(response.output_parsed)
            break
    assert len(parsed) == 2
    assert all(isinstance(p, Verdict) for p in parsed), parsed


@pytest.mark.parametrize(
    "extra", [{"structured_outputs": {"json": SCHEMA}}, {"guided_json": json.dumps(SCHEMA)}]
)
def test_a_structured_outputs_schema_reaches_the_developer_message(
    served: Served, extra: dict[str, Any]
) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 1, "return_token_ids": True, **extra}
    response = httpx.post(served.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    prompt = served.encoding.decode(response.json()["prompt_token_ids"])
    assert "# Response Formats" in prompt
    assert '"confidence"' in prompt


# -- the tool corpus: 30 strict function tools, both APIs, streamed and not, a call forced ------------------


def _corpus_tool(i: int) -> dict[str, Any]:
    return {"name": f"tool_{i}", "description": f"Tool {i}.", "parameters": CORPUS[i], "strict": True}


def test_a_corpus_of_strict_tools_gets_valid_arguments_on_both_apis_streamed_and_not(
    aclient: openai.AsyncOpenAI,
) -> None:
    """Each request offers three strict tools of the corpus and forces a call (named, or required: the model
    picks among the three) after a reasoning budget of 4 tokens. Every call that finishes has arguments
    that validate against its tool's schema; most finish within a small token budget."""
    names = {f"tool_{i}": schema for i, schema in enumerate(CORPUS)}

    def offered(i: int) -> list[dict[str, Any]]:
        return [_corpus_tool((i + k) % len(CORPUS)) for k in range(3)]

    async def chat(i: int, seed: int, stream: bool, named: bool) -> tuple[bool, str, str]:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "messages": USER,
            "temperature": 1.0,
            "seed": seed,
            "max_tokens": 128,
            "tools": [{"type": "function", "function": tool} for tool in offered(i)],
            "tool_choice": {"type": "function", "function": {"name": f"tool_{i}"}} if named else "required",
            "extra_body": {"thinking_token_budget": 4},
        }
        expected = "stop" if named else "tool_calls"
        if not stream:
            choice = (await aclient.chat.completions.create(**kwargs)).choices[0]
            (call,) = choice.message.tool_calls or []
            # A named choice finishes with "stop", as OpenAI's does; a required one with "tool_calls".
            assert choice.finish_reason in ("length", expected)
            return choice.finish_reason != "length", call.function.name, call.function.arguments
        name, arguments, finish = "", "", ""
        async for chunk in await aclient.chat.completions.create(stream=True, **kwargs):
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name += (delta.function.name or "") if delta.function else ""
                arguments += (delta.function.arguments or "") if delta.function else ""
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        assert finish in ("length", expected)
        return finish != "length", name, arguments

    async def responses(i: int, seed: int, stream: bool, named: bool) -> tuple[bool, str, str]:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "input": "Hi",
            "temperature": 1.0,
            "max_output_tokens": 128,
            "tools": [{"type": "function", **tool} for tool in offered(i)],
            "tool_choice": {"type": "function", "name": f"tool_{i}"} if named else "required",
            "extra_body": {"seed": seed, "thinking_token_budget": 4},
        }
        streamed_arguments = None
        if not stream:
            response = await aclient.responses.create(**kwargs)
        else:
            streamed_arguments = ""
            async for event in await aclient.responses.create(stream=True, **kwargs):
                if event.type == "response.function_call_arguments.delta":
                    streamed_arguments += event.delta
                if event.type in ("response.completed", "response.incomplete"):
                    response = event.response
        (call,) = [item for item in response.output if item.type == "function_call"]
        if streamed_arguments is not None:
            assert streamed_arguments == call.arguments  # the deltas add up to the arguments
        return response.status == "completed", call.name, call.arguments

    gate = asyncio.Semaphore(16)

    async def one(i: int, k: int) -> tuple[str, bool, str, str]:
        api = (chat, responses)[k % 2]
        stream, named = k // 2 % 2 == 1, (i + k) % 3 != 0  # each API and way meets both choices
        async with gate:
            done, name, arguments = await api(i, i * 4 + k, stream, named)
        how = f"tool_{i} {api.__name__}{' streamed' if stream else ''}{' named' if named else ' required'}"
        if named:
            assert name == f"tool_{i}", how
        else:
            assert name in [tool["name"] for tool in offered(i)], how
        return how, done, name, arguments

    async def run() -> list[tuple[str, bool, str, str]]:
        return await asyncio.gather(*(one(i, k) for i in range(len(CORPUS)) for k in range(4)))

    results = asyncio.run(run())
    finished = 0
    for how, done, name, arguments in results:
        if done:
            finished += 1
            try:
                jsonschema.validate(json.loads(arguments), names[name])
            except (ValueError, jsonschema.ValidationError) as error:
                raise AssertionError(f"{how}: {name}({arguments!r}): {error}") from error
    unfinished = [f"{how}: {arguments[-40:]!r}" for how, done, _, arguments in results if not done]
    assert finished >= len(results) * 0.8, f"{finished} of {len(results)} finished; not: {unfinished}"
