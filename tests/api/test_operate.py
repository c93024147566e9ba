"""Operating the server: API keys, metrics, limits and request ids."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.api.conftest import MODEL, Served, wait_until_idle

USER = [{"role": "user", "content": "Hello"}]


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = (
        "^" + re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{[^}]*\})?") + r" (\S+)$"
    )
    found = re.findall(pattern, text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def test_api_key_is_required_on_v1_only() -> None:
    app = create_app(None, ServerSettings(api_key="s3cret"))
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 503  # open (and still loading: no engine)
        assert client.get("/metrics").status_code == 200


def test_body_size_limit_is_a_413() -> None:
    app = create_app(None, ServerSettings(max_request_bytes=200))
    with TestClient(app) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x" * 500}]}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


def test_metrics_move_after_a_request(served: Served) -> None:
    before = httpx.get(served.base_url + "/metrics").text
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
    after = httpx.get(served.base_url + "/metrics").text
    label = 'endpoint="/v1/chat/completions",status="200"'
    assert (
        _metric(after, "gpt_oss_http_requests_total", label)
        == _metric(before, "gpt_oss_http_requests_total", label) + 1
    )
    assert _metric(after, "gpt_oss_prompt_tokens_total") > _metric(before, "gpt_oss_prompt_tokens_total")
    assert (
        _metric(after, "gpt_oss_generation_tokens_total")
        >= _metric(before, "gpt_oss_generation_tokens_total") + 1
    )
    assert (
        _metric(after, "gpt_oss_time_to_first_token_seconds_count")
        == _metric(before, "gpt_oss_time_to_first_token_seconds_count") + 1
    )
    assert _metric(after, "gpt_oss_e2e_request_latency_seconds_count") >= 1
    for gauge in (
        "gpt_oss_requests_running",
        "gpt_oss_requests_waiting",
        "gpt_oss_kv_cache_usage_ratio",
        "gpt_oss_prefix_cache_hit_ratio",
    ):
        assert re.search(rf"^{gauge} ", after, re.MULTILINE), gauge


def test_a_full_queue_is_a_429_with_retry_after(served: Served) -> None:
    bridge = served.app.state.server.services.engine
    saved = bridge.max_in_flight
    # A bound of one, held: full. (A bound of 0 would make every request one that can never be admitted,
    # which is a 400, not a 429.)
    bridge.max_in_flight = 1
    bridge.in_flight += 1
    try:
        response = httpx.post(
            served.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": USER}
        )
    finally:
        bridge.in_flight -= 1
        bridge.max_in_flight = saved
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_streams_started_at_once_are_admitted_up_to_the_bound(served: Served) -> None:
    """Many streams arriving together: exactly the bound starts, every other one is a 429 with Retry-After,
    and every slot comes back once the streams end. Counting a request only when its stream starts would let
    the whole burst pass the check before any was counted."""
    bridge = served.app.state.server.services.engine
    bound, burst = 3, 10
    script = "<|channel|>final<|message|>" + "word " * 300 + "<|return|>"
    body = {"model": MODEL, "messages": USER, "stream": True, "test_force": script}

    async def start_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as client:
            requests = [client.build_request("POST", "/v1/chat/completions", json=body) for _ in range(burst)]
            responses = await asyncio.gather(*(client.send(r, stream=True) for r in requests))
            for response in responses:
                await response.aclose()
            return responses

    saved = bridge.max_in_flight
    bridge.max_in_flight = bound
    try:
        responses = asyncio.run(start_all())
    finally:
        bridge.max_in_flight = saved
    assert sorted(r.status_code for r in responses) == [200] * bound + [429] * (burst - bound)
    assert [r.headers.get("retry-after") for r in responses if r.status_code == 429] == ["1"] * (
        burst - bound
    )
    wait_until_idle(served)
    deadline = time.time() + 10
    while bridge.in_flight and time.time() < deadline:
        time.sleep(0.05)
    assert bridge.in_flight == 0


@pytest.mark.parametrize(
    ("field", "count", "param"), [("messages", 2049, "messages"), ("tools", 257, "tools")]
)
def test_messages_and_tools_per_request_are_bounded(
    served: Served, field: str, count: int, param: str
) -> None:
    body: dict = {"model": MODEL, "messages": USER}
    if field == "messages":
        body["messages"] = USER * count
    else:
        body["tools"] = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(count)]
    response = httpx.post(served.base_url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_request_ids_are_echoed_or_made(served: Served) -> None:
    given = httpx.get(served.base_url + "/v1/models", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(served.base_url + "/v1/models")
    assert made.headers["x-request-id"].startswith("req-")


def test_cors_when_configured() -> None:
    app = create_app(None, ServerSettings(cors_origins=["https://app.example"], api_key="k"))
    with TestClient(app) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get(
            "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_one_client_cannot_take_every_slot(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client holding its share of the in-flight bound gets 429s while another client is still served,
    and its share comes back as its streams end. Clients are told apart by the configured header."""
    bridge = served.app.state.server.services.engine
    monkeypatch.setattr(served.app.state.server.settings, "client_id_header", "x-client")
    monkeypatch.setattr(bridge, "max_in_flight_per_client", 2)
    script = "<|channel|>final<|message|>" + "word " * 300 + "<|return|>"
    body = {"model": MODEL, "messages": USER, "stream": True, "test_force": script}

    async def burst() -> tuple[list[int], int, int]:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as client:

            async def send(who: str) -> httpx.Response:
                request = client.build_request(
                    "POST", "/v1/chat/completions", json=body, headers={"x-client": who}
                )
                return await client.send(request, stream=True)

            greedy = [await send("greedy") for _ in range(4)]
            other = await send("other")
            statuses = [r.status_code for r in greedy]
            for response in [*greedy, other]:
                await response.aclose()
            wait_until_idle(served)
            deadline = time.time() + 10
            while bridge.in_flight and time.time() < deadline:
                await asyncio.sleep(0.05)
            again = await send("greedy")
            await again.aclose()
            return statuses, other.status_code, again.status_code

    statuses, other, again = asyncio.run(burst())
    assert statuses == [200, 200, 429, 429]
    assert other == 200
    assert again == 200
    wait_until_idle(served)
    deadline = time.time() + 10
    while bridge.in_flight and time.time() < deadline:
        time.sleep(0.05)
    assert bridge.in_flight == 0
    assert bridge._held == {}
