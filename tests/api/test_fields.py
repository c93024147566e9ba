"""No request field is silently ignored: each is honoured, refused with a 400 naming it, or a documented
no-op; unknown fields are refused (or, with `ignore_unknown_fields`, named in a response header). Also
vLLM's `return_token_ids` and `continuous_usage_stats`, the deprecated `functions`, and SSE lines that every
line splitter keeps whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.api.conftest import MODEL, Served

USER = [{"role": "user", "content": "Hello"}]
FINAL = "<|channel|>final<|message|>Hi there, friend.<|return|>"
WEATHER = {
    "name": "get_weather",
    "description": "Gets the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = (
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
    '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


def _refused(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    return body


def _post(served: Served, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(served.base_url + path, json={"model": MODEL, **body}, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": USER, "some_future_field": 1}, "some_future_field"),
        (
            "/v1/chat/completions",
            {"messages": USER, "guided_decoding_backend": "x"},
            "guided_decoding_backend",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi", "colour": "red"}]},
            "messages[0].colour",
        ),
        (
            "/v1/chat/completions",
            {"messages": USER, "tools": [{"type": "function", "function": {**WEATHER, "x": 1}}]},
            "tools[0].function.x",
        ),
        (
            "/v1/chat/completions",
            {"messages": USER, "stream_options": {"include_usage": True, "fancy": True}},
            "stream_options.fancy",
        ),
        ("/v1/completions", {"prompt": "Hi", "use_beam_search": True}, "use_beam_search"),
        ("/tokenize", {"prompt": "Hi", "return_token_strs": True}, "return_token_strs"),
        ("/detokenize", {"tokens": [1], "extra": 1}, "extra"),
    ],
)
def test_unknown_fields_are_refused_naming_them(
    served: Served, path: str, body: dict[str, Any], param: str
) -> None:
    response = _post(served, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == "unknown_field"
    assert param in error["message"]


def test_ignore_unknown_fields_accepts_them_and_names_them_in_a_header(served: Served) -> None:
    settings = served.app.state.server.settings
    settings.ignore_unknown_fields = True
    try:
        body = {"messages": [{"role": "user", "content": "Hi", "colour": 1}], "max_tokens": 2, "odd": 2}
        response = _post(served, "/v1/chat/completions", body)
        streamed = _post(served, "/v1/chat/completions", {**body, "stream": True})
        # A name no header can carry as it is comes escaped.
        odd_name = _post(served, "/tokenize", {"prompt": "Hi", "fär\nbe": 1})
    finally:
        settings.ignore_unknown_fields = False
    assert response.status_code == 200, response.text
    assert response.headers["x-ignored-fields"] == "odd, messages[0].colour"
    assert streamed.status_code == 200
    assert streamed.headers["x-ignored-fields"] == "odd, messages[0].colour"
    assert odd_name.status_code == 200
    assert odd_name.headers["x-ignored-fields"] == "f\\u00e4r\\nbe"
    assert (
        "x-ignored-fields"
        not in _post(served, "/v1/chat/completions", {"messages": USER, "max_tokens": 1}).headers
    )


def test_the_processors_hook_declares_the_fields_it_takes(client: openai.OpenAI) -> None:
    """`test_force` is not refused: the tests' hook declares it (every other test relies on that too)."""
    response = client.chat.completions.create(model=MODEL, messages=USER, extra_body={"test_force": FINAL})
    assert response.choices[0].message.content == "Hi there, friend."


def test_what_real_clients_send_is_accepted(client: openai.OpenAI) -> None:
    """Fields from the OpenAI SDKs, the Agents SDKs, LiteLLM, LangChain, the Vercel AI SDK and guidellm, and an
    earlier answer echoed back whole."""
    messages: list[Any] = [
        {"role": "system", "content": "Be brief.", "name": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "annotations": [],
            "audio": None,
            "reasoning": "Greet.",
            "reasoning_content": "Greet.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
        {"role": "user", "content": "Again"},
    ]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[{"type": "function", "function": {**WEATHER, "strict": False}}],  # type: ignore[list-item]
            tool_choice="auto",
            parallel_tool_calls=True,
            response_format={"type": "text"},
            store=False,
            metadata={"k": "v"},
            service_tier="auto",
            user="u1",
            safety_identifier="s1",
            prompt_cache_key="p1",
            modalities=["text"],
            reasoning_effort="low",
            seed=3,
            stop=["\n\n"],
            max_completion_tokens=4,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
            extra_body={
                "top_k": 5,
                "min_p": 0.1,
                "skip_special_tokens": True,
                "request_id": "r1",
                "priority": 0,
            },
        )
    )
    assert chunks[-1].usage is not None


def test_refusal_parts_reach_the_prompt(served: Served) -> None:
    messages = [*USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "Cannot."}]}, *USER]
    ids = _post(served, "/tokenize", {"messages": messages}).json()["tokens"]
    assert "<|channel|>final<|message|>Cannot.<|end|>" in served.encoding.decode(ids)


def test_reasoning_sent_back_in_litellms_provider_fields_is_replayed(served: Served) -> None:
    """LiteLLM sends an earlier answer's `reasoning` back inside `provider_specific_fields`: the prompt is the
    one the message with its own `reasoning` gives (so the prefix cache still hits)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

    def prompt(assistant: dict[str, Any]) -> list[int]:
        messages = [*USER, {"role": "assistant", "tool_calls": [call], **assistant}]
        messages.append({"role": "tool", "tool_call_id": "call_1", "content": "ok"})
        return _post(served, "/tokenize", {"messages": messages, "tools": tools}).json()["tokens"]

    own = prompt({"reasoning": "Need f."})
    assert "<|channel|>analysis<|message|>Need f.<|end|>" in served.encoding.decode(own)
    assert prompt({"provider_specific_fields": {"reasoning": "Need f.", "refusal": None}}) == own
    assert prompt({"provider_specific_fields": {"reasoning_content": "Need f."}}) == own


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a1"}}]}, "messages[0].audio"),
        ({"messages": USER, "audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
        ({"messages": USER, "prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"messages": USER, "web_search_options": {}}, "web_search_options"),
        ({"messages": USER, "verbosity": "low"}, "verbosity"),
        ({"messages": USER, "skip_special_tokens": False}, "skip_special_tokens"),
        ({"messages": USER, "priority": 5}, "priority"),
        ({"messages": USER, "stop_token_ids": [10**7]}, "stop_token_ids"),
        ({"messages": [*USER, {"role": "function", "content": "sunny"}]}, "messages[1]"),
    ],
)
def test_chat_fields_it_cannot_honour_are_refused(served: Served, body: dict[str, Any], param: str) -> None:
    response = _post(served, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert not error["message"].startswith("Value error")


def test_completions_suffix_is_refused(client: openai.OpenAI) -> None:
    body = _refused(lambda: client.completions.create(model=MODEL, prompt="def f(", suffix="return 1"))
    assert body["param"] == "suffix"
    assert "fill-in-the-middle" in body["message"]


def test_stop_token_ids_end_a_choice(served: Served) -> None:
    ids = served.encoding.encode_ordinary(" there,")
    body = {"prompt": "x", "max_tokens": 10, "test_force": "Hi there, friend.", "stop_token_ids": ids[:1]}
    choice = _post(served, "/v1/completions", body).json()["choices"][0]
    assert choice["text"] == "Hi there"
    assert choice["finish_reason"] == "stop"


# -- the deprecated functions ---------------------------------------------------------------------------------


def test_functions_are_shown_to_the_model_and_answered_as_a_function_call(
    client: openai.OpenAI, served: Served
) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        functions=[WEATHER],  # type: ignore[list-item]
        extra_body={"test_force": CALL, "return_token_ids": True},
    )
    choice = response.choices[0]
    prompt = served.encoding.decode((response.model_extra or {})["prompt_token_ids"])
    assert "namespace functions {" in prompt
    assert "type get_weather = (_: {" in prompt
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None
    assert choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            functions=[WEATHER],
            stream=True,
            extra_body={"test_force": CALL},  # type: ignore[list-item]
        )
    )
    calls = [
        c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call
    ]
    assert calls[0].name == "get_weather"  # type: ignore[union-attr]
    assert json.loads("".join(c.arguments or "" for c in calls)) == {"city": "Paris"}  # type: ignore[union-attr]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "function_call"
    ]
    assert all(not (c.choices and c.choices[0].delta.tool_calls) for c in chunks)


def test_a_function_call_history_renders_as_a_tool_call_and_its_result(served: Served) -> None:
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    legacy = _post(
        served,
        "/v1/chat/completions",
        {"messages": messages, "functions": [WEATHER], "max_tokens": 1, "return_token_ids": True},
    ).json()
    tools = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    current = _post(
        served,
        "/v1/chat/completions",
        {
            "messages": tools,
            "tools": [{"type": "function", "function": WEATHER}],
            "max_tokens": 1,
            "return_token_ids": True,
        },
    ).json()
    assert legacy["prompt_token_ids"] == current["prompt_token_ids"]
    assert "<|start|>functions.get_weather to=assistant" in served.encoding.decode(legacy["prompt_token_ids"])


def test_function_call_none_and_named(served: Served) -> None:
    none = _post(served, "/tokenize", {"messages": USER}).json()["tokens"]
    body = {
        "messages": USER,
        "functions": [WEATHER],
        "function_call": "none",
        "max_tokens": 1,
        "return_token_ids": True,
    }
    assert _post(served, "/v1/chat/completions", body).json()["prompt_token_ids"] == none
    named = {**body, "function_call": {"name": "get_weather"}, "max_tokens": 30, "temperature": 0}
    message = _post(served, "/v1/chat/completions", named).json()["choices"][0]["message"]
    assert message["function_call"]["name"] == "get_weather"
    both = _post(
        served, "/v1/chat/completions", {**body, "tools": [{"type": "function", "function": WEATHER}]}
    )
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "functions"
    assert "not both" in both.json()["error"]["message"]
    choice = {**body, "tool_choice": "auto"}
    assert _post(served, "/v1/chat/completions", choice).json()["error"]["param"] == "function_call"


# -- vLLM's return_token_ids and continuous_usage_stats -----------------------------------------------------------


def _events(served: Served, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    response = _post(served, path, {**body, "stream": True})
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_chat_token_ids_streamed_and_not(served: Served) -> None:
    script = "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>Hi there!<|return|>"
    body = {"messages": USER, "return_token_ids": True, "test_force": script}
    whole = _post(served, "/v1/chat/completions", body).json()
    expected = served.encoding.encode(script, allowed_special="all")
    assert whole["choices"][0]["token_ids"] == expected
    prompt = _post(served, "/tokenize", {"messages": USER}).json()["tokens"]
    assert whole["prompt_token_ids"] == prompt
    ChatCompletion.model_validate(whole)

    chunks = list(_events(served, "/v1/chat/completions", body))
    assert chunks[0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    streamed = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids") or []]
    assert streamed == expected
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    plain = _post(served, "/v1/chat/completions", {**body, "return_token_ids": False}).json()
    assert "prompt_token_ids" not in plain
    assert "token_ids" not in plain["choices"][0]


def test_completions_token_ids_streamed(served: Served) -> None:
    prompt = served.encoding.encode_ordinary("Hello there")
    body = {
        "prompt": prompt,
        "max_tokens": 6,
        "return_token_ids": True,
        "test_force": "One two three four five six",
    }
    whole = _post(served, "/v1/completions", body).json()["choices"][0]
    chunks = list(_events(served, "/v1/completions", body))
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt
    assert sum("prompt_token_ids" in c["choices"][0] for c in chunks) == 1
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats_put_usage_on_every_chunk(served: Served, path: str) -> None:
    body: dict[str, Any] = {
        "max_tokens": 5,
        "test_force": "<|channel|>final<|message|>One two three four five",
    }
    body |= {"messages": USER} if path.startswith("/v1/chat") else {"prompt": "Count:"}
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(_events(served, path, {**body, "stream_options": options}))
    assert all(c.get("usage") for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts)
    assert counts[-1] == 5
    assert chunks[-1]["choices"] == []
    assert all(c["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] > 0 for c in chunks)
    # Without it, only the last chunk carries usage.
    plain = list(_events(served, path, {**body, "stream_options": {"include_usage": True}}))
    assert [bool(c.get("usage")) for c in plain] == [False] * (len(plain) - 1) + [True]


# -- SSE lines ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_line_separators_are_escaped_in_every_event(served: Served, path: str) -> None:
    text = "a\u2028b\u2029c\u0085d"
    body: dict[str, Any] = {"max_tokens": 12, "test_force": f"<|channel|>final<|message|>{text}<|return|>"}
    if path == "/v1/chat/completions":
        body["messages"] = USER
    elif path == "/v1/completions":
        body |= {"prompt": "x", "test_force": text}
    else:
        del body["max_tokens"]  # not a Responses field
        body |= {"input": "Hi", "max_output_tokens": 12}
    raw = _post(served, path, {**body, "stream": True}).text
    assert not any(ch in raw for ch in "\u2028\u2029\u0085")
    data = [line[6:] for line in raw.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert data
    assembled = ""
    for line in data:
        event = json.loads(line)  # every line is a whole event
        if path == "/v1/chat/completions":
            assembled += "".join(c["delta"].get("content") or "" for c in event["choices"])
        elif path == "/v1/completions":
            assembled += "".join(c["text"] for c in event["choices"])
        elif event["type"] == "response.output_text.delta":
            assembled += event["delta"]
    assert assembled.startswith(text)


def test_tokenize_without_the_generation_prompt(served: Served) -> None:
    full = _post(served, "/tokenize", {"messages": USER}).json()["tokens"]
    bare = _post(served, "/tokenize", {"messages": USER, "add_generation_prompt": False}).json()["tokens"]
    assert served.encoding.decode(full) == served.encoding.decode(bare) + "<|start|>assistant"


def test_lm_evals_remote_tokenizer_check_passes(served: Served) -> None:
    """lm-eval uses the server's tokenizer when /tokenizer_info names an eos_token and /tokenize answers a
    prompt with `add_special_tokens: false`."""
    assert httpx.get(served.base_url + "/tokenizer_info").json()["eos_token"] == "<|return|>"
    tokens = _post(served, "/tokenize", {"prompt": "test", "add_special_tokens": False}).json()["tokens"]
    assert tokens == served.encoding.encode_ordinary("test")
