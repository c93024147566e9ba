"""Per-request LoRA adapters through the engine: a batch mixing the base and two adapters gives every request
the tokens its adapter's merged model gives it alone; the prefix cache never hands one adapter's blocks to
another; loading and unloading refuse what they cannot do."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.core import EngineCore
from engine.request import LoraNotFound, LoraRefused, RequestOutput, SamplingParams
from model.gpt_oss import GptOss
from model.lora import AdapterError, read_adapter, write_random_adapter
from model.make_checkpoint import write_checkpoint
from tests.engine.conftest import WINDOW16, greedy_reference, make_engine


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-lora")
    return {
        "base": write_checkpoint(WINDOW16, root / "base", layout="hf", seed=3),
        "a": write_random_adapter(WINDOW16, root / "a", rank=4, seed=1),
        "b": write_random_adapter(WINDOW16, root / "b", rank=8, modules=("q_proj", "v_proj"), seed=2),
        "x": write_random_adapter(
            WINDOW16, root / "x", rank=4, modules=(), experts=("gate_up_proj", "down_proj"), seed=5
        ),
        "down": write_random_adapter(
            WINDOW16, root / "down", rank=2, modules=("o_proj",), experts=("down_proj",), seed=6
        ),
    }


def _model(paths: dict[str, Path], lora: str | None = None) -> GptOss:
    merged = None if lora is None else paths[lora]
    return GptOss.from_checkpoint(paths["base"], dtype=torch.float32, lora=merged, progress=False)


def _engine(paths: dict[str, Path], **overrides: object) -> EngineCore:
    settings: dict[str, object] = {"max_loras": 2, "max_lora_rank": 8}
    settings.update(overrides)
    engine = make_engine(_model(paths), **settings)
    for name in ("a", "b"):
        if len(engine.loras) < engine.config.max_loras:
            engine.load_lora(name, read_adapter(paths[name], engine.model.config), str(paths[name]))
    return engine


def _params(engine: EngineCore, lora: str | None, max_tokens: int = 8) -> SamplingParams:
    lora_id = None if lora is None else engine.loras[lora].lora_id
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, lora_id=lora_id)


def _drain(engine: EngineCore) -> dict[str, RequestOutput]:
    merged: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            seen = merged.setdefault(out.request_id, RequestOutput(out.request_id, []))
            seen.new_token_ids += out.new_token_ids
            seen.finish_reason = out.finish_reason
            seen.num_cached_tokens = out.num_cached_tokens
            seen.error = out.error
    return merged


def test_base_and_two_adapters_in_one_batch_each_get_their_merged_model_s_tokens(
    paths: dict[str, Path],
) -> None:
    engine = _engine(paths)
    rng = random.Random(4)
    prompts = [[rng.randrange(200_000) for _ in range(rng.randint(5, 40))] for _ in range(6)]
    loras = [None, "a", "b", "b", None, "a"]
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"r{i}", prompt, _params(engine, lora))
    outputs = _drain(engine)
    references = {lora: _model(paths, lora) for lora in (None, "a", "b")}
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        assert outputs[f"r{i}"].new_token_ids == greedy_reference(references[lora], prompt, 8), (i, lora)
    # The adapters change what the model says (else the comparison above proves nothing).
    assert greedy_reference(references["a"], prompts[0], 8) != greedy_reference(
        references[None], prompts[0], 8
    )
    assert greedy_reference(references["b"], prompts[0], 8) != greedy_reference(
        references[None], prompts[0], 8
    )


def test_base_attention_and_expert_adapters_in_one_batch_each_get_their_merged_model_s_tokens(
    paths: dict[str, Path],
) -> None:
    """Adapters on the experts served per request, beside the base and an attention adapter: through the
    engine's prefill chunks and decode steps, each request's greedy tokens are those of its adapter merged."""
    engine = make_engine(_model(paths), max_loras=3, max_lora_rank=8, lora_experts=True)
    for name in ("a", "x", "down"):
        engine.load_lora(name, read_adapter(paths[name], engine.model.config), str(paths[name]))
    rng = random.Random(7)
    prompts = [[rng.randrange(200_000) for _ in range(rng.randint(5, 40))] for _ in range(6)]
    loras = [None, "x", "a", "down", "x", None]
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"r{i}", prompt, _params(engine, lora))
    outputs = _drain(engine)
    references = {lora: _model(paths, lora) for lora in (None, "a", "x", "down")}
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        assert outputs[f"r{i}"].new_token_ids == greedy_reference(references[lora], prompt, 8), (i, lora)
    for lora in ("x", "down"):  # the expert adapters change what the model says
        assert greedy_reference(references[lora], prompts[1], 8) != greedy_reference(
            references[None], prompts[1], 8
        ), lora


def test_an_expert_adapter_needs_room_for_it(paths: dict[str, Path]) -> None:
    engine = make_engine(_model(paths), max_loras=1, max_lora_rank=8)
    with pytest.raises(AdapterError, match="--lora-experts"):
        engine.load_lora("x", read_adapter(paths["x"], engine.model.config))
    assert not engine.loras


def test_the_prefix_cache_never_shares_blocks_between_adapters(paths: dict[str, Path]) -> None:
    engine = _engine(paths)
    prompt = list(range(1000, 1041))  # ten full blocks of 4
    engine.add_request("base", prompt, _params(engine, None, 2))
    _drain(engine)
    cached = {}
    for lora in ("a", "b", None, "a"):
        engine.add_request(f"again-{lora}", prompt, _params(engine, lora, 2))
        cached[lora] = [*cached.get(lora, []), _drain(engine)[f"again-{lora}"].num_cached_tokens]
    assert cached["a"] == [0, 40]  # none of the base's blocks; then its own
    assert cached["b"] == [0]
    assert cached[None] == [40]


def test_loading_refuses_what_it_cannot_hold(paths: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(paths)
    config = engine.model.config
    with pytest.raises(LoraRefused, match="already loaded"):
        engine.load_lora("a", read_adapter(paths["a"], config))
    extra = read_adapter(write_random_adapter(config, tmp_path / "c", rank=2, seed=9), config)
    with pytest.raises(LoraRefused, match="--max-loras 2"):
        engine.load_lora("c", extra)
    engine.unload_lora("b")
    wide = read_adapter(write_random_adapter(config, tmp_path / "wide", rank=16, seed=9), config)
    with pytest.raises(AdapterError, match="rank 16 is above the largest served, 8"):
        engine.load_lora("wide", wide)
    assert set(engine.loras) == {"a"}  # a refused load changes nothing
    engine.load_lora("c", extra)
    with pytest.raises(LoraRefused, match="no room"):
        make_engine(_model(paths)).load_lora("a", read_adapter(paths["a"], config))


def test_an_adapter_in_use_is_not_unloaded_and_an_unloaded_one_is_not_served(paths: dict[str, Path]) -> None:
    engine = _engine(paths)
    old_id = engine.loras["a"].lora_id
    engine.add_request("running", [5, 6, 7], _params(engine, "a", 20))
    engine.step()
    with pytest.raises(LoraRefused, match="1 requests are running"):
        engine.unload_lora("a")
    _drain(engine)
    engine.unload_lora("a")
    with pytest.raises(LoraNotFound):
        engine.unload_lora("a")
    with pytest.raises(LoraNotFound, match="not loaded") as refused:
        engine.add_request("late", [5, 6, 7], SamplingParams(lora_id=old_id))
    assert refused.value.field == "lora_id"
    # Loaded again under the same name it gets a new id, so stale requests never reach the new weights.
    engine.load_lora("a", read_adapter(paths["a"], engine.model.config))
    assert engine.loras["a"].lora_id != old_id
