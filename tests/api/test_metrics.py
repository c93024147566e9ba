"""The engine's gauges in /metrics against the engine's own books, on a pool small enough to fill and preempt."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import SamplingParams
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from server.metrics import Metrics


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} is not in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EngineCore:
    config = dataclasses.replace(PRESETS["tiny"], sliding_window=16, vocab_size=512)
    path: Path = write_checkpoint(config, tmp_path_factory.mktemp("metrics-model"), layout="hf", seed=3)
    model = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)
    # 40 full-attention blocks of 4 tokens: five requests of 30-40 tokens cannot all stay.
    return EngineCore(
        model,
        EngineConfig(
            block_size=4, num_kv_blocks=40, max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64
        ),
    )


@torch.inference_mode()
def test_kv_usage_per_pool_and_preemptions_are_reported(engine: EngineCore) -> None:
    metrics = Metrics(lambda: engine)
    rng = random.Random(1)
    for i in range(5):
        engine.add_request(
            f"m{i}", [rng.randrange(512) for _ in range(30)], SamplingParams(temperature=0.0, max_tokens=10)
        )
    peak_full = 0.0
    while engine.has_unfinished():
        engine.step()
        stats = engine.stats()
        text = metrics.render().decode()
        full = _value(text, 'gpt_oss_kv_cache_pool_usage_ratio{pool="full"}')
        sliding = _value(text, 'gpt_oss_kv_cache_pool_usage_ratio{pool="sliding"}')
        assert full == pytest.approx(stats.kv_full_blocks_used / stats.kv_full_blocks_total)
        assert sliding == pytest.approx(stats.kv_sliding_blocks_used / stats.kv_sliding_blocks_total)
        # The headline ratio is the fuller pool's: it reaches 1 when admission stops, not half of that.
        assert _value(text, "gpt_oss_kv_cache_usage_ratio") == pytest.approx(max(full, sliding))
        assert _value(text, "gpt_oss_preemptions_total") == stats.num_preemptions
        peak_full = max(peak_full, full)
    assert engine.stats().num_preemptions > 0, "the pool was meant to be too small for all five at once"
    assert peak_full > 0.9
    assert _value(metrics.render().decode(), "gpt_oss_engine_failed_steps_total") == 0
