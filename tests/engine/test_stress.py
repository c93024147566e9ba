"""A randomized run against a small block pool: the block accounting holds after every step."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from engine.core import EngineCore
from engine.kv_cache import NULL_BLOCK, BlockPool, KVCacheManager
from engine.request import FinishReason, RequestStatus, SamplingParams
from model.gpt_oss import GptOss
from tests.engine.conftest import make_engine


def _check_pool(pool: BlockPool, tables: list[list[int]]) -> None:
    owners = Counter(b for table in tables for b in table if b != NULL_BLOCK)
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == owners.get(block, 0), f"block {block}: refs vs owners"
    assert set(pool.free) == {b for b in range(pool.num_blocks) if pool.ref_counts[b] == 0}
    assert len(pool.free) == len(set(pool.free))
    for key, block in pool.cached.items():
        assert pool.hash_of[block] == key


def check_invariants(engine: EngineCore) -> None:
    kv: KVCacheManager = engine.scheduler.kv
    bs = kv.block_size
    _check_pool(kv.full, list(kv.full_tables.values()))
    _check_pool(kv.sliding, list(kv.sliding_tables.values()))
    running = {r.request_id for r in engine.scheduler.running}
    assert set(kv.full_tables) == running == set(kv.sliding_tables)
    for request in engine.scheduler.running:
        assert request.status is RequestStatus.RUNNING
        assert 0 < request.num_computed_tokens <= request.num_tokens
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
    for request in engine.scheduler.waiting:
        assert request.num_computed_tokens == 0
        assert request.request_id not in kv.full_tables
    assert len(engine.scheduler.running) <= engine.config.max_num_seqs
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


def test_a_thousand_random_requests_keep_the_books_straight(small_vocab_model: GptOss) -> None:
    rng = random.Random(2026)
    engine = make_engine(
        small_vocab_model, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128
    )
    vocab = small_vocab_model.config.vocab_size
    shared = [rng.randrange(vocab) for _ in range(24)]  # some prompts share a prefix: the cache gets hits
    total, added, aborted = 1000, 0, set()
    finished: dict[str, FinishReason] = {}
    live: list[str] = []
    steps = 0
    while added < total or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if added == total:
                break
            length = rng.randint(1, 40)
            prompt = (shared[: rng.randint(0, 24)] if rng.random() < 0.4 else []) + [
                rng.randrange(vocab) for _ in range(length)
            ]
            params = SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.0]),
                max_tokens=rng.randint(1, 12),
                seed=rng.choice([None, added]),
            )
            engine.add_request(f"q{added}", prompt[:100], params)
            live.append(f"q{added}")
            added += 1
        if live and rng.random() < 0.1:
            victim = rng.choice(live)
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = out.finish_reason  # type: ignore[assignment]
                live.remove(out.request_id)
        steps += 1
        check_invariants(engine)
        assert steps < 20_000, "the engine stopped making progress"

    assert len(finished) == total
    assert all(
        reason in (FinishReason.STOP, FinishReason.LENGTH)
        for rid, reason in finished.items()
        if rid not in aborted
    )
    assert any(reason is FinishReason.ABORT for reason in finished.values())
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small for everyone at once"
    assert stats.prefix_cache_hit_rate > 0
    assert engine.scheduler.kv.full.num_free == engine.scheduler.kv.full.num_blocks
    assert engine.scheduler.kv.sliding.num_free == engine.scheduler.kv.sliding.num_blocks
    assert stats.kv_blocks_used == 0
