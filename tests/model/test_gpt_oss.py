"""The whole model: batching, the KV cache, the kernels it is built with against the reference twins, the
router and RoPE. The kernels alone are tested in tests/model/kernels/."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from model.batch import AttentionMetadata, LayerKV
from model.config import ModelConfig
from model.gpt_oss import ContiguousKVCache, GptOss, rope_parameters
from model.kernels import REFERENCE, Kernels
from model.kernels.experts import experts_batched


def tokens(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, 201088, (length,), generator=torch.Generator().manual_seed(seed))


def full(model: GptOss, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, AttentionMetadata.build([len(ids)]))


def test_batched_sequences_of_different_lengths_equal_each_alone(model_fp32: GptOss) -> None:
    seqs = [tokens(1, 37), tokens(2, 5), tokens(3, 1), tokens(4, 22)]
    batched = model_fp32(torch.cat(seqs), AttentionMetadata.build([len(s) for s in seqs]))
    alone = torch.cat([full(model_fp32, s) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_incremental_decoding_with_cache_equals_full_recomputation(model_fp32: GptOss) -> None:
    ids = tokens(5, 60)  # well past the 16-token window
    expected = full(model_fp32, ids)
    cache = ContiguousKVCache(model_fp32.config, 1, 64, dtype=torch.float32)
    prefill = 9
    got = [model_fp32(ids[:prefill], AttentionMetadata.build([prefill], cache_slots=[0]), cache)]
    for n in range(prefill, len(ids)):
        meta = AttentionMetadata.build([1], [n + 1], cache_slots=[0])
        got.append(model_fp32(ids[n : n + 1], meta, cache))
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_written_into_a_buffer_equal_the_returned_ones(
    checkpoints: dict[str, Path], dtype: torch.dtype
) -> None:
    """`logits_out`: the same values in the buffer's leading rows (float32 through the matmul's `out=`, bf16 and
    its prepacked weight through a copy), the rows past them untouched."""
    model = GptOss.from_checkpoint(checkpoints["hf"], dtype=dtype, progress=False)
    ids = tokens(12, 30)
    meta = AttentionMetadata.build([20, 10])
    last = torch.tensor([19, 29])
    buffer = torch.full((5, model.config.vocab_size), 7.0)
    expected = model(ids, meta, logits_indices=last)
    got = model(ids, meta, logits_indices=last, logits_out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert got.shape == (2, model.config.vocab_size)
    assert torch.equal(got, expected)
    assert torch.all(buffer[2:] == 7.0)


def test_mixed_batch_of_chunked_prefill_and_decode_through_cache(model_fp32: GptOss) -> None:
    """Each step serves a different mix: chunks of various sizes and single decode tokens, in cache slots that
    are not in sequence order, with only each sequence's last logits computed."""
    seqs = {2: tokens(6, 50), 0: tokens(7, 21), 1: tokens(8, 33)}
    expected = {slot: full(model_fp32, ids) for slot, ids in seqs.items()}
    cache = ContiguousKVCache(model_fp32.config, 3, 64, dtype=torch.float32)
    done = dict.fromkeys(seqs, 0)
    chunk_plan = [7, 20, 1, 3, 17, 1, 1, 40]
    step = 0
    while any(done[s] < len(seqs[s]) for s in seqs):
        slots = [s for s in seqs if done[s] < len(seqs[s])]
        q_lens = [min(chunk_plan[(step + s) % len(chunk_plan)], len(seqs[s]) - done[s]) for s in slots]
        ids = torch.cat([seqs[s][done[s] : done[s] + q] for s, q in zip(slots, q_lens, strict=True)])
        ctx = [done[s] + q for s, q in zip(slots, q_lens, strict=True)]
        meta = AttentionMetadata.build(q_lens, ctx, cache_slots=slots)
        last = torch.tensor(q_lens).cumsum(0) - 1
        logits = model_fp32(ids, meta, cache, logits_indices=last)
        for row, (s, c) in enumerate(zip(slots, ctx, strict=True)):
            torch.testing.assert_close(logits[row], expected[s][c - 1], rtol=0, atol=1e-5)
            done[s] = c
        step += 1


def test_reference_twins_equal_fast_paths_in_the_whole_model(
    checkpoints: dict[str, Path], model_fp32: GptOss
) -> None:
    """The same checkpoint built on the reference kernels: the same logits for a prompt, then for a decode
    step of it beside a new prompt through a cache."""
    reference = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, kernels=REFERENCE, progress=False
    )
    ids = tokens(9, 45)
    torch.testing.assert_close(full(model_fp32, ids), full(reference, ids), rtol=0, atol=1e-4)
    logits = []
    for model in (model_fp32, reference):
        cache = ContiguousKVCache(model.config, 2, 64, dtype=torch.float32)
        model(ids[:40], AttentionMetadata.build([40], cache_slots=[0]), cache)
        meta = AttentionMetadata.build([1, 5], [41, 5], cache_slots=[0, 1])
        logits.append(model(torch.cat((ids[40:41], ids[:5])), meta, cache))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)


def test_dequantize_at_load_equals_packed(checkpoints: dict[str, Path], model_fp32: GptOss) -> None:
    dense = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, expert_mode="dequantized", progress=False
    )
    assert dense.block[0].mlp.mlp1_weight.blocks.numel() == 0
    ids = tokens(10, 30)
    torch.testing.assert_close(full(dense, ids), full(model_fp32, ids), rtol=0, atol=1e-5)


def test_packed_experts_stay_packed_in_memory(model_fp32: GptOss, tiny_config: ModelConfig) -> None:
    mlp = model_fp32.block[1].mlp
    assert mlp.mlp1_weight.dense is None
    assert mlp.mlp1_weight.blocks.dtype == torch.uint8
    assert mlp.mlp1_weight.blocks.shape == (
        tiny_config.num_experts,
        2 * tiny_config.intermediate_size,
        tiny_config.hidden_size // 32,
        16,
    )
    assert all(t.dtype != torch.float32 or t.numel() < 10**6 for t in mlp.state_dict().values())


def test_weight_nbytes_counts_dequantized_experts_too(
    checkpoints: dict[str, Path], model_fp32: GptOss, tiny_config: ModelConfig
) -> None:
    c = tiny_config
    assert model_fp32.weight_nbytes() == sum(t.nbytes for t in model_fp32.state_dict().values())
    dense = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, expert_mode="dequantized", progress=False
    )
    values = c.num_experts * 3 * c.intermediate_size * c.hidden_size  # mlp1 (2 I x H) and mlp2 (H x I)
    per_layer = values * 4 - values // 32 * 17  # float32 values in, MXFP4 blocks (16 bytes + scale) out
    assert dense.weight_nbytes() - model_fp32.weight_nbytes() == c.num_hidden_layers * per_layer


# -- the MoE and its pieces --


def test_batched_experts_in_the_whole_model_packed_and_dequantized(
    checkpoints: dict[str, Path], model_fp32: GptOss
) -> None:
    ids = tokens(12, 40)
    expected = full(model_fp32, ids)
    cpu = Kernels.for_device("cpu")
    kernels = Kernels(cpu.attention, experts_batched)
    for mode in ("packed", "dequantized"):
        model = GptOss.from_checkpoint(
            checkpoints["hf"], dtype=torch.float32, expert_mode=mode, kernels=kernels, progress=False
        )
        torch.testing.assert_close(full(model, ids), expected, rtol=0, atol=1e-5)


def test_router_softmax_is_over_the_selected_logits_only(model_fp32: GptOss) -> None:
    mlp = model_fp32.block[0].mlp
    t = torch.randn(5, model_fp32.config.hidden_size, generator=torch.Generator().manual_seed(4))
    indices, weights = mlp.route(t)
    logits = mlp.gate(t)
    assert indices.shape == (5, model_fp32.config.experts_per_token)
    assert torch.equal(indices, logits.argsort(-1, descending=True)[:, : indices.shape[1]])
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    picked = logits.gather(-1, indices)
    torch.testing.assert_close(weights[:, 0] / weights[:, 1], (picked[:, 0] - picked[:, 1]).exp())


def test_yarn_rope_matches_the_published_parameters() -> None:
    config = ModelConfig(num_hidden_layers=24, num_experts=32)
    concentration, inv_freq = rope_parameters(config)
    assert concentration == pytest.approx(0.1 * math.log(32) + 1)
    base = 150000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    # The fastest pairs are left alone (extrapolation) and the slowest are slowed 32x (interpolation).
    assert inv_freq[0].item() == pytest.approx(base[0].item(), rel=1e-6)
    assert inv_freq[-1].item() == pytest.approx(base[-1].item() / 32, rel=1e-5)
    assert torch.all(inv_freq[1:] < inv_freq[:-1])


class ShuffledCache:
    """A KVCache that hands each layer its blocks in a random order, with padding blocks on top, to hold the
    model to the protocol: masks come from the key positions alone, as a paged cache's tables allow."""

    def __init__(self, inner: ContiguousKVCache, seed: int) -> None:
        self.inner = inner
        self.generator = torch.Generator().manual_seed(seed)

    def layer(self, layer: int, window: int, meta: AttentionMetadata) -> LayerKV:
        kv = self.inner.layer(layer, window, meta)
        tables = kv.tables
        assert tables.block_size == 1
        seqs, width = tables.block_index.shape
        pad = 3
        blocks = torch.cat((tables.block_index, tables.block_index[:, :1].expand(seqs, pad)), 1)
        positions = torch.cat((tables.key_positions, torch.full((seqs, pad), -1)), 1)
        order = torch.stack([torch.randperm(width + pad, generator=self.generator) for _ in range(seqs)])
        shuffled = dataclasses.replace(
            tables, block_index=blocks.gather(1, order), key_positions=positions.gather(1, order)
        )
        return LayerKV(kv.k, kv.v, shuffled)


def test_any_cache_honouring_the_protocol_gives_the_same_logits(model_fp32: GptOss) -> None:
    seqs = [tokens(12, 40), tokens(13, 9)]
    expected = torch.cat([full(model_fp32, s) for s in seqs])
    cache = ShuffledCache(ContiguousKVCache(model_fp32.config, 2, 41, dtype=torch.float32), seed=0)
    meta = AttentionMetadata.build([40, 9], cache_slots=[1, 0])
    torch.testing.assert_close(model_fp32(torch.cat(seqs), meta, cache), expected, rtol=0, atol=1e-5)
    # Decode one more token for each through the same cache.
    nxt = torch.tensor([7, 8])
    step = model_fp32(nxt, AttentionMetadata.build([1, 1], [41, 10], cache_slots=[1, 0]), cache)
    for row, s in enumerate(seqs):
        again = full(model_fp32, torch.cat((s, nxt[row : row + 1])))[-1]
        torch.testing.assert_close(step[row], again, rtol=0, atol=1e-5)


def test_a_random_model_is_whole_and_switches_kernels_on_the_same_weights(tiny_config: ModelConfig) -> None:
    """The benchmarks' model drawn on the device: every weight assigned (none left on the meta device), in
    the checkpoint's dtypes, and the reference kernels swapped in give the fast paths' logits."""
    from model.testing import random_model

    model = random_model(tiny_config, device="cpu", dtype=torch.float32, seed=3)
    state = model.state_dict()
    assert not any(t.is_meta for t in state.values())
    assert state["block.0.mlp.mlp1_weight.blocks"].dtype == torch.uint8
    assert state["block.0.attn.sinks"].dtype == torch.float32
    tokens = torch.tensor([5, 17, 99, 3000])
    meta = AttentionMetadata.build([4])
    fast = model(tokens, meta)
    assert fast.std() > 0.1  # weights of the checkpoint writer's scale, not zeros
    model.use_kernels(REFERENCE)
    torch.testing.assert_close(model(tokens, AttentionMetadata.build([4])), fast, rtol=1e-4, atol=1e-4)
    assert not torch.equal(
        random_model(tiny_config, device="cpu", dtype=torch.float32, seed=4)(tokens, meta), fast
    )
