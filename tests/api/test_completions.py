"""/v1/completions (the legacy API evaluation harnesses use) through the openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import MODEL, Served


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


def test_text_prompt_greedy_is_deterministic(client: openai.OpenAI, served: Served) -> None:
    first = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    second = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.usage is not None
    assert first.usage.prompt_tokens == len(served.encoding.encode_ordinary("The capital of France is"))


def test_token_ids_in_and_out(served: Served) -> None:
    prompt = served.encoding.encode_ordinary("Hello there")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "return_token_ids": True}
    choice = httpx.post(served.base_url + "/v1/completions", json=body).json()["choices"][0]
    assert choice["prompt_token_ids"] == prompt
    assert len(choice["token_ids"]) <= 5
    assert choice["text"] == served.encoding.decode(choice["token_ids"])


def test_echo_logprobs_n_and_batch(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt=["one", "two"], n=2, max_tokens=3, echo=True, logprobs=2, temperature=1.0, seed=5
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text.startswith("one")
    assert response.choices[2].text.startswith("two")
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or [])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])


def test_streamed_text_equals_the_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    ).choices[0]
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason


def test_sampling_defaults_come_from_the_settings(client: openai.OpenAI, served: Served) -> None:
    """A request that leaves temperature out samples with the server's default, as chat and Responses do:
    with a default of 0 (greedy), unseeded requests agree."""
    settings = served.app.state.server.settings
    saved = settings.default_temperature
    settings.default_temperature = 0.0
    try:
        texts = {
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8).choices[0].text
            for _ in range(3)
        }
    finally:
        settings.default_temperature = saved
    assert len(texts) == 1


def test_errors(served: Served) -> None:
    cases = [
        ({"model": MODEL, "prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": []}, 400, "prompt"),
        ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "stop": ["", "y"]}, 400, "stop"),
    ]
    for body, status, param in cases:
        response = httpx.post(served.base_url + "/v1/completions", json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
