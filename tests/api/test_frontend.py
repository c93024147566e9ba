"""The front end's guards: who may call which route, what a body may be, and what answers a bad one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from server.app import create_app
from server.routes import router
from server.settings import ServerSettings
from tests.api.conftest import MODEL, Served

KEY = "s3cret-ключ"  # a non-ASCII key: matched as the UTF-8 bytes a client sends


def _every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) for every route the app has, FastAPI's own (/docs, /openapi.json) included."""
    out = []
    for route in [*client.app.routes, *router.routes]:  # type: ignore[attr-defined]
        if isinstance(route, APIRoute | Route):
            path = route.path.replace("{response_id}", "resp_x")
            out += [(method, path) for method in sorted(route.methods or []) if method != "HEAD"]
    return out


@pytest.mark.parametrize("metrics_access", ["public", "protected"])
def test_the_api_key_covers_every_route_but_health(metrics_access: str) -> None:
    settings = ServerSettings(api_key=KEY, metrics_access=metrics_access)  # type: ignore[arg-type]
    with TestClient(create_app(None, settings)) as client:
        routes = _every_route(client)
        assert ("POST", "/tokenize") in routes
        assert ("GET", "/openapi.json") in routes
        key = KEY.encode()
        for method, path in routes:
            open_route = path == "/health" or (path == "/metrics" and metrics_access == "public")
            for headers in ({}, {"Authorization": b"Bearer wrong"}, {"Authorization": key}):
                response = client.request(method, path, headers=headers)
                assert (response.status_code == 401) != open_route, (method, path, headers)
                if not open_route:
                    assert response.json()["error"]["code"] == "invalid_api_key"
            # The scheme in any case, the key as UTF-8 bytes: accepted.
            for scheme in (b"Bearer ", b"bearer ", b"BEARER "):
                response = client.request(method, path, headers={"Authorization": scheme + key})
                assert response.status_code != 401, (method, path, scheme)
        # The same key sent as latin-1 is other bytes: refused, not silently matched.
        latin = client.get("/v1/models", headers={"Authorization": b"Bearer " + KEY.encode("utf-16")})
        assert latin.status_code == 401


def test_a_chunked_body_over_the_limit_is_a_413() -> None:
    """No Content-Length to check: the limit must hold while the bytes arrive."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}]}'

    with TestClient(create_app(None, ServerSettings(max_request_bytes=16 << 10))) as client:
        response = client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        small = client.post(
            "/tokenize",
            content=iter([b'{"prompt": ', b'"hello"}']),
            headers={"content-type": "application/json"},
        )
        assert small.status_code == 200, small.text


def test_a_405_names_the_allowed_methods() -> None:
    with TestClient(create_app(None, ServerSettings())) as client:
        response = client.get("/v1/chat/completions")
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["error"]["type"] == "invalid_request_error"


def _deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# Bodies are raw JSON: M stands for the model, SUR for a lone surrogate as JSON escapes it.
SURROGATE = '"\\ud800"'


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", '{"messages": []}', "messages"),
        ("/tokenize", '{"prompt": SUR}', "prompt"),
        ("/v1/responses", '{"model": "M", "input": "hi", "instructions": SUR}', "instructions"),
        ("/v1/responses", '{"model": "M", "input": "hi", "user": SUR}', "user"),
        ("/v1/responses", '{"model": "M", "input": "hi", "metadata": {"k": SUR}}', "metadata.k"),
        (
            "/v1/responses",
            '{"model": "M", "input": "hi", "stream": true, "instructions": SUR}',
            "instructions",
        ),
        (
            "/v1/responses",
            '{"model": "M", "input": "hi", "tools": [{"type": "function", "name": "f", "description": SUR}]}',
            "tools[0].description",
        ),
        ("/v1/completions", '{"model": "M", "prompt": "hi", "stop": SUR}', "stop"),
        (
            "/v1/chat/completions",
            '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": Infinity}}',
            "logit_bias.1",
        ),
        (
            "/v1/responses",
            '{"model": "M", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": '
            '{"type": "object", "properties": {"a": {"default": Infinity}}}}]}',
            "tools[0].parameters.properties.a.default",
        ),
        (
            "/v1/chat/completions",
            json.dumps(
                {
                    "model": "M",
                    "messages": [{"role": "user", "content": "hi"}],
                    "tools": [
                        {"type": "function", "function": {"name": "f", "parameters": _deep_schema(450)}}
                    ],
                }
            ),
            "tools[0].function.parameters",
        ),
        (
            "/tokenize",
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "tools": [
                        {"type": "function", "function": {"name": "f", "parameters": _deep_schema(450)}}
                    ],
                }
            ),
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field(served: Served, path: str, body: str, param: str) -> None:
    """Each of these was a 500 (or, streamed, a stream with no terminal event): a lone surrogate fails the
    tokenizer, the stop matcher or the response's encoding, `Infinity` the sampler or the JSON echo, a deep
    schema the renderer's recursion."""
    response = httpx.post(
        served.base_url + path,
        content=body.replace('"M"', f'"{MODEL}"').replace("SUR", SURROGATE),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
