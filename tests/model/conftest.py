"""Tiny random checkpoints in the published formats, written once per test session."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.config import PRESETS, ModelConfig
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint

SEED = 1234

# CI runs pytest with `-n 2` on 2 cores: two workers each spinning up 2 OpenMP threads oversubscribe them,
# and every small op then waits out a scheduler slice (measured here: 8 ms instead of 0.1 ms per op).
torch.set_num_threads(1)

# The tiny preset with a 16-token window, so that prompts of a few dozen tokens already reach past the window
# on the sliding layers while the full-attention layers see everything.
SMALL_WINDOW = dataclasses.replace(PRESETS["tiny"], sliding_window=16)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return SMALL_WINDOW


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random checkpoint (one seed) written in both layouts, plus the unmodified tiny preset."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "hf": write_checkpoint(SMALL_WINDOW, root / "hf", layout="hf", seed=SEED),
        "original": write_checkpoint(SMALL_WINDOW, root / "original", layout="original", seed=SEED),
        "preset": write_checkpoint(PRESETS["tiny"], root / "preset", layout="hf", seed=SEED + 1),
    }


@pytest.fixture(scope="session")
def model_fp32(checkpoints: dict[str, Path]) -> GptOss:
    return GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.inference_mode():
        yield
