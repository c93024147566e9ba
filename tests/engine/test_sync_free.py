"""A decode step with the GPU's code paths (Triton kernels, the device sampler) makes no host sync but the one
copy of the sampled ids back: checked on the CPU by recording every op that would make the host wait on a
GPU. Tensors are all on the CPU here, so the recorder goes by what an op does, not where its tensor lies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import triton.runtime.interpreter as interpreter
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from engine.core import EngineCore
from engine.request import SamplingParams
from engine.runner import ModelRunner
from model.gpt_oss import GptOss
from model.kernels import Kernels
from model.make_checkpoint import write_checkpoint
from tests.engine.conftest import WINDOW16, make_engine

# Tensor methods and functions that read a tensor's values on the host, or copy host data to the device
# from pageable memory with the host waiting.
_HOST_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.new_tensor,
    torch.tensor,
    torch.as_tensor,
}
# aten ops that synchronise on CUDA: a value read back (item, bool), or an output shape that depends on the
# data (nonzero, boolean indexing, masked_select, unique), or bincount's min/max read.
_SYNCING_ATEN = {
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "nonzero",
    "argwhere",
    "masked_select",
    "bincount",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",  # without output_size (the only form a tensor of repeats dispatches to)
}


class SyncRecorder:
    """Records every op that would synchronise a GPU's host with the device, by name, while active."""

    def __init__(self) -> None:
        self.syncs: list[str] = []
        self.paused = 0
        recorder = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if func in _HOST_READS and not recorder.paused:
                    recorder.syncs.append(getattr(func, "__name__", str(func)))
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                name = func.overloadpacket.__name__
                if name in _SYNCING_ATEN and not recorder.paused:
                    recorder.syncs.append(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        self.modes = (Functions(), Dispatch())

    @contextmanager
    def recording(self) -> Iterator[None]:
        with self.modes[0], self.modes[1]:
            yield

    @contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@pytest.fixture(scope="module")
def triton_model(tmp_path_factory: pytest.TempPathFactory) -> GptOss:
    """The engine tests' tiny model, computing through the Triton kernels (under the interpreter here)."""
    path: Path = write_checkpoint(WINDOW16, tmp_path_factory.mktemp("sync-free"), layout="hf", seed=7)
    return GptOss.from_checkpoint(path, dtype=torch.float32, progress=False, kernels=Kernels.triton())


@contextmanager
def recorded(
    engine: EngineCore, recorder: SyncRecorder, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[tuple[int, ...]]]:
    """Record `engine`'s steps; yields the shapes of what `ModelRunner.read_back` copied back. The copy back
    itself and the interpreter's launches (a kernel launch on a GPU, host copies of every argument here)
    are not recorded."""
    read: list[tuple[int, ...]] = []
    launch = interpreter.GridExecutor.__call__

    def read_back(token_ids: torch.Tensor) -> list[int]:
        read.append(tuple(token_ids.shape))
        with recorder.pause():
            return ModelRunner.read_back(token_ids)

    def paused_launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        with recorder.pause():
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "read_back", read_back)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", paused_launch)
    with recorder.recording():
        yield read


def _add_requests(engine: EngineCore) -> None:
    engine.add_request("greedy", list(range(1, 30)), SamplingParams(temperature=0.0, max_tokens=8))
    engine.add_request(
        "seeded", list(range(5, 12)), SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=8)
    )
    engine.add_request(
        "penalised",
        list(range(40, 61)),
        SamplingParams(
            temperature=1.0, top_k=20, min_p=0.01, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=8
        ),
    )


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-buffers"])
def test_every_step_makes_one_copy_back_and_no_other_sync(
    triton_model: GptOss, monkeypatch: pytest.MonkeyPatch, graphs: bool
) -> None:
    """Three steps, each recorded on its own: the prompts alone, then a decode step (through the decode
    graphs' buffers where they are on), then the decodes beside a new prompt (attention's varlen kernel,
    whose per-sequence starts and lengths are derived on the device)."""
    engine = make_engine(triton_model, device_sampling=True, cuda_graphs=graphs)
    _add_requests(engine)
    for step in ("prompts", "decodes", "decodes and a prompt"):
        if step == "decodes and a prompt":
            engine.add_request("late", list(range(70, 90)), SamplingParams(temperature=0.0, max_tokens=4))
        recorder = SyncRecorder()
        with recorded(engine, recorder, monkeypatch) as read:
            outputs = engine.step()
        assert recorder.syncs == [], step
        rows = 4 if step == "decodes and a prompt" else 3
        assert read == [(rows,)], step
        assert len(outputs) == rows, step
    assert engine.runner.graphs is None or engine.runner.graphs.logits.data_ptr() != 0


def test_the_recorder_sees_the_syncs_of_the_host_sampler(
    triton_model: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same step through the host sampler: its per-row settings go to the device as blocking copies, and
    its ids come back through tolist, all of which the recorder must see (else the test above proves
    nothing)."""
    engine = make_engine(triton_model, device_sampling=False)
    _add_requests(engine)
    engine.step()
    recorder = SyncRecorder()
    with recorded(engine, recorder, monkeypatch) as read:
        engine.step()
    assert read == []
    assert "tensor" in recorder.syncs
    assert "tolist" in recorder.syncs


def test_device_sampling_gives_the_host_samplers_greedy_tokens(tiny_model: GptOss) -> None:
    outputs = []
    for on_device in (False, True):
        engine = make_engine(tiny_model, device_sampling=on_device)
        for i in range(3):
            prompt = [(7 * i + 3 * j) % 1000 + 1 for j in range(5 + 9 * i)]
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=6))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        outputs.append(tokens)
    assert outputs[0] == outputs[1]
    assert all(len(t) == 6 for t in outputs[0].values())


# -- the decode graphs' buffers, run eagerly on the CPU ----------------------------------------------------


def _run(engine: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, list[int]]:
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_the_graph_buffers_give_the_ordinary_steps_tokens(triton_model: GptOss) -> None:
    """Three requests whose batch shrinks as they end (buckets 4, 2, 1: padded rows in each), prompts past
    the 16-token window and across blocks, greedy and seeded: the same tokens as the ordinary step."""
    prompts = [[(11 * i + 5 * j) % 900 + 1 for j in range(n)] for i, n in enumerate((5, 14, 29))]
    params = [
        SamplingParams(temperature=0.0, max_tokens=2),
        SamplingParams(temperature=0.9, top_k=50, seed=11, max_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=7),
    ]
    eager = _run(make_engine(triton_model, device_sampling=True), prompts, params)
    engine = make_engine(triton_model, device_sampling=True, cuda_graphs=True)
    graphed = _run(engine, prompts, params)
    assert graphed == eager
    assert [len(graphed[f"r{i}"]) for i in range(3)] == [2, 4, 7]
    assert engine.runner.graphs is not None
    assert engine.runner.graphs.buckets[:4] == [1, 2, 4, 8]


def test_the_graph_buffers_compute_the_ordinary_steps_logits(triton_model: GptOss) -> None:
    """One decode step of three rows (padded to four) through the buffers and through the ordinary inputs,
    on the same cache: the same logits for the real rows, and the padded row wrote only the scratch block."""
    engine = make_engine(triton_model, device_sampling=True, cuda_graphs=True)
    for i, n in enumerate((3, 18, 9)):
        engine.add_request(f"r{i}", list(range(1, n + 1)), SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    runner = engine.runner
    assert runner.graphs is not None
    plan = engine.scheduler.schedule()
    assert runner.graphs.applies(plan)
    before = [t.clone() for t in (*runner.cache.k, *runner.cache.v)]
    static = runner.graphs.run(plan).clone()
    inputs = runner.prepare(plan)
    ordinary = runner.model(inputs.token_ids, inputs.meta, inputs.step_kv, inputs.logits_indices)
    assert static.shape == ordinary.shape == (3, triton_model.config.vocab_size)
    assert torch.allclose(static, ordinary, rtol=1e-5, atol=1e-5)
    bs = runner.block_size
    for layer, (old, new) in enumerate(zip(before, (*runner.cache.k, *runner.cache.v), strict=True)):
        changed = (old != new).flatten(1).any(1).nonzero().flatten() // bs
        sliding = triton_model.config.layer_sliding[layer % len(runner.cache.k)]
        scratch = runner.blocks.num_sliding if sliding else runner.blocks.num_full
        table = plan.sliding_tables if sliding else plan.full_tables
        assert table is not None
        real = {int(table[item.row, item.request.num_computed_tokens // bs]) for item in plan.scheduled}
        assert set(changed.tolist()) <= real | {scratch}
        assert scratch in set(changed.tolist())


def test_the_grammar_masks_device_route_makes_no_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits on a device take the packed words over (from pinned memory on CUDA, without waiting) and unpack
    them there: nothing reads a value back or builds an index on the host. Taken here on the CPU with the
    host loop out of the way."""
    from engine.constraint import apply_token_masks
    from model.kernels import token_bitmask

    monkeypatch.setattr(token_bitmask, "available", lambda: False)
    masks = torch.full((3, 4), -1, dtype=torch.int32)
    masks[1] = 0
    masks[2, 1] = ~(1 << 3)  # token 35
    logits = torch.randn(3, 100)
    source = logits.clone()
    recorder = SyncRecorder()
    with recorder.recording():
        apply_token_masks(logits, masks)
    assert recorder.syncs == []
    assert torch.equal(logits[0], source[0])
    assert torch.isinf(logits[1]).all()
    assert torch.isinf(logits[2]).nonzero().flatten().tolist() == [35]


_OVERLAP_PROMPTS = [[(11 * i + 5 * j) % 900 + 1 for j in range(n)] for i, n in enumerate((5, 14, 29))]
_OVERLAP_PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=3),
    SamplingParams(temperature=0.9, top_k=50, seed=11, max_tokens=5),
    SamplingParams(temperature=0.0, max_tokens=5),
]


@pytest.fixture(scope="module")
def plain_tokens(triton_model: GptOss) -> dict[str, list[int]]:
    """The overlap test's requests through the plain loop (once: the interpreter makes every step slow)."""
    with torch.inference_mode():
        engine = make_engine(triton_model, device_sampling=True, async_scheduling=False)
        return _run(engine, _OVERLAP_PROMPTS, _OVERLAP_PARAMS)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-buffers"])
def test_an_overlapped_step_feeds_the_device_tokens_and_syncs_only_to_read_the_step_before(
    triton_model: GptOss, plain_tokens: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch, graphs: bool
) -> None:
    """In the overlapped loop a decode step is launched with its tokens read from the previous step's ids
    on the device (no sync), and the one copy back is of that previous step's ids. Run to the end, each
    request gets the plain loop's tokens, through the graph buffers' rows as through the ordinary inputs."""
    prompts, params = _OVERLAP_PROMPTS, _OVERLAP_PARAMS
    engine = make_engine(triton_model, async_scheduling=True, cuda_graphs=graphs)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    tokens: dict[str, list[int]] = {}
    for _ in range(2):  # the prompts' step, launched; the first decode's, launched as the prompts' is read
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    recorder = SyncRecorder()
    with recorded(engine, recorder, monkeypatch) as read:
        outputs = engine.step()
    assert recorder.syncs == []
    assert read == [(3,)]  # the first decode's ids, read while the second decode runs
    assert all(len(r.output_token_ids) == 2 for r in engine.scheduler.requests.values())
    assert all(r.num_pending_tokens == 1 for r in engine.scheduler.requests.values())
    for out in outputs:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens == plain_tokens
