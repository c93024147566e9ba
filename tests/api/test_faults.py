"""One client's bad request cannot hurt the others: against the real server, each input that used to raise
inside the engine step (and end every stream in flight with it) is now a 400 naming its field, or is computed
(a tiny top_p), while concurrent victim streams finish with exactly their text. A request whose own logits
processor fails mid-stream fails alone."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from engine.config import EngineConfig
from engine.core import EngineCore
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from server.app import create_app
from tests.api.conftest import MODEL, Served, wait_until_idle

USER = [{"role": "user", "content": "Hello"}]
VICTIMS = 6
WORDS = 60  # long enough that every victim is still streaming when the bad request reaches the engine


def _script(i: int) -> str:
    return "<|channel|>final<|message|>" + f"v{i} " * WORDS + "<|return|>"


def _victim(served: Served, i: int) -> tuple[str, str | None, Any]:
    """Stream a forced reply; returns its text, its finish reason and an error chunk if one came."""
    body = {"model": MODEL, "messages": USER, "stream": True, "test_force": _script(i)}
    text, finish, error = "", None, None
    with httpx.stream("POST", served.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
                continue
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, finish, error


def _with_victims(served: Served, bad: Any) -> Any:
    """Start the victim streams, send `bad()` once they are all in the engine, and check every victim got its
    whole reply. Returns what `bad()` returned."""
    wait_until_idle(served)
    with ThreadPoolExecutor(VICTIMS) as pool:
        victims: list[Future] = [pool.submit(_victim, served, i) for i in range(VICTIMS)]
        deadline = time.time() + 60
        while len(served.engine.scheduler.requests) < VICTIMS and time.time() < deadline:
            time.sleep(0.01)
        assert len(served.engine.scheduler.requests) >= VICTIMS, "the victims never got to the engine"
        result = bad()
        outcomes = [v.result(timeout=120) for v in victims]
    for i, (text, finish, error) in enumerate(outcomes):
        assert error is None, f"victim {i} was ended by another request: {error}"
        assert text == f"v{i} " * WORDS
        assert finish == "stop"
    return result


# (endpoint, body fields, the field the 400 names)
REFUSED = [
    ("/v1/chat/completions", {"temperature": 1e-300}, "temperature"),
    ("/v1/chat/completions", {"logit_bias": {"1": float("inf")}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"1": 1e308}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"1": -101}}, "logit_bias"),
    ("/v1/chat/completions", {"stop": ["ok", "\ud800"]}, "stop"),
    ("/v1/responses", {"temperature": 1e-300}, "temperature"),
]


def _body(endpoint: str, fields: dict[str, Any]) -> dict[str, Any]:
    if endpoint == "/v1/responses":
        return {"model": MODEL, "input": "Hello", "max_output_tokens": 8, **fields}
    return {"model": MODEL, "messages": USER, "max_tokens": 8, **fields}


@pytest.mark.parametrize(("endpoint", "fields", "param"), REFUSED, ids=[f"{e} {f}" for e, f, _ in REFUSED])
def test_an_uncomputable_value_is_a_400_naming_it_and_the_streams_in_flight_go_on(
    served: Served, endpoint: str, fields: dict[str, Any], param: str
) -> None:
    def bad() -> httpx.Response:
        # Encoded here, not by httpx (which refuses both): json.dumps writes Infinity for inf and \ud800 for
        # the lone surrogate, as other clients' JSON does.
        return httpx.post(
            served.base_url + endpoint,
            content=json.dumps(_body(endpoint, fields)),
            headers={"content-type": "application/json"},
            timeout=60,
        )

    response = _with_victims(served, bad)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    # The field, or the element of it at fault (the body check names `stop[1]` for a lone surrogate there).
    assert error["param"] == param or error["param"].startswith((f"{param}[", f"{param}.")), error["param"]


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
def test_a_top_p_too_small_for_float32_is_computed_and_harms_nobody(served: Served, endpoint: str) -> None:
    def bad() -> httpx.Response:
        return httpx.post(served.base_url + endpoint, json=_body(endpoint, {"top_p": 1e-50}), timeout=60)

    response = _with_victims(served, bad)
    assert response.status_code == 200, response.text


def test_a_request_whose_own_processor_fails_ends_alone(served: Served) -> None:
    """A failure that only shows inside the step (here the request's own logits processor raising after four
    tokens) ends that request with an error and no other."""
    body = {
        "model": MODEL,
        "messages": USER,
        "stream": True,
        "test_force": "<|channel|>final<|message|>" + "x " * 20 + "<|return|>",
        "test_fail_after": 4,
    }

    def bad() -> dict[str, Any]:
        with httpx.stream(
            "POST", served.base_url + "/v1/chat/completions", json=body, timeout=60
        ) as response:
            data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        return json.loads(data[-2])

    last = _with_victims(served, bad)
    assert last["error"]["type"] == "server_error"
    assert "forced engine failure" in last["error"]["message"]


def test_an_engine_that_stopped_for_good_fails_requests_at_once_and_health_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the engine thread stops for good (its books broke), requests end at once with the reason (a 500
    in the envelope, not a hang) and /health turns 503 so that the orchestrator restarts the server."""
    config = dataclasses.replace(PRESETS["tiny"], sliding_window=16)
    path = write_checkpoint(config, tmp_path, layout="hf", seed=11)
    model = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)
    engine = EngineCore(model, EngineConfig(block_size=16, kv_cache_memory=16 << 20, max_model_len=512))

    def broken(*args: object) -> object:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    monkeypatch.setattr(engine, "fail_all", broken)
    body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200
        for _ in range(2):  # the one that stops the engine, then one after
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 500
            assert "the engine stopped: RuntimeError: device lost" in response.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": "engine stopped",
            "error": "the engine stopped: RuntimeError: device lost",
        }
