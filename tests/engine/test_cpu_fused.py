"""The CPU's fused decode layer through the real engine: a bfloat16 model's batched, chunked greedy decoding
over the paged cache runs the fused calls, and every token it reports scores as the plain blocks score it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.request import SamplingParams
from model.gpt_oss import AttentionMetadata, GptOss
from model.kernels import Kernels, cpu_fused, cpu_mxfp4
from model.kernels.attention import TorchAttention, sdpa_sink_from_lse
from model.kernels.cpu_fused import CpuFusedLayers
from model.kernels.experts import experts_fused
from model.make_checkpoint import write_checkpoint
from tests.engine.conftest import WINDOW16, make_engine
from tests.engine.test_engine import _prompts, _run


@pytest.fixture(scope="module")
def bf16_every_expert(tmp_path_factory: pytest.TempPathFactory) -> GptOss:
    """The engine tests' tiny model in bfloat16 (the CPU's default there), each token routed to all its
    experts: a router tie a rounding apart would otherwise swap an expert, which no tolerance describes."""
    if not cpu_mxfp4.native_bf16():
        pytest.fail("this machine has AVX512-BF16: the fused decode layer must build")
    config = dataclasses.replace(WINDOW16, experts_per_token=WINDOW16.num_experts)
    path = write_checkpoint(config, tmp_path_factory.mktemp("bf16-every-expert"), layout="hf", seed=7)
    return GptOss.from_checkpoint(path, dtype=torch.bfloat16, progress=False)


def test_the_engine_decodes_through_the_fused_layer_as_the_plain_blocks_score(
    bf16_every_expert: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = bf16_every_expert
    assert isinstance(model.block[0].attn.fused, CpuFusedLayers)
    calls = {"paged_attention": 0, "norm_qkv_rope": 0}
    for name in calls:

        def counted(*args: object, name: str = name, fn: object = getattr(cpu_fused, name)) -> object:
            calls[name] += 1
            return fn(*args)  # type: ignore[operator]

        monkeypatch.setattr(cpu_fused, name, counted)
    prompts = _prompts(5, seed=11, lengths=(3, 40))
    params = [SamplingParams(temperature=0.0, max_tokens=6, logprobs=0)] * len(prompts)
    # A small token budget chunks the longer prompts beside the others' decodes.
    outputs = _run(make_engine(model, max_num_batched_tokens=24), prompts, params)
    monkeypatch.undo()
    assert calls["paged_attention"] > 0
    assert calls["norm_qkv_rope"] == calls["paged_attention"]

    model.use_kernels(Kernels(TorchAttention(sdpa_sink_from_lse), experts_fused))
    try:
        for i, prompt in enumerate(prompts):
            out = outputs[f"r{i}"]
            assert out.logprobs is not None
            assert len(out.new_token_ids) == 6
            tokens = prompt + out.new_token_ids
            logits = model(torch.tensor(tokens), AttentionMetadata.build([len(tokens)]), None).float()
            scores = torch.log_softmax(logits, dim=-1)
            expected = [scores[len(prompt) - 1 + j, t].item() for j, t in enumerate(out.new_token_ids)]
            got = [entry.logprob for entry in out.logprobs]
            # The logits are bfloat16 values: near 8 in magnitude they are 1/32 apart, so the two paths' sums
            # in other orders may put one a step or two away.
            assert got == pytest.approx(expected, abs=0.1), f"request {i}"
    finally:
        model.use_kernels(Kernels.for_device("cpu"))
