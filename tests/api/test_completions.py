"""/v1/completions (the legacy API evaluation harnesses use) through the openai client."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import torch

from harmony import encoding as tok
from model.gpt_oss import AttentionMetadata
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
    # The prompt's first token has no logprob; each map holds the top 2 and the token itself (OpenAI: "up to
    # logprobs + 1").
    assert (logprobs.top_logprobs or [])[0] is None
    assert all(len(top) <= 3 for top in (logprobs.top_logprobs or [])[1:])


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


# ----------------------------------------------------------------------------------------------------------
# Scoring, as lm-evaluation-harness does it, and the sampling extras.


def _post(served: Served, **body: Any) -> httpx.Response:
    return httpx.post(served.base_url + "/v1/completions", json={"model": MODEL, **body}, timeout=120)


def _reference_logprobs(served: Served, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the served model's logits over the whole sequence, from one plain forward."""
    with torch.inference_mode():
        logits = served.engine.model(torch.tensor(tokens), AttentionMetadata.build([len(tokens)]))
    return torch.log_softmax(logits.double(), dim=-1)


def test_echo_scores_the_prompt_as_lm_eval_reads_it(served: Served) -> None:
    """lm-eval's local-completions loglikelihood: token ids, echo, logprobs 1, max_tokens 1; it sums
    token_logprobs over the continuation and calls it greedy when each token's logprob is its map's best."""
    context = served.encoding.encode_ordinary("The quick brown fox")
    continuation = served.encoding.encode_ordinary(" jumps over the lazy dog")
    prompt = context + continuation
    body = _post(served, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt, then the one generated token
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][: len(prompt)] == [served.encoding.decode([t]) for t in prompt]
    assert logprobs["text_offset"][: len(prompt) + 1] == [
        len(served.encoding.decode(prompt[:i])) for i in range(len(prompt) + 1)
    ]
    reference = _reference_logprobs(served, prompt)
    for i in range(1, len(prompt)):
        assert logprobs["token_logprobs"][i] == pytest.approx(float(reference[i - 1, prompt[i]]), abs=1e-4)
        top = logprobs["top_logprobs"][i]
        assert 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(float(reference[i - 1].max()), abs=1e-4)
    # lm-eval's arithmetic on the continuation (it drops the generated token at the end).
    ctxlen = len(context)
    scored = logprobs["token_logprobs"][ctxlen:-1]
    want = sum(float(reference[i - 1, prompt[i]]) for i in range(ctxlen, len(prompt)))
    assert sum(scored) == pytest.approx(want, abs=1e-3)
    greedy = all(
        t == max(top.values()) for t, top in zip(scored, logprobs["top_logprobs"][ctxlen:-1], strict=True)
    )
    assert greedy == all(int(reference[i - 1].argmax()) == prompt[i] for i in range(ctxlen, len(prompt)))
    # The generated token follows, scored as it was sampled.
    assert logprobs["token_logprobs"][-1] == pytest.approx(float(reference[-1].max()), abs=1e-4)


def test_max_tokens_zero_with_echo_returns_the_prompt_scored(served: Served) -> None:
    prompt = served.encoding.encode_ordinary("Score me, please")
    body = _post(served, prompt=prompt, echo=True, logprobs=0, max_tokens=0).json()
    choice = body["choices"][0]
    assert choice["text"] == served.encoding.decode(prompt)
    assert len(choice["logprobs"]["tokens"]) == len(prompt)
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in choice["logprobs"]["token_logprobs"][1:])
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0


def test_vllm_prompt_logprobs(served: Served) -> None:
    prompt = served.encoding.encode_ordinary("Hello there, general")
    body = _post(served, prompt=prompt, prompt_logprobs=2, max_tokens=2, temperature=0).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt)
    assert entries[0] is None
    reference = _reference_logprobs(served, prompt)
    for i, entry in enumerate(entries[1:], start=1):
        own = entry[str(prompt[i])]
        assert own["logprob"] == pytest.approx(float(reference[i - 1, prompt[i]]), abs=1e-4)
        assert own["decoded_token"] == served.encoding.decode([prompt[i]])
        assert own["rank"] >= 1
        assert 2 <= len(entry) <= 3
        assert {1, 2} <= {v["rank"] for v in entry.values()}  # the two most likely, and the token's own
    # Not asked: not there; and the echo text is untouched by it.
    plain = _post(served, prompt=prompt, max_tokens=2, temperature=0).json()
    assert "prompt_logprobs" not in plain["choices"][0]


def test_streamed_echo_logprobs_equal_the_whole(served: Served) -> None:
    prompt = served.encoding.encode_ordinary("Stream the scores")
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 4, "temperature": 0}
    whole = _post(served, **body).json()["choices"][0]
    tokens: list[str] = []
    values: list[float | None] = []
    offsets: list[int] = []
    text = ""
    with httpx.stream(
        "POST", served.base_url + "/v1/completions", json={"model": MODEL, "stream": True, **body}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["logprobs"] is not None:
                tokens += choice["logprobs"]["tokens"]
                values += choice["logprobs"]["token_logprobs"]
                offsets += choice["logprobs"]["text_offset"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"]
    assert values == pytest.approx(whole["logprobs"]["token_logprobs"])
    assert offsets == whole["logprobs"]["text_offset"]


def _tokens_out(body: dict[str, Any]) -> int:
    return body["usage"]["completion_tokens"]


def test_min_tokens_and_ignore_eos(served: Served) -> None:
    """The end token made the argmax: it ends the output at once, after min_tokens outputs with
    min_tokens, and never with ignore_eos."""
    base = {
        "prompt": "Tell me",
        "max_tokens": 10,
        "temperature": 0,
        "logit_bias": {str(tok.END_OF_TEXT): 100},
    }
    assert _tokens_out(_post(served, **base).json()) == 1
    held = _post(served, **base, min_tokens=4, return_token_ids=True).json()
    assert held["choices"][0]["token_ids"] == [*held["choices"][0]["token_ids"][:4], tok.END_OF_TEXT]
    assert tok.END_OF_TEXT not in held["choices"][0]["token_ids"][:4]
    assert held["choices"][0]["finish_reason"] == "stop"
    ignored = _post(served, **base, ignore_eos=True).json()
    assert _tokens_out(ignored) == 10
    assert ignored["choices"][0]["finish_reason"] == "length"


def test_top_k_and_min_p_are_honoured(served: Served) -> None:
    """top_k 1 and min_p 1 keep only the most likely token: sampling at temperature 1 is then greedy."""
    body = {"prompt": "Once upon", "max_tokens": 6, "return_token_ids": True}
    greedy = _post(served, **body, temperature=0).json()["choices"][0]["token_ids"]
    assert _post(served, **body, temperature=1.0, top_k=1).json()["choices"][0]["token_ids"] == greedy
    assert _post(served, **body, temperature=1.0, min_p=1.0).json()["choices"][0]["token_ids"] == greedy
    assert _post(served, **body, temperature=1.0, seed=1).json()["choices"][0]["token_ids"] != greedy


def test_logit_bias_is_honoured(served: Served) -> None:
    body = _post(served, prompt="Hi", max_tokens=3, logit_bias={"42": 100}, return_token_ids=True).json()
    assert body["choices"][0]["token_ids"] == [42, 42, 42]


def test_repetition_penalty_changes_greedy_output(served: Served) -> None:
    """Below 1 it favours tokens already seen: with 0.05 greedy decoding repeats prompt tokens."""
    prompt = served.encoding.encode_ordinary("apples and oranges and pears")
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    plain = _post(served, **body).json()["choices"][0]["token_ids"]
    penalized = _post(served, **body, repetition_penalty=0.05).json()["choices"][0]["token_ids"]
    assert penalized != plain
    assert set(penalized) <= set(prompt) | set(penalized[:1])


def test_best_of_keeps_the_candidates_of_highest_cumulative_logprob(served: Served) -> None:
    scripts = [" red fish", " blue sky", " green tea"]
    scores = []
    for script in scripts:
        body = _post(served, prompt="Say", max_tokens=2, logprobs=0, test_force=script).json()
        scores.append(sum(body["choices"][0]["logprobs"]["token_logprobs"]))
    ranked = sorted(range(3), key=lambda i: scores[i], reverse=True)
    body = _post(served, prompt="Say", max_tokens=2, best_of=3, n=2, test_force=scripts).json()
    assert [c["text"] for c in body["choices"]] == [scripts[i] for i in ranked[:2]]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 6  # all three candidates


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"best_of": 21}, "best_of"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 1000}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
    ],
)
def test_scoring_and_sampling_fields_are_validated(served: Served, body: dict[str, Any], param: str) -> None:
    response = _post(served, prompt="Hi", **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert _post(served, prompt="Hi", max_tokens=1).status_code == 200
