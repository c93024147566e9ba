"""The real app on an engine running the overlapped loop (--async-scheduling on) streams what the same app on
the plain loop streams: the same text, finish reasons and usage, with stops seen a step late in the engine
and the extra token never reaching the client. Both engines sample on the device (on CPU tensors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from engine.core import EngineCore
from harmony import encoding as tok
from server.app import create_app
from server.settings import ServerSettings
from tests.api.conftest import MODEL, serve_in_thread, tiny_engine


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    """Clients of two servers on the same checkpoint: the plain loop's, then the overlapped loop's."""
    engines: list[EngineCore] = []
    with contextlib.ExitStack() as stack:
        bases = []
        for overlap in (False, True):
            engine, encoding = tiny_engine(
                tmp_path_factory.mktemp("overlap-api"), device_sampling=True, async_scheduling=overlap
            )
            engines.append(engine)
            settings = ServerSettings(served_model_name=MODEL, conversation_date="2026-11-27")
            bases.append(
                stack.enter_context(serve_in_thread(create_app(engine, settings, encoding=encoding)))
            )
        assert [e.async_scheduling for e in engines] == [False, True]
        plain, overlapped = (
            openai.OpenAI(base_url=b + "/v1", api_key="unused", max_retries=0) for b in bases
        )
        yield plain, overlapped
        assert not engines[1].has_unfinished()


def _chat(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    """A streamed chat completion as a client rebuilds it: per choice its text, reasoning and finish reason,
    and the usage."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            got = choices.setdefault(choice.index, {"content": "", "reasoning": "", "finish": None})
            got["content"] += choice.delta.content or ""
            got["reasoning"] += getattr(choice.delta, "reasoning", None) or ""
            got["finish"] = choice.finish_reason or got["finish"]
    return {"choices": choices, "usage": usage}


def _completion(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    text, finish, usage = "", None, None
    for chunk in client.completions.create(
        model=MODEL, prompt="The weather", stream=True, stream_options={"include_usage": True}, **kwargs
    ):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return {"text": text, "finish": finish, "usage": usage}


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 0, "max_tokens": 20},
        {"temperature": 1.0, "seed": 7, "n": 2, "max_tokens": 16},
        # The end of the turn made the argmax, held back by min_tokens: the stop token ends it at the sixth.
        {
            "temperature": 0,
            "logit_bias": {str(tok.RETURN): 100},
            "extra_body": {"min_tokens": 5},
            "max_tokens": 12,
        },
    ],
    ids=["greedy", "seeded-n2", "stop-token"],
)
def test_a_chat_stream_is_the_plain_loops(clients: tuple[openai.OpenAI, openai.OpenAI], body: dict) -> None:
    plain, overlapped = clients
    expected = _chat(plain, **body)
    assert _chat(overlapped, **body) == expected
    held = "extra_body" in body  # the stop token ends the turn at the sixth token
    tokens = 6 if held else body["max_tokens"] * body.get("n", 1)
    assert expected["usage"]["completion_tokens"] == tokens
    assert {c["finish"] for c in expected["choices"].values()} == {"stop" if held else "length"}


def test_a_stop_string_ends_the_stream_as_in_the_plain_loop(
    clients: tuple[openai.OpenAI, openai.OpenAI],
) -> None:
    plain, overlapped = clients
    whole = _completion(plain, temperature=0, max_tokens=12)
    assert len(whole["text"]) > 8
    stop = whole["text"][4:7]
    expected = _completion(plain, temperature=0, max_tokens=12, stop=[stop])
    assert expected["finish"] == "stop"
    assert expected["usage"]["completion_tokens"] < 12
    assert _completion(overlapped, temperature=0, max_tokens=12, stop=[stop]) == expected
