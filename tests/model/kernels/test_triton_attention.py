"""The Triton paged attention kernels (decode, varlen, the K/V store) against their plain twins, the twins
against the model's attention, the seam against the reference, and a tiny model through them against the
torch kernels."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from model.batch import AttentionMetadata
from model.config import PRESETS
from model.gpt_oss import ContiguousKVCache
from model.kernels import Kernels
from model.kernels.attention import KVView, attend_reference, attention_reference
from model.kernels.triton_attention import (
    TritonAttention,
    decode_attention,
    decode_attention_reference,
    store_kv,
    varlen_attention,
    varlen_attention_reference,
)
from model.testing import random_model, random_paged_case
from tests.model.kernels.test_attention import CASES, check_twin
from tests.triton_interpreter import bf16_dots_widened

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 4


@pytest.fixture(autouse=True)
def _interpreter_bf16_dots() -> Iterator[None]:
    with bf16_dots_widened():
        yield


def _case(
    lengths: list[int],
    window: int,
    *,
    heads: int = 8,
    kv_heads: int = 2,
    dim: int = 16,
    seed: int = 0,
    shifted: bool = False,
) -> tuple[torch.Tensor, ...]:
    """A shuffled pool of blocks, each sequence's table pointing into it, and random queries, keys, values
    and sinks. The table starts at position 0 with released blocks (-1) below the window, or, `shifted`, at
    the window's first block (as the engine hands a sliding layer's tables)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // BLOCK) for n in lengths]
    pool = sum(blocks_needed) + 3
    order = torch.randperm(pool, generator=generator).tolist()
    tables = torch.full((len(lengths), max(blocks_needed) + 2), -1, dtype=torch.int32)
    starts = torch.zeros(len(lengths), dtype=torch.int64)
    taken = 0
    for s, (n, count) in enumerate(zip(lengths, blocks_needed, strict=True)):
        first = max(n - window, 0) // BLOCK if window else 0
        column_zero = first if shifted else 0
        starts[s] = column_zero * BLOCK
        for j in range(first, count):
            tables[s, j - column_zero] = order[taken]
            taken += 1
    k = torch.randn(pool * BLOCK, kv_heads, dim, generator=generator)
    v = torch.randn(pool * BLOCK, kv_heads, dim, generator=generator)
    q = torch.randn(len(lengths), heads, dim, generator=generator)
    sinks = torch.randn(heads, generator=generator)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k, v, tables, starts, lens, sinks))


@pytest.mark.parametrize(("window", "shifted"), [(0, False), (8, False), (8, True)])
@pytest.mark.parametrize(("lengths", "splits"), [([1], 1), ([1, 7, 37, 16], 4), ([300, 5, 129], 8)])
def test_decode_attention_matches_the_reference(
    lengths: list[int], splits: int, window: int, shifted: bool
) -> None:
    q, k, v, tables, starts, lens, sinks = _case(lengths, window, shifted=shifted)
    got = decode_attention(q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK, splits=splits)
    expected = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("window", "shifted"), [(0, False), (8, True)])
@pytest.mark.parametrize(("lengths", "splits"), [([1], 1), ([1, 7, 37, 16], 4), ([3, 300, 5, 129], 8)])
def test_decode_attention_with_the_merge_in_the_split_launch(
    lengths: list[int], splits: int, window: int, shifted: bool
) -> None:
    """The last split of each (sequence, KV head) merges them (with splits that see no key among them):
    the two-launch result exactly, the reference's to float32 rounding, and the counters zero again, twice
    over the same counters (as layer after layer, or a graph's replays, use them)."""
    q, k, v, tables, starts, lens, sinks = _case(lengths, window, shifted=shifted)
    arrivals = torch.zeros(len(lengths) * k.shape[1] + 3, dtype=torch.int32, device=DEVICE)
    args = (q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK)
    two_launches = decode_attention(*args, splits=splits)
    for _ in range(2):
        got = decode_attention(*args, splits=splits, arrivals=arrivals)
        assert torch.equal(got, two_launches)
        assert not arrivals.any()
    torch.testing.assert_close(got, decode_attention_reference(*args), rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_too_few_arrival_counters() -> None:
    q, k, v, tables, starts, lens, sinks = _case([5, 9], 0)
    arrivals = torch.zeros(3, dtype=torch.int32, device=DEVICE)  # 2 sequences x 2 KV heads need 4
    with pytest.raises(ValueError, match="arrivals"):
        decode_attention(q, k, v, tables, starts, lens, sinks, 0.25, 0, BLOCK, arrivals=arrivals)


def test_more_splits_than_blocks_leave_empty_splits_harmless() -> None:
    """A 3-token context over 8 splits: most splits see no key and must weigh nothing in the merge."""
    q, k, v, tables, starts, lens, sinks = _case([3, 2], 0)
    got = decode_attention(q, k, v, tables, starts, lens, sinks, 0.5, 0, BLOCK, splits=8)
    expected = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.5, 0, BLOCK)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_query_head_per_kv_head_and_bfloat16() -> None:
    q, k, v, tables, starts, lens, sinks = _case([9, 20], 0, heads=4, kv_heads=4, dim=32, seed=3)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = decode_attention(q, k, v, tables, starts, lens, sinks, 0.2, 0, BLOCK)
    expected = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.2, 0, BLOCK)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=2**-6)


def test_the_reference_agrees_with_the_models_attention() -> None:
    """The twin itself, against the model's spec-level attention on the same keys laid out per sequence."""
    from model.batch import AttentionMetadata
    from model.kernels.attention import KVView, attend_reference

    lengths, window = [5, 11], 8
    q, k, v, tables, starts, lens, sinks = (t.cpu() for t in _case(lengths, window, seed=9))
    width = max(lengths)
    keys = torch.zeros(len(lengths), width, k.shape[1], k.shape[2])
    values = torch.zeros_like(keys)
    positions = torch.full((len(lengths), width), -1, dtype=torch.int64)
    for s, n in enumerate(lengths):
        for p in range(max(n - window, 0), n):
            slot = int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK
            keys[s, p], values[s, p], positions[s, p] = k[slot], v[slot], p
    meta = AttentionMetadata.build([1, 1], lengths)
    spec = attend_reference(q, KVView(keys, values, positions), meta, sinks, 0.25, window)
    ours = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK)
    torch.testing.assert_close(ours.reshape(spec.shape), spec, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_at_the_seam_every_step_stores_and_attends_as_the_reference(
    case: str, window: int, dtype: torch.dtype
) -> None:
    """Through the attention seam on the engine's kind of paged cache, decodes (the split kernel), prompts,
    chunks after cached tokens and mixed steps (the varlen kernel): the same cache after the store, and the
    same output, as the reference. bfloat16: within the torch paths' tolerance (3e-2 at outputs of about 1:
    a few bf16 ulps, the probabilities rounded to bf16 for the second dot as on the GPU)."""
    check_twin(TritonAttention(_no_fallback), case, window, False, dtype, device=DEVICE.type)


def _no_fallback(*args: object) -> torch.Tensor:
    raise AssertionError("the kernels take every step of a supported shape")


def test_shapes_the_kernels_do_not_take_go_to_the_fallback() -> None:
    """Three query heads per KV head (not a power of two): the torch path, and its result."""
    q, k, v, meta, kv, sinks = random_paged_case(8, [1, 5], [9, 5], 0, heads=6, kv_heads=2)
    calls = []

    def fallback(*args: object) -> torch.Tensor:
        calls.append(args)
        return Kernels.for_device("cpu").attention(*args)  # type: ignore[arg-type]

    got = TritonAttention(fallback)(q, k, v, meta, kv, sinks, 0.25, 0)
    assert len(calls) == 1
    torch.testing.assert_close(got, attention_reference(q, k, v, meta, kv, sinks, 0.25, 0), rtol=0, atol=1e-5)


# -- the varlen kernel --------------------------------------------------------------------------------------


def _varlen_case(
    q_lens: list[int],
    ctx_lens: list[int],
    window: int,
    *,
    heads: int = 8,
    kv_heads: int = 2,
    dim: int = 16,
    block: int = BLOCK,
    seed: int = 0,
    shifted: bool = True,
) -> tuple[torch.Tensor, ...]:
    """A shuffled pool of blocks, each sequence's table pointing into it, as the engine hands a step's: from
    the block of the oldest key its first query's window reaches (`shifted`; else from position 0 with
    released blocks, -1, below it), and random queries, cache and sinks (one head without a sink)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block) for n in ctx_lens]
    pool = sum(blocks_needed) + 3
    order = torch.randperm(pool, generator=generator).tolist()
    tables = torch.full((len(ctx_lens), max(blocks_needed) + 2), -1, dtype=torch.int32)
    starts = torch.zeros(len(ctx_lens), dtype=torch.int64)
    taken = 0
    for s, (q, n, count) in enumerate(zip(q_lens, ctx_lens, blocks_needed, strict=True)):
        first = max(n - q - window + 1, 0) // block if window else 0
        column_zero = first if shifted else 0
        starts[s] = column_zero * block
        for j in range(first, count):
            tables[s, j - column_zero] = order[taken]
            taken += 1
    k = torch.randn(pool * block, kv_heads, dim, generator=generator)
    v = torch.randn(pool * block, kv_heads, dim, generator=generator)
    q = torch.randn(sum(q_lens), heads, dim, generator=generator)
    sinks = torch.randn(heads, generator=generator)
    sinks[1] = float("-inf")
    query_starts = torch.tensor([0, *q_lens]).cumsum(0)
    lens = torch.tensor(ctx_lens)
    return tuple(t.to(DEVICE) for t in (q, k, v, tables, starts, query_starts, lens, sinks))


VARLEN_CASES = {
    "prefill": ([13], [13]),
    "prefill-of-many-tiles": ([45], [45]),
    "extend-after-a-prefix": ([10], [37]),
    "mixed-decodes-and-chunks": ([1, 7, 1, 1, 22, 3], [30, 11, 4, 9, 22, 40]),
    "decodes-only": ([1, 1, 1], [1, 17, 64]),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize(("window", "shifted"), [(0, False), (6, True), (6, False)])
def test_varlen_attention_matches_its_twin(case: str, window: int, shifted: bool) -> None:
    """Tiles of 4 tokens of 4 heads (16 rows) over 16 keys a step, on 4-token blocks: queries and keys cross
    tile and block boundaries, windows start inside a block. float32 throughout (dots exact): to 1e-5."""
    q_lens, ctx_lens = VARLEN_CASES[case]
    q, k, v, tables, starts, query_starts, lens, sinks = _varlen_case(
        q_lens, ctx_lens, window, shifted=shifted
    )
    got = varlen_attention(
        q, k, v, tables, starts, query_starts, lens, sinks, 0.25, window, BLOCK, max(q_lens), block_m=16,
        block_n=16,
    )  # fmt: skip
    expected = varlen_attention_reference(
        q, k, v, tables, starts, query_starts, lens, sinks, 0.25, window, BLOCK
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 16])
def test_varlen_attention_on_blocks_smaller_and_larger_than_its_key_step(block: int) -> None:
    """One-token blocks (the contiguous cache's) and 16-token blocks with 32 keys a step: a step's keys come
    from many blocks, or a block spans steps; a 32-row tile holds 8 tokens of 4 heads."""
    q_lens, ctx_lens = [1, 19, 6], [50, 19, 70]
    for window in (0, 7):
        q, k, v, tables, starts, query_starts, lens, sinks = _varlen_case(
            q_lens, ctx_lens, window, block=block, seed=4
        )
        got = varlen_attention(
            q, k, v, tables, starts, query_starts, lens, sinks, 0.3, window, block, 19, block_m=32,
            block_n=32,
        )  # fmt: skip
        expected = varlen_attention_reference(
            q, k, v, tables, starts, query_starts, lens, sinks, 0.3, window, block
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_varlen_attention_in_bfloat16_with_one_query_head_per_kv_head() -> None:
    """bfloat16 queries and cache, 4 query heads on 4 KV heads of 32: within 2**-6 of the float32 twin on
    the same bf16 values (outputs of about 1; the probabilities enter the second dot in bf16, as on the
    GPU, and the interpreter truncates casts where the GPU rounds)."""
    q, k, v, tables, starts, query_starts, lens, sinks = _varlen_case(
        [9, 1, 14], [20, 33, 14], 0, heads=4, kv_heads=4, dim=32, seed=3
    )
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = varlen_attention(q, k, v, tables, starts, query_starts, lens, sinks, 0.2, 0, BLOCK, 14, block_m=16)
    expected = varlen_attention_reference(q, k, v, tables, starts, query_starts, lens, sinks, 0.2, 0, BLOCK)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=2**-6)


def test_the_varlen_twin_agrees_with_the_models_attention() -> None:
    """The twin itself, against the model's spec-level attention on the same keys laid out per sequence."""
    q_lens, ctx_lens, window = [3, 1, 9], [8, 12, 9], 4
    q, k, v, tables, starts, query_starts, lens, sinks = (
        t.cpu() for t in _varlen_case(q_lens, ctx_lens, window, seed=5)
    )
    width = max(ctx_lens)
    keys = torch.zeros(len(q_lens), width, k.shape[1], k.shape[2])
    values = torch.zeros_like(keys)
    positions = torch.full((len(q_lens), width), -1, dtype=torch.int64)
    for s, (n, start) in enumerate(zip(ctx_lens, starts.tolist(), strict=True)):
        for p in range(max(n - q_lens[s] - window + 1, 0), n):
            slot = int(tables[s, p // BLOCK - start // BLOCK]) * BLOCK + p % BLOCK
            keys[s, p], values[s, p], positions[s, p] = k[slot], v[slot], p
    meta = AttentionMetadata.build(q_lens, ctx_lens)
    spec = attend_reference(q, KVView(keys, values, positions), meta, sinks, 0.25, window)
    ours = varlen_attention_reference(q, k, v, tables, starts, query_starts, lens, sinks, 0.25, window, BLOCK)
    torch.testing.assert_close(ours.reshape(spec.shape), spec, rtol=1e-5, atol=1e-6)


def test_store_kv_writes_keys_and_values_at_their_slots_and_skips_negative_ones() -> None:
    """Strided new keys and values (a view of a wider projection, as the model hands them), 3 heads of 16
    (a row of 48, padded to 64 in the kernel), bf16 into a float32 cache: as two index_copy_, and a slot of
    -1 writes nothing."""
    generator = torch.Generator().manual_seed(6)
    qkv = torch.randn(21, 2 * 3 * 16 + 5, generator=generator).to(DEVICE)
    k = qkv[:, :48].unflatten(-1, (3, 16))
    v = qkv[:, 48:96].unflatten(-1, (3, 16)).bfloat16()
    slots = torch.randperm(40, generator=generator)[:21].to(DEVICE)
    slots[4] = -1
    k_cache, v_cache = torch.zeros(40, 3, 16, device=DEVICE), torch.zeros(40, 3, 16, device=DEVICE)
    store_kv(k, v, k_cache, v_cache, slots, block_tokens=8)
    keep = slots >= 0
    expected_k = torch.zeros_like(k_cache).index_copy_(0, slots[keep], k[keep])
    expected_v = torch.zeros_like(v_cache).index_copy_(0, slots[keep], v[keep].float())
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_without_a_cache_the_kernel_reads_the_steps_own_keys() -> None:
    q, k, v, meta, _, sinks = random_paged_case(4, [9, 1, 6], [9, 1, 6], 0, heads=8, kv_heads=2)
    for window in (0, 4):
        expected = attention_reference(q, k, v, meta, None, sinks, 0.25, window)
        got = Kernels.triton().attention(q, k, v, meta, None, sinks, 0.25, window)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_tiny_model_through_the_triton_attention_gives_the_torch_kernels_logits() -> None:
    """The tiny preset with an 8-token window, random weights, float32: a prompt in one forward, another in
    chunks of 7 and 12 beside the first one's decodes (prefix hits and chunked prefill look the same: a
    chunk after cached tokens), through the contiguous cache, and a prompt without a cache; every forward's
    logits as the torch kernels' on the same weights, each path on its own cache."""
    config = dataclasses.replace(PRESETS["tiny"], sliding_window=8, vocab_size=512)
    model = random_model(config, device=DEVICE, dtype=torch.float32, seed=2)
    prompts = [list(range(3, 23)), [(5 * i) % 500 + 1 for i in range(19)]]
    steps = [
        ([20], [20], [0]),
        ([1, 7], [21, 7], [0, 1]),
        ([1, 12], [22, 19], [0, 1]),
        ([1, 1], [23, 20], [0, 1]),
    ]
    logits: dict[str, list[torch.Tensor]] = {}
    torch_kernels = Kernels.for_device(DEVICE)
    # The torch experts on both paths: the attention is what differs (the Triton MoE has its own tests).
    triton_kernels = Kernels(Kernels.triton().attention, torch_kernels.experts)
    for name, kernels in (("torch", torch_kernels), ("triton", triton_kernels)):
        model.use_kernels(kernels)
        cache = ContiguousKVCache(config, 2, 32, dtype=torch.float32, device=DEVICE)
        out = [
            model(torch.tensor(prompts[1][:9], device=DEVICE), AttentionMetadata.build([9], device=DEVICE))
        ]
        generated = [[], []]
        for q_lens, ctx_lens, slots in steps:
            ids = []
            for slot, q, c in zip(slots, q_lens, ctx_lens, strict=True):
                sequence = prompts[slot] + generated[slot]
                ids += sequence[c - q : c]
            meta = AttentionMetadata.build(q_lens, ctx_lens, cache_slots=slots, device=DEVICE)
            last = torch.tensor(q_lens, device=DEVICE).cumsum(0) - 1
            step = model(torch.tensor(ids, device=DEVICE), meta, cache, logits_indices=last)
            out.append(step)
            for row, (slot, c) in enumerate(zip(slots, ctx_lens, strict=True)):
                if c >= len(prompts[slot]):
                    generated[slot].append(int(step[row].argmax()))
        logits[name] = out
    for got, expected in zip(logits["triton"], logits["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
