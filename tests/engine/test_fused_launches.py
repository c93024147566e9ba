"""How many kernels one decode step launches per layer on the GPU's code paths, with and without the fused
layers (:mod:`model.kernels.triton_fused`): counted on the CPU, the Triton kernels under the interpreter.

A launch is an aten op that runs a kernel on a GPU (views and allocations do not) or a Triton launch; a no-op
``.to()`` or ``.contiguous()`` never reaches the dispatcher. The counts are printed for the benchmarks'
notes (``--log-cli-level=INFO``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from engine.core import EngineCore
from engine.request import SamplingParams
from model.gpt_oss import GptOss
from model.kernels import Kernels
from model.make_checkpoint import write_checkpoint
from tests.engine.conftest import WINDOW16, make_engine

logger = logging.getLogger(__name__)

# aten ops that allocate or describe memory without running a kernel.
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "lift_fresh",
}

# Launches per layer of a decode step (bf16, 1-64 rows) with the fused layers:
# attention block: norm + QKV + RoPE + the K/V store into the cache (1), the attention's split with its
#   merge (1), out projection + residual (1);
# MLP block: norm + router + top-k + softmax (1), the two MoE kernels, the second adding the residual (2).
# The first layer launches one more: the sequences' lengths (positions + 1), which the others reuse.
FUSED_PER_LAYER = 6


class LaunchCounter:
    """Counts, per transformer block (and outside them), the kernel launches of a model's forward."""

    def __init__(self, model: GptOss) -> None:
        self.model = model
        self.counts: Counter[str] = Counter()
        self.where = "step"
        self.inside_launch = 0

    @contextmanager
    def counting(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        counter = self
        launch = interpreter.GridExecutor.__call__

        def counted_launch(executor: Any, *args: Any, **kwargs: Any) -> Any:
            counter.counts[counter.where] += 1
            counter.inside_launch += 1  # the interpreter's own host copies of the arguments are not launches
            try:
                return launch(executor, *args, **kwargs)
            finally:
                counter.inside_launch -= 1

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if (
                    not counter.inside_launch
                    and not func.is_view
                    and func.overloadpacket.__name__ not in _NO_KERNEL
                ):
                    counter.counts[counter.where] += 1
                return func(*args, **(kwargs or {}))

        hooks = []
        for n, block in enumerate(self.model.block):
            hooks.append(
                block.register_forward_pre_hook(lambda *_, n=n: setattr(counter, "where", f"layer {n}"))
            )
            hooks.append(block.register_forward_hook(lambda *_: setattr(counter, "where", "step")))
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted_launch)
        try:
            with Dispatch():
                yield
        finally:
            for hook in hooks:
                hook.remove()

    def per_layer(self) -> list[int]:
        return [self.counts[f"layer {n}"] for n in range(len(self.model.block))]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> GptOss:
    """The engine tests' tiny model in bf16 (as a GPU serves it), plain weights for the Triton kernels."""
    path: Path = write_checkpoint(WINDOW16, tmp_path_factory.mktemp("launches"), layout="hf", seed=7)
    return GptOss.from_checkpoint(
        path, dtype=torch.bfloat16, progress=False, prepack=False, kernels=Kernels.triton()
    )


def _decode_step_launches(
    model: GptOss, kernels: Kernels, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], int]:
    """(launches per layer, launches outside the layers) of the third step of three requests: a decode step
    after another, which allocated what the fused layers allocate once (the attention's arrival counters)."""
    model.use_kernels(kernels)
    engine: EngineCore = make_engine(model, device_sampling=True)
    for i, n in enumerate((7, 21, 12)):
        engine.add_request(
            f"r{i}", list(range(3 + i, 3 + i + n)), SamplingParams(temperature=0.0, max_tokens=4)
        )
    engine.step()  # the prompts
    engine.step()  # the first decode step
    counter = LaunchCounter(model)
    with counter.counting(monkeypatch):
        engine.step()
    return counter.per_layer(), counter.counts["step"]


def test_the_fused_layers_cut_a_decode_steps_launches_per_layer(
    bf16_model: GptOss, monkeypatch: pytest.MonkeyPatch, record_property: Callable[[str, object], None]
) -> None:
    try:
        unfused, unfused_step = _decode_step_launches(bf16_model, Kernels.triton(fused=False), monkeypatch)
        fused, fused_step = _decode_step_launches(bf16_model, Kernels.triton(), monkeypatch)
    finally:
        bf16_model.use_kernels(Kernels.triton())
    layers = len(bf16_model.block)
    line = (
        f"decode step launches per layer after the first: {unfused[1]} unfused -> {fused[1]} fused; whole step "
        f"({layers} layers + {fused_step} outside them): {sum(unfused) + unfused_step} -> {sum(fused) + fused_step}"
    )
    logger.info(line)
    record_property("launches", line)
    assert fused == [FUSED_PER_LAYER + 1] + [FUSED_PER_LAYER] * (layers - 1)
    assert unfused[0] == unfused[1] + 1
    assert len(set(unfused[1:])) == 1
    assert unfused[1] >= 2 * FUSED_PER_LAYER
    assert fused_step == unfused_step
