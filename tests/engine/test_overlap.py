"""The overlapped loop (EngineConfig.async_scheduling) gives each request what the plain loop gives it: the
same tokens, finish and stop reasons and usage, with the step after launched before a step's tokens are
read, one step late to see a stop (the extra token dropped), and the scheduler's books sound after every
step. Both loops sample on the device here (on CPU tensors), the overlapped one's precondition."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine.core import EngineCore
from engine.request import FinishReason, RequestOutput, SamplingParams
from engine.runner import LaunchedStep, ModelRunner
from engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from model.gpt_oss import GptOss
from tests.engine.conftest import make_engine
from tests.engine.invariants import check_invariants


def token_bytes(token: int) -> bytes:
    return f"<{token}>".encode()


def engine_for(model: GptOss, overlap: bool, **overrides: Any) -> EngineCore:
    config = make_engine(model, device_sampling=True, async_scheduling=overlap, **overrides).config
    return EngineCore(model, config, token_bytes=token_bytes)


@dataclasses.dataclass
class Result:
    """What one request got, over all its outputs."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    outputs_after_finish: int = 0

    def add(self, out: RequestOutput) -> None:
        if self.finish_reason is not None:
            self.outputs_after_finish += 1
        self.tokens += out.new_token_ids
        self.finish_reason = out.finish_reason
        self.stop_reason = out.stop_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.error = out.error


Arrival = tuple[str, list[int], SamplingParams]


def drive(
    engine: EngineCore,
    arrivals: dict[int, list[Arrival]],
    aborts: dict[int, list[str]] | None = None,
) -> dict[str, Result]:
    """Step `engine` until it is idle: the requests of `arrivals[k]` join before step k, those named in
    `aborts[k]` are aborted before it; the invariants are checked after every step."""
    results: dict[str, Result] = {}
    aborts = aborts or {}
    step = 0
    while engine.has_unfinished() or any(k >= step for k in arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for request_id in aborts.get(step, []):
            engine.abort(request_id)
        for out in engine.step():
            results.setdefault(out.request_id, Result()).add(out)
        check_invariants(engine.scheduler)
        step += 1
        assert step < 500, "the engine never went idle"
    kv = engine.scheduler.kv
    assert kv.full.num_free == kv.full.num_blocks
    assert kv.sliding.num_free == kv.sliding.num_blocks
    assert not engine.scheduler.requests
    return results


def both(model: GptOss, arrivals: dict[int, list[Arrival]], **overrides: Any) -> dict[str, Result]:
    """The requests through both loops: asserts they got the same, and returns it."""
    plain = drive(engine_for(model, False, **overrides), arrivals)
    overlapped = drive(engine_for(model, True, **overrides), arrivals)
    assert overlapped == plain
    assert all(r.finish_reason is not None and r.outputs_after_finish == 0 for r in plain.values())
    return plain


def prompts(n: int, seed: int, lengths: tuple[int, int] = (3, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 200_000) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def test_greedy_and_seeded_requests_joining_mid_run_get_the_plain_loops_tokens(tiny_model: GptOss) -> None:
    ps = prompts(6, seed=1)
    arrivals = {
        0: [
            ("greedy", ps[0], SamplingParams(temperature=0.0, max_tokens=9)),
            ("seeded", ps[1], SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=12)),
        ],
        3: [("late", ps[2], SamplingParams(temperature=0.7, top_k=40, seed=6, max_tokens=5))],
        # n = 2 as the server asks for it: one request per choice, the seed offset by the choice.
        4: [
            (f"n{i}", ps[3], SamplingParams(temperature=1.0, seed=9 + i, min_p=0.01, max_tokens=7))
            for i in range(2)
        ],
        6: [("biased", ps[4], SamplingParams(temperature=0.0, logit_bias={17: 100.0}, max_tokens=3))],
    }
    # A small token budget: the late prompts are chunked and share steps with the others' decodes.
    results = both(tiny_model, arrivals, max_num_batched_tokens=16)
    assert {r: len(v.tokens) for r, v in results.items()} == {
        "greedy": 9,
        "seeded": 12,
        "late": 5,
        "n0": 7,
        "n1": 7,
        "biased": 3,
    }
    assert all(v.finish_reason is FinishReason.LENGTH for v in results.values())
    assert results["n0"].tokens != results["n1"].tokens
    assert results["biased"].tokens == [17, 17, 17]


def test_stop_tokens_and_stop_strings_end_requests_one_step_late_with_the_extra_token_dropped(
    tiny_model: GptOss,
) -> None:
    ps = prompts(3, seed=2, lengths=(10, 20))
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    reference = drive(engine_for(tiny_model, False), {0: [(f"r{i}", p, greedy) for i, p in enumerate(ps)]})
    stop_token = reference["r0"].tokens[3]
    # Across a token boundary: the end of the third token and the start of the fourth.
    stop_string = f"{reference['r1'].tokens[2]}><{reference['r1'].tokens[3]}"
    arrivals = {
        0: [
            ("token", ps[0], dataclasses.replace(greedy, stop_token_ids=[stop_token])),
            ("string", ps[1], dataclasses.replace(greedy, stop=[stop_string])),
            # min_tokens holds the stop token back: the counts the device sampler reads include the
            # placeholder of the token still in flight.
            ("late stop", ps[0], dataclasses.replace(greedy, stop_token_ids=[stop_token], min_tokens=5)),
            ("length", ps[2], dataclasses.replace(greedy, max_tokens=2)),
        ]
    }
    results = both(tiny_model, arrivals)
    first = reference["r0"].tokens.index(stop_token)
    assert results["token"].tokens == reference["r0"].tokens[: first + 1]
    assert (results["token"].finish_reason, results["token"].stop_reason) == (FinishReason.STOP, stop_token)
    assert results["string"].tokens == reference["r1"].tokens[:4]
    assert results["string"].stop_reason == stop_string
    assert len(results["late stop"].tokens) >= 5
    assert results["length"].tokens == reference["r2"].tokens[:2]


def test_preemption_under_a_small_kv_pool_changes_nothing(tiny_model: GptOss) -> None:
    ps = prompts(6, seed=3, lengths=(20, 36))
    params = [SamplingParams(temperature=0.0, max_tokens=14), SamplingParams(temperature=1.0, seed=4)]
    arrivals = {
        0: [(f"r{i}", p, dataclasses.replace(params[i % 2], max_tokens=14)) for i, p in enumerate(ps[:4])],
        2: [(f"r{i}", p, params[0]) for i, p in enumerate(ps[4:], start=4)],
    }
    overrides = {"num_kv_blocks": 40, "max_model_len": 160, "enable_prefix_caching": False}
    both(tiny_model, arrivals, **overrides)
    engine = engine_for(tiny_model, True, **overrides)
    drive(engine, arrivals)
    assert engine.stats().num_preemptions > 0


def test_aborts_mid_run_end_the_request_and_leave_the_others_alone(tiny_model: GptOss) -> None:
    ps = prompts(3, seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    arrivals = {0: [(f"r{i}", p, greedy) for i, p in enumerate(ps)]}
    full = drive(engine_for(tiny_model, False), arrivals)
    for overlap in (False, True):
        results = drive(engine_for(tiny_model, overlap), arrivals, aborts={4: ["r1", "unknown"]})
        assert results["r1"].finish_reason is FinishReason.ABORT
        # Up to the abort: the token of the step in flight when it comes is dropped in the overlapped loop.
        assert 0 < len(results["r1"].tokens) < 10
        assert results["r1"].tokens == full["r1"].tokens[: len(results["r1"].tokens)]
        assert results["r0"] == full["r0"]
        assert results["r2"] == full["r2"]


def test_a_request_the_overlap_cannot_serve_drains_it_and_it_resumes(tiny_model: GptOss) -> None:
    """A request whose next token needs its previous one on the host (a penalty counts the output ids)
    joins mid-run: the step in flight is read before the next is planned, and the loop overlaps again once
    it has ended. Everyone gets the plain loop's tokens."""
    ps = prompts(3, seed=5)
    arrivals = {
        0: [("a", ps[0], SamplingParams(temperature=0.0, max_tokens=14))],
        3: [("penalised", ps[1], SamplingParams(temperature=0.0, presence_penalty=1.0, max_tokens=4))],
        10: [("b", ps[2], SamplingParams(temperature=0.8, seed=2, max_tokens=5))],
    }
    engine = engine_for(tiny_model, True)
    launched: list[int] = []
    launch = engine.runner.launch

    def counted(plan: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        launched.append(engine.scheduler.num_steps)
        return launch(plan, previous)

    engine.runner.launch = counted  # type: ignore[method-assign]
    overlapped = drive(engine, arrivals)
    assert overlapped == drive(engine_for(tiny_model, False), arrivals)
    assert len(overlapped["penalised"].tokens) == 4
    # Launched before the penalised request came and after it left, not while it ran.
    steps = engine.stats().num_steps
    assert 0 < len(launched) < steps


def test_step_n_plus_one_is_launched_before_step_ns_tokens_are_read(
    tiny_model: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of calls at the seams: the runner's launch and collect, the scheduler's update."""
    engine = engine_for(tiny_model, True)
    calls: list[str] = []
    launches = 0

    def wrap(owner: object, name: str, label: Callable[[tuple[Any, ...]], str]) -> None:
        original = getattr(owner, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls.append(label(args))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    plans: dict[int, int] = {}

    def launch_label(args: tuple[Any, ...]) -> str:
        nonlocal launches
        launches += 1
        plans[id(args[0])] = launches
        return f"launch {launches}"

    wrap(engine.runner, "launch", launch_label)
    wrap(engine.runner, "collect", lambda args: f"collect {plans[id(args[0].plan)]}")
    wrap(engine.scheduler, "update", lambda args: f"update {plans[id(args[0])]}")
    engine.add_request("r", prompts(1, seed=6)[0], SamplingParams(temperature=0.0, max_tokens=3))
    outputs = [engine.step() for _ in range(4)]
    assert calls == [
        "launch 1",  # the prompt: nothing to read yet
        "launch 2",  # the second token's step, fed the first token on the device...
        "collect 1",  # ...then the first token is read and applied while it runs
        "update 1",
        "launch 3",
        "collect 2",
        "update 2",
        # The third token ends the request (max_tokens): its step is read with nothing launched after it.
        "collect 3",
        "update 3",
    ]
    assert [len(o) for o in outputs] == [0, 1, 1, 1]
    assert outputs[-1][0].finish_reason is FinishReason.LENGTH
    assert not engine.has_unfinished()


def test_a_request_finished_by_the_read_step_gets_no_token_from_the_step_in_flight(
    tiny_model: GptOss,
) -> None:
    """The stop token is sampled in step n; step n+1, launched before it was read, samples one more token
    for the request: that token is dropped, the request ends with the stop, and its blocks are freed."""
    p = prompts(1, seed=7)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    reference = drive(engine_for(tiny_model, False), {0: [("r", p, greedy)]})["r"].tokens
    stop = reference[1]
    engine = engine_for(tiny_model, True)
    engine.add_request("r", p, dataclasses.replace(greedy, stop_token_ids=[stop]))
    dropped: list[RunnerOutput] = []
    update = Scheduler.update

    def watched(self: Scheduler, plan: SchedulerOutput, result: RunnerOutput, **kwargs: Any) -> Any:
        outputs = update(self, plan, result, **kwargs)
        if plan.scheduled and not outputs:
            dropped.append(result)
        return outputs

    engine.scheduler.update = watched.__get__(engine.scheduler)  # type: ignore[method-assign]
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
        check_invariants(engine.scheduler)
    assert tokens == reference[: reference.index(stop) + 1]
    assert len(dropped) == 1
    assert dropped[0].token_ids[0] is not None
    assert engine.scheduler.kv.full.num_free == engine.scheduler.kv.full.num_blocks


def test_the_setting_follows_the_device_sampler_on_cuda_only(tiny_model: GptOss) -> None:
    assert not make_engine(tiny_model).async_scheduling  # the CPU keeps the host sampler
    assert not make_engine(tiny_model, device_sampling=True).async_scheduling  # and has no device to feed
    on = make_engine(tiny_model, async_scheduling=True)
    assert on.async_scheduling
    assert on.runner.device_sampling
    with pytest.raises(ValueError, match="device sampler"):
        make_engine(tiny_model, device_sampling=False, async_scheduling=True)


def test_the_collect_reads_the_ids_launch_left_on_the_device(tiny_model: GptOss) -> None:
    """The runner's two halves alone: a launched step's ids are on the device, and collect turns them into
    the result the plain execute gives for the same plan."""
    engine = engine_for(tiny_model, True)
    engine.add_request("r", prompts(1, seed=8)[0], SamplingParams(temperature=0.0, max_tokens=2))
    plan = engine.scheduler.schedule()
    launched = engine.runner.launch(plan, None)
    assert isinstance(launched.token_ids, torch.Tensor)
    assert launched.sample_rows == [0]
    result = engine.runner.collect(launched)
    assert result == ModelRunner.execute(engine.runner, plan)
