"""Attention at the KV cache's seam: every implementation against the reference twin, store and attend, on
paged caches; and the torch path's plan (causal calls, windowed blocks) and its two ways of adding sinks."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from model.kernels import Kernels, cpu_mxfp4
from model.kernels import attention as attn
from model.kernels.attention import (
    Attention,
    KVView,
    TorchAttention,
    attend_reference,
    attention_reference,
    sdpa_sink_as_key,
    sdpa_sink_from_lse,
)
from model.kernels.cpu_fused import CpuAttention
from model.testing import random_attention_case, random_paged_case

LSE, KEY = TorchAttention(sdpa_sink_from_lse), TorchAttention(sdpa_sink_as_key)
FAST = {"sink-from-lse": LSE, "sink-as-key": KEY}

# (query lengths, context lengths): what one engine step can hold.
CASES = {
    "decode": ([1, 1, 1], [30, 4, 17]),
    "prefill": ([13], [13]),
    "chunk-after-cached-tokens": ([10], [25]),
    "mixed-batch": ([1, 7, 1, 1, 15], [30, 11, 4, 9, 15]),
}


def check_twin(
    impl: Attention, case: str, window: int, shuffle: bool, dtype: torch.dtype, device: str = "cpu"
) -> None:
    """`impl` on `device` and the reference on the CPU, each on its own copy of one paged cache: the same
    output, and the same cache after the store."""
    q_lens, ctx_lens = CASES[case]
    q, k, v, meta, kv, sinks = random_paged_case(
        3, q_lens, ctx_lens, window, heads=8, kv_heads=2, shuffle=shuffle
    )
    sinks[1] = float("-inf")  # a head without a sink
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kv.k, kv.v = kv.k.to(dtype), kv.v.to(dtype)
    expected_kv = copy.deepcopy(kv)
    expected = attention_reference(q, k, v, meta, expected_kv, sinks, 0.25, window).float()
    on = torch.device(device)
    got_kv = copy.deepcopy(kv)
    for name in ("k", "v"):
        setattr(got_kv, name, getattr(got_kv, name).to(on))
    for name in ("slot_mapping", "block_index", "key_positions"):
        setattr(got_kv.tables, name, getattr(got_kv.tables, name).to(on))
    got_meta = dataclasses.replace(
        meta,
        positions=meta.positions.to(on),
        seq_index=meta.seq_index.to(on),
        query_offset=meta.query_offset.to(on),
        attention_plans={},
    )
    got = impl(q.to(on), k.to(on), v.to(on), got_meta, got_kv, sinks.to(on), 0.25, window).float().cpu()
    assert torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    assert torch.equal(got_kv.k.cpu(), expected_kv.k)
    assert torch.equal(got_kv.v.cpu(), expected_kv.v)


@pytest.mark.parametrize("impl", list(FAST))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "keys-out-of-order"])
def test_fast_attention_stores_and_attends_as_the_reference(
    impl: str, case: str, window: int, shuffle: bool
) -> None:
    check_twin(FAST[impl], case, window, shuffle, torch.float32)


@pytest.mark.parametrize("impl", list(FAST))
@pytest.mark.parametrize("case", ["decode", "mixed-batch"])
def test_fast_attention_in_bfloat16(impl: str, case: str) -> None:
    check_twin(FAST[impl], case, 5, False, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_attention_stores_and_attends_as_the_reference(
    case: str, window: int, dtype: torch.dtype
) -> None:
    check_twin(Kernels.for_device("cuda").attention, case, window, True, dtype, device="cuda")


@pytest.mark.parametrize("impl", list(FAST))
def test_without_a_cache_each_sequence_attends_to_its_own_tokens(impl: str) -> None:
    q, k, v, meta, _, sinks = random_paged_case(4, [9, 1, 6], [9, 1, 6], 0, heads=8, kv_heads=2)
    for window in (0, 4):
        expected = attention_reference(q, k, v, meta, None, sinks, 0.25, window)
        got = FAST[impl](q, k, v, meta, None, sinks, 0.25, window)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The same as storing them in a cache first.
    q, k, v, meta, kv, sinks = random_paged_case(4, [9, 1, 6], [9, 1, 6], 0, heads=8, kv_heads=2)
    cached = attention_reference(q, k, v, meta, kv, sinks, 0.25, 0)
    torch.testing.assert_close(attention_reference(q, k, v, meta, None, sinks, 0.25, 0), cached)


def test_each_device_gets_its_way_of_adding_the_sinks() -> None:
    """The CPU: the log-sum-exp way, behind the fused decode layer's paged attention where that is built."""
    expected_cpu = CpuAttention(LSE) if cpu_mxfp4.native_bf16() else LSE
    assert Kernels.for_device("cpu").attention == expected_cpu
    assert Kernels.for_device("cuda").attention == KEY


# -- the torch path's plan, on gathered views --


@pytest.mark.parametrize("window", [0, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_equals_reference(window: int, dtype: torch.dtype) -> None:
    q, kv, meta, sinks = random_attention_case(0, [5, 1, 12], [9, 20, 12])
    q, kv = q.to(dtype), KVView(kv.keys.to(dtype), kv.values.to(dtype), kv.positions)
    fast = LSE.attend(q, kv, meta, sinks, 0.25, window).float()
    slow = attend_reference(q, kv, meta, sinks, 0.25, window).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, slow, rtol=0, atol=tol)


@pytest.mark.parametrize("impl", list(FAST))
def test_fresh_prompt_in_full_attention_runs_causal_without_a_mask(impl: str) -> None:
    """A fresh prompt's call in a full-attention layer carries no mask (the kernels' causal mode); a prompt
    alone and one beside a decode and a later chunk, each way of adding the sinks, against the reference.
    Windowed layers, chunks with earlier tokens and decodes keep their masks."""
    for q_lens, ctx_lens, fresh in (([9], [9], 0), ([1, 6, 9], [20, 11, 9], 2)):
        q, kv, meta, sinks = random_attention_case(5, q_lens, ctx_lens, heads=8, kv_heads=2)
        for window in (0, 4):
            calls = attn.attention_plan(meta, kv.positions, window, q.dtype)
            causal = [c for c in calls if c.bias is None]
            assert [c.seqs for c in causal] == ([slice(fresh, fresh + 1)] if window == 0 else [])
            fast = FAST[impl].attend(q, kv, meta, sinks, 0.25, window)
            slow = attend_reference(q, kv, meta, sinks, 0.25, window)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_fresh_prompt_with_keys_out_of_order_keeps_its_mask() -> None:
    """The KV view may hand a prompt's keys in any order: the plan looks at their positions, and keys not
    at 0, 1, ... in order keep the mask (causal mode would let early queries see later keys)."""
    q, kv, meta, sinks = random_attention_case(6, [9], [9])
    order = torch.tensor([1, 0, 2, 3, 4, 5, 6, 8, 7])
    shuffled = KVView(kv.keys[:, order], kv.values[:, order], kv.positions[:, order])
    (call,) = attn.attention_plan(meta, shuffled.positions, 0, q.dtype)
    assert call.bias is not None
    fast = LSE.attend(q, shuffled, meta, sinks, 0.25, 0)
    torch.testing.assert_close(fast, attend_reference(q, kv, meta, sinks, 0.25, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", list(FAST))
@pytest.mark.parametrize("shuffle", [False, True])
def test_long_query_in_a_window_layer_is_cut_into_blocks_reading_their_keys_only(
    monkeypatch: pytest.MonkeyPatch, impl: str, shuffle: bool
) -> None:
    """Blocks of 4 queries, a window of 3: a fresh 13-token prompt and a 10-token chunk after 15 earlier
    tokens (beside a decode) each run as calls of at most 4 queries over at most 4 + 3 - 1 key columns, and
    agree with the reference; with the keys handed out of order the blocks still find theirs."""
    monkeypatch.setattr(attn, "WINDOW_QUERY_BLOCK", 4)
    window = 3
    for q_lens, ctx_lens in (([13], [13]), ([1, 10], [7, 25])):
        q, kv, meta, sinks = random_attention_case(7, q_lens, ctx_lens)
        slow = attend_reference(q, kv, meta, sinks, 0.25, window)
        if shuffle:
            order = torch.randperm(kv.keys.shape[1], generator=torch.Generator().manual_seed(8))
            kv = KVView(kv.keys[:, order], kv.values[:, order], kv.positions[:, order])
        calls = attn.attention_plan(meta, kv.positions, window, q.dtype)
        blocks = [c for c in calls if c.seqs == slice(len(q_lens) - 1, len(q_lens))]
        total = sum(q_lens)
        first = total - q_lens[-1]  # the long query is the last sequence's
        assert [c.tokens for c in blocks] == [slice(t, min(t + 4, total)) for t in range(first, total, 4)]
        if not shuffle:
            assert all(c.width <= 4 + window - 1 for c in blocks)
        got = FAST[impl].attend(q, kv, meta, sinks, 0.25, window)
        torch.testing.assert_close(got, slow, rtol=0, atol=1e-5)


def test_sliding_window_hides_keys_older_than_the_window() -> None:
    q, kv, meta, sinks = random_attention_case(1, [1], [30])
    window = 8
    before = attend_reference(q, kv, meta, sinks, 0.25, window)
    # The query sits at position 29 and sees positions 22..29; scrambling 0..21 must change nothing...
    kv.keys[0, :22] = torch.randn(22, *kv.keys.shape[2:])
    kv.values[0, :22] = torch.randn(22, *kv.values.shape[2:])
    torch.testing.assert_close(LSE.attend(q, kv, meta, sinks, 0.25, window), before, rtol=0, atol=1e-6)
    # ...while scrambling position 22 does, and full attention sees the old keys too.
    kv.values[0, 22] += 1.0
    assert not torch.allclose(LSE.attend(q, kv, meta, sinks, 0.25, window), before, atol=1e-3)
    assert not torch.allclose(LSE.attend(q, kv, meta, sinks, 0.25, 0), before, atol=1e-3)


@pytest.mark.parametrize("impl", [attend_reference, LSE.attend, KEY.attend], ids=["reference", *FAST])
def test_sinks_only_add_to_the_softmax_denominator(impl: Callable[..., torch.Tensor]) -> None:
    q, kv, meta, sinks = random_attention_case(2, [6], [6], heads=2, kv_heads=2)
    plain = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kv.keys[:, :6].transpose(1, 2), kv.values[:, :6].transpose(1, 2),
        is_causal=True, scale=0.25,
    )[0].transpose(0, 1).reshape(6, -1)  # fmt: skip
    no_sink = torch.full((2,), float("-inf"))
    torch.testing.assert_close(impl(q, kv, meta, no_sink, 0.25, 0), plain, rtol=0, atol=1e-6)
    # With a sink s, every attention weight of head h is scaled by Z / (Z + e^s), Z the plain denominator.
    with_sink = impl(q, kv, meta, sinks, 0.25, 0).unflatten(-1, (2, -1))
    k = kv.keys[0, :6]
    logits = torch.einsum("thd,khd->thk", q, k) * 0.25
    logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1)[:, None, :], float("-inf"))
    z = logits.exp().sum(-1, keepdim=True)
    factor = z / (z + sinks.exp()[None, :, None])
    torch.testing.assert_close(with_sink, plain.unflatten(-1, (2, -1)) * factor, rtol=0, atol=1e-5)
