"""A randomized run against a small block pool: the block accounting holds after every step."""

from __future__ import annotations

import random

from engine.request import FinishReason, SamplingParams
from model.gpt_oss import GptOss
from tests.engine.conftest import make_engine
from tests.engine.invariants import check_invariants


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
        check_invariants(engine.scheduler)
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
