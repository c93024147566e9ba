"""The real app on the real engine (a tiny random checkpoint), served by uvicorn on localhost.

The model has random weights, so to make it say a chosen harmony sequence the tests pass `test_force` (an
extra body field the OpenAI SDK forwards): the app's processors hook turns it into a logits processor that
forces those tokens through the engine's own sampling path. Nothing replaces the engine. `test_fail_after: N`
makes the request's own logits processor raise once it has N tokens: that request fails with the error, alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tiktoken
import torch
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import LogitsProcessor
from harmony.encoding import load_harmony_encoding
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from server.app import create_app
from server.serving import ProcessorsHook
from server.settings import ServerSettings

MODEL = "gpt-oss-test"


def force_tokens(tokens: list[int]) -> LogitsProcessor:
    """Make the model produce exactly `tokens`, one per step (the last one repeats if it keeps going)."""

    def processor(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        row = torch.full_like(logits, float("-inf"))
        row[tokens[min(len(output), len(tokens) - 1)]] = 0.0
        return row

    return processor


def fail_after(count: int) -> LogitsProcessor:
    """Make the request fail in the engine step once `count` tokens have been produced (mid-request)."""

    def processor(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output) >= count:
            raise RuntimeError("test_fail_after: a forced engine failure")
        return logits

    return processor


def _hook(encoding: tiktoken.Encoding) -> ProcessorsHook:
    def hook(extra: dict[str, Any], index: int) -> list[LogitsProcessor]:
        processors = []
        script: Any = extra.get("test_force")
        if script is not None:
            if isinstance(script, list):
                script = script[index % len(script)]
            processors.append(force_tokens(encoding.encode(script, allowed_special="all")))
        if extra.get("test_fail_after") is not None:
            processors.append(fail_after(int(extra["test_fail_after"])))
        return processors

    return ProcessorsHook(frozenset({"test_force", "test_fail_after"}), hook)


@dataclasses.dataclass
class Served:
    base_url: str
    engine: EngineCore
    encoding: tiktoken.Encoding
    app: FastAPI


def wait_until_idle(served: Served, timeout: float = 30.0) -> None:
    """Wait for the engine to hold no request (an abandoned stream is aborted at its next step)."""
    deadline = time.time() + timeout
    while time.time() < deadline and served.engine.scheduler.requests:
        time.sleep(0.05)


def assert_disconnect_frees_blocks(served: Served, path: str, body: dict[str, Any], lines: int) -> None:
    """Read `lines` lines of a long stream, hang up, and check the engine dropped the request and its KV."""
    with httpx.stream("POST", served.base_url + path, json=body, timeout=60) as response:
        received = response.iter_lines()
        for _ in range(lines):
            next(received)
    wait_until_idle(served)
    assert not served.engine.scheduler.requests
    assert served.engine.scheduler.kv.full_tables == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, log_level: str = "warning", timeout: float = 60.0) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port, on a thread of the test process: its base URL, once
    the server has started (and stopped when the block ends)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def tiny_engine(directory: Path, seed: int = 11, **config: Any) -> tuple[EngineCore, tiktoken.Encoding]:
    """An engine on a tiny random checkpoint written to `directory` (the model the served tests use), with
    the harmony encoding; `config` overrides the engine's settings."""
    model_config = dataclasses.replace(PRESETS["tiny"], sliding_window=16)
    path = write_checkpoint(model_config, directory, layout="hf", seed=seed)
    model = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)
    encoding = load_harmony_encoding()
    engine_config = EngineConfig(
        **{"block_size": 16, "kv_cache_memory": 64 << 20, "max_model_len": 4096, **config}
    )
    engine = EngineCore(model, engine_config, token_bytes=encoding.decode_single_token_bytes)
    return engine, encoding


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    engine, encoding = tiny_engine(tmp_path_factory.mktemp("api-model"))
    settings = ServerSettings(served_model_name=MODEL, conversation_date="2026-11-27")
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding))
    with serve_in_thread(app) as base:
        yield Served(base, engine, encoding, app)


def recorded_prompts(served: Served, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Every prompt the served engine is given from now on (this test's), in order: the engine still runs them."""
    prompts: list[list[int]] = []
    add_request = served.engine.add_request

    def recorded(request_id: str, prompt: list[int], params: Any) -> None:
        prompts.append(list(prompt))
        add_request(request_id, prompt, params)

    monkeypatch.setattr(served.engine, "add_request", recorded)
    return prompts
