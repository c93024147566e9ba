"""The front end's guards: who may call which route, what a body may be, and what answers a bad one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sse_starlette.sse import AppStatus
from starlette.routing import Route

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import SamplingParams
from harmony.encoding import load_harmony_encoding
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from server.app import create_app
from server.async_engine import EngineFailure
from server.errors import engine_failure
from server.page import PAGE_PATHS
from server.routes import router
from server.settings import ServerSettings
from server.transport import header_timeout_protocol
from tests.api.conftest import MODEL, Served, _free_port, _hook

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
def test_the_api_key_covers_every_route_but_health_and_the_page(metrics_access: str) -> None:
    settings = ServerSettings(api_key=KEY, metrics_access=metrics_access)  # type: ignore[arg-type]
    with TestClient(create_app(None, settings)) as client:
        routes = _every_route(client)
        assert ("POST", "/tokenize") in routes
        assert ("GET", "/openapi.json") in routes
        key = KEY.encode()
        for method, path in routes:
            open_route = path in {"/health", *PAGE_PATHS} or (
                path == "/metrics" and metrics_access == "public"
            )
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


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


# How long /health may take while a 10 MB prompt is tokenized. With the tokenizing on the event loop it waited
# for a whole tokenize (1.0 to 1.3 s here); off the loop the slowest of ~250 probes took 0.08 to 0.17 s on this
# shared 2-core CPU, the loop's own work on the big body (reading and parsing its JSON) included.
HEALTH_BOUND_S = 0.25


def test_health_answers_while_a_big_prompt_is_tokenized() -> None:
    settings = ServerSettings(max_prompt_chars=64 << 20, max_request_bytes=64 << 20)
    words = ["alpha", "beta", "gamma", "tokens", "server", "über", "中文", "12345", "stream", "health"]
    text = " ".join(words[i * 7 % len(words)] + str(i % 97) for i in range(1_200_000))  # about 10 MB
    # Encoded once here: the client shares the server's process (and GIL) in this test.
    body = json.dumps({"prompt": text}).encode()
    with _serve(create_app(None, settings)) as base:
        done = threading.Event()
        took: list[float] = []

        def tokenize() -> None:
            started = time.perf_counter()
            for _ in range(3):
                response = httpx.post(
                    base + "/tokenize",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=120,
                )
                assert response.status_code == 200
            took.append(time.perf_counter() - started)
            done.set()

        # The first tokenize on a fresh worker thread holds the GIL for a one-time setup (0.6 s here).
        assert httpx.post(base + "/tokenize", json={"prompt": "warm up"}).status_code == 200
        worker = threading.Thread(target=tokenize)
        worker.start()
        latencies = []
        with httpx.Client(base_url=base) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 503  # no engine: loading, but answering
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        worker.join()
    assert took[0] > 4 * HEALTH_BOUND_S, "the tokenizing was too quick to show anything"
    assert len(latencies) > 10
    # A rare probe may still wait for the OS to schedule the server's thread (the CPU is shared with other
    # test processes): at most one in 50 may pass the bound. With the tokenizing on the loop, 3 of 20 did.
    slow = [x for x in latencies if x > HEALTH_BOUND_S]
    assert len(slow) <= len(latencies) // 50, sorted(latencies)[-5:]


def test_a_prompt_over_the_character_limit_is_a_400(served: Served) -> None:
    limit = served.app.state.server.settings.max_prompt_chars
    big = "x" * (limit + 1)
    for path, body, param in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}, "messages"),
        ("/v1/responses", {"input": big}, "input"),
        ("/v1/responses", {"input": "hi", "instructions": big}, "input"),
        ("/v1/completions", {"prompt": ["hi", big]}, "prompt"),
        ("/tokenize", {"prompt": big}, "prompt"),
    ]:
        response = httpx.post(served.base_url + path, json={"model": MODEL, **body}, timeout=60)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == param
        assert str(limit) in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/completions"])
def test_a_non_streamed_request_is_aborted_when_its_client_leaves(served: Served, path: str) -> None:
    """The client gives up (a timeout) long before the answer would be ready: the engine must drop the request
    and its blocks at once, not generate thousands of tokens for nobody."""
    script = "<|channel|>final<|message|>" + "word " * 3000 + "<|return|>"
    body: dict[str, Any] = {"model": MODEL, "test_force": script}
    if path == "/v1/completions":
        body |= {"prompt": "Hello", "max_tokens": 3000}
    elif path == "/v1/responses":
        body |= {"input": "Hello", "max_output_tokens": 3000}
    else:
        body |= {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.base_url + path, json=body, timeout=httpx.Timeout(60, read=1.0))
    left = time.time()
    while served.engine.scheduler.requests and time.time() - left < 5:
        time.sleep(0.05)
    assert not served.engine.scheduler.requests, "still generating for a client that left"
    assert served.engine.scheduler.kv.full_tables == {}
    assert served.app.state.server.services.engine.in_flight == 0


def test_shutdown_ends_every_open_stream_with_a_terminal_error(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM with streams longer than the grace period: each gets its API's terminal error event before it
    closes (chat: an error object then [DONE]; Responses: response.failed), and the log says shutdown."""
    encoding = load_harmony_encoding()
    engine = EngineCore(
        GptOss.from_checkpoint(
            write_checkpoint(
                dataclasses.replace(PRESETS["tiny"], sliding_window=16), tmp_path, layout="hf", seed=11
            ),
            dtype=torch.float32,
            progress=False,
        ),
        EngineConfig(block_size=16, kv_cache_memory=64 << 20, max_model_len=4096),
        token_bytes=encoding.decode_single_token_bytes,
    )
    settings = ServerSettings(served_model_name=MODEL, shutdown_grace=0.5)
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=10)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    script = "<|channel|>final<|message|>" + "word " * 3000 + "<|return|>"
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3000},
        "/v1/completions": {"prompt": "Hi", "max_tokens": 3000},
        "/v1/responses": {"input": "Hi", "max_output_tokens": 3000},
    }
    lines: dict[str, list[str]] = {path: [] for path in bodies}
    started = threading.Barrier(len(bodies) + 1)

    def read(path: str) -> None:
        body = {"model": MODEL, "stream": True, "test_force": script, **bodies[path]}
        with httpx.stream("POST", base + path, json=body, timeout=60) as response:
            for i, line in enumerate(response.iter_lines()):
                lines[path].append(line)
                if i == 4:
                    started.wait()

    readers = [threading.Thread(target=read, args=(path,)) for path in bodies]
    for reader in readers:
        reader.start()
    started.wait(timeout=30)
    try:
        with caplog.at_level(logging.INFO, logger="server.async_engine"):
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
            for reader in readers:
                reader.join(30)
            thread.join(15)
    finally:
        AppStatus.should_exit = False  # sse_starlette's flag is process-wide: later servers must not stop
    data = {path: [line[6:] for line in got if line.startswith("data: ")] for path, got in lines.items()}
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert data[path][-1] == "[DONE]", (path, data[path][-3:])
        error = json.loads(data[path][-2])["error"]
        assert error["code"] == "server_shutting_down"
    last = json.loads(data["/v1/responses"][-1])
    assert last["type"] == "response.failed"
    assert last["response"]["error"]["code"] == "server_error"
    said = caplog.text
    assert "cut: the server is shutting down" in said
    assert "abandoned by its client" not in said


def test_sequences_per_request_are_bounded_before_any_tokenizing(served: Served) -> None:
    """Admission counts sequences (prompts x n), and a request of more than one request may have, or than the
    bound could ever admit, is a 400 (a 429 would have the client retry in vain), not admitted whole."""
    over = {"model": MODEL, "prompt": ["Hi"] * 40, "n": 8, "max_tokens": 1}  # 320 > the default of 256
    response = httpx.post(served.base_url + "/v1/completions", json=over, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
    bridge = served.app.state.server.services.engine
    saved = bridge.max_in_flight
    bridge.max_in_flight = 4
    try:
        many = {"model": MODEL, "prompt": ["Hi"] * 5, "max_tokens": 1}
        response = httpx.post(served.base_url + "/v1/completions", json=many, timeout=60)
        assert response.status_code == 400, response.text
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 5, "max_tokens": 1}
        response = httpx.post(served.base_url + "/v1/chat/completions", json=chat, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "n"
        fits = {"model": MODEL, "prompt": ["Hi"] * 4, "max_tokens": 1}
        assert httpx.post(served.base_url + "/v1/completions", json=fits, timeout=60).status_code == 200
    finally:
        bridge.max_in_flight = saved
    assert bridge.in_flight == 0


def test_a_reader_that_falls_behind_is_aborted_with_a_clear_error(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs a consumer leaves unread are bounded: past the bound the engine drops the request (and its
    blocks), and the consumer finds, after what was queued, why it ended."""
    bridge = served.app.state.server.services.engine
    script = "<|channel|>final<|message|>" + "word " * 3000 + "<|return|>"
    hook = _hook(served.encoding)
    params = SamplingParams(max_tokens=3000, logits_processors=hook.make({"test_force": script}, 0))
    prompt = served.encoding.encode("Hello")

    async def fall_behind() -> tuple[int, Exception | None]:
        outputs = bridge.generate(prompt, params, "slow-reader")
        first = await anext(outputs)  # the request is running; now stop reading for a while
        left = time.time()
        while served.engine.scheduler.requests and time.time() - left < 10:
            await asyncio.sleep(0.05)
        assert not served.engine.scheduler.requests, "the engine kept generating for a reader that stopped"
        read, error = len(first.new_token_ids), None
        try:
            async for output in outputs:
                read += len(output.new_token_ids)
        except EngineFailure as failure:
            error = failure
        return read, error

    monkeypatch.setattr(bridge, "max_unread_outputs", 8, raising=False)
    read, error = asyncio.run(fall_behind())
    assert read < 100
    assert error is not None
    assert engine_failure(error).code == "client_too_slow"
    assert served.engine.scheduler.kv.full_tables == {}


def test_openapi_documents_the_real_error_responses() -> None:
    with TestClient(create_app(None, ServerSettings())) as client:
        schema = client.get("/openapi.json").json()
    envelope = "#/components/schemas/ErrorResponse"
    assert set(schema["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # validation errors are 400s
            if path.endswith("_lora_adapter"):  # managing adapters: nothing queued, so no 429
                assert {"400", "401", "413", "503"} <= set(responses), (method, path)
            elif path.startswith("/v1/") and method == "post" and "{" not in path:  # the generating routes
                assert {"400", "401", "404", "413", "429", "503"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status != "200":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == envelope, (method, path, status)


@contextlib.contextmanager
def _raw_server(read_timeout: float) -> Iterator[int]:
    settings = ServerSettings(request_read_timeout=read_timeout)
    port = _free_port()
    config = uvicorn.Config(
        create_app(None, settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=header_timeout_protocol(read_timeout),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _send_and_read(port: int, data: bytes) -> bytes:
    """Send `data` (a request cut short), then read what the server says until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(4096):
            received += chunk
        return received


def test_half_sent_headers_do_not_hold_a_connection_for_ever() -> None:
    with _raw_server(0.5) as port:
        started = time.perf_counter()
        assert _send_and_read(port, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Ty") == b""
        assert time.perf_counter() - started < 3
        # After a complete exchange, the next request on the same connection gets the same deadline.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"loading"}'):
                first += conn.recv(4096)
            assert first.startswith(b"HTTP/1.1 503")
            conn.sendall(b"GET /heal")
            time.sleep(1.0)
            assert conn.recv(4096) == b""


def test_a_half_sent_body_is_a_408() -> None:
    with _raw_server(0.5) as port:
        head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        answer = _send_and_read(port, head + b'{"prom')
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b"request_timeout" in answer


def test_a_body_trickling_in_is_a_408_at_the_deadline() -> None:
    """The deadline covers the whole body, not each piece: a byte every 0.2 s never waits 0.5 s at once."""
    with _raw_server(0.5) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n"
        )
        started = time.perf_counter()
        with contextlib.suppress(OSError):  # the server may close the connection while we still send
            for _ in range(30):  # the whole body, if nothing stops it
                conn.sendall(b" ")
                time.sleep(0.2)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.perf_counter() - started < 5
