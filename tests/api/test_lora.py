"""LoRA adapters served per request through the real app: listed in /v1/models with their base, chosen by a
request's `model` on every generating API, loaded and unloaded at run time behind the API key."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from harmony.encoding import load_harmony_encoding
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.lora import read_adapter, write_random_adapter
from model.make_checkpoint import write_checkpoint
from server.app import create_app
from server.settings import ServerSettings
from server.state import Services
from tests.api.conftest import _hook, serve_in_thread
from tests.engine.conftest import greedy_reference

BASE = "gpt-oss-lora-test"
KEY = "lora-key"
CONFIG = dataclasses.replace(PRESETS["tiny"], sliding_window=16)


@dataclasses.dataclass
class LoraServer:
    url: str
    engine: EngineCore
    paths: dict[str, Path]
    services: Services

    def post(self, path: str, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraServer]:
    root = tmp_path_factory.mktemp("api-lora")
    paths = {
        "base": write_checkpoint(CONFIG, root / "base", layout="hf", seed=21),
        "a": write_random_adapter(CONFIG, root / "a", rank=4, seed=1),
        "b": write_random_adapter(CONFIG, root / "b", rank=8, modules=("q_proj", "v_proj"), seed=2),
        "c": write_random_adapter(CONFIG, root / "c", rank=2, modules=("o_proj",), seed=3),
        "wide": write_random_adapter(CONFIG, root / "wide", rank=16, seed=4),
        "x": write_random_adapter(
            CONFIG, root / "x", rank=4, modules=("q_proj",), experts=("gate_up_proj", "down_proj"), seed=5
        ),
    }
    model = GptOss.from_checkpoint(paths["base"], dtype=torch.float32, progress=False)
    encoding = load_harmony_encoding()
    engine = EngineCore(
        model,
        EngineConfig(
            block_size=16,
            kv_cache_memory=32 << 20,
            max_model_len=1024,
            max_loras=3,
            max_lora_rank=8,
            lora_experts=True,
        ),
        token_bytes=encoding.decode_single_token_bytes,
    )
    for name in ("a", "b"):  # as --lora does at start
        engine.load_lora(name, read_adapter(paths[name], model.config), str(paths[name]))
    settings = ServerSettings(served_model_name=BASE, conversation_date="2026-11-27", api_key=KEY)
    app = create_app(engine, settings, encoding=encoding, processors_hook=_hook(encoding))
    with serve_in_thread(app) as url:
        yield LoraServer(url, engine, paths, app.state.server.ready())


@pytest.fixture(scope="module")
def client(server: LoraServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)


def test_models_list_each_adapter_with_its_base(server: LoraServer, client: openai.OpenAI) -> None:
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(listed) >= {BASE, "a", "b"}
    assert listed["a"]["parent"] == BASE
    assert listed["a"]["root"] == str(server.paths["a"])
    assert client.models.retrieve("b").model_dump()["parent"] == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_each_request_gets_its_adapter_in_one_batch(server: LoraServer) -> None:
    """Base and both adapters at once, from threads, so the engine batches them: each request's greedy tokens
    are its merged model's."""
    prompt = [200005, 1001, 2002, 3003, 4004, 5005, 6006, 7007, 8008]
    got: dict[str, list[int]] = {}

    def ask(model: str) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
        response = server.post("/v1/completions", body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        got[model] = response.json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=ask, args=(m,)) for m in (BASE, "a", "b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model in (BASE, "a", "b"):
        merged = None if model == BASE else server.paths[model]
        reference = GptOss.from_checkpoint(
            server.paths["base"], dtype=torch.float32, lora=merged, progress=False
        )
        with torch.inference_mode():
            expected = greedy_reference(reference, prompt, 6)
        assert got[model], model
        assert got[model] == expected[: len(got[model])], model
    assert got["a"] != got[BASE]


def test_chat_and_responses_take_an_adapter_as_their_model(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body={"test_force": "Hi"}
    )
    assert chat.model == "a"
    response = client.responses.create(
        model="b", input="Hi", max_output_tokens=4, extra_body={"test_force": "Hi"}
    )
    assert response.model == "b"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert "'a'" in missing.value.message


def test_loading_at_run_time_checks_the_adapter(
    server: LoraServer, client: openai.OpenAI, tmp_path: Path
) -> None:
    body = {"lora_name": "c", "lora_path": str(server.paths["c"])}
    assert server.post("/v1/load_lora_adapter", body, key=None).status_code == 401
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    for path, why in [
        (tmp_path / "absent", "adapter_config.json"),
        (tmp_path, "adapter_model.safetensors"),
        (server.paths["wide"], "rank 16 is above the largest served, 8"),
        (server.paths["base"], "adapter_config.json"),
    ]:
        refused = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "lora_path"
        assert why in refused.json()["error"]["message"]
    taken = server.post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(server.paths["c"])})
    assert taken.status_code == 400
    assert "already loaded" in taken.json()["error"]["message"]
    base_name = server.post("/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": str(server.paths["c"])})
    assert base_name.status_code == 400
    loaded = server.post("/v1/load_lora_adapter", body)
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'c' added successfully."
    assert "c" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="c", prompt="Hi", max_tokens=2).model == "c"
    full = server.post("/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(server.paths["c"])})
    assert full.status_code == 400
    assert "--max-loras 3" in full.json()["error"]["message"]
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert "c" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="Hi", max_tokens=2)


def test_an_adapter_in_use_is_not_unloaded(server: LoraServer) -> None:
    missing = server.post("/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "lora_name"
    body = {"model": "b", "prompt": "Once", "max_tokens": 500, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        busy = server.post("/v1/unload_lora_adapter", {"lora_name": "b"})
        assert busy.status_code == 400
        assert "running with the LoRA adapter 'b'" in busy.json()["error"]["message"]
    deadline = time.time() + 30
    while server.engine.scheduler.requests and time.time() < deadline:
        time.sleep(0.05)
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200
    reloaded = server.post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(server.paths["b"])})
    assert reloaded.status_code == 200


def _greedy(server: LoraServer, prompt: list[int], max_tokens: int, adapter: str | None) -> list[int]:
    merged = None if adapter is None else server.paths[adapter]
    reference = GptOss.from_checkpoint(server.paths["base"], dtype=torch.float32, lora=merged, progress=False)
    with torch.inference_mode():
        return greedy_reference(reference, prompt, max_tokens)


def test_an_adapter_on_the_experts_is_served_per_request(server: LoraServer) -> None:
    """An adapter on q_proj and the experts' gate_up_proj and down_proj, loaded at run time: its requests get
    its merged model's tokens, the base's theirs."""
    loaded = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(server.paths["x"])})
    assert loaded.status_code == 200, loaded.text
    prompt = [200005, 1001, 2002, 3003, 4004, 5005]
    try:
        for model, adapter in (("x", "x"), (BASE, None)):
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": 6,
                "temperature": 0,
                "return_token_ids": True,
            }
            response = server.post("/v1/completions", body)
            assert response.status_code == 200, response.text
            tokens = response.json()["choices"][0]["token_ids"]
            assert tokens == _greedy(server, prompt, 6, adapter)[: len(tokens)], model
        assert _greedy(server, prompt, 6, "x") != _greedy(server, prompt, 6, None)
    finally:
        assert server.post("/v1/unload_lora_adapter", {"lora_name": "x"}).status_code == 200


def test_an_adapter_unloaded_before_admission_is_a_404(
    server: LoraServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter goes between the request's naming it and its admission (the unload runs while the request
    is rendered): the request is answered as one for a model that does not exist, not failed in the engine."""
    loaded = server.post("/v1/load_lora_adapter", {"lora_name": "r", "lora_path": str(server.paths["c"])})
    assert loaded.status_code == 200, loaded.text
    service = server.services.completions
    render = service._prepare

    def unload_then_render(request: Any) -> Any:  # on a render worker: the event loop serves the unload
        unloaded = server.post("/v1/unload_lora_adapter", {"lora_name": "r"})
        assert unloaded.status_code == 200, unloaded.text
        return render(request)

    monkeypatch.setattr(service, "_prepare", unload_then_render)
    response = server.post("/v1/completions", {"model": "r", "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("not_found_error", "model", "not_found")
    assert error["message"].startswith("the model 'r' does not exist")
    assert not server.engine.scheduler.requests


def test_an_admitted_request_keeps_its_adapter_until_it_ends(
    server: LoraServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unload that comes after the request's admission but before the engine thread takes it is refused
    (the admission holds the adapter), and the request runs with its adapter; once it ends, the unload
    goes through."""
    loaded = server.post("/v1/load_lora_adapter", {"lora_name": "r", "lora_path": str(server.paths["c"])})
    assert loaded.status_code == 200, loaded.text
    bridge = server.services.engine
    generate = bridge.generate
    unloads: list[httpx.Response] = []

    async def unload_then_generate(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with httpx.AsyncClient() as client:
            unloads.append(
                await client.post(
                    server.url + "/v1/unload_lora_adapter",
                    json={"lora_name": "r"},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
            )
        async for output in generate(*args, **kwargs):
            yield output

    monkeypatch.setattr(bridge, "generate", unload_then_generate)
    prompt = [200005, 1001, 2002, 3003]
    body = {"model": "r", "prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    response = server.post("/v1/completions", body)
    monkeypatch.undo()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["token_ids"] == _greedy(server, prompt, 4, "c")
    assert unloads[0].status_code == 400, unloads[0].text
    assert "1 requests are running with the LoRA adapter 'r'" in unloads[0].json()["error"]["message"]
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "r"}).status_code == 200


def test_the_command_line_serves_lora_adapters(
    server: LoraServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.main import build, parse_args

    model = ["--model", str(server.paths["base"]), "--device", "cpu", "--max-model-len", "256"]
    engine, settings = build(
        parse_args([*model, "--lora", f"a={server.paths['a']}", "--lora", f"b={server.paths['b']}"])
    )
    assert set(engine.loras) == {"a", "b"}
    assert settings.served_model_name == "base"
    assert engine.config.max_loras == 2
    assert engine.config.max_lora_rank == 16
    assert not engine.config.lora_experts  # attention adapters only: no room kept on the experts
    engine, _ = build(parse_args([*model, "--lora", f"x={server.paths['x']}"]))
    assert engine.config.lora_experts  # an adapter on the experts makes room for itself
    assert engine.model.block[0].mlp.mlp1_lora is not None
    with pytest.raises(ValueError, match="lower --max-loras or --max-lora-rank"):
        build(
            parse_args(
                [*model, "--max-loras", "100000", "--max-lora-rank", "100000", "--lora-experts", "true"]
            )
        )
    for bad, why in [
        (["--lora", "a"], "is not NAME=PATH"),
        (["--lora", f"a={server.paths['base']}"], "lora: a: "),
        (["--lora", f"w={server.paths['wide']}", "--max-lora-rank", "8"], "rank 16 is above"),
        (
            ["--lora", f"a={server.paths['a']}", "--lora", f"b={server.paths['b']}", "--max-loras", "1"],
            "--max-loras 1",
        ),
    ]:
        with pytest.raises(SystemExit):
            build(parse_args([*model, *bad]))
        assert why in capsys.readouterr().err
