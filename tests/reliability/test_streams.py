"""Streams under churn: clients that hang up mid-way must not leak KV blocks, and more long requests than the
KV pool holds must all end (completed, or refused clearly) in bounded time, with no deadlock."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.reliability.conftest import (
    MODEL,
    StreamResult,
    blocks_in_use,
    final_script,
    read_chat_stream,
    serve,
    wait_until_idle,
)

STREAMS = 200
DROP_EVERY = 10  # streams i with i % 10 < 3 hang up: 30%
DROPPED = 3
CONCURRENCY = 24


def _chat_body(script: str, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "test_force": script,
        **extra,
    }


def test_dropped_streams_leak_no_kv_blocks(checkpoint: Path, summary: Callable[[str], None]) -> None:
    text = " ".join(f"word{i}" for i in range(12))
    started = time.perf_counter()
    with serve(checkpoint, engine={"max_num_seqs": 32}) as served:

        def one(i: int) -> tuple[int, StreamResult]:
            drop = i % DROP_EVERY < DROPPED
            with httpx.stream(
                "POST",
                served.base_url + "/v1/chat/completions",
                json=_chat_body(final_script(text)),
                timeout=120,
            ) as response:
                return i, read_chat_stream(response, stop_after=2 + i % 5 if drop else None)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = dict(pool.map(one, range(STREAMS)))
        wait_until_idle(served, timeout=60)
        in_flight = len(served.engine.scheduler.requests)
        full_used, sliding_used = blocks_in_use(served)
        total = served.engine.scheduler.kv.full.num_blocks
    elapsed = time.perf_counter() - started
    kept = {i: r for i, r in results.items() if i % DROP_EVERY >= DROPPED}
    bad = {i: r for i, r in kept.items() if not (r.terminal and r.error is None and r.content == text)}
    summary(
        f"{STREAMS} streams, {STREAMS - len(kept)} dropped mid-way: {len(kept) - len(bad)}/{len(kept)} kept streams "
        f"complete; afterwards {in_flight} requests in the engine, {full_used}/{total} full-attention and "
        f"{sliding_used} sliding KV blocks held; {elapsed:.1f} s"
    )
    assert not bad, f"{len(bad)} of {len(kept)} kept streams did not complete: {dict(list(bad.items())[:3])}"
    assert in_flight == 0, f"{in_flight} requests still in the engine after every client finished or left"
    assert (full_used, sliding_used) == (0, 0), (
        f"leaked KV blocks: {full_used} full-attention, {sliding_used} sliding still held"
    )


KV_BLOCKS = 16  # 256 tokens of full-attention KV: room for one long request, not for eight
LONG = 8


def test_kv_exhaustion_completes_or_refuses_without_deadlock(
    checkpoint: Path, summary: Callable[[str], None]
) -> None:
    """Eight requests of ~200 tokens each (prompt plus forced output) against a pool of 256 tokens: the
    scheduler must preempt and finish them all (or refuse some clearly), inside a bounded time."""
    text = " ".join(f"tok{i}" for i in range(60))  # ~120 tokens of forced output
    prompt = "Please repeat. " * 10
    bound = 150.0
    started = time.perf_counter()
    with serve(checkpoint, engine={"num_kv_blocks": KV_BLOCKS, "max_model_len": KV_BLOCKS * 16}) as served:
        expected_tokens = len(served.encoding.encode(text))

        def one(i: int) -> tuple[str, StreamResult]:
            body = _chat_body(final_script(text), max_tokens=expected_tokens + 8)
            body["messages"] = [{"role": "user", "content": prompt + str(i)}]
            if i % 2:  # half streamed, half not
                with httpx.stream(
                    "POST", served.base_url + "/v1/chat/completions", json=body, timeout=bound
                ) as response:
                    return "stream", read_chat_stream(response)
            body["stream"] = False
            response = httpx.post(served.base_url + "/v1/chat/completions", json=body, timeout=bound)
            result = StreamResult(response.status_code)
            payload = response.json()
            if response.status_code == 200:
                result.content = payload["choices"][0]["message"]["content"] or ""
                result.finish_reason = payload["choices"][0]["finish_reason"]
                result.done = True
            else:
                result.error = payload.get("error")
            return "plain", result

        with ThreadPoolExecutor(LONG) as pool:
            try:
                results = list(pool.map(one, range(LONG)))
            except httpx.TimeoutException as error:
                results = []
                problem = f"a request hung past {bound:.0f} s: {error!r}"
            else:
                problem = None
        elapsed = time.perf_counter() - started
        wait_until_idle(served, timeout=30)
        preemptions = served.engine.scheduler.num_preemptions
        held = blocks_in_use(served)
    completed = [r for _, r in results if r.status == 200 and r.terminal and r.content == text]
    refused = [
        r
        for _, r in results
        if (400 <= r.status < 500 or r.status == 200)
        and r.error is not None
        and isinstance(r.error.get("message"), str)
    ]
    summary(
        f"{LONG} requests of ~{expected_tokens + 60} tokens on a {KV_BLOCKS * 16}-token KV pool: "
        f"{len(completed)} completed, {len(refused)} refused clearly, {preemptions} preemptions, "
        f"{elapsed:.1f} s (bound {bound:.0f} s); blocks held afterwards {held}"
    )
    assert problem is None, problem
    assert len(completed) + len(refused) == LONG, (
        f"{LONG - len(completed) - len(refused)} of {LONG} requests neither completed nor got a clear error: "
        f"{[r for _, r in results if r not in completed and r not in refused][:3]}"
    )
    assert completed, "no request completed: the pool holds one long request at a time"
    assert held == (0, 0), f"KV blocks held after every request ended: {held}"
