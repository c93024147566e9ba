"""Real clients (agent frameworks, SDKs, evaluation and load tools) against the real app on the real engine.

The server is the one tests/api starts (the tiny random checkpoint, the `test_force` processors hook), with one
more layer in front: `ScriptedModel`, which plays the model's part for clients that cannot send `test_force`
themselves (an agent framework builds its own requests; lm-eval and guidellm run as their own programs). The
test sets a `Script` before it runs the client; for every generation request that does not carry `test_force`
already, the script picks the harmony text the model will emit from the request as the client sent it (so an
agent's first turn can call the tool and its second turn, which holds the tool's result, answer), and the layer
adds it to the body as `test_force`. The engine still produces every token through its own sampling path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from harmony.encoding import O200K_PATTERN, VOCAB_FILE_NAME
from model.gpt_oss import GptOss
from server.app import create_app
from server.settings import ServerSettings
from tests.api.conftest import MODEL, Served, _hook, serve_in_thread, tiny_engine

# LiteLLM fetches its model price list from the internet at import unless told to use the copy it ships: offline
# that costs three retries (about ten seconds) per process.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

NODE_DIR = Path(__file__).resolve().parent / "node"
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})

# What the model says in the tests' agent runs: it thinks, calls `get_weather` for Paris, and once the
# conversation holds the tool's result, thinks again and answers.
TOOL_NAME = "get_weather"
TOOL_REASONING = "The user wants the weather in Paris. Call the tool."
TOOL_CALL = (
    f"<|channel|>analysis<|message|>{TOOL_REASONING}<|end|>"
    f"<|start|>assistant to=functions.{TOOL_NAME}<|channel|>commentary <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)
ANSWER_REASONING = "The tool says sunny. Answer."
ANSWER = "It is sunny in Paris."
ANSWER_AFTER_TOOL = (
    f"<|channel|>analysis<|message|>{ANSWER_REASONING}<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"
)

# A script: the request body as the client sent it -> the harmony text the model emits (None: leave it to the
# random model).
Script = Callable[[dict[str, Any]], str | None]


def holds_tool_result(body: dict[str, Any]) -> bool:
    """Whether a chat or Responses request's conversation already carries a tool's output."""
    messages = body.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") == "tool" for m in messages):
        return True
    items = body.get("input")
    return isinstance(items, list) and any(
        isinstance(i, dict) and i.get("type") == "function_call_output" for i in items
    )


def tool_then_answer(body: dict[str, Any]) -> str:
    """An agent's model: call the tool first, answer once its result is in the conversation."""
    return ANSWER_AFTER_TOOL if holds_tool_result(body) else TOOL_CALL


def always(text: str) -> Script:
    return lambda body: text


class ScriptedModel:
    """ASGI layer in front of the app: adds the current script's text as `test_force` to generation requests.

    It also records each generation request's body as it arrived (before the addition), so a test can say
    which fields a real client sends.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.script: Script | None = None
        # Appended on the server's thread, read and cleared on the test's (list operations are atomic).
        self.captured: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # the app answers a body that is not JSON itself
        if isinstance(body, dict):
            self.captured.append((scope["path"], body))
            script = self.script
            if script is not None and "test_force" not in body:
                forced = script(body)
                if forced is not None:
                    raw = json.dumps({**body, "test_force": forced}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)


@dataclasses.dataclass
class ScriptedServer:
    served: Served
    model: ScriptedModel
    network: GptOss  # the engine's model, for scores computed without the server

    @property
    def base_url(self) -> str:
        return self.served.base_url

    @property
    def v1(self) -> str:
        return self.served.base_url + "/v1"

    def requests(self, path: str) -> list[dict[str, Any]]:
        """The bodies the client sent to `path` since the test began, as sent."""
        return [body for p, body in self.model.captured if p == path]


@pytest.fixture(scope="session")
def _scripted_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedServer]:
    # Room for agent frameworks' instructions and tool schemas, and guidellm's synthetic prompts.
    engine, encoding = tiny_engine(tmp_path_factory.mktemp("clients-model"), max_model_len=4096)
    settings = ServerSettings(served_model_name=MODEL, conversation_date="2026-11-27")
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding))
    scripted = ScriptedModel(app)
    with serve_in_thread(scripted) as base:
        yield ScriptedServer(Served(base, engine, encoding, app), scripted, engine.runner.model)


@pytest.fixture
def scripted(_scripted_session: ScriptedServer, request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    """The session's server with no script and no captured requests; whatever the test sets is undone after.

    With `CLIENTS_CAPTURE_DIR` set, the bodies each test's client sent are written there, one JSON file per
    test: the record of which fields each real client sends.
    """
    _scripted_session.model.script = None
    _scripted_session.model.captured.clear()
    yield _scripted_session
    _scripted_session.model.script = None
    folder = os.environ.get("CLIENTS_CAPTURE_DIR")
    if folder:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.nodeid.split("/")[-1])
        bodies = [{"path": path, "body": body} for path, body in _scripted_session.model.captured]
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(bodies, indent=1))


@pytest.fixture(scope="session")
def hf_tokenizer(vocab_dir: Path) -> Path:
    """A Hugging Face tokenizer folder for o200k (the harmony vocabulary's text tokens), for clients that load
    one with `AutoTokenizer.from_pretrained` (guidellm): converted from the verified vocabulary, offline, once
    per machine (about 20 s) into the test cache beside it."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = vocab_dir.parent / "o200k-hf-tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    converted = TikTokenConverter(
        vocab_file=str(vocab_dir / VOCAB_FILE_NAME), pattern=O200K_PATTERN
    ).converted()
    # Written aside and renamed: pytest-xdist's workers may both get here, and neither may see half a folder.
    partial = Path(tempfile.mkdtemp(dir=vocab_dir.parent))
    PreTrainedTokenizerFast(tokenizer_object=converted).save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:
        shutil.rmtree(partial)  # the other worker's copy won
    return folder


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The node clients' packages, which `npm ci` in tests/clients/node installs from the lock file (.ci/run
    does it before the tests; here it would race between pytest-xdist workers)."""
    modules = NODE_DIR / "node_modules"
    assert shutil.which("node") is not None, "Node.js is needed for the node clients (.ci/run installs it)"
    assert (modules / ".package-lock.json").exists(), f"run `npm ci` in {NODE_DIR} first (.ci/run does)"
    return modules


def run_node(script: str, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run one of the node clients' scripts; it prints one JSON object, its result, on its last line."""
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, str(NODE_DIR / script), *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])
