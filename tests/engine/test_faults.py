"""Nothing one request brings into the engine can hurt another: values a step cannot compute are refused at
admission naming their field, and what still fails inside a step (a request's logits processor, parameters
changed after admission, its stop strings) fails that request alone while the batch goes on. A step that
fails as a whole still ends the requests it holds, and the engine thread survives it."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import FinishReason, RequestOutput, SamplingParams, SamplingParamsError
from engine.scheduler import RunnerOutput, SchedulerOutput
from engine.thread import FAILED_STEPS_ALARM, EngineThread
from model.gpt_oss import GptOss
from tests.engine.conftest import make_engine


@dataclass
class Gathered:
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None


def _run(engine: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Gathered]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    return _drain(engine)


def _drain(engine: EngineCore) -> dict[str, Gathered]:
    out: dict[str, Gathered] = {}
    while engine.has_unfinished():
        for o in engine.step():
            g = out.setdefault(o.request_id, Gathered())
            g.tokens += o.new_token_ids
            g.finish_reason, g.error = o.finish_reason, o.error
    return out


def _prompt(seed: int, n: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200_000) for _ in range(n)]


def _token_bytes(token: int) -> bytes:
    return bytes([token % 256])


def _engine(model: GptOss) -> EngineCore:
    return EngineCore(
        model,
        EngineConfig(block_size=4, kv_cache_memory=4 << 20, max_model_len=512),
        token_bytes=_token_bytes,
    )


# Victims of every kind of row: greedy, seeded random with each filter. Seeded rows draw from their own
# generator, so alone or in any batch they get the same tokens; unseeded random rows could not be compared.
# Each random victim has a top-k: the random model's distribution over 200k tokens is nearly flat, and there
# a batched forward's last-bit differences from a forward alone can move a draw to the neighbouring token.
VICTIMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=8),
    "seeded": SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=8),
    "filtered": SamplingParams(temperature=1.2, top_p=0.9, top_k=50, min_p=0.01, seed=2, max_tokens=8),
    "penalized": SamplingParams(temperature=0.0, frequency_penalty=1.5, logit_bias={5: 3.0}, max_tokens=8),
}


def _raises_at(count: int) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    def processor(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output) >= count:
            raise RuntimeError("a processor that breaks")
        return logits

    return processor


def _returns(
    row: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    return lambda output, logits: row(logits)


def _set(**fields: object) -> Callable[[SamplingParams], None]:
    """Change parameters after admission: what validation would refuse, reaching the step anyway."""

    def change(params: SamplingParams) -> None:
        for name, value in fields.items():
            setattr(params, name, value)

    return change


# (poisoned parameters, a change made after admission, what the poisoned request's error says)
POISONS = {
    "processor raises": (SamplingParams(max_tokens=8, logits_processors=[_raises_at(2)]), None, "breaks"),
    "processor bans every token": (
        SamplingParams(max_tokens=8, logits_processors=[_returns(lambda x: torch.full_like(x, -math.inf))]),
        None,
        "no token can be sampled",
    ),
    "processor returns NaN": (
        SamplingParams(
            temperature=0.0,
            max_tokens=8,
            logits_processors=[_returns(lambda x: torch.full_like(x, math.nan))],
        ),
        None,
        "no token can be sampled",
    ),
    "processor returns the wrong shape": (
        SamplingParams(max_tokens=8, logits_processors=[_returns(lambda x: x[:10])]),
        None,
        "shape",
    ),
    "denormal temperature": (
        SamplingParams(max_tokens=8),
        _set(temperature=1e-300),
        "no token can be sampled",
    ),
    "infinite bias": (
        SamplingParams(max_tokens=8),
        _set(logit_bias={3: math.inf}),
        "no token can be sampled",
    ),
    "bias id out of the vocabulary": (
        SamplingParams(max_tokens=8),
        _set(logit_bias={10**9: 1.0}),
        "logit_bias token ids",
    ),
    "temperature of the wrong type": (
        SamplingParams(max_tokens=8),
        _set(temperature="hot"),
        "sampling failed",
    ),
    "unencodable stop string": (SamplingParams(max_tokens=8), _set(stop=["\ud800"]), "stop check failed"),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_request_fails_alone_and_the_others_get_their_tokens(
    tiny_model: GptOss, poison: str
) -> None:
    prompts = {name: _prompt(i) for i, name in enumerate(VICTIMS)}
    alone = {
        name: _run(_engine(tiny_model), {name: (prompts[name], params)})[name]
        for name, params in VICTIMS.items()
    }
    template, change, message = POISONS[poison]
    params = dataclasses.replace(template)  # a copy: the change below must not outlive this test
    engine = _engine(tiny_model)
    requests = {name: (prompts[name], p) for name, p in VICTIMS.items()}
    requests["poisoned"] = (_prompt(99), params)
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p)
    if change is not None:
        change(params)
    outputs = _drain(engine)

    bad = outputs["poisoned"]
    assert bad.finish_reason is FinishReason.ABORT
    assert bad.error is not None
    assert message in bad.error
    for name in VICTIMS:
        assert outputs[name].error is None, outputs[name].error
        assert outputs[name].finish_reason is FinishReason.LENGTH
        assert outputs[name].tokens == alone[name].tokens, name
    assert engine.scheduler.kv.full.num_free == engine.scheduler.kv.full.num_blocks
    assert not engine.scheduler.requests


# (parameters, the field named) that SamplingParams refuses, since a step could not compute them.
UNCOMPUTABLE = [
    ({"temperature": 1e-300}, "temperature"),
    ({"temperature": 1e-6}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"logit_bias": {1: math.inf}}, "logit_bias"),
    ({"logit_bias": {1: -math.inf}}, "logit_bias"),
    ({"logit_bias": {1: 1e308}}, "logit_bias"),
    ({"logit_bias": {1: 100.5}}, "logit_bias"),
    ({"logit_bias": {1: math.nan}}, "logit_bias"),
    ({"stop": ["ok", "\ud800"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"top_p": math.nan}, "top_p"),
    ({"min_p": math.nan}, "min_p"),
    ({"presence_penalty": math.inf}, "presence_penalty"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"logit_bias": {"1": 1.0}}, "logit_bias"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop": [b"end"]}, "stop"),
    ({"logits_processors": [None]}, "logits_processors"),
]


@pytest.mark.parametrize(("fields", "name"), UNCOMPUTABLE, ids=[repr(f) for f, _ in UNCOMPUTABLE])
def test_what_a_step_cannot_compute_is_refused_naming_the_field(
    tiny_model: GptOss, fields: dict, name: str
) -> None:
    with pytest.raises(SamplingParamsError) as refused:
        SamplingParams(**fields)
    assert refused.value.field == name
    # Changed after construction, the engine's admission check refuses it too (the server calls it as well).
    params = SamplingParams()
    for key, value in fields.items():
        setattr(params, key, value)
    engine = _engine(tiny_model)
    with pytest.raises(SamplingParamsError) as at_admission:
        engine.add_request("r", [1, 2, 3], params)
    assert at_admission.value.field == name
    assert not engine.scheduler.requests


def test_the_bounds_themselves_are_accepted() -> None:
    SamplingParams(temperature=1e-5, logit_bias={1: 100.0, 2: -100.0}, stop=["é", "\U0001f600"])
    SamplingParams(temperature=0.0, top_p=1e-50)


def test_a_top_p_below_float32s_range_keeps_the_most_likely_token(tiny_model: GptOss) -> None:
    """float32 rounds 1e-50 to 0, which kept no token and raised in the step; it keeps the argmax, as any top_p
    below the top token's probability does."""
    prompt = _prompt(5)
    greedy = _run(_engine(tiny_model), {"g": (prompt, SamplingParams(temperature=0.0, max_tokens=6))})["g"]
    tiny = _run(_engine(tiny_model), {"t": (prompt, SamplingParams(top_p=1e-50, max_tokens=6))})["t"]
    assert tiny.error is None
    assert tiny.tokens == greedy.tokens


def test_the_kv_pool_must_hold_one_full_context(tiny_model: GptOss) -> None:
    with pytest.raises(ValueError, match="max_model_len 512") as refused:
        make_engine(tiny_model, num_kv_blocks=100)  # 400 tokens of 4-token blocks
    assert "at most 400" in str(refused.value)
    assert make_engine(tiny_model, num_kv_blocks=100, max_model_len=400).max_model_len == 400


def test_kv_usage_is_reported_per_pool(tiny_model: GptOss) -> None:
    """The full-attention pool fills up while the sliding one (windows only) does not: the usage reported for
    admission is the fuller pool's, not the sum over both (which read about half with the full pool spent)."""
    engine = make_engine(tiny_model, num_kv_blocks=40, max_model_len=160, max_num_batched_tokens=256)
    for i in range(3):
        engine.add_request(f"r{i}", _prompt(i, n=50), SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    stats = engine.stats()
    kv = engine.scheduler.kv
    assert stats.kv_full_blocks_used == kv.full.num_used
    assert stats.kv_full_blocks_total == 40
    assert stats.kv_sliding_blocks_used == kv.sliding.num_used
    assert stats.kv_full_usage == kv.full.num_used / 40
    assert stats.kv_sliding_usage == kv.sliding.num_used / kv.sliding.num_blocks
    assert stats.kv_full_usage > stats.kv_sliding_usage
    assert stats.kv_cache_usage == stats.kv_full_usage


def _collect(done: dict[str, RequestOutput], event: threading.Event) -> Callable[[str], Callable]:
    def callback_for(rid: str) -> Callable[[RequestOutput], None]:
        def callback(out: RequestOutput) -> None:
            if out.finished:
                done[rid] = out
                event.set()

        return callback

    return callback_for


def test_repeated_whole_step_failures_end_each_request_and_are_logged_loudly(
    tiny_model: GptOss, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward that raises (a lost device, say) ends the requests of that step; the engine thread neither
    dies nor spins, says so loudly once it keeps happening, and serves again once steps succeed."""
    engine = make_engine(tiny_model)
    real_execute = engine.runner.execute
    broken = True

    def execute(plan: SchedulerOutput) -> RunnerOutput:
        if broken:
            raise RuntimeError("device lost")
        return real_execute(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    thread = EngineThread(engine)
    try:
        for attempt in range(FAILED_STEPS_ALARM):
            done: dict[str, RequestOutput] = {}
            event = threading.Event()
            thread.add_request(
                f"a{attempt}", [1, 2, 3], SamplingParams(max_tokens=4), _collect(done, event)(f"a{attempt}")
            )
            assert event.wait(30)
            assert done[f"a{attempt}"].error == "engine error: device lost"
        assert engine.stats().num_failed_steps == FAILED_STEPS_ALARM
        assert engine.stats().num_failed_steps_in_a_row == FAILED_STEPS_ALARM
        assert any(r.levelno == logging.CRITICAL and "in a row" in r.getMessage() for r in caplog.records)
        broken = False
        done, event = {}, threading.Event()
        thread.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=4), _collect(done, event)("ok"))
        assert event.wait(30)
        assert done["ok"].error is None
        assert done["ok"].finish_reason is FinishReason.LENGTH
        assert engine.stats().num_failed_steps_in_a_row == 0
    finally:
        thread.stop()


def test_a_callback_that_raises_harms_no_other_request(tiny_model: GptOss) -> None:
    thread = EngineThread(make_engine(tiny_model))

    def broken(out: RequestOutput) -> None:
        raise RuntimeError("a consumer's bug")

    try:
        thread.add_request("broken", [4, 5, 6], SamplingParams(max_tokens=6), broken)
        done: dict[str, RequestOutput] = {}
        event = threading.Event()
        thread.add_request("fine", [1, 2, 3], SamplingParams(max_tokens=6), _collect(done, event)("fine"))
        assert event.wait(30)
        assert done["fine"].finish_reason is FinishReason.LENGTH
        assert thread._thread.is_alive()
    finally:
        thread.stop()


def test_parameters_spoiled_while_queued_are_refused_without_stopping_the_thread(tiny_model: GptOss) -> None:
    """EngineThread.add_request checks on the caller's thread; if the parameters change before the engine
    thread admits the request, the engine's own check refuses them there, and that refusal must reach the
    request's callback rather than end the thread."""
    thread = EngineThread(make_engine(tiny_model))
    inside_step, release = threading.Event(), threading.Event()

    def hold(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        inside_step.set()
        assert release.wait(30)
        return logits

    try:
        done: dict[str, RequestOutput] = {}
        event = threading.Event()
        holder = SamplingParams(temperature=0.0, max_tokens=2, logits_processors=[hold])
        thread.add_request("holder", [1, 2, 3], holder, _collect(done, threading.Event())("holder"))
        assert inside_step.wait(30)  # the engine thread is in a step: the next add waits in its queue
        spoiled = SamplingParams(max_tokens=4)
        thread.add_request("spoiled", [4, 5, 6], spoiled, _collect(done, event)("spoiled"))
        spoiled.temperature = 1e-300
        release.set()
        assert event.wait(30)
        assert done["spoiled"].finish_reason is FinishReason.ABORT
        assert done["spoiled"].error is not None
        assert "temperature" in done["spoiled"].error
        after: dict[str, RequestOutput] = {}
        finished = threading.Event()
        thread.add_request(
            "after", [7, 8, 9], SamplingParams(max_tokens=3), _collect(after, finished)("after")
        )
        assert finished.wait(30)
        assert after["after"].finish_reason is FinishReason.LENGTH
    finally:
        release.set()
        thread.stop()


def test_an_engine_whose_books_break_stops_loudly_and_ends_every_request(
    tiny_model: GptOss, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If ending a failed step's requests raises too, the engine's books cannot be trusted: the thread stops
    for good, says why, and ends what it held, what was queued and whatever comes later with the reason;
    nothing waits on a thread that is gone."""
    engine = make_engine(tiny_model)
    inside_step, release = threading.Event(), threading.Event()

    def execute(plan: SchedulerOutput) -> RunnerOutput:
        inside_step.set()
        assert release.wait(30)
        raise RuntimeError("device lost")

    def fail_all(message: str) -> list[RequestOutput]:
        raise AssertionError("a block freed twice")

    monkeypatch.setattr(engine.runner, "execute", execute)
    monkeypatch.setattr(engine, "fail_all", fail_all)
    thread = EngineThread(engine)
    done: dict[str, RequestOutput] = {}
    events = {rid: threading.Event() for rid in ("running", "queued", "later")}
    try:
        thread.add_request(
            "running", [1, 2, 3], SamplingParams(max_tokens=4), _collect(done, events["running"])("running")
        )
        assert inside_step.wait(30)
        thread.add_request(
            "queued", [4, 5, 6], SamplingParams(max_tokens=4), _collect(done, events["queued"])("queued")
        )
        release.set()
        assert events["running"].wait(30)
        assert events["queued"].wait(30)
        thread._thread.join(30)
        assert not thread._thread.is_alive()
        reason = "the engine stopped: AssertionError: a block freed twice"
        assert thread.stopped_because == reason
        thread.add_request(
            "later", [7, 8, 9], SamplingParams(max_tokens=4), _collect(done, events["later"])("later")
        )
        assert events["later"].is_set()  # at once, on the caller's thread
        for rid in events:
            assert done[rid].finish_reason is FinishReason.ABORT
            assert done[rid].error == reason
        assert any(r.levelno == logging.CRITICAL and reason in r.getMessage() for r in caplog.records)
    finally:
        release.set()
        thread.stop()


def test_a_request_that_meets_a_bug_when_added_fails_alone(
    tiny_model: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_model)
    real_add = engine.add_request

    def add_request(request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id == "unlucky":
            raise KeyError("a bug")
        real_add(request_id, prompt, params)

    monkeypatch.setattr(engine, "add_request", add_request)
    thread = EngineThread(engine)
    done: dict[str, RequestOutput] = {}
    unlucky, fine = threading.Event(), threading.Event()
    try:
        thread.add_request(
            "unlucky", [1, 2, 3], SamplingParams(max_tokens=4), _collect(done, unlucky)("unlucky")
        )
        thread.add_request("fine", [4, 5, 6], SamplingParams(max_tokens=4), _collect(done, fine)("fine"))
        assert unlucky.wait(30)
        assert fine.wait(30)
        assert done["unlucky"].error == "engine error: 'a bug'"
        assert done["fine"].finish_reason is FinishReason.LENGTH
        assert thread.stopped_because is None
    finally:
        thread.stop()
