"""The chat page in headless Chromium, against the real app on the real engine (a tiny random checkpoint).

The page sends no test field, so the app's processors hook forces one chosen harmony script on every request
(set per test through `PageServer.say`), a few milliseconds per token so that the page's progressive
rendering has something to show. Chromium is Debian's (`.ci/run` installs it); Playwright drives it through
`executable_path`, since Playwright's own browser downloads are not reachable.

A second, tiny static server on another port is the "other origin" a cross-origin frontend would be: the API
server allows it by CORS, and a second API server without CORS is there to be refused.
"""

from __future__ import annotations

import dataclasses
import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tiktoken
import torch
from fastapi import FastAPI
from playwright.sync_api import Browser, Playwright, sync_playwright

from engine.core import EngineCore
from engine.request import LogitsProcessor
from server.app import create_app
from server.serving import ProcessorsHook
from server.settings import ServerSettings
from tests.api.conftest import MODEL, serve_in_thread, tiny_engine

KEY = "page-test-key"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@dataclasses.dataclass
class Script:
    """What every request of the page server says, and how long each forced token takes."""

    text: str = "<|channel|>final<|message|>ok<|return|>"
    seconds_per_token: float = 0.0
    # A response that runs built-in tools is one engine request per step: step i says steps[i] (the last one
    # repeats), in place of `text`.
    steps: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PageServer:
    base_url: str
    engine: EngineCore
    encoding: tiktoken.Encoding
    app: FastAPI
    script: Script
    # Where a cross-origin page is served from (allowed by this server's CORS), and an API server that
    # sends no CORS headers at all.
    other_origin: str
    no_cors_url: str

    def say(self, text: str, seconds_per_token: float = 0.0) -> None:
        self.say_steps([text], seconds_per_token)

    def say_steps(self, steps: list[str], seconds_per_token: float = 0.0) -> None:
        """What each step of a built-in tool loop says (the processors hook's index is the step)."""
        self.script.text = steps[0]
        self.script.steps = list(steps)
        self.script.seconds_per_token = seconds_per_token

    def idle(self, timeout: float = 30.0) -> bool:
        """Whether the engine holds no request and no KV block within `timeout` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.engine.scheduler.requests and not self.engine.scheduler.kv.full_tables:
                return True
            time.sleep(0.05)
        return False


def _slow_force(tokens: list[int], seconds: float) -> LogitsProcessor:
    def processor(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        row = torch.full_like(logits, float("-inf"))
        row[tokens[min(len(output), len(tokens) - 1)]] = 0.0
        return row

    return processor


def _hook(encoding: tiktoken.Encoding, script: Script) -> ProcessorsHook:
    """The page sends no test fields: every request says the current script."""

    def hook(extra: dict[str, Any], index: int) -> list[LogitsProcessor]:
        text = script.steps[min(index, len(script.steps) - 1)] if script.steps else script.text
        tokens = encoding.encode(text, allowed_special="all")
        return [_slow_force(tokens, script.seconds_per_token)]

    return ProcessorsHook(frozenset(), hook)


class _BlankPage(http.server.BaseHTTPRequestHandler):
    """Any path: an empty HTML page, the other origin's document for the cross-origin calls."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>another origin</title><p>a frontend on another origin</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests' output is for failures."""


@pytest.fixture(scope="session")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageServer]:
    engine, encoding = tiny_engine(tmp_path_factory.mktemp("page-model"), seed=5)
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BlankPage)
    threading.Thread(target=static.serve_forever, daemon=True).start()
    other_origin = f"http://127.0.0.1:{static.server_address[1]}"
    script = Script()
    settings = ServerSettings(
        served_model_name=MODEL, conversation_date="2026-11-27", api_key=KEY, cors_origins=[other_origin]
    )
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding, script))
    no_cors_app = create_app(None, ServerSettings(served_model_name=MODEL, api_key=KEY))
    with serve_in_thread(app) as base, serve_in_thread(no_cors_app) as no_cors:
        yield PageServer(base, engine, encoding, app, script, other_origin, no_cors)
    static.shutdown()


def chromium_path() -> str:
    found = shutil.which("chromium")
    assert found, "Debian's chromium is needed (`apt-get install -y chromium`, as .ci/run does)"
    return found


# Per test, not per session: while Playwright's sync driver runs, the worker's main thread has an asyncio loop
# running, and the other tests that xdist runs in the same worker would meet it in `asyncio.run`.
@pytest.fixture
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=chromium_path(), args=["--disable-dev-shm-usage", "--disable-gpu"]
    )
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots land here (git ignores it); CI keeps the folder as the run's artifacts."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def metrics_value(base_url: str, name: str) -> float:
    """One unlabelled sample of `/metrics` (public on the page server)."""
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")
