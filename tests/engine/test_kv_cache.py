"""The block manager alone: allocation is all or nothing, prefix hits respect the sliding window."""

from __future__ import annotations

import random

import numpy as np
import torch

from engine.kv_cache import NULL_BLOCK, BlockPool, KVCacheManager
from engine.paged_kv import StepShape, group_step, group_step_reference, plan_group
from engine.request import Request, SamplingParams


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), arrival_time=0.0, max_total_tokens=10_000)


def _manager(full: int = 16, sliding: int = 16, window: int = 8) -> KVCacheManager:
    return KVCacheManager(block_size=4, num_full_blocks=full, num_sliding_blocks=sliding, window=window)


def _compute(kv: KVCacheManager, request: Request) -> None:
    """Admit and 'compute' the whole request in one go, registering its blocks."""
    prefix = kv.find_cached_prefix(request)
    assert kv.allocate_slots(request, request.num_tokens - prefix.num_tokens, prefix)
    request.num_computed_tokens = request.num_tokens
    kv.register_computed(request)


def test_pool_evicts_cached_contents_only_when_reused() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"ka")
    pool.release(a)
    assert pool.lookup(b"ka") == a  # freed, still cached
    pool.touch(a)  # a prefix hit takes it back from the free queue
    assert pool.num_free == 0
    pool.release(a)
    pool.release(b)
    assert pool.allocate(1) == [a]  # least recently freed first, and its hash is gone
    assert pool.lookup(b"ka") is None


def test_the_last_prompt_token_is_always_recomputed() -> None:
    kv = _manager()
    first = _request("a", list(range(8)))
    _compute(kv, first)
    again = _request("b", list(range(8)))
    hit = kv.find_cached_prefix(again)
    assert hit.num_tokens == 4  # not 8: one token must be left to compute and sample from
    longer = _request("c", list(range(9)))
    assert kv.find_cached_prefix(longer).num_tokens == 8


def test_a_hit_needs_only_the_window_on_sliding_layers() -> None:
    kv = _manager(window=8)
    first = _request("a", list(range(40)))
    _compute(kv, first)
    second = _request("b", [*range(40), 99])
    hit = kv.find_cached_prefix(second)
    assert hit.num_tokens == 40
    assert hit.sliding_blocks is not None
    # Positions 33..39 are what the window of position 40 reaches: blocks 8 and 9; the rest are not needed.
    assert hit.sliding_blocks[:8] == [NULL_BLOCK] * 8
    assert NULL_BLOCK not in hit.sliding_blocks[8:]


def test_a_hit_shrinks_when_the_window_was_evicted() -> None:
    kv = _manager(full=32, sliding=12, window=8)
    first = _request("a", list(range(40)))
    _compute(kv, first)
    kv.free(first)  # tail first: the free queue is now 10, 11, then blocks 9, 8, ..., 0 of the request
    other = _request("x", [1000 + i for i in range(36)])
    assert kv.allocate_slots(other, 36)  # takes 9 blocks: 10, 11 and the request's blocks 9 down to 3
    second = _request("b", [*range(40), 99])
    hit = kv.find_cached_prefix(second)
    # Full blocks 0..9 are all still cached, but a hit of P tokens also needs the sliding blocks of positions
    # P-7..P-1: only blocks 0..2 survive, so the longest usable prefix is 12 tokens (blocks 1 and 2).
    assert hit.num_tokens == 12
    assert hit.full_blocks is not None
    assert len(hit.full_blocks) == 3
    assert hit.sliding_blocks is not None
    assert hit.sliding_blocks[0] == NULL_BLOCK
    assert all(kv.sliding.ref_counts[b] == 0 for b in hit.sliding_blocks[1:])


def test_allocation_is_all_or_nothing() -> None:
    kv = _manager(full=3, sliding=16)
    request = _request("a", list(range(20)))
    before = (kv.full.num_free, kv.sliding.num_free)
    assert not kv.allocate_slots(request, 20)  # needs 5 full blocks, 3 exist
    assert (kv.full.num_free, kv.sliding.num_free) == before
    assert "a" not in kv.full_tables
    assert kv.allocate_slots(request, 12)
    assert len(kv.full_tables["a"]) == 3


def test_sliding_blocks_behind_the_window_are_released() -> None:
    kv = _manager(full=64, sliding=64, window=8)
    request = _request("a", list(range(100)))
    assert kv.allocate_slots(request, 4)
    for _ in range(24):
        request.num_computed_tokens += 4
        assert kv.allocate_slots(request, 4)
    table = kv.sliding_tables["a"]
    live = [b for b in table if b != NULL_BLOCK]
    # Computing positions 96..99 needs keys from 89 on: blocks 22..24 (3 blocks), whatever the length.
    assert len(live) == 3
    assert len(kv.full_tables["a"]) == 25
    assert kv.sliding.num_used == 3


def test_step_indices_match_the_slot_by_slot_reference() -> None:
    """plan_group + group_step (numpy on the host, positions on the device) against the plain twin, on random
    tables and steps mixing decodes, prompt chunks and prefills, with and without a sliding window."""
    rng = random.Random(5)
    bs = 4
    offsets = torch.arange(1024)
    for trial in range(200):
        window = rng.choice([0, 0, 5, 8, 16])
        seqs = rng.randint(1, 6)
        query_lens = [rng.choice([1, 1, rng.randint(1, 30)]) for _ in range(seqs)]
        context_lens = [q + rng.choice([0, rng.randint(0, 60)]) for q in query_lens]
        tables = [rng.sample(range(500), -(-c // bs)) for c in context_lens]
        if window:  # blocks that fell out of the first new token's window were released
            for table, q, c in zip(tables, query_lens, context_lens, strict=True):
                for i in range(max(0, c - q - window + 1) // bs):
                    table[i] = NULL_BLOCK
        rows = rng.sample(range(10), seqs)
        array = np.full((10, 40), NULL_BLOCK, dtype=np.int64)
        for row, table in zip(rows, tables, strict=True):
            array[row, : len(table)] = table
        shape = StepShape.build(rows, query_lens, context_lens, bs)
        plan = plan_group(array, shape, bs, window)
        step = group_step(
            *(
                torch.from_numpy(x)
                for x in (plan.slot_mapping, plan.blocks.ravel(), plan.starts, shape.context_lens)
            ),
            offsets,
            bs,
        )
        slots, gather, key_positions = group_step_reference(tables, query_lens, context_lens, bs, window)
        assert shape.positions.tolist() == [
            p for q, c in zip(query_lens, context_lens, strict=True) for p in range(c - q, c)
        ], trial
        assert shape.seq_index.tolist() == [s for s, q in enumerate(query_lens) for _ in range(q)], trial
        assert shape.query_offset.tolist() == [i for q in query_lens for i in range(q)], trial
        assert step.slot_mapping.tolist() == slots, trial
        assert step.key_positions.tolist() == key_positions, trial
        # Slots read: block b's slots are b * bs + 0..bs-1; padding reads a real block, whatever it holds.
        read = (step.block_index[:, :, None] * bs + torch.arange(bs)).view(seqs, -1)
        present = step.key_positions >= 0
        assert torch.equal(read[present], torch.tensor(gather)[present]), trial
        assert bool((step.block_index >= 0).all()), trial
