"""/v1/responses through the official openai client, against the real engine.

Every event and final object is also checked on the raw JSON with the SDK's own pydantic models (the client
itself builds them without validation), so a missing required field fails here.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent

from server.protocol import ResponsesRequest
from server.serving_responses import ResponseStore, StoredResponse
from tests.api.conftest import MODEL, Served, assert_disconnect_frees_blocks, wait_until_idle

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Gets the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}
REASON_AND_ANSWER = "<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hi there!<|return|>"
CALL_WEATHER = (
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
    '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)
EVENT_ADAPTER: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


def _post(served: Served, **body: Any) -> httpx.Response:
    return httpx.post(served.base_url + "/v1/responses", json={"model": MODEL, **body}, timeout=60)


def _raw_events(served: Served, **body: Any) -> list[dict[str, Any]]:
    """The SSE events of a streamed response as sent, each checked against the SDK's event models."""
    events = []
    with httpx.stream(
        "POST", served.base_url + "/v1/responses", json={"model": MODEL, "stream": True, **body}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                assert event["type"] == name  # the SSE event name is the event's type
                validated = EVENT_ADAPTER.validate_python(event)
                assert validated.type == event["type"]
                events.append(event)
    return events


def _check_numbering(events: list[dict[str, Any]]) -> None:
    """sequence_number 0, 1, 2, ...; each item keeps one output_index; indexes are 0, 1, ... in order."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    index_of: dict[str, int] = {}
    for e in events:
        item_id = e.get("item_id") or (e.get("item") or {}).get("id")
        if item_id is None:
            continue
        assert index_of.setdefault(item_id, e["output_index"]) == e["output_index"]
    assert sorted(index_of.values()) == list(range(len(index_of)))


def _collapse(types: list[str]) -> list[str]:
    """Event types with runs of the same delta type folded into one."""
    out: list[str] = []
    for t in types:
        if not (t.endswith(".delta") and out and out[-1] == t):
            out.append(t)
    return out


def test_reasoning_then_answer(client: openai.OpenAI, served: Served) -> None:
    response = client.responses.create(
        model=MODEL, input="Hello", extra_body={"test_force": REASON_AND_ANSWER}
    )
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning, message = response.output
    assert reasoning.content is not None  # type: ignore[union-attr]
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", "User greets. Reply.")]  # type: ignore[union-attr]
    assert reasoning.id.startswith("rs_")
    assert message.id.startswith("msg_")  # type: ignore[union-attr]
    assert response.output_text == "Hi there!"
    assert response.id.startswith("resp_")
    usage = response.usage
    assert usage is not None
    assert usage.output_tokens == len(served.encoding.encode(REASON_AND_ANSWER, allowed_special="all"))
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    raw = _post(served, input="Hello", test_force=REASON_AND_ANSWER)
    assert raw.status_code == 200
    validated = Response.model_validate(raw.json())
    assert validated.tools == []
    assert validated.tool_choice == "auto"
    assert validated.incomplete_details is None


def test_streamed_reasoning_and_answer_follow_the_recommended_sequence(
    client: openai.OpenAI, served: Served
) -> None:
    events = _raw_events(served, input="Hello", test_force=REASON_AND_ANSWER)
    _check_numbering(events)
    assert _collapse([e["type"] for e in events]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert (reasoning, text) == ("User greets. Reply.", "Hi there!")
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed"
    assert final.id == events[0]["response"]["id"]
    # The final output is exactly the items as their done events gave them.
    assert events[-1]["response"]["output"] == [
        e["item"] for e in events if e["type"] == "response.output_item.done"
    ]
    # The SDK's own stream parsing sees the same sequence.
    stream = client.responses.create(
        model=MODEL, input="Hello", stream=True, extra_body={"test_force": REASON_AND_ANSWER}
    )
    sdk_types = [event.type for event in stream]
    assert _collapse(sdk_types) == _collapse([e["type"] for e in events])


def test_streamed_function_call(aclient: openai.AsyncOpenAI, served: Served) -> None:
    async def run() -> tuple[list[Any], Any]:
        stream = await aclient.responses.create(
            model=MODEL,
            input="Weather?",
            tools=[WEATHER_TOOL],
            stream=True,
            extra_body={"test_force": CALL_WEATHER},
        )
        events = [event async for event in stream]
        plain = await aclient.responses.create(
            model=MODEL, input="Weather?", tools=[WEATHER_TOOL], extra_body={"test_force": CALL_WEATHER}
        )
        return events, plain

    events, plain = asyncio.run(run())
    types = [e.type for e in events]
    assert _collapse(types)[-6:] == [
        "response.output_item.done",  # the reasoning item
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = [e for e in events if e.type == "response.output_item.added"][-1]
    assert added.item.type == "function_call"
    assert (added.item.name, added.item.arguments, added.item.status) == ("get_weather", "", "in_progress")
    assert added.output_index == 1
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1
    assert {(e.item_id, e.output_index) for e in deltas} == {(added.item.id, 1)}
    assert json.loads("".join(e.delta for e in deltas)) == {"city": "Paris"}
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert (done.name, json.loads(done.arguments)) == ("get_weather", {"city": "Paris"})
    final = events[-1].response
    assert final.status == "completed"
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    call = final.output[1]
    assert call.call_id.startswith("call_")
    assert call.call_id == added.item.call_id
    assert call.id == added.item.id
    assert call.id.startswith("fc_")
    assert call.status == "completed"
    # The raw stream validates, numbered and indexed as it should be; not streamed, the call is the same.
    _check_numbering(_raw_events(served, input="Weather?", tools=[WEATHER_TOOL], test_force=CALL_WEATHER))
    assert [(i.type, getattr(i, "name", None)) for i in plain.output] == [
        ("reasoning", None),
        ("function_call", "get_weather"),
    ]
    assert json.loads(plain.output[1].arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_tool_loop_via_previous_response_id_gives_the_same_prompt(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        instructions="Be brief.",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_body={"test_force": CALL_WEATHER},
    )
    call = first.output[-1]
    assert call.type == "function_call"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    answer = "<|channel|>final<|message|>It is 21.<|return|>"
    chained = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[result],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_body={"test_force": answer},
    )
    assert chained.output_text == "It is 21."
    assert chained.previous_response_id == first.id
    assert chained.instructions is None
    # The same conversation sent in full (instructions are per request, so none here either).
    explicit = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            result,
        ],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_body={"test_force": answer},
    )
    assert chained.usage is not None
    assert explicit.usage is not None
    assert explicit.usage.input_tokens == chained.usage.input_tokens
    # Same ids, not just the same count: the explicit request finds the chained prompt in the prefix cache.
    assert explicit.usage.input_tokens_details.cached_tokens >= explicit.usage.input_tokens - 16
    # Dropping the reasoning item changes the prompt (the comparison above can fail).
    without_reasoning = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            first.output[-1].model_dump(exclude_none=True),
            result,
        ],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_body={"test_force": answer},
    )
    assert without_reasoning.usage is not None
    assert without_reasoning.usage.input_tokens < chained.usage.input_tokens
    # The prompt of turn 1 is a prefix of turn 2's (the tool loop hits the cache).
    assert chained.usage.input_tokens_details.cached_tokens > 0


def test_truncation_during_reasoning_is_incomplete_and_keeps_the_reasoning(
    client: openai.OpenAI, served: Served
) -> None:
    script = "<|channel|>analysis<|message|>This is a long thought that goes on and on.<|end|>"
    response = client.responses.create(
        model=MODEL, input="Hello", max_output_tokens=8, extra_body={"test_force": script}
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 8
    (reasoning,) = response.output
    assert reasoning.type == "reasoning"
    assert reasoning.status == "incomplete"
    text = reasoning.content[0].text  # type: ignore[index]
    assert text
    assert "This is a long thought".startswith(text) or text.startswith("This is")
    assert response.usage is not None
    assert response.usage.output_tokens == 8
    events = _raw_events(served, input="Hello", max_output_tokens=8, test_force=script)
    _check_numbering(events)
    assert events[-1]["type"] == "response.incomplete"
    assert not any(e["type"] == "response.completed" for e in events)
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    item_done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["item"]["status"] for e in item_done] == ["incomplete"]
    assert item_done[0]["item"]["content"][0]["text"] == text


def test_unknown_previous_response_id_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope")
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_retrieve_and_delete(client: openai.OpenAI, served: Served) -> None:
    created = client.responses.create(
        model=MODEL, input="Hello", metadata={"k": "v"}, extra_body={"test_force": REASON_AND_ANSWER}
    )
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    assert fetched.metadata == {"k": "v"}
    raw = httpx.get(f"{served.base_url}/v1/responses/{created.id}")
    Response.model_validate(raw.json())
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(created.id)
    assert caught.value.body["param"] == "response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hi", previous_response_id=created.id)


def test_store_false_is_not_retrievable_and_streams_are_stored(client: openai.OpenAI) -> None:
    unstored = client.responses.create(
        model=MODEL, input="Hello", store=False, extra_body={"test_force": REASON_AND_ANSWER}
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    stream = client.responses.create(
        model=MODEL, input="Hello", stream=True, extra_body={"test_force": REASON_AND_ANSWER}
    )
    final = [event for event in stream][-1]
    assert final.type == "response.completed"
    assert client.responses.retrieve(final.response.id).output_text == "Hi there!"


def test_input_items_of_every_kind_and_item_references(client: openai.OpenAI, served: Served) -> None:
    first = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER_TOOL],
        extra_body={"test_force": CALL_WEATHER},  # type: ignore[list-item]
    )
    reasoning, call = first.output
    items: list[Any] = [
        {"type": "message", "role": "system", "content": "Be kind."},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Really."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        reasoning.model_dump(exclude_none=True),
        call.model_dump(exclude_none=True),
        {
            "type": "function_call_output",
            "call_id": call.call_id,
            "output": '{"temp": 21}',
            "status": "completed",
        },
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_x",
            "content": [{"type": "output_text", "text": "21."}],
        },
        {"role": "user", "content": "Thanks"},
    ]
    script = "<|channel|>final<|message|>Welcome.<|return|>"
    full = client.responses.create(
        model=MODEL,
        input=items,
        tools=[WEATHER_TOOL],
        extra_body={"test_force": script},  # type: ignore[list-item]
    )
    assert full.output_text == "Welcome."
    # `item_reference` (what @ai-sdk/openai sends) names stored items by id: the same prompt.
    referenced = [
        *items[:3],
        {"type": "item_reference", "id": reasoning.id},
        {"type": "item_reference", "id": call.id},
        *items[5:],
    ]
    by_reference = client.responses.create(
        model=MODEL,
        input=referenced,
        tools=[WEATHER_TOOL],
        extra_body={"test_force": script},  # type: ignore[list-item]
    )
    assert full.usage is not None
    assert by_reference.usage is not None
    assert by_reference.usage.input_tokens == full.usage.input_tokens
    # Instructions and system/developer messages all become the developer message's instructions.
    instructed = _post(served, input="Hi", instructions="Answer in French.", max_output_tokens=1).json()
    plain = _post(served, input="Hi", max_output_tokens=1).json()
    assert instructed["instructions"] == "Answer in French."
    assert instructed["usage"]["input_tokens"] > plain["usage"]["input_tokens"]
    assert instructed["status"] == "incomplete"
    # reasoning.effort reaches the system message (a different prompt) and is echoed.
    high = _post(served, input="Hi", reasoning={"effort": "high"}, max_output_tokens=1).json()
    assert high["reasoning"]["effort"] == "high"
    assert plain["reasoning"]["effort"] == "medium"


def test_tool_choice_required_and_none(client: openai.OpenAI) -> None:
    required = client.responses.create(
        model=MODEL,
        input="Hi",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_output_tokens=40,
        temperature=0,  # type: ignore[list-item]
    )
    assert required.output[0].type == "function_call"
    assert required.output[0].name == "get_weather"  # type: ignore[union-attr]
    named = client.responses.create(
        model=MODEL,
        input="Hi",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40,
        temperature=0,
    )
    assert named.output[0].type == "function_call"
    assert named.tool_choice.type == "function"  # type: ignore[union-attr]
    none = client.responses.create(
        model=MODEL,
        input="Hi",
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,  # type: ignore[list-item]
    )
    assert not any(item.type == "function_call" for item in none.output)
    assert none.tool_choice == "none"


def test_engine_failure_ends_the_stream_with_response_failed(client: openai.OpenAI, served: Served) -> None:
    script = "<|channel|>final<|message|>one two three four five six seven<|return|>"
    events = _raw_events(served, input="Hello", test_force=script, test_fail_after=4)
    _check_numbering(events)
    assert events[-1]["type"] == "response.failed"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "server_error"
    assert "forced engine failure" in failed.error.message
    # Every item that was opened is closed before the end.
    added = {e["item"]["id"] for e in events if e["type"] == "response.output_item.added"}
    done = {e["item"]["id"] for e in events if e["type"] == "response.output_item.done"}
    assert added
    assert added == done
    not_streamed = _post(served, input="Hello", test_force=script, test_fail_after=4)
    assert not_streamed.status_code == 500
    assert not_streamed.json()["error"]["type"] == "server_error"
    # The engine goes on serving.
    after = client.responses.create(model=MODEL, input="Hello", extra_body={"test_force": REASON_AND_ANSWER})
    assert after.output_text == "Hi there!"


def test_concurrent_streams(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        stream = await aclient.responses.create(
            model=MODEL,
            input="Hello",
            stream=True,
            extra_body={"test_force": f"<|channel|>final<|message|>reply {i}<|return|>"},
        )
        text = ""
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        return text

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(12)))

    assert asyncio.run(all_of_them()) == [f"reply {i}" for i in range(12)]


def test_the_store_is_bounded_and_forgets_the_oldest() -> None:
    store = ResponseStore(capacity=3)
    for i in range(5):
        store.put(StoredResponse({"id": f"resp_{i}", "output": [{"id": f"msg_{i}"}]}, []))
    assert len(store) == 3
    assert store.get("resp_0") is None
    assert store.get("resp_1") is None
    assert store.get("resp_4") is not None
    assert store.item("msg_2") == {"id": "msg_2"}
    assert store.item("msg_0") is None
    assert store.delete("resp_4")
    assert not store.delete("resp_4")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "Hi", "tools": [{"type": "web_search_preview"}]}, 400, "tools[0].type"),
        ({"input": "Hi", "tools": [{"type": "function", "name": "bad name!"}]}, 400, "tools[0].name"),
        ({"input": "Hi", "background": True, "store": False}, 400, "background"),
        ({"input": "Hi", "include": ["file_search_call.results"]}, 400, "include"),
        ({"input": "Hi", "top_logprobs": 21}, 400, "top_logprobs"),
        ({"input": "Hi", "max_tool_calls": -1}, 400, "max_tool_calls"),
        ({"input": "Hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"input": "Hi", "logit_bias": {"1": 500}}, 400, "logit_bias"),
        ({"input": "Hi", "top_k": -2}, 400, "top_k"),
        ({"input": "Hi", "min_p": 2}, 400, "min_p"),
        ({"input": "Hi", "presence_penalty": 3}, 400, "presence_penalty"),
        ({"input": "Hi", "seed": 2**64}, 400, "seed"),
        ({"input": "Hi", "context_management": [{"type": "compaction"}]}, 400, "context_management"),
        ({"input": "Hi", "conversation": "conv_1"}, 400, "conversation"),
        ({"input": "Hi", "prompt": {"id": "pmpt_1"}}, 400, "prompt"),
        ({"input": "Hi", "moderation": {"mode": "auto"}}, 400, "moderation"),
        ({"input": "Hi", "background_options": {}}, 400, "background_options"),
        ({"input": "Hi", "some_future_field": 1}, 400, "some_future_field"),
        ({"input": "Hi", "truncation": "auto"}, 400, "truncation"),
        ({"input": "Hi", "text": {"format": {"type": "json_schema"}}}, 400, "text.format"),
        ({"input": "Hi", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
        ({"input": "Hi", "temperature": 5}, 400, "temperature"),
        ({"input": "Hi", "tool_choice": "required"}, 400, "tool_choice"),
        (
            {"input": "Hi", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "x"}},
            400,
            "tool_choice",
        ),
        ({"input": "Hi", "tool_choice": {"type": "web_search_preview"}}, 400, "tool_choice"),
        (
            {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
            400,
            "input[0].call_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
        ({"input": [{"type": "computer_call", "id": "cu_1"}]}, 400, "input[0].type"),
        ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, 400, "input[0].name"),
        ({"input": [{"type": "item_reference", "id": "rs_nope"}]}, 404, "input[0].id"),
        ({"input": "Hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({"input": "x " * 5000}, 400, "input"),
        ({"input": "Hi", "max_output_tokens": 10_000}, 400, "max_output_tokens"),
        ({"input": "Hi", "model": "other"}, 404, "model"),
        ({}, 400, "input"),
    ],
)
def test_errors_use_the_openai_envelope(served: Served, body: dict, status: int, param: str) -> None:
    response = _post(served, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]


def test_sdk_accepted_fields_are_accepted(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input="Hi",
        instructions="",
        include=["reasoning.encrypted_content"],
        truncation="disabled",
        parallel_tool_calls=False,
        temperature=0.5,
        top_p=0.9,
        user="u1",
        text={"format": {"type": "text"}, "verbosity": "low"},
        max_output_tokens=2,
        # Hints with nothing to do here (the prefix cache needs no key; one tier; no summaries written).
        prompt_cache_key="k1",
        safety_identifier="s1",
        service_tier="auto",
        reasoning={"effort": "low", "summary": "auto"},
        prompt_cache_retention="24h",
        stream_options={"include_obfuscation": False},
    )
    assert response.status in ("completed", "incomplete")
    assert (response.temperature, response.top_p, response.parallel_tool_calls) == (0.5, 0.9, False)


def test_chat_and_responses_render_a_tool_loop_alike(client: openai.OpenAI) -> None:
    chat_tool = {
        "type": "function",
        "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
    }
    answer = {"test_force": "<|channel|>final<|message|>21.<|return|>"}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning": "Need weather.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },  # type: ignore[typeddict-unknown-key]
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ],
        tools=[chat_tool],  # type: ignore[list-item]
        extra_body=answer,
    )
    response = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Need weather."}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
        ],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_body=answer,
    )
    assert chat.usage is not None
    assert response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    # Same ids: the second request finds the whole prompt (all full blocks) in the prefix cache.
    assert response.usage.input_tokens_details.cached_tokens >= response.usage.input_tokens - 16


def test_a_client_that_disconnects_frees_its_blocks(served: Served) -> None:
    script = "<|channel|>analysis<|message|>" + "word " * 400
    body = {"model": MODEL, "input": "Hi", "stream": True, "max_output_tokens": 2000, "test_force": script}
    assert_disconnect_frees_blocks(served, "/v1/responses", body, lines=12)


def test_the_sdk_stream_helper_accepts_the_stream(client: openai.OpenAI) -> None:
    # `client.responses.stream()` checks the event order strictly (items added before their deltas, all done).
    with client.responses.stream(
        model=MODEL,
        input="Hi",
        tools=[WEATHER_TOOL],
        extra_body={"test_force": CALL_WEATHER},  # type: ignore[list-item]
    ) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    assert json.loads(final.output[1].arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    with client.responses.stream(
        model=MODEL, input="Hi", extra_body={"test_force": REASON_AND_ANSWER}
    ) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        assert stream.get_final_response().output_text == text == "Hi there!"


# -- logprobs ------------------------------------------------------------------------------------------------


def test_logprobs_come_with_the_answer_tokens(client: openai.OpenAI, served: Served) -> None:
    response = client.responses.create(
        model=MODEL,
        input="Hello",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        extra_body={"test_force": REASON_AND_ANSWER},
    )
    assert response.top_logprobs == 2
    _, message = response.output
    (part,) = message.content  # type: ignore[union-attr]
    assert part.type == "output_text"
    assert part.logprobs is not None
    assert "".join(lp.token for lp in part.logprobs) == "Hi there!"
    for lp in part.logprobs:
        assert bytes(lp.bytes).decode() == lp.token
        assert len(lp.top_logprobs) == 2
        assert lp.logprob <= 0
        # Logprobs are the model's (before the test's forcing): the alternatives are the most likely.
        assert lp.top_logprobs[0].logprob >= max(lp.top_logprobs[1].logprob, lp.logprob)
    # Streamed: each delta carries its tokens' logprobs; the done event and the part carry them all.
    events = _raw_events(
        served,
        input="Hello",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        test_force=REASON_AND_ANSWER,
    )
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(len(e["logprobs"]) == 1 for e in deltas)
    streamed = [lp for e in deltas for lp in e["logprobs"]]
    assert [lp["token"] for lp in streamed] == [lp.token for lp in part.logprobs]
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == streamed
    (part_done,) = [
        e for e in events if e["type"] == "response.content_part.done" and e["part"]["type"] == "output_text"
    ]
    assert part_done["part"]["logprobs"] == streamed
    assert events[-1]["response"]["output"][1]["content"][0]["logprobs"] == streamed
    # top_logprobs alone asks for them too; top_logprobs 0 with the include gives the tokens alone.
    alone = client.responses.create(
        model=MODEL, input="Hello", top_logprobs=1, extra_body={"test_force": REASON_AND_ANSWER}
    )
    assert len(alone.output[1].content[0].logprobs) == len(part.logprobs)  # type: ignore[union-attr,arg-type]
    bare = client.responses.create(
        model=MODEL,
        input="Hello",
        include=["message.output_text.logprobs"],
        extra_body={"test_force": REASON_AND_ANSWER},
    )
    bare_logprobs = bare.output[1].content[0].logprobs  # type: ignore[union-attr]
    assert bare_logprobs is not None
    assert [lp.top_logprobs for lp in bare_logprobs] == [[]] * len(part.logprobs)
    # Not asked for: none.
    plain = client.responses.create(model=MODEL, input="Hello", extra_body={"test_force": REASON_AND_ANSWER})
    assert plain.output[1].content[0].logprobs == []  # type: ignore[union-attr]


# -- input items ---------------------------------------------------------------------------------------------


def test_input_items_are_listed_with_ids_and_paginated(client: openai.OpenAI, served: Served) -> None:
    first = client.responses.create(
        model=MODEL, input="Weather?", tools=[WEATHER_TOOL], extra_body={"test_force": CALL_WEATHER}
    )
    (only,) = client.responses.input_items.list(first.id)
    assert only.type == "message"
    assert only.role == "user"  # type: ignore[union-attr]
    assert only.id.startswith("msg_")
    assert [(c.type, c.text) for c in only.content] == [("input_text", "Weather?")]  # type: ignore[union-attr]
    reasoning, call = first.output
    sent: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        reasoning.model_dump(exclude_none=True),
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
        {"type": "message", "role": "assistant", "id": "msg_mine", "content": "21."},
        {"role": "user", "content": "Thanks"},
    ]
    second = client.responses.create(
        model=MODEL,
        input=sent,
        tools=[WEATHER_TOOL],
        extra_body={"test_force": "<|channel|>final<|message|>Welcome.<|return|>"},
    )
    raw = httpx.get(f"{served.base_url}/v1/responses/{second.id}/input_items")
    assert raw.status_code == 200
    page = ResponseItemList.model_validate(raw.json())  # every item in OpenAI's item shape
    # Newest first by default; ids kept where sent, given where not.
    assert [item.type for item in page.data] == [
        "message",
        "message",
        "function_call_output",
        "function_call",
        "reasoning",
        "message",
        "message",
    ]
    assert (page.first_id, page.last_id, page.has_more) == (page.data[0].id, page.data[-1].id, False)
    ids = [item.id for item in page.data]
    assert len(set(ids)) == len(ids)
    assert ids[1] == "msg_mine"
    assert (ids[3], ids[4]) == (call.id, reasoning.id)
    assert ids[2].startswith("fco_")
    assert page.data[1].content[0].type == "output_text"  # type: ignore[union-attr]
    # The SDK's paginator walks `after` cursors, `limit` at a time, oldest first with order asc.
    walked = list(client.responses.input_items.list(second.id, limit=2, order="asc"))
    assert [item.id for item in walked] == ids[::-1]
    one_page = httpx.get(
        f"{served.base_url}/v1/responses/{second.id}/input_items", params={"limit": 3, "after": ids[1]}
    ).json()
    assert [item["id"] for item in one_page["data"]] == ids[2:5]
    assert one_page["has_more"] is True
    before = httpx.get(
        f"{served.base_url}/v1/responses/{second.id}/input_items",
        params={"before": ids[3], "order": "desc"},
    ).json()
    assert [item["id"] for item in before["data"]] == ids[:3]
    # The stored items give back the same prompt: a chain from `second` equals sending it all again.
    chained = client.responses.create(
        model=MODEL,
        previous_response_id=second.id,
        input="More?",
        extra_body={"test_force": "<|channel|>final<|message|>No.<|return|>"},
    )
    again = client.responses.create(
        model=MODEL,
        input=[
            *sent,
            *[o.model_dump(exclude_none=True) for o in second.output],
            {"role": "user", "content": "More?"},
        ],
        extra_body={"test_force": "<|channel|>final<|message|>No.<|return|>"},
    )
    assert chained.usage is not None
    assert again.usage is not None
    assert chained.usage.input_tokens == again.usage.input_tokens
    # A chained response lists its whole conversation: the chain's items, then its own.
    chain_items = list(client.responses.input_items.list(chained.id, order="asc", limit=100))
    assert [i.id for i in chain_items][: len(ids)] == ids[::-1]
    assert chain_items[len(ids)].id == second.output[0].id
    assert chain_items[-1].content[0].text == "More?"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("query", "status", "param"),
    [
        ({"limit": 0}, 400, "limit"),
        ({"limit": 101}, 400, "limit"),
        ({"order": "sideways"}, 400, "order"),
        ({"after": "msg_nope"}, 400, "after"),
        ({"include": ["file_search_call.results"]}, 400, "include"),
    ],
)
def test_input_items_refuse_bad_queries(
    client: openai.OpenAI, served: Served, query: dict, status: int, param: str
) -> None:
    created = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    response = httpx.get(f"{served.base_url}/v1/responses/{created.id}/input_items", params=query)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_input_items_of_an_unknown_response_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.input_items.list("resp_nope")
    assert caught.value.body["param"] == "response_id"  # type: ignore[index]


# -- responses in progress, background responses -------------------------------------------------------------

LONG_THOUGHT = "<|channel|>analysis<|message|>" + "word " * 300 + "<|end|>"


def _wait_for(client: openai.OpenAI, response_id: str, done: Any, timeout: float = 60) -> Response:
    deadline = time.time() + timeout
    while True:
        response = client.responses.retrieve(response_id)
        if done(response) or time.time() > deadline:
            return response
        time.sleep(0.05)


def _engine_idle(served: Served) -> bool:
    wait_until_idle(served)
    return not served.engine.scheduler.requests and served.engine.scheduler.kv.full_tables == {}


def _read_until(lines: Any, kind: str, count: int = 1) -> list[dict[str, Any]]:
    """Events from an SSE line iterator up to the `count`-th of type `kind`."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
            count -= events[-1]["type"] == kind
            if count == 0:
                break
    return events


def test_a_streamed_response_is_visible_while_in_progress(client: openai.OpenAI, served: Served) -> None:
    script = LONG_THOUGHT + "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    body = {"model": MODEL, "input": "Hi", "stream": True, "test_force": script}
    with httpx.stream("POST", served.base_url + "/v1/responses", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        head = _read_until(lines, "response.reasoning_text.delta", 5)
        response_id = head[0]["response"]["id"]
        raw = httpx.get(f"{served.base_url}/v1/responses/{response_id}").json()
        during = Response.model_validate(raw)
        assert during.status == "in_progress"
        (item,) = during.output
        assert (item.type, item.status) == ("reasoning", "in_progress")
        text = item.content[0].text  # type: ignore[union-attr,index]
        assert text.startswith("word word")
        assert ("word " * 300).startswith(text)
        assert during.usage is None
        rest = _read_until(lines, "response.completed")
    final = rest[-1]["response"]
    assert client.responses.retrieve(response_id).model_dump() == Response.model_validate(final).model_dump()
    # A stored stream whose client hangs up is kept as cancelled, with what it had said.
    with httpx.stream("POST", served.base_url + "/v1/responses", json=body, timeout=60) as stream:
        head = _read_until(stream.iter_lines(), "response.reasoning_text.delta", 3)
    assert _engine_idle(served)
    cut = client.responses.retrieve(head[0]["response"]["id"])
    assert cut.status == "cancelled"
    assert cut.output[0].content[0].text.startswith("word")  # type: ignore[union-attr,index]
    assert cut.output[0].status == "incomplete"


def test_background_response_runs_and_is_polled(client: openai.OpenAI, served: Served) -> None:
    script = LONG_THOUGHT + "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    created = client.responses.create(
        model=MODEL, input="Hi", background=True, extra_body={"test_force": script}
    )
    assert created.background is True
    assert created.status in ("queued", "in_progress")
    assert created.output == []
    running = _wait_for(client, created.id, lambda r: r.status == "in_progress" and r.output)
    assert running.status == "in_progress"
    assert running.output[0].type == "reasoning"
    assert served.app.state.server.services.engine.in_flight == 1  # it holds its admission
    final = _wait_for(client, created.id, lambda r: r.status != "in_progress")
    assert final.status == "completed"
    assert final.output_text == "Done."
    assert final.output[0].content[0].text == "word " * 300  # type: ignore[union-attr,index]
    assert served.app.state.server.services.engine.in_flight == 0
    assert _engine_idle(served)
    # Finished, a background response cancels to itself; a foreground one cannot be cancelled.
    assert client.responses.cancel(created.id).status == "completed"
    foreground = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(foreground.id)
    assert caught.value.body["param"] == "response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")


def test_cancelling_a_background_response_aborts_it(client: openai.OpenAI, served: Served) -> None:
    script = "<|channel|>analysis<|message|>" + "word " * 3000
    created = client.responses.create(
        model=MODEL, input="Hi", background=True, max_output_tokens=3000, extra_body={"test_force": script}
    )
    _wait_for(client, created.id, lambda r: r.output and len(r.output[0].content[0].text) > 20)  # type: ignore[union-attr,index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.delete(created.id)  # still in progress
    assert caught.value.body["param"] == "response_id"  # type: ignore[index]
    # Cancelled before its task has begun: it ends at once, and its slot is given back.
    service = served.app.state.server.services.responses
    task = service.live[created.id].task

    async def create_and_cancel() -> dict[str, Any]:
        request = ResponsesRequest(model=MODEL, input="Hi", background=True, max_output_tokens=5)
        early = await service.create(request)
        assert early["status"] == "queued"
        return await service.cancel(early["id"])

    early = asyncio.run_coroutine_threadsafe(create_and_cancel(), task.get_loop()).result(30)
    assert (early["status"], early["output"]) == ("cancelled", [])
    assert early["id"] not in service.live
    assert served.app.state.server.services.engine.in_flight == 1
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    (item,) = cancelled.output
    assert item.status == "incomplete"
    assert item.content[0].text.startswith("word word")  # type: ignore[union-attr,index]
    assert cancelled.usage is not None
    assert 0 < cancelled.usage.output_tokens < 3000
    assert _engine_idle(served)  # its engine request is gone, its KV freed
    assert served.app.state.server.services.engine.in_flight == 0
    assert client.responses.retrieve(created.id).model_dump() == cancelled.model_dump()
    assert client.responses.cancel(created.id).status == "cancelled"  # again: as it is


def test_a_background_stream_outlives_its_client_and_resumes(client: openai.OpenAI, served: Served) -> None:
    script = LONG_THOUGHT + "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    body = {"model": MODEL, "input": "Hi", "stream": True, "background": True, "test_force": script}
    with httpx.stream("POST", served.base_url + "/v1/responses", json=body, timeout=60) as stream:
        head = _read_until(stream.iter_lines(), "response.reasoning_text.delta", 3)
    for event in head:
        EVENT_ADAPTER.validate_python(event)
    assert [e["sequence_number"] for e in head] == list(range(len(head)))
    response_id = head[0]["response"]["id"]
    assert head[0]["response"]["background"] is True
    # The client is gone; the response goes on. The SDK resumes the stream after the last event it had.
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=len(head) - 1))
    assert resumed[0].sequence_number == len(head)
    assert [e.sequence_number for e in resumed] == list(range(len(head), len(head) + len(resumed)))
    assert resumed[-1].type == "response.completed"
    text = "".join(e["delta"] for e in head if e["type"] == "response.reasoning_text.delta") + "".join(
        e.delta for e in resumed if e.type == "response.reasoning_text.delta"
    )
    assert text == "word " * 300
    final = client.responses.retrieve(response_id)
    assert final.status == "completed"
    assert final.output_text == "Done."
    # Streaming by GET is for a background response in progress.
    with pytest.raises(openai.BadRequestError) as caught:
        list(client.responses.retrieve(response_id, stream=True))
    assert caught.value.body["param"] == "stream"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        list(client.responses.retrieve("resp_nope", stream=True))


def test_background_responses_share_the_in_flight_bound(client: openai.OpenAI, served: Served) -> None:
    engine = served.app.state.server.services.engine
    assert engine.max_in_flight is not None
    engine.in_flight = engine.max_in_flight - 1  # all slots but one are taken by others
    try:
        script = "<|channel|>analysis<|message|>" + "word " * 3000
        created = client.responses.create(
            model=MODEL,
            input="Hi",
            background=True,
            max_output_tokens=3000,
            extra_body={"test_force": script},
        )
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model=MODEL, input="Hi", background=True, max_output_tokens=1)
        client.responses.cancel(created.id)
        assert engine.in_flight == engine.max_in_flight - 1
    finally:
        engine.in_flight = 0


def test_shutdown_cuts_background_responses(client: openai.OpenAI, served: Served) -> None:
    script = "<|channel|>analysis<|message|>" + "word " * 3000
    created = client.responses.create(
        model=MODEL, input="Hi", background=True, max_output_tokens=3000, extra_body={"test_force": script}
    )
    _wait_for(client, created.id, lambda r: bool(r.output))
    service = served.app.state.server.services.responses
    run = service.live[created.id]
    assert run.task is not None
    asyncio.run_coroutine_threadsafe(service.shutdown(), run.task.get_loop()).result(30)
    cut = client.responses.retrieve(created.id)
    assert cut.status == "failed"
    assert cut.error is not None
    assert "shutting down" in cut.error.message
    assert _engine_idle(served)
    assert served.app.state.server.services.engine.in_flight == 0


# -- replaying the assistant's turns -------------------------------------------------------------------------


def test_an_assistant_message_before_a_call_is_replayed_as_commentary(
    client: openai.OpenAI, served: Served
) -> None:
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    items: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me check."}],
        },
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
    ]
    service = served.app.state.server.services.responses
    request = ResponsesRequest(model=MODEL, input=items, tools=[WEATHER_TOOL])
    messages, _, _ = service.conversation(request)
    prompt = served.encoding.decode(service.render(messages, service._tools(request), None))
    assert "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>" in prompt
    assert "<|channel|>final<|message|>Let me check." not in prompt
    # Chat renders an assistant message with content and tool calls the same way: the same prompt.
    chat_tool = {
        "type": "function",
        "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
    }
    answer = {"test_force": "<|channel|>final<|message|>21.<|return|>"}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ],
        tools=[chat_tool],  # type: ignore[list-item]
        extra_body=answer,
    )
    response = client.responses.create(model=MODEL, input=items, tools=[WEATHER_TOOL], extra_body=answer)
    assert chat.usage is not None
    assert response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.input_tokens_details.cached_tokens >= response.usage.input_tokens - 16
    # A message that is not followed by a call is still a final answer.
    answered = ResponsesRequest(model=MODEL, input=[*items[:2], {"role": "user", "content": "And?"}])
    messages, _, _ = service.conversation(answered)
    assert "<|channel|>final<|message|>Let me check.<|end|>" in served.encoding.decode(
        service.render(messages, None, None)
    )


# -- sampling ------------------------------------------------------------------------------------------------


def _said(response: Response) -> list[tuple[str, str]]:
    """What a response said, item by item, without its ids."""
    out = []
    for item in response.output:
        if item.type == "function_call":
            out.append((item.type, item.arguments))
        else:
            out.append((item.type, "".join(c.text for c in item.content or [])))  # type: ignore[union-attr]
    return out


def test_seed_and_sampling_extras_reach_the_sampler(client: openai.OpenAI, served: Served) -> None:
    def sample(temperature: float, **extra: Any) -> Response:
        # None of these is in OpenAI's Responses API (vLLM takes them): the SDK sends them as extra fields.
        return client.responses.create(
            model=MODEL, input="Hi", max_output_tokens=12, temperature=temperature, extra_body=extra
        )

    seeded = sample(temperature=1.0, seed=7)
    assert _said(sample(temperature=1.0, seed=7)) == _said(seeded)
    assert _said(sample(temperature=1.0, seed=8)) != _said(seeded)
    greedy = _said(sample(temperature=0))
    # top_k 1 and min_p 1 keep only the most likely token: greedy, whatever the temperature.
    assert _said(sample(temperature=1.0, top_k=1, seed=1)) == greedy
    assert _said(sample(temperature=1.0, min_p=1.0, seed=2)) == greedy
    # A bias of 100 makes one token win every step; penalties let a runner-up win once it has repeated.
    (zebra,) = served.encoding.encode_ordinary(" zebra")
    (horse,) = served.encoding.encode_ordinary(" horse")
    bias = {str(zebra): 100, str(horse): 96}
    biased = sample(temperature=0, logit_bias=bias)
    assert biased.output_text == " zebra" * 12
    penalized = sample(temperature=0, logit_bias=bias, presence_penalty=2.0, frequency_penalty=2.0)
    assert " horse" in penalized.output_text
    assert penalized.output_text.startswith(" zebra")


def test_max_tool_calls_ends_the_response_at_the_limit(client: openai.OpenAI, served: Served) -> None:
    capped = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER_TOOL],
        max_tool_calls=0,
        extra_body={"test_force": CALL_WEATHER},
    )
    assert capped.max_tool_calls == 0
    assert capped.status == "completed"
    assert [item.type for item in capped.output] == ["reasoning"]
    assert _engine_idle(served)
    events = _raw_events(
        served, input="Weather?", tools=[WEATHER_TOOL], max_tool_calls=0, test_force=CALL_WEATHER
    )
    _check_numbering(events)
    assert events[-1]["type"] == "response.completed"
    assert not any(e["type"].startswith("response.function_call") for e in events)
    allowed = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER_TOOL],
        max_tool_calls=1,
        extra_body={"test_force": CALL_WEATHER},
    )
    assert [item.type for item in allowed.output] == ["reasoning", "function_call"]
