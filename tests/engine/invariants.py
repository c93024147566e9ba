"""The scheduler's and the KV books' invariants, checked after every step by the scheduler and stress tests."""

from __future__ import annotations

from collections import Counter

import numpy as np

from engine.kv_cache import NULL_BLOCK, BlockPool, KVCacheManager
from engine.request import RequestStatus
from engine.scheduler import Scheduler


def _check_pool(pool: BlockPool, tables: list[list[int]]) -> None:
    owners = Counter(b for table in tables for b in table if b != NULL_BLOCK)
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == owners.get(block, 0), f"block {block}: refs vs owners"
    assert set(pool.free) == {b for b in range(pool.num_blocks) if pool.ref_counts[b] == 0}
    assert len(pool.free) == len(set(pool.free))
    for key, block in pool.cached.items():
        assert pool.hash_of[block] == key


def check_invariants(scheduler: Scheduler) -> None:
    """Computed tokens never pass the request's tokens, blocks equal what those tokens fill, no block is owned
    twice, every request is in exactly one queue, and the block-table arrays mirror the lists."""
    kv = scheduler.kv
    bs = kv.block_size
    _check_pool(kv.full, list(kv.full_tables.values()))
    _check_pool(kv.sliding, list(kv.sliding_tables.values()))
    running = {r.request_id for r in scheduler.running}
    assert set(kv.full_tables) == running == set(kv.sliding_tables)
    for request in scheduler.running:
        assert request.status is RequestStatus.RUNNING
        # A placeholder (the overlapped loop's token in flight) counts as a token, and its KV as computed.
        assert request.num_pending_tokens in (0, 1)
        assert 0 < request.num_computed_tokens <= request.num_tokens + request.num_pending_tokens
        full = kv.full_tables[request.request_id]
        sliding = kv.sliding_tables[request.request_id]
        # Blocks match tokens: exactly the blocks the computed tokens fill.
        assert len(full) == len(sliding) == -(-request.num_computed_tokens // bs)
        # The blocks still being written are the request's own; only full blocks are shared.
        for i in range(request.num_computed_tokens // bs, len(full)):
            assert kv.full.ref_counts[full[i]] == 1
            assert kv.sliding.ref_counts[sliding[i]] == 1
        # The window of the next token is all present on the sliding layers.
        needed = range(max(0, request.num_computed_tokens - kv.window + 1) // bs, len(sliding))
        assert all(sliding[i] != NULL_BLOCK for i in needed)
    for request in scheduler.waiting:
        # A request preempted while its token was in flight got that token before the step returned.
        assert request.num_computed_tokens == request.num_pending_tokens == 0
        assert request.request_id not in kv.full_tables
    assert len(scheduler.running) <= scheduler.max_num_seqs
    queued = [r.request_id for r in scheduler.running] + [r.request_id for r in scheduler.waiting]
    assert sorted(queued) == sorted(scheduler.requests), "every request in flight is in exactly one queue"
    _check_table_arrays(kv)


def _check_table_arrays(kv: KVCacheManager) -> None:
    """The incrementally written block-table arrays equal arrays rebuilt from the lists: one row per request
    holding blocks, no row shared, NULL_BLOCK past each table and in every unused row."""
    assert set(kv.rows) == set(kv.full_tables)
    assert len(set(kv.rows.values())) == len(kv.rows)
    for books, mirror in ((kv.full_tables, kv.full_array.array), (kv.sliding_tables, kv.sliding_array.array)):
        rebuilt = np.full(mirror.shape, NULL_BLOCK, dtype=np.int64)
        for rid, table in books.items():
            rebuilt[kv.rows[rid], : len(table)] = table
        assert np.array_equal(mirror, rebuilt)
    for rid, table in kv.sliding_tables.items():
        released = kv.num_released[rid]
        assert all(b == NULL_BLOCK for b in table[:released])
