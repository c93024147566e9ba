"""The engine end to end on a tiny real model: batching, chunking, preemption and the prefix cache change
nothing in what a request gets."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from engine.core import EngineCore
from engine.request import FinishReason, RequestOutput, RequestRejected, SamplingParams
from engine.thread import EngineThread
from model.gpt_oss import GptOss
from tests.engine.conftest import greedy_reference, make_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def _prompts(n: int, seed: int, vocab: int = 200_000, lengths: tuple[int, int] = (1, 60)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def _run(
    engine: EngineCore, prompts: list[list[int]], params: list[SamplingParams]
) -> dict[str, RequestOutput]:
    """All requests at once; returns each request's tokens gathered into one output."""
    merged: dict[str, RequestOutput] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id not in merged:
                merged[out.request_id] = RequestOutput(
                    out.request_id, [], [] if out.logprobs is not None else None
                )
            merged[out.request_id].new_token_ids += out.new_token_ids
            if out.logprobs is not None:
                merged[out.request_id].logprobs += out.logprobs  # type: ignore[operator]
            merged[out.request_id].finish_reason = out.finish_reason
            merged[out.request_id].num_cached_tokens = out.num_cached_tokens
    return merged


def test_greedy_batch_equals_full_recomputation_alone(tiny_model: GptOss) -> None:
    prompts = _prompts(10, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=random.Random(i).randint(1, 14)) for i in range(10)]
    # A small token budget chunks the longer prompts and mixes them with other requests' decodes.
    engine = make_engine(tiny_model, max_num_batched_tokens=24)
    outputs = _run(engine, prompts, params)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        assert outputs[f"r{i}"].new_token_ids == greedy_reference(tiny_model, prompt, p.max_tokens)
        assert outputs[f"r{i}"].finish_reason is FinishReason.LENGTH
    assert engine.stats().num_steps > 14


def test_preempted_requests_resume_with_the_same_output(tiny_model: GptOss) -> None:
    prompts = _prompts(8, seed=2, lengths=(20, 40))
    params = [SamplingParams(temperature=0.0, max_tokens=16)] * 8
    # Room for about three requests at a time: the newest get preempted and recomputed.
    engine = make_engine(
        tiny_model, kv_cache_memory=None, max_num_batched_tokens=64, enable_prefix_caching=False
    )
    engine = _with_blocks(tiny_model, full_blocks=40, max_model_len=160, enable_prefix_caching=False)
    outputs = _run(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"].new_token_ids == greedy_reference(tiny_model, prompt, 16)
    _assert_all_free(engine)


def _with_blocks(model: GptOss, *, full_blocks: int, **overrides: object) -> EngineCore:
    """An engine whose full-attention pool has exactly `full_blocks` blocks of 4 tokens."""
    engine = make_engine(model, num_kv_blocks=full_blocks, **overrides)
    assert engine.scheduler.kv.full.num_blocks == full_blocks
    return engine


def _assert_all_free(engine: EngineCore) -> None:
    assert engine.scheduler.kv.full.num_free == engine.scheduler.kv.full.num_blocks
    assert engine.scheduler.kv.sliding.num_free == engine.scheduler.kv.sliding.num_blocks
    assert not engine.scheduler.kv.full_tables
    assert not engine.scheduler.kv.sliding_tables


def test_prefix_cache_hits_and_changes_nothing(tiny_model: GptOss) -> None:
    """A shared prefix longer than the window: later requests reuse its blocks, with the same tokens."""
    rng = random.Random(3)
    shared = [rng.randrange(200_000) for _ in range(45)]
    prompts = [shared + [rng.randrange(200_000) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    cached = make_engine(tiny_model)
    first = _run(cached, prompts[:1], [GREEDY])
    later = _run(cached, prompts[1:], [GREEDY] * 4)
    assert first["r0"].num_cached_tokens == 0
    hits = [later[f"r{i}"].num_cached_tokens for i in range(4)]
    assert all(h >= 40 for h in hits), hits  # whole blocks of the shared prefix, past the 16-token window
    assert cached.stats().prefix_cache_hit_rate > 0.5
    for i, prompt in enumerate(prompts[1:]):
        assert later[f"r{i}"].new_token_ids == greedy_reference(tiny_model, prompt, GREEDY.max_tokens)


def test_prefix_cache_reuses_a_finished_conversation_turn(tiny_model: GptOss) -> None:
    """Multi-turn: the next prompt is the previous prompt plus its output plus more; the cache covers it."""
    engine = make_engine(tiny_model)
    prompt = _prompts(1, seed=4, lengths=(30, 30))[0]
    turn1 = _run(engine, [prompt], [GREEDY])["r0"].new_token_ids
    follow_up = prompt + turn1 + [17, 18, 19, 20, 21]
    turn2 = _run(engine, [follow_up], [GREEDY])["r0"]
    assert turn2.num_cached_tokens >= 40
    assert turn2.new_token_ids == greedy_reference(tiny_model, follow_up, GREEDY.max_tokens)


def test_seeded_sampling_is_reproducible_across_batches(tiny_model: GptOss) -> None:
    prompt = _prompts(1, seed=5, lengths=(10, 10))[0]
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=10)
    alone = _run(make_engine(tiny_model), [prompt], [seeded])["r0"].new_token_ids
    others = _prompts(5, seed=6)
    crowd = _run(
        make_engine(tiny_model),
        [*others[:3], prompt, *others[3:]],
        [SamplingParams(temperature=1.0, max_tokens=8)] * 3
        + [seeded]
        + [SamplingParams(temperature=0.7)] * 2,
    )
    assert crowd["r3"].new_token_ids == alone
    other_seed = _run(
        make_engine(tiny_model), [prompt], [SamplingParams(temperature=1.0, seed=43, max_tokens=10)]
    )
    assert other_seed["r0"].new_token_ids != alone


def test_stop_tokens_stop_strings_and_limits(tiny_model: GptOss) -> None:
    prompt = _prompts(1, seed=7, lengths=(12, 12))[0]
    reference = greedy_reference(tiny_model, prompt, 10)
    stop_at = reference[4]
    first = reference.index(stop_at)
    out = _run(
        make_engine(tiny_model), [prompt], [SamplingParams(temperature=0.0, stop_token_ids=[stop_at])]
    )["r0"]
    assert out.new_token_ids == reference[: first + 1]
    assert out.finish_reason is FinishReason.STOP

    # The context limit ends a request with `length`, and a prompt that fills it is refused.
    engine = make_engine(tiny_model, max_model_len=16)
    out = _run(engine, [prompt], [SamplingParams(temperature=0.0, max_tokens=100)])["r0"]
    assert len(out.new_token_ids) == 4
    assert out.finish_reason is FinishReason.LENGTH
    with pytest.raises(RequestRejected, match="context is 16 tokens"):
        engine.add_request("long", list(range(16)), GREEDY)
    with pytest.raises(RequestRejected, match="token ids"):
        engine.add_request("bad", [tiny_model.config.vocab_size], GREEDY)
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("empty", [], GREEDY)


def test_stop_strings_match_across_token_boundaries(tiny_model: GptOss) -> None:
    prompt = _prompts(1, seed=8, lengths=(12, 12))[0]
    reference = greedy_reference(tiny_model, prompt, 8)

    def token_bytes(t: int) -> bytes:
        return f"<{t}>".encode()

    # The stop string spans the end of one token and the start of the next.
    stop = f"{reference[2]}><{reference[3]}"
    engine = EngineCore(tiny_model, make_engine(tiny_model).config, token_bytes=token_bytes)
    engine.add_request("s", prompt, SamplingParams(temperature=0.0, stop=[stop], max_tokens=8))
    tokens: list[int] = []
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            final = out
    assert final is not None
    assert tokens == reference[:4]
    assert (final.finish_reason, final.stop_reason) == (FinishReason.STOP, stop)
    with pytest.raises(RequestRejected, match="stop strings"):
        make_engine(tiny_model).add_request("x", prompt, SamplingParams(stop=["a"]))


def test_logits_processors_force_tokens_per_request(tiny_model: GptOss) -> None:
    forced = [5, 6, 7, 8]

    def force(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        row = torch.full_like(logits, float("-inf"))
        row[forced[len(output)]] = 0.0
        return row

    prompts = _prompts(2, seed=9)
    outputs = _run(
        make_engine(tiny_model),
        prompts,
        [SamplingParams(temperature=0.8, max_tokens=4, logits_processors=[force]), GREEDY],
    )
    assert outputs["r0"].new_token_ids == forced
    assert outputs["r1"].new_token_ids == greedy_reference(tiny_model, prompts[1], GREEDY.max_tokens)


def test_logprobs_come_back_per_token(tiny_model: GptOss) -> None:
    prompt = _prompts(1, seed=10)[0]
    out = _run(
        make_engine(tiny_model), [prompt], [SamplingParams(temperature=0.0, max_tokens=3, logprobs=5)]
    )["r0"]
    assert out.logprobs is not None
    assert len(out.logprobs) == 3
    for token, lp in zip(out.new_token_ids, out.logprobs, strict=True):
        assert lp.token_id == token
        assert len(lp.top) == 5
        assert lp.top[0][0] == token  # greedy: the sampled token is the most likely one
        assert lp.logprob == pytest.approx(lp.top[0][1])


def test_abort_ends_a_request_and_frees_its_blocks(tiny_model: GptOss) -> None:
    engine = make_engine(tiny_model)
    engine.add_request("a", _prompts(1, seed=11, lengths=(30, 30))[0], SamplingParams(max_tokens=50))
    engine.add_request("b", _prompts(1, seed=12)[0], SamplingParams(max_tokens=3))
    engine.step()
    engine.abort("a")
    engine.abort("unknown")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "a"]
    assert aborted[0].finish_reason is FinishReason.ABORT
    while engine.has_unfinished():
        engine.step()
    _assert_all_free(engine)


def test_stats_follow_the_work(tiny_model: GptOss) -> None:
    engine = make_engine(tiny_model)
    for i, prompt in enumerate(_prompts(3, seed=13)):
        engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=4))
    before = engine.stats()
    assert (before.num_waiting, before.num_running, before.kv_blocks_used) == (3, 0, 0)
    finished = [o for o in engine.step() if o.finished]
    during = engine.stats()
    assert during.num_running == 3
    assert during.kv_blocks_used > 0
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    after = engine.stats()
    assert after.kv_blocks_used == 0
    assert after.tokens_per_step > 1
    # Each request's times come once, with its last output.
    assert len(finished) == 3
    for out in finished:
        assert out.time_to_first_token is not None
        assert out.latency is not None
        assert 0 < out.time_to_first_token < out.latency


def test_engine_thread_serves_callers_from_other_threads(tiny_model: GptOss) -> None:
    thread = EngineThread(make_engine(tiny_model))
    prompts = _prompts(6, seed=14)
    results: dict[str, list[int]] = {f"t{i}": [] for i in range(6)}
    done = {rid: threading.Event() for rid in results}
    finish: dict[str, FinishReason | None] = {}

    def callback_for(rid: str):
        def callback(out: RequestOutput) -> None:
            results[rid].extend(out.new_token_ids)
            if out.finished:
                finish[rid] = out.finish_reason
                done[rid].set()

        return callback

    try:
        workers = [
            threading.Thread(target=thread.add_request, args=(f"t{i}", p, GREEDY, callback_for(f"t{i}")))
            for i, p in enumerate(prompts)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for rid in results:
            assert done[rid].wait(60)
        for i, prompt in enumerate(prompts):
            assert results[f"t{i}"] == greedy_reference(tiny_model, prompt, GREEDY.max_tokens)
        with pytest.raises(RequestRejected):
            thread.add_request("bad", [], GREEDY, callback_for("t0"))
    finally:
        thread.stop()


def test_a_failing_step_aborts_its_requests_and_the_engine_goes_on(tiny_model: GptOss) -> None:
    def explode(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    thread = EngineThread(make_engine(tiny_model))
    seen: dict[str, RequestOutput] = {}
    done = {rid: threading.Event() for rid in ("bad", "good")}

    def record(out: RequestOutput) -> None:
        if out.finished:
            seen[out.request_id] = out
            done[out.request_id].set()

    try:
        thread.add_request("bad", [1, 2, 3], SamplingParams(logits_processors=[explode]), record)
        assert done["bad"].wait(60)
        assert seen["bad"].finish_reason is FinishReason.ABORT
        assert "boom" in (seen["bad"].error or "")
        thread.add_request("good", [1, 2, 3], GREEDY, record)
        assert done["good"].wait(60)
        assert seen["good"].finish_reason is FinishReason.LENGTH
    finally:
        thread.stop()


def test_the_triton_path_gives_the_tokens_of_full_recomputation(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The engine on a model built with the Triton kernels (every step's attention through the paged kernels,
    chunks after cached tokens and decodes beside them included, decode steps' MoE too; without a GPU,
    under Triton's interpreter): prompts longer than the window, chunked, batched."""
    from model.kernels import Kernels
    from tests.engine.conftest import WINDOW16, write_checkpoint

    path = write_checkpoint(WINDOW16, tmp_path_factory.mktemp("engine-triton"), layout="hf", seed=7)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GptOss.from_checkpoint(
        path, device=device, dtype=torch.float32, kernels=Kernels.triton(), progress=False
    )
    reference = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)
    prompts = _prompts(2, seed=21, lengths=(18, 30))
    outputs = _run(
        make_engine(model, max_num_batched_tokens=24),
        prompts,
        [SamplingParams(temperature=0.0, max_tokens=4)] * 2,
    )
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"].new_token_ids == greedy_reference(reference, prompt, 4)
