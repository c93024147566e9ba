"""The reliability suite: the real app on a tiny real engine (in-process, as tests/api serves it) or as a real
`python -m server` process, driven only over loopback by servers the tests start themselves.

Each check records ONE summary line with its figures (`summary(...)`); the lines travel with the test reports
(so they reach the controller under pytest-xdist) and tests/conftest.py prints them at the end of the run,
pass or fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from harmony.encoding import load_harmony_encoding
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from server.app import create_app
from server.settings import ServerSettings
from tests.api.conftest import MODEL, Served, _free_port, _hook, serve_in_thread, wait_until_idle
from tests.conftest import SUMMARY_KEY

__all__ = ["MODEL", "Served", "wait_until_idle"]


@pytest.fixture
def summary(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """`summary("...figures...")`: this check's one line for the end-of-run report (the last call wins)."""

    def record(line: str) -> None:
        props = request.node.user_properties
        props[:] = [p for p in props if p[0] != SUMMARY_KEY]
        props.append((SUMMARY_KEY, line))

    return record


# -- the in-process server ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random checkpoint tests/api serves (same preset, window and seed)."""
    config = dataclasses.replace(PRESETS["tiny"], sliding_window=16)
    return write_checkpoint(config, tmp_path_factory.mktemp("reliability-model"), layout="hf", seed=11)


@contextlib.contextmanager
def serve(
    checkpoint: Path,
    *,
    engine: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    hook: bool = True,
) -> Iterator[Served]:
    """The real app on a real engine built from `checkpoint`, served by uvicorn on a free loopback port."""
    model = GptOss.from_checkpoint(checkpoint, dtype=torch.float32, progress=False)
    encoding = load_harmony_encoding()
    config = EngineConfig(
        **{"block_size": 16, "kv_cache_memory": 64 << 20, "max_model_len": 4096, **(engine or {})}
    )
    core = EngineCore(model, config, token_bytes=encoding.decode_single_token_bytes)
    server_settings = ServerSettings(
        **{"served_model_name": MODEL, "conversation_date": "2026-11-27", **(settings or {})}
    )
    app = create_app(
        core, server_settings, encoding=encoding, processors_hook=_hook(encoding) if hook else None
    )
    with serve_in_thread(app, log_level="error") as base:
        wait_healthy(base, 60)
        yield Served(base, core, encoding, app)


def wait_healthy(base: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=5, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server at {base} was not healthy within {timeout:.0f} s")


def blocks_in_use(served: Served) -> tuple[int, int]:
    """KV blocks held (full group, sliding group) after the engine's books settle."""
    kv = served.engine.scheduler.kv
    return kv.full.num_used, kv.sliding.num_used


# -- a real server process ------------------------------------------------------------------------------------


@contextlib.contextmanager
def server_process(
    cache_dir: Path, *args: str, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m server` (the demo checkpoint, on the CPU) on a free loopback port; killed if still running."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--port",
            str(port),
            "--cache-dir",
            str(cache_dir),
            "--device",
            "cpu",
            "--log-level",
            "error",
            *args,
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, f"the server exited at start with status {process.returncode}"
        yield process, base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)


# -- streams --------------------------------------------------------------------------------------------------


def final_script(text: str) -> str:
    """Harmony output that answers `text` on the final channel and stops."""
    return f"<|channel|>final<|message|>{text}<|return|>"


@dataclasses.dataclass
class StreamResult:
    status: int
    content: str = ""
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` seen
    error: dict[str, Any] | None = None  # an error object in the stream
    problem: str | None = None  # a transport error or a malformed event

    @property
    def terminal(self) -> bool:
        """The stream ended with a terminal event: a finish reason or an error object, then [DONE]."""
        return self.done and (self.finish_reason is not None or self.error is not None)


def read_chat_stream(response: httpx.Response, stop_after: int | None = None) -> StreamResult:
    """Read a streamed chat completion; `stop_after` lines, then hang up (the caller's `with` closes it)."""
    result = StreamResult(response.status_code)
    if response.status_code != 200:
        response.read()
        result.problem = response.text[:200]
        return result
    try:
        for count, line in enumerate(response.iter_lines()):
            if stop_after is not None and count >= stop_after:
                return result
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                result.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"]
                continue
            for choice in chunk.get("choices", []):
                result.content += choice.get("delta", {}).get("content") or ""
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, ValueError) as error:
        result.problem = f"{type(error).__name__}: {error}"
    return result


def sse_data(lines: list[str]) -> list[Any]:
    """The data of each SSE event, JSON-decoded (`[DONE]` kept as the string)."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_ending(path: str, lines: list[str]) -> str | None:
    """How a stream of `path` ended: "normal" (a finish reason, or response.completed / incomplete), "error"
    (an error object, or response.failed), or None when it has no terminal event (cut off)."""
    events = sse_data(lines)
    if path.endswith("/responses"):
        last = events[-1] if events else None
        if not isinstance(last, dict):
            return None
        kind = last.get("type")
        if kind in ("response.completed", "response.incomplete"):
            return "normal"
        return "error" if kind in ("response.failed", "error") else None
    if not events or events[-1] != "[DONE]":
        return None
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    if any("error" in chunk for chunk in chunks):
        return "error"
    finishes = [c.get("finish_reason") for chunk in chunks for c in chunk.get("choices", [])]
    return "normal" if any(finishes) else None


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `--cache-dir` of the server processes: the demo checkpoint is built there once per worker."""
    from server.main import demo_checkpoint

    folder = tmp_path_factory.mktemp("demo-cache")
    demo_checkpoint(folder)
    return folder
