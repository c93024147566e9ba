"""The device sampler against the host sampler and its own twins: greedy rows exactly, random rows by their
distribution, seeded rows reproducible and independent of their batch."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from engine.device_sampler import (
    DeviceSampler,
    gumbel_noise,
    gumbel_noise_reference,
    row_keys,
    supports,
)
from engine.request import SamplingParams
from engine.sampler import Sampler, filtered_probs, filtered_probs_reference, make_generator, process_logits
from tests.engine.test_sampler import _chi2, _chi2_critical, _randn, _random_logits, _random_params


def _sample(
    sampler: DeviceSampler,
    logits: torch.Tensor,
    params: list[SamplingParams],
    outputs: list[list[int]],
    prompts: list[list[int]] | None = None,
) -> list[int]:
    prompts = prompts if prompts is not None else [[] for _ in params]
    plan = sampler.plan(params, outputs, prompts, logits.shape[1])
    arrays = [torch.from_numpy(a) for a in plan.arrays]
    return DeviceSampler.sample(logits, plan, arrays).tolist()


def test_the_noise_is_its_plain_integer_twin() -> None:
    keys = row_keys([0, 1, 2**64 - 1, -5, 12345678901234567890], [0, 7, 2**40 + 3, 1, 0])
    noise = gumbel_noise(torch.from_numpy(keys), 40)
    for row, key in enumerate(keys.tolist()):
        want = torch.tensor(gumbel_noise_reference((key[0], key[1]), 40), dtype=torch.float64)
        assert torch.allclose(noise[row], want, rtol=1e-12, atol=1e-12)
    assert len({tuple(k) for k in keys.tolist()}) == len(keys), "distinct (seed, counter) pairs collide"


def test_the_noise_is_standard_gumbel() -> None:
    """Mean (Euler's gamma) and variance (pi^2 / 6) of a million draws over many keys."""
    keys = torch.from_numpy(row_keys([3] * 1000, list(range(1000))))
    noise = gumbel_noise(keys, 1000)
    assert torch.isfinite(noise).all()
    assert float(noise.mean()) == pytest.approx(0.5772156649, abs=0.005)
    assert float(noise.var()) == pytest.approx(math.pi**2 / 6, rel=0.01)


def test_greedy_rows_and_processing_equal_the_host_sampler() -> None:
    """Greedy rows after bias, min_tokens bans and every penalty: the host sampler's tokens, exactly (ties,
    -inf rows and all); random rows only ever sample a token their filtered distribution keeps."""
    rng = random.Random(20261207)
    checked = 0
    for case in range(30):
        vocab = rng.choice([2, 17, 100, 1000])
        batch = rng.randint(1, 12)
        logits = _random_logits(rng, batch, vocab, seed=case)
        params = [
            dataclasses.replace(
                _random_params(rng, vocab),
                logprobs=None,
                repetition_penalty=rng.choice([1.0, 1.0, 0.7, 1.3]),
                min_tokens=rng.choice([0, 0, 3]),
                stop_token_ids=[rng.randrange(vocab)],
            )
            for _ in range(batch)
        ]
        outputs = [[rng.randrange(vocab) for _ in range(rng.randint(0, 6))] for _ in range(batch)]
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 6))] for _ in range(batch)]
        want = Sampler(make_generator(case)).sample(logits, params, outputs, [None] * batch, None, prompts)
        got = _sample(DeviceSampler(seed=case), logits, params, outputs, prompts)
        processed = process_logits(logits, params, outputs, None, prompts)
        kept = filtered_probs(processed, params) > 0
        for row, p in enumerate(params):
            if want.errors[row] is not None:
                assert got[row] == -1
                continue
            if p.greedy:
                assert got[row] == want.token_ids[row]
            else:
                assert bool(kept[row, got[row]]), "sampled outside the filtered distribution"
            checked += 1
    assert checked > 100


def test_a_seeded_row_samples_the_same_whatever_its_batch() -> None:
    vocab = 500
    logits = _randn(6, vocab, seed=3, scale=2.0)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    mates = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.3, min_p=0.1, seed=7),
        SamplingParams(temperature=0.9, presence_penalty=1.0),
        SamplingParams(temperature=1.0),
    ]
    out = [1, 2, 3]
    alone = _sample(DeviceSampler(seed=1), logits[:1], [seeded], [out])
    for position in range(6):
        params = [*mates[:position], seeded, *mates[position:]]
        rows = torch.cat((logits[1 : position + 1], logits[:1], logits[position + 1 :]))[: len(params)]
        outputs = [[9] * position for _ in range(position)] + [out] + [[4]] * (len(params) - position - 1)
        batch = _sample(DeviceSampler(seed=position + 100), rows, params, outputs)
        assert batch[position] == alone[0]
    # The key follows the output length: the next step draws afresh, and the same step again gives the same.
    tokens = {_sample(DeviceSampler(), logits[:1], [seeded], [[0] * n])[0] for n in range(40)}
    assert len(tokens) > 3
    assert _sample(DeviceSampler(), logits[:1], [seeded], [out]) == alone


def test_unseeded_rows_draw_afresh_each_time() -> None:
    logits = torch.zeros(1, 1000)
    sampler = DeviceSampler(seed=5)
    tokens = [_sample(sampler, logits, [SamplingParams(temperature=1.0)], [[]])[0] for _ in range(20)]
    assert len(set(tokens)) > 15


def test_sampling_frequencies_match_the_filtered_distribution() -> None:
    vocab = 8
    logits = _randn(1, vocab, seed=9, scale=1.5)
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.97, min_p=0.03)
    expected = filtered_probs_reference(logits, [params])[0]
    support = int((expected > 0).sum())
    assert 3 <= support < vocab, "the case should keep several tokens and drop some"
    critical = _chi2_critical(support - 1)

    n = 20000  # unseeded rows: one key each from the sampler's running count
    tokens = _sample(DeviceSampler(seed=12), logits.expand(n, vocab), [params] * n, [[]] * n)
    assert _chi2(tokens, expected) < critical

    m = 4000  # seeded rows: one key each from its (seed, output length)
    seeded = [dataclasses.replace(params, seed=s) for s in range(m)]
    tokens = _sample(DeviceSampler(), logits.expand(m, vocab), seeded, [[1] * (s % 5) for s in range(m)])
    assert _chi2(tokens, expected) < critical

    # The test has power: the unfiltered distribution is rejected by the same samples.
    unfiltered = (logits[0] / params.temperature).softmax(-1)
    counts = Counter(tokens)
    assert sum((counts[t] - m * float(p)) ** 2 / (m * float(p)) for t, p in enumerate(unfiltered)) > (
        _chi2_critical(vocab - 1)
    )


def test_a_rare_token_keeps_its_odds() -> None:
    """A token 9 logits below the other (probability about 1.2e-4) is drawn about as often as its
    probability says over 800,000 draws: the race's noise reaches far enough into the tail."""
    logits = torch.tensor([[0.0, -9.0]], dtype=torch.float64)
    draws = 800_000
    keys = torch.from_numpy(row_keys([77] * draws, list(range(draws))))
    hits = int(((logits + gumbel_noise(keys, 2)).argmax(-1) == 1).sum())
    expected = draws * float(logits.softmax(-1)[0, 1])
    assert abs(hits - expected) < 5 * math.sqrt(expected)


def test_rows_with_nothing_to_sample_get_minus_one() -> None:
    logits = torch.tensor([[-math.inf, -math.inf], [math.nan, 0.0], [0.0, math.inf], [0.0, 1.0]])
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature)] * 4
        got = _sample(DeviceSampler(seed=1), logits, params, [[]] * 4)
        want = Sampler().sample(logits, params, [[]] * 4, [None] * 4)
        assert got[:2] == [-1, -1]
        assert got[3] in (0, 1)
        assert [t if t is not None else -1 for t in want.token_ids][:2] == [-1, -1]
        if temperature:
            assert got[2] == -1  # +inf cannot be sampled from, as in the host sampler


def test_what_it_does_not_serve() -> None:
    assert supports(SamplingParams(temperature=0.7, top_p=0.9, seed=3, presence_penalty=0.5), None)
    assert not supports(SamplingParams(logprobs=2), None)
    assert not supports(SamplingParams(logits_processors=[lambda ids, row: row]), None)


def test_row_keys_take_any_integer() -> None:
    keys = row_keys([2**70 + 1, -(2**63), 0], [0, 2**65, -1])
    assert keys.dtype == np.int64
    assert ((keys >= 0) & (keys < 2**32)).all()
