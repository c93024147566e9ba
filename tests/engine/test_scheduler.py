"""The scheduler alone, driven by a fake runner: no model, no tensors.

The fake runner "computes" like a deterministic model: the token after a sequence is a hash of the whole
sequence, so a request recomputed after preemption, or served partly from the prefix cache, must still get
exactly the tokens it would get alone. It also checks, as the real runner relies on, that the plan's
block-table arrays hold a block for every token the step computes and every key its window reads.
"""

from __future__ import annotations

import random
import zlib
from array import array

import pytest

from engine.kv_cache import NULL_BLOCK, KVCacheManager
from engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams
from engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from tests.engine.invariants import check_invariants

BLOCK = 4
VOCAB = 1000


def next_token(tokens: list[int]) -> int:
    return zlib.crc32(array("i", tokens).tobytes()) % VOCAB


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    """What a request gets with nothing else running: the fake model's tokens one after another."""
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(tokens))
        tokens.append(out[-1])
    return out


def fake_runner(plan: SchedulerOutput, window: int) -> RunnerOutput:
    """One token for each request whose computed tokens reach its end this step; None for a prompt chunk."""
    assert plan.full_tables is not None
    assert plan.sliding_tables is not None
    tokens: list[int | None] = []
    for item in plan.scheduled:
        request = item.request
        start, end = request.num_computed_tokens, request.num_computed_tokens + item.num_new_tokens
        assert 0 < end <= request.num_tokens
        blocks = -(-end // BLOCK)
        assert (plan.full_tables[item.row, :blocks] != NULL_BLOCK).all()
        first_key = max(0, start - window + 1) // BLOCK
        assert (plan.sliding_tables[item.row, first_key:blocks] != NULL_BLOCK).all()
        tokens.append(next_token(request.all_token_ids[:end]) if end == request.num_tokens else None)
    return RunnerOutput(tokens, [None] * len(tokens))


class Harness:
    """A scheduler, its books and the fake runner; `step` checks the invariants after every step."""

    def __init__(
        self,
        *,
        full: int = 64,
        sliding: int = 64,
        window: int = 8,
        max_num_seqs: int = 8,
        budget: int = 16,
        prefix_caching: bool = True,
        token_bytes: dict[int, bytes] | None = None,
    ) -> None:
        self.window = window
        kv = KVCacheManager(
            block_size=BLOCK,
            num_full_blocks=full,
            num_sliding_blocks=sliding,
            window=window,
            enable_prefix_caching=prefix_caching,
        )
        self.scheduler = Scheduler(
            kv,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            token_bytes=None if token_bytes is None else token_bytes.__getitem__,
        )
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, RequestOutput] = {}
        self.plans: list[SchedulerOutput] = []

    def add(self, rid: str, prompt: list[int], **params: object) -> Request:
        sampling = SamplingParams(temperature=0.0, **params)  # type: ignore[arg-type]
        request = Request(
            rid, prompt, sampling, arrival_time=0.0, max_total_tokens=len(prompt) + sampling.max_tokens
        )
        self.scheduler.add(request)
        self.outputs[rid] = []
        return request

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.plans.append(plan)
        outputs = self.scheduler.update(plan, fake_runner(plan, self.window))
        self._record(outputs)
        check_invariants(self.scheduler)
        return outputs

    def abort(self, rid: str) -> RequestOutput | None:
        output = self.scheduler.abort(rid)
        if output is not None:
            self._record([output])
        check_invariants(self.scheduler)
        return output

    def _record(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            assert output.request_id not in self.finished, "an output after the request finished"
            self.outputs[output.request_id] += output.new_token_ids
            if output.finished:
                self.finished[output.request_id] = output

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler stopped making progress")

    def assert_all_free(self) -> None:
        kv = self.scheduler.kv
        assert kv.full.num_free == kv.full.num_blocks
        assert kv.sliding.num_free == kv.sliding.num_blocks
        assert not kv.full_tables
        assert not kv.rows


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(length)]


def test_a_long_prompt_is_chunked_by_the_budget_then_decodes_a_token_a_step() -> None:
    h = Harness(budget=8)
    prompt = list(range(21))
    request = h.add("a", prompt, max_tokens=3)
    chunks = []
    while h.scheduler.has_unfinished():
        outputs = h.step()
        chunks.append(h.plans[-1].num_tokens)
        # The first token comes with the last chunk of the prompt, not before.
        assert bool(outputs) == (request.num_computed_tokens >= len(prompt))
    assert chunks == [8, 8, 5, 1, 1]
    assert h.outputs["a"] == alone(prompt, 3)
    assert h.finished["a"].finish_reason is FinishReason.LENGTH
    assert h.finished["a"].num_prompt_tokens == 21
    h.assert_all_free()


def test_running_requests_go_first_and_waiting_ones_are_admitted_in_order() -> None:
    h = Harness(budget=10, max_num_seqs=3)
    for rid in "abcd":
        h.add(rid, list(range(ord(rid), ord(rid) + 6)), max_tokens=4)
    h.step()
    first = [(s.request.request_id, s.num_new_tokens) for s in h.plans[-1].scheduled]
    assert first == [("a", 6), ("b", 4)]  # b's prompt is cut by the budget; c waits
    h.step()
    second = [(s.request.request_id, s.num_new_tokens) for s in h.plans[-1].scheduled]
    assert second == [("a", 1), ("b", 2), ("c", 6)]  # d waits: three requests run at most
    h.run()
    for rid in "abcd":
        assert h.outputs[rid] == alone(list(range(ord(rid), ord(rid) + 6)), 4)


def test_out_of_blocks_the_newest_request_is_preempted_and_recomputed_to_the_same_tokens() -> None:
    rng = random.Random(1)
    # 12 full blocks of 4 tokens: three requests of 12 prompt + 8 output tokens cannot all stay.
    h = Harness(full=12, sliding=64, window=8, budget=64, prefix_caching=False)
    prompts = {rid: _prompt(rng, 12) for rid in "abc"}
    for rid, prompt in prompts.items():
        h.add(rid, prompt, max_tokens=8)
    preempted: list[str] = []
    while h.scheduler.has_unfinished():
        h.step()
        preempted += [r.request_id for r in h.plans[-1].preempted]
        for request in h.scheduler.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
    assert preempted
    assert "a" not in preempted, "the oldest request is never preempted for a newer one"
    for rid, prompt in prompts.items():
        assert h.outputs[rid] == alone(prompt, 8)
    h.assert_all_free()


def test_a_preempted_request_goes_back_to_the_front_of_the_queue() -> None:
    h = Harness(full=6, budget=64, max_num_seqs=4, prefix_caching=False)
    a = h.add("a", list(range(8)), max_tokens=12)
    b = h.add("b", list(range(100, 108)), max_tokens=12)
    h.step()  # both admitted: 2 + 2 blocks
    late = h.add("c", list(range(200, 204)), max_tokens=1)
    while not h.plans[-1].preempted:
        h.step()
    assert h.plans[-1].preempted == [b]
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert list(h.scheduler.waiting) == [b, late]
    assert a.status is RequestStatus.RUNNING
    h.run()
    assert h.outputs["b"] == alone(list(range(100, 108)), 12)


def test_a_shared_prefix_is_served_from_the_cache_in_whole_blocks() -> None:
    h = Harness(window=8)
    shared = list(range(500, 523))  # 23 tokens: five whole blocks, past the window
    h.add("first", [*shared, 1], max_tokens=2)
    h.run()
    second = h.add("second", [*shared, 2, 3], max_tokens=2)
    h.step()
    assert second.num_cached_tokens == 20  # the five whole blocks of the shared part
    assert h.plans[-1].scheduled[0].num_new_tokens == 5
    h.run()
    assert h.outputs["second"] == alone([*shared, 2, 3], 2)
    assert h.finished["second"].num_cached_tokens == 20
    assert h.scheduler.kv.prefix_hit_rate == pytest.approx(20 / (24 + 25))


def test_without_prefix_caching_nothing_is_reused() -> None:
    h = Harness(prefix_caching=False)
    h.add("first", list(range(20)), max_tokens=1)
    h.run()
    second = h.add("second", list(range(20)), max_tokens=1)
    h.step()
    assert second.num_cached_tokens == 0


def test_sliding_blocks_are_released_as_the_window_moves_on() -> None:
    """A long generation holds every full-attention block but only its window's sliding blocks."""
    h = Harness(window=8, budget=64)
    request = h.add("a", list(range(10)), max_tokens=40)
    kv = h.scheduler.kv
    while h.scheduler.has_unfinished():
        h.step()
        if request.status is RequestStatus.RUNNING:
            held = [b for b in kv.sliding_tables["a"] if b != NULL_BLOCK]
            # The window (8 tokens) spans at most three blocks of 4, plus the block being written.
            assert len(held) <= 8 // BLOCK + 2
            assert len(kv.full_tables["a"]) == -(-request.num_computed_tokens // BLOCK)
    assert h.outputs["a"] == alone(list(range(10)), 40)


def test_a_prefix_hit_needs_the_window_of_sliding_blocks_too() -> None:
    """Once a finished request's sliding blocks are reused by others, only the full-attention blocks remain
    cached; a hit needs the window's sliding blocks as well, so it shrinks to what is still whole."""
    h = Harness(full=64, sliding=8, window=8, budget=64, max_num_seqs=1)
    shared = list(range(300, 324))
    h.add("first", shared, max_tokens=1)
    h.run()
    # A different request takes every sliding block (evicting the cached ones), but few full blocks.
    h.add("other", list(range(600, 632)), max_tokens=1)
    h.run()
    again = h.add("again", [*shared, 7], max_tokens=1)
    h.step()
    assert again.num_cached_tokens == 0
    h.run()
    assert h.outputs["again"] == alone([*shared, 7], 1)


def test_aborts_free_waiting_running_and_preempted_requests() -> None:
    h = Harness(full=6, budget=64, max_num_seqs=4, prefix_caching=False)
    h.add("running", list(range(8)), max_tokens=12)
    h.add("preempted", list(range(100, 108)), max_tokens=12)
    h.step()
    h.add("waiting", list(range(200, 204)), max_tokens=4)
    while not h.plans[-1].preempted:
        h.step()
    assert [r.request_id for r in h.scheduler.waiting] == ["preempted", "waiting"]
    assert h.abort("nobody") is None
    for rid in ("waiting", "preempted", "running"):
        output = h.abort(rid)
        assert output is not None
        assert output.finish_reason is FinishReason.ABORT
    assert not h.scheduler.has_unfinished()
    assert h.abort("running") is None  # once only
    h.assert_all_free()


def test_update_stops_on_a_stop_token_a_stop_string_and_the_length() -> None:
    prompt = list(range(5))
    expected = alone(prompt, 10)
    h = Harness(token_bytes={t: f"<{t}>".encode() for t in range(VOCAB)})
    h.add("token", prompt, max_tokens=10, stop_token_ids=[expected[3]])
    h.add("string", prompt, max_tokens=10, stop=[f"{expected[5]}><{expected[6]}"])
    h.add("length", prompt, max_tokens=4)
    h.run()
    first = expected.index(expected[3])
    assert h.outputs["token"] == expected[: first + 1]
    assert h.finished["token"].stop_reason == expected[3]
    assert h.outputs["string"] == expected[:7]
    assert h.finished["string"].stop_reason == f"{expected[5]}><{expected[6]}"
    assert h.outputs["length"] == expected[:4]
    assert [h.finished[r].finish_reason for r in ("token", "string", "length")] == [
        FinishReason.STOP,
        FinishReason.STOP,
        FinishReason.LENGTH,
    ]


def test_fail_all_ends_every_request_with_the_error() -> None:
    h = Harness()
    h.add("a", list(range(6)), max_tokens=5)
    h.add("b", list(range(9)), max_tokens=5)
    h.step()
    h.add("c", list(range(3)), max_tokens=5)
    outputs = h.scheduler.fail_all("engine error: boom")
    assert sorted(o.request_id for o in outputs) == ["a", "b", "c"]
    assert all(o.finish_reason is FinishReason.ABORT and o.error == "engine error: boom" for o in outputs)
    check_invariants(h.scheduler)
    h.assert_all_free()


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_keeps_the_books_and_every_request_gets_its_own_tokens(seed: int) -> None:
    """Arrivals, aborts, shared prefixes and a pool too small for everyone at once; invariants after every
    step, and every request that was not aborted gets exactly the tokens it would get alone."""
    rng = random.Random(seed)
    h = Harness(full=30, sliding=40, window=8, max_num_seqs=6, budget=24)
    shared = _prompt(rng, 20)
    prompts: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    total, added = 300, 0
    for _ in range(20_000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if added < total:
                prompt = (shared[: rng.randint(0, 20)] if rng.random() < 0.5 else []) + _prompt(
                    rng, rng.randint(1, 30)
                )
                max_tokens = rng.randint(1, 12)
                prompts[f"r{added}"] = (prompt, max_tokens)
                h.add(f"r{added}", prompt, max_tokens=max_tokens)
                added += 1
        live = [rid for rid in prompts if rid not in h.finished]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            h.abort(victim)
            aborted.add(victim)
        if added == total and not h.scheduler.has_unfinished():
            break
        h.step()
    else:
        raise AssertionError("the scheduler stopped making progress")
    assert len(h.finished) == total
    assert sum(len(p.preempted) for p in h.plans) > 0, "the pool was meant to be too small"
    assert h.scheduler.kv.prefix_hit_rate > 0
    for rid, (prompt, max_tokens) in prompts.items():
        if rid in aborted:
            assert h.finished[rid].finish_reason is FinishReason.ABORT
            assert h.outputs[rid] == alone(prompt, max_tokens)[: len(h.outputs[rid])]
        else:
            assert h.outputs[rid] == alone(prompt, max_tokens), rid
    h.assert_all_free()
