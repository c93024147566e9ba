"""What evaluation harnesses rely on, through the real engine: prompt logprobs equal to a plain full forward
(chunked prefill, prefix-cache hits and preemption change nothing), min_tokens and the repetition penalty."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.core import EngineCore
from engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    SamplingParamsError,
    TokenLogprob,
)
from engine.sampler import process_logits, process_logits_reference
from engine.scheduler import Scheduler
from model.gpt_oss import AttentionMetadata, GptOss
from tests.engine.conftest import greedy_reference, make_engine


def _prompt(n: int, seed: int, vocab: int = 200_000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _reference_logprobs(model: GptOss, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over the whole sequence, in one plain forward without a cache."""
    logits = model(torch.tensor(tokens), AttentionMetadata.build([len(tokens)]))
    return torch.log_softmax(logits.double(), dim=-1)


def _collect(
    engine: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[RequestOutput]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def _prompt_logprobs(outputs: list[RequestOutput]) -> list[TokenLogprob | None]:
    given = [o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None]
    assert len(given) == 1, "prompt logprobs come once, whole"
    assert outputs[0].prompt_logprobs is not None, "on the first output"
    return given[0]


def _assert_matches_reference(
    model: GptOss, prompt: list[int], got: list[TokenLogprob | None], k: int
) -> None:
    reference = _reference_logprobs(model, prompt)
    assert len(got) == len(prompt)
    assert got[0] is None
    for position in range(1, len(prompt)):
        entry = got[position]
        assert entry is not None
        row = reference[position - 1]  # the logits before token `position` score it
        want = float(row[prompt[position]])
        assert entry.token_id == prompt[position]
        assert abs(entry.logprob - want) < 1e-4, (position, entry.logprob, want)
        # A random model's distribution is nearly flat: tokens within rounding of each other may swap.
        assert 1 + int((row > want + 1e-4).sum()) <= entry.rank <= 1 + int((row > want - 1e-4).sum())
        assert len(entry.top) == k
        best = row.topk(k).values.tolist()
        assert all(abs(v - w) < 1e-4 for (_, v), w in zip(entry.top, best, strict=True))
        assert all(abs(float(row[t]) - v) < 1e-4 for t, v in entry.top)


@pytest.mark.parametrize("budget", [7, 16, 2048])
def test_prompt_logprobs_equal_a_full_forward_across_chunks(tiny_model: GptOss, budget: int) -> None:
    """Chunks of 7 and 16 tokens (chunk boundaries inside and on blocks) and a whole-prompt prefill."""
    prompt = _prompt(45, seed=1)
    other = _prompt(30, seed=2)  # a plain request sharing the steps
    engine = make_engine(tiny_model, max_num_batched_tokens=budget)
    outputs = _collect(
        engine,
        {
            "scored": (prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3)),
            "plain": (other, SamplingParams(temperature=0.0, max_tokens=3)),
        },
    )
    _assert_matches_reference(tiny_model, prompt, _prompt_logprobs(outputs["scored"]), 3)
    assert all(o.prompt_logprobs is None for o in outputs["plain"])


def test_prompt_logprobs_recompute_a_cached_prefix(tiny_model: GptOss) -> None:
    """The same prompt twice: the second request finds it in the prefix cache, yet gets every position
    scored; a request without prompt logprobs still takes the cached blocks."""
    prompt = _prompt(40, seed=3)
    engine = make_engine(tiny_model, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    first = _collect(engine, {"a": (prompt, params)})["a"]
    second = _collect(engine, {"b": (prompt, params)})["b"]
    plain = _collect(engine, {"c": (prompt, SamplingParams(temperature=0.0, max_tokens=2))})["c"]
    assert plain[0].num_cached_tokens >= 36
    for outputs in (first, second):
        _assert_matches_reference(tiny_model, prompt, _prompt_logprobs(outputs), 0)
    # Both scored every position (checked above), so the second took no cached block for them.
    assert second[0].num_cached_tokens == 0
    assert [o.new_token_ids for o in second] == [o.new_token_ids for o in first]


def test_prompt_logprobs_survive_preemption(tiny_model: GptOss, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests preempted mid-prefill resume scoring where they stopped (the scored positions' KV may come
    back from the prefix cache) and still agree with a full forward."""
    cut_short: list[int] = []  # prompt tokens scored when a request was preempted before scoring all
    preempt = Scheduler._preempt

    def recording(self: Scheduler, request: Request) -> None:
        if 1 < len(request.prompt_logprobs) < request.num_prompt_tokens:
            cut_short.append(len(request.prompt_logprobs))
        preempt(self, request)

    monkeypatch.setattr(Scheduler, "_preempt", recording)
    rngs = [random.Random(10 + i) for i in range(6)]
    prompts = [[rng.randrange(200_000) for _ in range(rng.randint(20, 60))] for rng in rngs]
    engine = make_engine(tiny_model, num_kv_blocks=40, max_model_len=160, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=30, prompt_logprobs=1)
    outputs = _collect(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    assert cut_short, "no request was preempted mid-prefill"
    for i, prompt in enumerate(prompts):
        _assert_matches_reference(tiny_model, prompt, _prompt_logprobs(outputs[f"r{i}"]), 1)


def test_prompt_logprobs_of_a_one_token_prompt(tiny_model: GptOss) -> None:
    engine = make_engine(tiny_model)
    out = _collect(engine, {"a": ([42], SamplingParams(max_tokens=2, prompt_logprobs=2))})["a"]
    assert _prompt_logprobs(out) == [None]


def test_prompt_logprobs_are_validated() -> None:
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(prompt_logprobs=21)
    assert error.value.field == "prompt_logprobs"
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(prompt_logprobs=True)  # type: ignore[arg-type]
    assert error.value.field == "prompt_logprobs"


# ----------------------------------------------------------------------------------------------------------
# min_tokens and the repetition penalty


def test_min_tokens_and_repetition_penalty_match_the_reference_twin() -> None:
    rng = random.Random(7)
    for case in range(30):
        vocab = rng.choice([3, 17, 100, 1000])
        batch = rng.randint(1, 8)
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(case)) * 3
        outputs = [[rng.randrange(vocab) for _ in range(rng.randint(0, 6))] for _ in range(batch)]
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(batch)]
        params = [
            SamplingParams(
                max_tokens=10,
                repetition_penalty=rng.choice([1.0, 0.5, 1.3, 2.0, rng.uniform(0.01, 100.0)]),
                min_tokens=rng.choice([0, 3, 10]),
                stop_token_ids=rng.sample(range(vocab), min(vocab - 1, rng.randint(0, 3))),
                presence_penalty=rng.choice([0.0, 0.5]),
                logit_bias={rng.randrange(vocab): rng.uniform(-3, 3)},
            )
            for _ in range(batch)
        ]
        fast = process_logits(logits, params, outputs, None, prompts)
        reference = process_logits_reference(logits, params, outputs, prompts)
        assert torch.allclose(fast, reference, rtol=1e-6, atol=1e-5), case
        for row, p in enumerate(params):
            if p.stop_token_ids:
                banned = bool((fast[row, p.stop_token_ids] == -math.inf).all())
                assert banned == (len(outputs[row]) < p.min_tokens)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    out = process_logits(logits, params, [[1]], None, [[0, 4]])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]
    with pytest.raises(ValueError, match="prompt token ids"):
        process_logits(logits, params, [[1]])


def test_greedy_with_a_repetition_penalty_equals_full_recomputation(tiny_model: GptOss) -> None:
    prompt = _prompt(20, seed=4, vocab=1000)
    params = SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=0.2)
    got = _collect(make_engine(tiny_model, max_num_batched_tokens=8), {"a": (prompt, params)})["a"]
    tokens = list(prompt)
    want: list[int] = []
    for _ in range(8):
        logits = tiny_model(torch.tensor(tokens), AttentionMetadata.build([len(tokens)]))[-1]
        seen = torch.tensor(sorted(set(tokens)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 0.2, logits[seen] * 0.2)
        token = int(logits.argmax())
        want.append(token)
        tokens.append(token)
    assert [t for o in got for t in o.new_token_ids] == want
    assert want != greedy_reference(tiny_model, prompt, 8), "the penalty changed nothing: a weak test"


def _biased_to(token: int, **overrides: object) -> SamplingParams:
    """Greedy, with `token` made the argmax (a stop token when listed in stop_token_ids)."""
    settings: dict[str, object] = {"temperature": 0.0, "max_tokens": 12, "logit_bias": {token: 100.0}}
    settings.update(overrides)
    return SamplingParams(**settings)  # type: ignore[arg-type]


def test_min_tokens_keeps_stop_tokens_out_until_reached(tiny_model: GptOss) -> None:
    stop = 500
    engine = make_engine(tiny_model)
    prompt = _prompt(10, seed=5)
    outputs = _collect(
        engine,
        {
            "free": (prompt, _biased_to(stop, stop_token_ids=[stop])),
            "held": (prompt, _biased_to(stop, stop_token_ids=[stop], min_tokens=5)),
            "long": (prompt, _biased_to(stop, stop_token_ids=[stop], min_tokens=12)),
        },
    )

    def tokens(rid: str) -> list[int]:
        return [t for o in outputs[rid] for t in o.new_token_ids]

    assert tokens("free") == [stop]
    held = tokens("held")
    assert len(held) == 6
    assert held[-1] == stop
    assert stop not in held[:5]
    assert outputs["held"][-1].finish_reason is FinishReason.STOP
    assert outputs["held"][-1].stop_reason == stop
    assert stop not in tokens("long")
    assert len(tokens("long")) == 12
    assert outputs["long"][-1].finish_reason is FinishReason.LENGTH


def test_min_tokens_defers_stop_strings(tiny_model: GptOss) -> None:
    """The forced output says x y x y ...; the stop string "x" ends it at the first x counted from
    min_tokens outputs on (the min_tokens-th output included, as vLLM)."""
    x, y = 7, 8
    engine = EngineCore(
        tiny_model,
        make_engine(tiny_model).config,
        token_bytes=lambda t: b"x" if t == x else b"y",
    )

    def alternate(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        row = torch.full_like(logits, -math.inf)
        row[x if len(output) % 2 == 0 else y] = 0.0
        return row

    def params(min_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=10, stop=["x"], min_tokens=min_tokens, logits_processors=[alternate])

    prompt = _prompt(5, seed=6)
    outputs = _collect(engine, {"a": (prompt, params(0)), "b": (prompt, params(2)), "c": (prompt, params(3))})
    lengths = {rid: sum(len(o.new_token_ids) for o in outs) for rid, outs in outputs.items()}
    assert lengths == {"a": 1, "b": 3, "c": 3}
    assert all(outs[-1].stop_reason == "x" for outs in outputs.values())


def test_min_tokens_and_repetition_penalty_are_validated() -> None:
    for settings, field in [
        ({"min_tokens": 11, "max_tokens": 10}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e9}, "repetition_penalty"),
        ({"repetition_penalty": "2"}, "repetition_penalty"),
    ]:
        with pytest.raises(SamplingParamsError) as error:
            SamplingParams(**settings)  # type: ignore[arg-type]
        assert error.value.field == field
