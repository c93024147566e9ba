"""Tiny random checkpoints for the engine tests, written once per session, and a full-recompute reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from model.config import PRESETS, ModelConfig
from model.gpt_oss import AttentionMetadata, GptOss
from model.make_checkpoint import write_checkpoint

# A 16-token window, so prompts of a few dozen tokens reach past it on the sliding layers.
WINDOW16 = dataclasses.replace(PRESETS["tiny"], sliding_window=16)
# The same with a small vocabulary, for the long randomized runs.
SMALL_VOCAB = dataclasses.replace(WINDOW16, vocab_size=512)


def _load(config: ModelConfig, tmp_path_factory: pytest.TempPathFactory, name: str) -> GptOss:
    path = write_checkpoint(config, tmp_path_factory.mktemp(name), layout="hf", seed=7)
    return GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> GptOss:
    return _load(WINDOW16, tmp_path_factory, "engine-tiny")


@pytest.fixture(scope="session")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> GptOss:
    return _load(SMALL_VOCAB, tmp_path_factory, "engine-small-vocab")


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    with torch.inference_mode():
        yield


def make_engine(model: GptOss, **overrides: object) -> EngineCore:
    settings: dict[str, object] = {"block_size": 4, "kv_cache_memory": 4 << 20, "max_model_len": 512}
    settings.update(overrides)
    return EngineCore(model, EngineConfig(**settings))  # type: ignore[arg-type]


def greedy_reference(
    model: GptOss, prompt: list[int], max_tokens: int, stop: set[int] | None = None
) -> list[int]:
    """Greedy decoding by full recomputation of the whole sequence at every token: no cache, no batching."""
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        meta = AttentionMetadata.build([len(tokens)])
        logits = model(torch.tensor(tokens), meta, None, torch.tensor([len(tokens) - 1]))
        token = int(logits[0].argmax())
        out.append(token)
        tokens.append(token)
        if stop and token in stop:
            break
    return out
