"""Batching, the KV cache, the sliding window and sinks, and the fast paths against their reference twins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import gpt_oss
from model.config import ModelConfig
from model.gpt_oss import (
    AttentionMetadata,
    ContiguousKVCache,
    GptOss,
    KVView,
    attention,
    attention_reference,
    rope_parameters,
    swiglu,
)
from model.testing import random_attention_case


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


def test_reference_twins_equal_fast_paths_in_the_whole_model(model_fp32: GptOss) -> None:
    ids = tokens(9, 45)
    fast = full(model_fp32, ids)
    model_fp32.reference = True
    try:
        slow = full(model_fp32, ids)
    finally:
        model_fp32.reference = False
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_dequantize_at_load_equals_packed(checkpoints: dict[str, Path], model_fp32: GptOss) -> None:
    dense = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, experts="dequantized", progress=False
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
        checkpoints["hf"], dtype=torch.float32, experts="dequantized", progress=False
    )
    values = c.num_experts * 3 * c.intermediate_size * c.hidden_size  # mlp1 (2 I x H) and mlp2 (H x I)
    per_layer = values * 4 - values // 32 * 17  # float32 values in, MXFP4 blocks (16 bytes + scale) out
    assert dense.weight_nbytes() - model_fp32.weight_nbytes() == c.num_hidden_layers * per_layer


# -- attention: window, sinks, fast vs reference --


@pytest.mark.parametrize("window", [0, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_fast_equals_reference(window: int, dtype: torch.dtype) -> None:
    q, kv, meta, sinks = random_attention_case(0, [5, 1, 12], [9, 20, 12])
    q, kv = q.to(dtype), KVView(kv.keys.to(dtype), kv.values.to(dtype), kv.positions)
    fast = attention(q, kv, meta, sinks, 0.25, window).float()
    slow = attention_reference(q, kv, meta, sinks, 0.25, window).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, slow, rtol=0, atol=tol)


@pytest.mark.parametrize("impl", ["sdpa_sink_as_key", "sdpa_sink_from_lse"])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_ways_of_adding_the_sinks_equal_reference(
    monkeypatch: pytest.MonkeyPatch, impl: str, window: int, dtype: torch.dtype
) -> None:
    """The sink as an extra zero key (CUDA) and as a rescaling by the log-sum-exp (CPU), each forced in turn:
    prompt chunks, decodes (sequences 0, 2 and 3: not consecutive), grouped query heads, and a sink of -inf
    (no sink at all)."""
    monkeypatch.setattr(gpt_oss, "sdpa_with_sinks", getattr(gpt_oss, impl))
    q, kv, meta, sinks = random_attention_case(3, [1, 7, 1, 1, 15], [30, 11, 4, 9, 15], heads=8, kv_heads=2)
    q, kv = q.to(dtype), KVView(kv.keys.to(dtype), kv.values.to(dtype), kv.positions)
    sinks[1] = float("-inf")
    fast = attention(q, kv, meta, sinks, 0.25, window).float()
    slow = attention_reference(q, kv, meta, sinks, 0.25, window).float()
    assert torch.isfinite(fast).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, slow, rtol=0, atol=tol)


@pytest.mark.parametrize("impl", ["sdpa_sink_as_key", "sdpa_sink_from_lse"])
def test_fresh_prompt_in_full_attention_runs_causal_without_a_mask(
    monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """A fresh prompt's call in a full-attention layer carries no mask (the kernels' causal mode); a prompt
    alone and one beside a decode and a later chunk, each way of adding the sinks, against the reference.
    Windowed layers, chunks with earlier tokens and decodes keep their masks."""
    monkeypatch.setattr(gpt_oss, "sdpa_with_sinks", getattr(gpt_oss, impl))
    for q_lens, ctx_lens, fresh in (([9], [9], 0), ([1, 6, 9], [20, 11, 9], 2)):
        q, kv, meta, sinks = random_attention_case(5, q_lens, ctx_lens, heads=8, kv_heads=2)
        for window in (0, 4):
            calls = gpt_oss.attention_plan(meta, kv.positions, window, q.dtype)
            causal = [c for c in calls if c.bias is None]
            assert [c.seqs for c in causal] == ([slice(fresh, fresh + 1)] if window == 0 else [])
            fast = attention(q, kv, meta, sinks, 0.25, window)
            slow = attention_reference(q, kv, meta, sinks, 0.25, window)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_fresh_prompt_with_keys_out_of_order_keeps_its_mask() -> None:
    """The KV view may hand a prompt's keys in any order: the plan looks at their positions, and keys not
    at 0, 1, ... in order keep the mask (causal mode would let early queries see later keys)."""
    q, kv, meta, sinks = random_attention_case(6, [9], [9])
    order = torch.tensor([1, 0, 2, 3, 4, 5, 6, 8, 7])
    shuffled = KVView(kv.keys[:, order], kv.values[:, order], kv.positions[:, order])
    (call,) = gpt_oss.attention_plan(meta, shuffled.positions, 0, q.dtype)
    assert call.bias is not None
    fast = attention(q, shuffled, meta, sinks, 0.25, 0)
    torch.testing.assert_close(fast, attention_reference(q, kv, meta, sinks, 0.25, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa_sink_as_key", "sdpa_sink_from_lse"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_long_query_in_a_window_layer_is_cut_into_blocks_reading_their_keys_only(
    monkeypatch: pytest.MonkeyPatch, impl: str, shuffle: bool
) -> None:
    """Blocks of 4 queries, a window of 3: a fresh 13-token prompt and a 10-token chunk after 15 earlier
    tokens (beside a decode) each run as calls of at most 4 queries over at most 4 + 3 - 1 key columns, and
    agree with the reference; with the keys handed out of order the blocks still find theirs."""
    monkeypatch.setattr(gpt_oss, "sdpa_with_sinks", getattr(gpt_oss, impl))
    monkeypatch.setattr(gpt_oss, "WINDOW_QUERY_BLOCK", 4)
    window = 3
    for q_lens, ctx_lens in (([13], [13]), ([1, 10], [7, 25])):
        q, kv, meta, sinks = random_attention_case(7, q_lens, ctx_lens)
        slow = attention_reference(q, kv, meta, sinks, 0.25, window)
        if shuffle:
            order = torch.randperm(kv.keys.shape[1], generator=torch.Generator().manual_seed(8))
            kv = KVView(kv.keys[:, order], kv.values[:, order], kv.positions[:, order])
        calls = gpt_oss.attention_plan(meta, kv.positions, window, q.dtype)
        blocks = [c for c in calls if c.seqs == slice(len(q_lens) - 1, len(q_lens))]
        total = sum(q_lens)
        first = total - q_lens[-1]  # the long query is the last sequence's
        assert [c.tokens for c in blocks] == [slice(t, min(t + 4, total)) for t in range(first, total, 4)]
        if not shuffle:
            assert all(c.width <= 4 + window - 1 for c in blocks)
        torch.testing.assert_close(attention(q, kv, meta, sinks, 0.25, window), slow, rtol=0, atol=1e-5)


def test_cpu_attention_adds_the_sinks_from_the_log_sum_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = gpt_oss.sdpa_sink_from_lse

    def spy(*args: torch.Tensor | float) -> torch.Tensor:
        calls.append("lse")
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gpt_oss, "sdpa_sink_from_lse", spy)
    q, kv, meta, sinks = random_attention_case(4, [3], [3])
    attention(q, kv, meta, sinks, 0.25, 0)
    assert calls == ["lse"]


def test_sliding_window_hides_keys_older_than_the_window() -> None:
    q, kv, meta, sinks = random_attention_case(1, [1], [30])
    window = 8
    before = attention_reference(q, kv, meta, sinks, 0.25, window)
    # The query sits at position 29 and sees positions 22..29; scrambling 0..21 must change nothing...
    kv.keys[0, :22] = torch.randn(22, *kv.keys.shape[2:])
    kv.values[0, :22] = torch.randn(22, *kv.values.shape[2:])
    torch.testing.assert_close(attention(q, kv, meta, sinks, 0.25, window), before, rtol=0, atol=1e-6)
    # ...while scrambling position 22 does, and full attention sees the old keys too.
    kv.values[0, 22] += 1.0
    assert not torch.allclose(attention(q, kv, meta, sinks, 0.25, window), before, atol=1e-3)
    assert not torch.allclose(attention(q, kv, meta, sinks, 0.25, 0), before, atol=1e-3)


def test_sinks_only_add_to_the_softmax_denominator() -> None:
    q, kv, meta, sinks = random_attention_case(2, [6], [6], heads=2, kv_heads=2)
    plain = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kv.keys[:, :6].transpose(1, 2), kv.values[:, :6].transpose(1, 2),
        is_causal=True, scale=0.25,
    )[0].transpose(0, 1).reshape(6, -1)  # fmt: skip
    no_sink = torch.full((2,), float("-inf"))
    torch.testing.assert_close(attention(q, kv, meta, no_sink, 0.25, 0), plain, rtol=0, atol=1e-6)
    # With a sink s, every attention weight of head h is scaled by Z / (Z + e^s), Z the plain denominator.
    with_sink = attention(q, kv, meta, sinks, 0.25, 0).unflatten(-1, (2, -1))
    k = kv.keys[0, :6]
    logits = torch.einsum("thd,khd->thk", q, k) * 0.25
    logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1)[:, None, :], float("-inf"))
    z = logits.exp().sum(-1, keepdim=True)
    factor = z / (z + sinks.exp()[None, :, None])
    torch.testing.assert_close(with_sink, plain.unflatten(-1, (2, -1)) * factor, rtol=0, atol=1e-5)


# -- the MoE and its pieces --


@pytest.mark.parametrize("num_tokens", [1, 13, 300])
@pytest.mark.parametrize("group_bytes", [256 << 10, 3 * 128 * 4])
def test_experts_fast_equal_reference(
    model_fp32: GptOss, num_tokens: int, group_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path against the token-by-token twin: with the default grouping (all of a decode's experts in
    one SwiGLU), and groups of at most 3 rows (the tiny model's first matmul is 128 wide), so most experts
    of the longer inputs hold more rows than a group and go alone."""
    monkeypatch.setattr(gpt_oss, "MOE_GROUP_BYTES", group_bytes)
    mlp = model_fp32.block[0].mlp
    t = torch.randn(num_tokens, model_fp32.config.hidden_size, generator=torch.Generator().manual_seed(3))
    indices, weights = mlp.route(t)
    torch.testing.assert_close(mlp.experts(t, indices, weights), mlp.experts_reference(t, indices, weights))


def test_expert_spans_and_groups() -> None:
    spans = gpt_oss._spans([2, 0, 1, 0, 0, 5, 1])
    assert spans == [(0, 0, 2), (2, 2, 3), (5, 3, 8), (6, 8, 9)]
    assert gpt_oss._groups(spans, 3) == [[(0, 0, 2), (2, 2, 3)], [(5, 3, 8)], [(6, 8, 9)]]
    assert gpt_oss._groups(spans, 9) == [spans]
    assert gpt_oss._groups(spans, 1) == [[span] for span in spans]
    assert gpt_oss._spans([0, 0]) == []
    assert gpt_oss._groups([], 4) == []


@pytest.mark.parametrize("num_tokens", [1, 13, 300])
@pytest.mark.parametrize("per_call", [32, 3])
def test_experts_batched_equal_reference(
    model_fp32: GptOss, num_tokens: int, per_call: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path (all active experts in two batched matmuls), here run on the CPU: with the experts in one
    call, and in calls of 3 (the tiny model has 8 experts, so assignments are split between calls)."""
    monkeypatch.setattr(gpt_oss, "EXPERTS_PER_CALL", per_call)
    mlp = model_fp32.block[1].mlp
    t = torch.randn(num_tokens, model_fp32.config.hidden_size, generator=torch.Generator().manual_seed(4))
    indices, weights = mlp.route(t)
    torch.testing.assert_close(
        mlp.experts_batched(t, indices, weights), mlp.experts_reference(t, indices, weights)
    )


def test_batched_experts_in_the_whole_model_packed_and_dequantized(
    checkpoints: dict[str, Path], model_fp32: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = tokens(12, 40)
    expected = full(model_fp32, ids)
    dense = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, experts="dequantized", progress=False
    )
    monkeypatch.setattr(gpt_oss.MLPBlock, "experts", gpt_oss.MLPBlock.experts_batched)
    for model in (model_fp32, dense):
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


def test_swiglu_clamps_and_interleaves() -> None:
    h = torch.tensor([[10.0, -10.0, 1.0, 2.0]])  # (gate, up) pairs: (10, -10), (1, 2)
    out = swiglu(h, alpha=1.702, limit=7.0)
    expected = [
        7.0 * torch.sigmoid(torch.tensor(1.702 * 7.0)) * (-7.0 + 1),
        torch.sigmoid(torch.tensor(1.702)) * 3,
    ]
    torch.testing.assert_close(out[0], torch.stack(expected))


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
    """A KVCache that hands back its keys permuted, with extra padding, to hold the model to the protocol:
    masks come from the returned positions alone, as a paged cache's gathered blocks would require."""

    def __init__(self, inner: ContiguousKVCache, seed: int) -> None:
        self.inner = inner
        self.generator = torch.Generator().manual_seed(seed)

    def store_and_view(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, window: int
    ) -> KVView:
        view = self.inner.store_and_view(layer, k, v, meta, window)
        seqs, width = view.positions.shape
        pad = 3
        keys = torch.cat(
            (view.keys, torch.randn(seqs, pad, *view.keys.shape[2:], generator=self.generator)), 1
        )
        values = torch.cat(
            (view.values, torch.randn(seqs, pad, *view.values.shape[2:], generator=self.generator)), 1
        )
        positions = torch.cat((view.positions, torch.full((seqs, pad), -1)), 1)
        order = torch.stack([torch.randperm(width + pad, generator=self.generator) for _ in range(seqs)])
        take = order[:, :, None, None].expand_as(keys)
        return KVView(keys.gather(1, take), values.gather(1, take), positions.gather(1, order))


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
