"""What the client sees of the model's output, through the real app on the real engine, in chat, Responses and
the legacy completions: stop strings on the answer, no harmony markup anywhere, no call to a tool that was
not offered, and output with no harmony structure streamed at once."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from harmony.encoding import load_harmony_encoding
from tests.api.conftest import MODEL, Served, wait_until_idle

USER = [{"role": "user", "content": "Hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TAIL = " and on" * 150
REASON_THEN_ANSWER = (
    "<|channel|>analysis<|message|>Think. More thought.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Answer one. Answer two." + TAIL + "<|return|>"
)
MARKUP = ("<|", "|>")


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


def _tokens_through(script: str, text: str) -> int:
    """How many of the script's tokens it takes to spell everything up to the end of `text` in it."""
    encoding = load_harmony_encoding()
    tokens = encoding.encode(script, allowed_special="all")
    end = script.index(text) + len(text)
    for count in range(1, len(tokens) + 1):
        if len(encoding.decode(tokens[:count])) >= end:
            return count
    raise AssertionError(f"{text!r} is not in the script")


def _chat_stream(served: Served, **body: Any) -> list[dict[str, Any]]:
    """The data chunks of a streamed chat completion, as sent."""
    payload = {"model": MODEL, "messages": USER, "stream": True, **body}
    with httpx.stream("POST", served.base_url + "/v1/chat/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _assembled(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per choice index: the content, the reasoning, the finish reason and stop reason a client rebuilds."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            entry = choices.setdefault(choice["index"], {"content": "", "reasoning": "", "finishes": []})
            entry["content"] += choice["delta"].get("content") or ""
            entry["reasoning"] += choice["delta"].get("reasoning") or ""
            if choice["finish_reason"] is not None:
                entry["finishes"].append((choice["finish_reason"], choice.get("stop_reason")))
    return choices


# -- stop strings: the answer, not the raw output --------------------------------------------------------------


def test_a_stop_string_ends_the_answer_not_the_reasoning(client: openai.OpenAI, served: Served) -> None:
    """`stop: ["."]` once ended generation inside the analysis, with empty content: the stop applies to the
    answer only. The choice ends there (its engine request is aborted, not run to its end) and usage counts
    the tokens up to the stop."""
    steps = served.engine.stats().num_steps
    response = client.chat.completions.create(
        model=MODEL, messages=USER, stop=["."], extra_body={"test_force": REASON_THEN_ANSWER}
    )
    choice = response.choices[0]
    assert choice.message.content == "Answer one"
    assert choice.message.reasoning == "Think. More thought."  # type: ignore[attr-defined]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", ".")  # type: ignore[index]
    used = _tokens_through(REASON_THEN_ANSWER, "Answer one.")
    assert response.usage is not None
    assert response.usage.completion_tokens == used
    wait_until_idle(served)
    assert not served.engine.scheduler.requests
    assert served.engine.stats().num_steps - steps < used + 10  # far fewer than the 300-token tail needs

    streamed = _assembled(_chat_stream(served, stop=["."], test_force=REASON_THEN_ANSWER))[0]
    assert streamed == {
        "content": "Answer one",
        "reasoning": "Think. More thought.",
        "finishes": [("stop", ".")],
    }


def test_a_stop_string_never_matches_a_header(client: openai.OpenAI) -> None:
    """`stop: ["final"]` once matched the `<|channel|>final` header: headers are not the answer."""
    script = "<|channel|>final<|message|>All done.<|return|>"
    choice = client.chat.completions.create(
        model=MODEL, messages=USER, stop=["final", "assistant", "channel"], extra_body={"test_force": script}
    ).choices[0]
    assert choice.message.content == "All done."
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", None)  # type: ignore[index]


def test_include_stop_str_in_output_and_a_stop_split_across_tokens(
    client: openai.OpenAI, served: Served
) -> None:
    for stream in (False, True):
        body: dict[str, Any] = {
            "stop": ["zzz", "r tw"],  # the second spans the tokens " Answer" and " two"
            "include_stop_str_in_output": True,
            "test_force": REASON_THEN_ANSWER,
        }
        if stream:
            content = _assembled(_chat_stream(served, **body))[0]["content"]
        else:
            content = (
                client.chat.completions.create(model=MODEL, messages=USER, extra_body=body)
                .choices[0]
                .message.content
            )
        assert content == "Answer one. Answer tw"


def test_one_choice_stopping_leaves_the_others_running(client: openai.OpenAI, served: Served) -> None:
    scripts = [
        "<|channel|>final<|message|>Short. Then more." + TAIL + "<|return|>",
        "<|channel|>final<|message|>No full stop here, only words<|return|>",
    ]
    response = client.chat.completions.create(
        model=MODEL, messages=USER, n=2, stop=["."], extra_body={"test_force": scripts}
    )
    by_index = {c.index: c for c in response.choices}
    assert by_index[0].message.content == "Short"
    assert by_index[1].message.content == "No full stop here, only words"
    assert [by_index[i].model_extra["stop_reason"] for i in (0, 1)] == [".", None]  # type: ignore[index]
    assert response.usage is not None
    full = len(load_harmony_encoding().encode(scripts[1], allowed_special="all"))
    assert response.usage.completion_tokens == _tokens_through(scripts[0], "Short.") + full

    streamed = _assembled(_chat_stream(served, n=2, stop=["."], test_force=scripts))
    assert streamed[0]["content"] == "Short"
    assert streamed[1]["content"] == "No full stop here, only words"
    assert streamed[0]["finishes"] == [
        ("stop", ".")
    ]  # one finish chunk, though the engine's abort comes later
    assert streamed[1]["finishes"] == [("stop", None)]


def test_tool_call_arguments_never_end_on_a_stop(client: openai.OpenAI, served: Served) -> None:
    script = (
        '<|channel|>commentary<|message|>Checking "now".<|end|><|start|>assistant to=functions.get_weather'
        '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    choice = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stop=['"Paris'],
        extra_body={"test_force": script},
    ).choices[0]
    assert choice.message.content == 'Checking "now".'
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert choice.finish_reason == "tool_calls"
    # Streamed, the answer text held back as a possible stop string goes out before the call opens.
    chunks = _chat_stream(served, tools=[WEATHER_TOOL], stop=['"Paris'], test_force=script)
    kinds = [k for c in chunks for ch in c["choices"] for k in ch["delta"] if k in ("content", "tool_calls")]
    content = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert content == 'Checking "now".'
    assert kinds.index("tool_calls") > max(i for i, k in enumerate(kinds) if k == "content")


def test_responses_stop_on_the_answer_alike(served: Served) -> None:
    """Responses has no `stop` in OpenAI's API; vLLM takes it, and so do we, with the same meaning as chat."""
    body = {"model": MODEL, "input": "Hello", "stop": ".", "test_force": REASON_THEN_ANSWER}
    response = httpx.post(served.base_url + "/v1/responses", json=body, timeout=60).json()
    assert response["status"] == "completed"
    reasoning, message = response["output"]
    assert reasoning["content"][0]["text"] == "Think. More thought."
    assert message["content"][0]["text"] == "Answer one"
    assert response["usage"]["output_tokens"] == _tokens_through(REASON_THEN_ANSWER, "Answer one.")

    included = {**body, "include_stop_str_in_output": True, "stream": True}
    with httpx.stream("POST", served.base_url + "/v1/responses", json=included, timeout=60) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "Answer one."
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][1]["content"][0]["text"] == "Answer one."
    wait_until_idle(served)
    assert not served.engine.scheduler.requests


def test_completions_keep_raw_text_stops_with_include_and_stop_reason(client: openai.OpenAI) -> None:
    """No harmony in the legacy API: the engine matches the raw text, as before."""
    script = "one two three four five"
    plain = client.completions.create(
        model=MODEL, prompt="x", max_tokens=20, stop=[" three"], extra_body={"test_force": script}
    ).choices[0]
    assert (plain.text, plain.finish_reason, plain.model_extra["stop_reason"]) == (
        "one two",
        "stop",
        " three",
    )  # type: ignore[index]
    included = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=20,
        stop=[" three"],
        extra_body={"test_force": script, "include_stop_str_in_output": True},
    ).choices[0]
    assert included.text == "one two three"


def test_an_empty_stop_string_is_refused_by_every_api(served: Served) -> None:
    for path, body in (
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/responses", {"input": "Hi"}),
        ("/v1/completions", {"prompt": "Hi"}),
    ):
        response = httpx.post(
            served.base_url + path, json={"model": MODEL, "stop": ["x", ""], **body}, timeout=60
        )
        assert response.status_code == 400, path
        assert response.json()["error"]["param"] == "stop", path


# -- no markup, no call to a tool that was not offered -----------------------------------------------------


MALFORMED = [
    # A header that never reached <|message|>, then a proper answer.
    "<|channel|>commentary to=functions.get_weather<|end|><|start|>assistant<|channel|>final<|message|>Yes.<|return|>",
    # A second <|channel|> inside a header: once the tool name `exec<|channel|>analysis`.
    "<|channel|>commentary to=exec<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>",
    # Control tokens inside the answer and between messages.
    "<|channel|>final<|message|>a<|constrain|>b<|message|>c<|reserved_200100|>d<|end|><|constrain|>tail<|return|>",
    # The answer written without <|message|>, past a header's shape.
    "<|channel|>final The answer is <|channel|>four, plainly.<|return|>",
]


@pytest.mark.parametrize("script", MALFORMED)
def test_no_control_token_text_reaches_the_client(client: openai.OpenAI, served: Served, script: str) -> None:
    message = (
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            extra_body={"test_force": script},
        )
        .choices[0]
        .message
    )
    texts = [message.content or "", getattr(message, "reasoning", None) or ""]
    texts += [c.function.name + c.function.arguments for c in message.tool_calls or []]
    assert not any(m in t for m in MARKUP for t in texts), texts
    assert all(c.function.name == "get_weather" for c in message.tool_calls or [])
    streamed = _assembled(_chat_stream(served, tools=[WEATHER_TOOL], test_force=script))[0]
    assert streamed["content"] == (message.content or "")
    response = httpx.post(
        served.base_url + "/v1/responses",
        json={"model": MODEL, "input": "Hi", "test_force": script},
        timeout=60,
    ).json()
    assert not any(m in json.dumps(response["output"]) for m in MARKUP)


def test_a_call_to_a_tool_that_was_not_offered_is_not_returned(client: openai.OpenAI, served: Served) -> None:
    """OpenAI never returns a call to a tool the client did not offer: a client cannot run it. Such a message
    is dropped (counted as a parse anomaly); the rest of the turn is kept."""
    script = (
        "<|channel|>commentary to=functions.delete_everything <|constrain|>json<|message|>{}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    )
    for tools, choice in (([WEATHER_TOOL], "auto"), ([WEATHER_TOOL], "none"), (None, None)):
        body: dict[str, Any] = {"extra_body": {"test_force": script}}
        if tools:
            body |= {"tools": tools, "tool_choice": choice}
        result = client.chat.completions.create(model=MODEL, messages=USER, **body).choices[0]
        assert result.message.tool_calls is None
        assert result.message.content == "Done."
        assert result.finish_reason == "stop"
    offered_but_refused = script.replace("delete_everything", "get_weather")
    none = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        extra_body={"test_force": offered_but_refused},
    ).choices[0]
    assert none.message.tool_calls is None  # with tool_choice "none" the model was shown no tools
    response = httpx.post(
        served.base_url + "/v1/responses",
        json={
            "model": MODEL,
            "input": "Hi",
            "test_force": script,
            "tools": [{**WEATHER_TOOL["function"], "type": "function"}],
        },
        timeout=60,
    ).json()
    assert [item["type"] for item in response["output"]] == ["message"]


# -- output with no harmony structure streams at once ------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "bound"),
    [
        ("Plain words with no harmony at all, on and on and on.", 1),
        # ` to` could start a recipient (` to=functions.f`); ` be` shows it does not.
        (" to be or not to be, plainly with no harmony.", 2),
        ("\n\n\n\nAfter blank lines, plain words.", 2),
    ],
)
def test_unstructured_output_streams_within_a_few_tokens(served: Served, script: str, bound: int) -> None:
    """The engine fails the request after `bound` tokens: the text must already have been sent by then (the
    parser once held such output back for 64 tokens, as a would-be header)."""
    chunks = _chat_stream(served, test_force=script, test_fail_after=bound)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert content
    assert script.startswith(content)
    assert "forced engine failure" in chunks[-1]["error"]["message"]


def test_a_content_type_after_the_channel_is_no_recipient(client: openai.OpenAI) -> None:
    """`<|channel|>final <|constrain|>json` (as a response format's grammar writes it): the official header
    reading takes the lone content type for a recipient; the answer is still the answer, not a dropped call."""
    for header in ("<|channel|>final <|constrain|>json", "<|channel|>final json"):
        script = header + '<|message|>{"a": 1}<|return|>'
        message = (
            client.chat.completions.create(model=MODEL, messages=USER, extra_body={"test_force": script})
            .choices[0]
            .message
        )
        assert (message.content, message.tool_calls) == ('{"a": 1}', None)


def _anomalies(served: Served) -> float:
    text = httpx.get(served.base_url + "/metrics", timeout=10).text
    match = re.search(r"^gpt_oss_harmony_parse_anomalies_total (\S+)$", text, re.MULTILINE)
    assert match, "the parse anomaly counter is not in /metrics"
    return float(match.group(1))


def test_malformed_harmony_in_an_output_is_counted_in_metrics(client: openai.OpenAI, served: Served) -> None:
    """A call to a tool nobody offered is dropped from the answer and counted, on both APIs; a well-formed
    turn counts nothing."""
    script = (
        "<|channel|>commentary to=functions.delete_everything <|constrain|>json<|message|>{}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    )
    before = _anomalies(served)
    client.chat.completions.create(model=MODEL, messages=USER, extra_body={"test_force": script})
    after_chat = _anomalies(served)
    assert after_chat >= before + 1
    client.responses.create(model=MODEL, input="Hi", extra_body={"test_force": script})
    after_responses = _anomalies(served)
    assert after_responses >= after_chat + 1
    clean = "<|channel|>final<|message|>Done.<|return|>"
    client.chat.completions.create(model=MODEL, messages=USER, extra_body={"test_force": clean})
    assert _anomalies(served) == after_responses
