"""The sampler against its plain reference twin, and the properties the engine relies on (CPU, seeded)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.request import MAX_TOP_LOGPROBS, SamplingParams, SamplingParamsError
from engine.sampler import (
    Sampler,
    SamplerOutput,
    _inverse_cdf,
    check_params_for_vocab,
    filtered_probs,
    filtered_probs_reference,
    greedy_argmax,
    make_generator,
    process_logits,
    process_logits_reference,
    sample_reference,
)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _random_params(rng: random.Random, vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.0, 1.5, rng.uniform(0.05, 3.0)]),
        top_k=rng.choice([0, 0, 1, 2, 5, vocab, vocab + 3, rng.randint(1, vocab)]),
        top_p=rng.choice([1.0, 1.0, 0.05, 0.5, 0.9, 0.999, rng.uniform(0.01, 1.0)]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3, rng.uniform(0.0, 1.0)]),
        presence_penalty=rng.choice([0.0, 0.0, rng.uniform(-2.0, 2.0)]),
        frequency_penalty=rng.choice([0.0, 0.0, rng.uniform(-2.0, 2.0)]),
        logit_bias={rng.randrange(vocab): rng.uniform(-5.0, 5.0) for _ in range(rng.randint(0, 3))},
        logprobs=rng.choice([None, None, 0, 1, 5, MAX_TOP_LOGPROBS]),
    )


def _random_logits(rng: random.Random, batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits, some rows with masked (-inf) tokens, some with exact ties (rounded values)."""
    logits = _randn(batch, vocab, seed=seed, scale=rng.choice([0.5, 2.0, 5.0]))
    for row in range(batch):
        if rng.random() < 0.3:
            logits[row] = logits[row].round(decimals=1)
        if vocab > 1 and rng.random() < 0.3:
            masked = rng.sample(range(vocab), rng.randint(1, vocab - 1))
            logits[row, masked] = -math.inf
    return logits


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    # torch.testing.assert_close would import torch.distributed (seconds); equal infinities count as close.
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (
        f"max |diff| {(got - want).abs().nan_to_num().max()}"
    )


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def _chi2(tokens: list[int], probs: torch.Tensor) -> float:
    counts = Counter(tokens)
    n = len(tokens)
    assert all(probs[t] > 0 for t in counts), "a token outside the filtered distribution was sampled"
    return sum((counts[t] - n * float(p)) ** 2 / (n * float(p)) for t, p in enumerate(probs) if p > 0)


# ----------------------------------------------------------------------------------------------------------
# The fast path against the reference twin.


def test_fast_path_matches_reference_on_random_logits_and_params() -> None:
    rng = random.Random(20261127)
    rows_checked = 0
    for case in range(36):
        vocab = rng.choice([1, 2, 3, 17, 100, 1000])
        batch = rng.randint(1, 16)
        logits = _random_logits(rng, batch, vocab, seed=case)
        params = [_random_params(rng, vocab) for _ in range(batch)]
        outputs = [[rng.randrange(vocab) for _ in range(rng.randint(0, 20))] for _ in range(batch)]

        processed = process_logits(logits, params, outputs)
        processed_ref = process_logits_reference(logits, params, outputs)
        _assert_close(processed, processed_ref, rtol=1e-6, atol=1e-5)

        probs = filtered_probs(processed, params)
        probs_ref = filtered_probs_reference(processed_ref, params)
        assert torch.equal(probs > 0, probs_ref > 0), f"case {case}: kept sets differ"
        _assert_close(probs.double(), probs_ref, rtol=1e-4, atol=1e-6)
        _assert_close(probs.sum(dim=-1), torch.ones(batch))

        out = Sampler(make_generator(case)).sample(logits, params, outputs, [None] * batch)
        ref = sample_reference(logits, params, outputs, [None] * batch, make_generator(case))
        for row, p in enumerate(params):
            token = out.token_ids[row]
            assert probs_ref[row, token] > 0, "sampled outside the filtered distribution"
            if p.greedy:
                assert token == ref.token_ids[row]
            got, want = out.logprobs[row], ref.logprobs[row]
            if p.logprobs is None:
                assert got is None
                assert want is None
                continue
            assert got is not None
            assert want is not None
            raw = torch.log_softmax(logits[row].double(), dim=-1)
            assert got.token_id == token
            assert got.logprob == pytest.approx(float(raw[token]), abs=1e-5)
            assert len(got.top) == len(want.top) == min(p.logprobs, vocab)
            assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-5)
            assert all(v == pytest.approx(float(raw[t]), abs=1e-5) for t, v in got.top)
            if len(set(logits[row].tolist())) == vocab:  # no ties: the order of ids is determined too
                assert [t for t, _ in got.top] == [t for t, _ in want.top]
            rows_checked += 1
    assert rows_checked > 50


def test_top_k_alone_matches_reference_on_both_paths() -> None:
    """Without top-p the k-th value comes from topk (small k) or from a sort (large k); rows without top-k
    in the same batch keep everything."""
    vocab = 3000
    logits = _randn(6, vocab, seed=15, scale=2.0)
    logits[1] = logits[1].round(decimals=1)  # ties at the k-th value are kept together
    for ks in ([0, 1, 7, 40, 0, 1000], [0, 5, 1500, 2999, 0, 3000]):
        params = [SamplingParams(temperature=0.9, top_k=k, min_p=0.001 * (k == 40)) for k in ks]
        probs = filtered_probs(logits, params)
        probs_ref = filtered_probs_reference(logits, params)
        assert torch.equal(probs > 0, probs_ref > 0)
        _assert_close(probs.double(), probs_ref, rtol=1e-4, atol=1e-7)


def test_top_p_reached_exactly_stops_the_prefix() -> None:
    """A token is kept when the mass ranked before it is still below top_p: when the first two tokens' mass
    equals top_p exactly, the third is dropped."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    mass_two = float(logits.softmax(dim=-1).sort(descending=True).values.cumsum(dim=-1)[0, 1])
    probs = filtered_probs(logits, [SamplingParams(top_p=mass_two)])[0]
    assert (probs > 0).tolist() == [True, True, False, False]
    above = float(torch.nextafter(torch.tensor(mass_two), torch.tensor(1.0)))  # the next float32
    nudged = filtered_probs(logits, [SamplingParams(top_p=above)])[0]
    assert (nudged > 0).tolist() == [True, True, True, False]


def test_top_p_just_below_one_keeps_the_top_k_exactly() -> None:
    """The top-k survivors' float32 mass can round below a top_p just under 1; top-p must not then reach
    past them into the tokens top-k dropped."""
    logits = _randn(64, 50, seed=16)
    just_below_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    for k in (2, 3, 9):
        probs = filtered_probs(logits, [SamplingParams(top_k=k, top_p=just_below_one)] * 64)
        assert ((probs > 0).sum(dim=-1) == k).all()


def test_inverse_cdf_never_lands_on_a_zero_probability_token() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0, 0.0]] * 6)
    u = torch.tensor([[0.0], [0.2499], [0.25], [0.7501], [0.9999], [1.0]], dtype=torch.float64)
    cdf = [sum(probs[0, : t + 1].tolist()) for t in range(7)]
    expected = [next(t for t in range(7) if cdf[t] > float(v) and probs[0, t] > 0) for v in u[:5, 0]]
    assert _inverse_cdf(probs, u).tolist() == [*expected, 4]  # u = 1 (never drawn): the last token with mass


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    values=st.lists(
        st.one_of(st.floats(-30.0, 30.0, width=32), st.just(-math.inf)), min_size=1, max_size=12
    ).filter(lambda v: max(v) > -math.inf),
    temperature=st.floats(0.05, 4.0),
    top_k=st.integers(0, 14),
    top_p=st.floats(0.001, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_filters_keep_an_upper_set_within_every_bound(
    values: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    """Whatever the logits (ties, -inf, huge spread), the kept tokens are the most likely ones: every token
    more likely than a kept one is kept; top-k, min-p and top-p bounds hold; the argmax always survives."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.tensor([values])
    probs = filtered_probs(logits, [params])[0]
    _assert_close(probs.sum(), torch.tensor(1.0))
    kept = probs > 0
    assert kept[logits[0].argmax()]
    lowest_kept = logits[0][kept].min()
    assert torch.equal(kept, logits[0] >= lowest_kept), "kept set is not an upper set of the logits"
    if top_k:
        assert int((logits[0] > lowest_kept).sum()) < top_k
    scaled = logits[0] / temperature
    ratio = torch.exp(scaled - scaled.max())
    assert bool((ratio[kept] >= min_p * (1 - 1e-6)).all())
    # Without the lowest kept group the mass (of the top-k survivors) falls short of top_p, unless min-p cut.
    survivors = scaled >= scaled.sort(descending=True).values[min(top_k or len(values), len(values)) - 1]
    p_k = torch.where(survivors, scaled, -math.inf).softmax(dim=-1)
    if min_p == 0.0:
        assert float(p_k[logits[0] > lowest_kept].sum()) < top_p + 1e-6


# ----------------------------------------------------------------------------------------------------------
# Greedy, penalties, logit bias, processors.


def test_greedy_takes_the_argmax_of_processed_logits() -> None:
    logits = _randn(8, 300, seed=1)
    params = [SamplingParams(temperature=0.0) for _ in range(8)]
    params[3] = SamplingParams(temperature=0.0, logit_bias={7: 100.0})
    out = Sampler(make_generator(0)).sample(logits, params, [[]] * 8, [None] * 8)
    expected = logits.argmax(dim=-1).tolist()
    expected[3] = 7
    assert out.token_ids == expected


def test_penalties_and_logit_bias_change_exactly_what_they_should() -> None:
    vocab = 40
    logits = _randn(3, vocab, seed=2)
    outputs = [[5, 5, 5, 9], [5, 9, 9], []]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={1: 2.0, 5: -1.0}),
        SamplingParams(presence_penalty=-1.0),
        SamplingParams(frequency_penalty=2.0, logit_bias={0: -3.0}),  # no output yet: only the bias applies
    ]
    delta = process_logits(logits, params, outputs) - logits
    for row, (p, ids) in enumerate(zip(params, outputs, strict=True)):
        counts = Counter(ids)
        for token in range(vocab):
            c = counts[token]
            expected = p.logit_bias.get(token, 0.0) - p.presence_penalty * (c > 0) - p.frequency_penalty * c
            assert float(delta[row, token]) == pytest.approx(expected, abs=1e-5), (row, token)
    # The penalties push a repeated token down: with a strong frequency penalty greedy moves off it.
    flat = torch.zeros(1, vocab)
    flat[0, 4] = 1.0
    repeat = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    sampler = Sampler(make_generator(0))
    assert sampler.sample(flat, [repeat], [[]], [None]).token_ids == [4]
    assert sampler.sample(flat, [repeat], [[4]], [None]).token_ids != [4]


def _force(token: int, seen: list[list[int]]):
    def processor(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append(list(output_ids))
        forced = torch.full_like(row, -math.inf)
        forced[token] = 0.0
        return forced

    return processor


def test_logits_processor_forces_its_row_and_leaves_the_others() -> None:
    vocab = 50
    logits = _randn(4, vocab, seed=3)
    seen_1: list[list[int]] = []
    seen_3: list[list[int]] = []
    params = [
        SamplingParams(seed=11, logprobs=2),
        SamplingParams(logits_processors=[_force(17, seen_1)], logit_bias={3: 100.0}, logprobs=2),
        SamplingParams(seed=12, top_p=0.8),
        SamplingParams(temperature=0.0, logits_processors=[_force(42, seen_3)]),
    ]
    outputs = [[1], [2, 3], [4], [5, 6, 7]]
    gens = [make_generator(11), None, make_generator(12), None]
    out = Sampler(make_generator(0)).sample(logits, params, outputs, gens)
    assert out.token_ids[1] == 17
    assert out.token_ids[3] == 42
    assert seen_1 == [[2, 3]]
    assert seen_3 == [[5, 6, 7]]
    # Raw logprobs: the forced token's logprob is the model's, not the processor's certainty.
    assert out.logprobs[1] is not None
    assert out.logprobs[1].logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[17]), abs=1e-6)
    # The other rows: untouched logits, and the same tokens as a batch without the forced rows.
    processed = process_logits(logits, params, outputs)
    assert torch.equal(processed[[0, 2]], logits[[0, 2]])
    alone = Sampler(make_generator(0)).sample(
        logits[[0, 2]],
        [params[0], params[2]],
        [outputs[0], outputs[2]],
        [make_generator(11), make_generator(12)],
    )
    assert alone.token_ids == [out.token_ids[0], out.token_ids[2]]
    assert alone.logprobs[0] == out.logprobs[0]


def test_processor_returning_a_wrong_shape_is_refused() -> None:
    params = [SamplingParams(logits_processors=[lambda ids, row: row[:-1]])]
    with pytest.raises(ValueError, match="logits processor"):
        process_logits(torch.zeros(1, 8), params, [[]])


# ----------------------------------------------------------------------------------------------------------
# Seeds and randomness.


def _run_seeded(batch: int, position: int, steps: list[torch.Tensor], fill_seed: int, mix: str) -> list[int]:
    """Sample the seed-1234 request at `position` of a batch whose other rows are `mix`, for every step."""
    vocab = steps[0].shape[0]
    target = SamplingParams(top_p=0.95, presence_penalty=0.3, seed=1234)
    others = {
        "unseeded": lambda i: (SamplingParams(temperature=0.9), None),
        "seeded": lambda i: (SamplingParams(seed=1234), make_generator(1234)),  # same seed, other logits
        "mixed": lambda i: [
            (SamplingParams(temperature=0.0), None),
            (SamplingParams(seed=i), make_generator(i)),
            (SamplingParams(top_k=3), None),
        ][i % 3],
    }[mix]
    rows = [others(i) for i in range(batch)]
    rows[position] = (target, make_generator(1234))
    params = [p for p, _ in rows]
    generators = [g for _, g in rows]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    sampler = Sampler(make_generator(fill_seed))
    fill = torch.Generator().manual_seed(fill_seed)
    tokens = []
    for step_logits in steps:
        logits = torch.randn(batch, vocab, generator=fill)
        logits[position] = step_logits
        out = sampler.sample(logits, params, outputs, generators)
        for row, token in enumerate(out.token_ids):
            outputs[row].append(token)
        tokens.append(out.token_ids[position])
    return tokens


def test_seeded_request_gets_the_same_tokens_whatever_the_batch() -> None:
    steps = list(_randn(8, 64, seed=4))
    alone = _run_seeded(1, 0, steps, fill_seed=0, mix="unseeded")
    assert _run_seeded(5, 0, steps, fill_seed=1, mix="unseeded") == alone
    assert _run_seeded(5, 3, steps, fill_seed=2, mix="seeded") == alone
    assert _run_seeded(9, 8, steps, fill_seed=3, mix="mixed") == alone
    assert _run_seeded(16, 6, steps, fill_seed=4, mix="mixed") == alone
    # And the seed matters: another seed gives another sequence on the same logits.
    other = Sampler(make_generator(0))
    generator = make_generator(4321)
    params = SamplingParams(top_p=0.95, presence_penalty=0.3, seed=4321)
    outputs: list[int] = []
    for step_logits in steps:
        outputs.extend(other.sample(step_logits[None], [params], [outputs], [generator]).token_ids)
    assert outputs != alone


def test_unseeded_rows_draw_afresh_each_step() -> None:
    vocab = 1000
    logits = torch.zeros(2, vocab)
    params = [SamplingParams(), SamplingParams()]
    for sampler in (Sampler(make_generator(5)), Sampler()):  # its own generator; torch's default one
        draws = [sampler.sample(logits, params, [[], []], [None, None]).token_ids for _ in range(4)]
        assert len({tuple(d) for d in draws}) == 4, draws
        assert any(a != b for a, b in draws), "rows of one step drew the same noise"
    # The shared generator makes unseeded sampling repeatable when the sampler is built with one.
    first = [
        Sampler(make_generator(9)).sample(logits, params, [[], []], [None, None]).token_ids for _ in "ab"
    ]
    assert first[0] == first[1]


def test_seed_without_a_generator_is_refused() -> None:
    with pytest.raises(ValueError, match="make_generator"):
        Sampler().sample(torch.zeros(1, 4), [SamplingParams(seed=1)], [[]], [None])


def test_make_generator_accepts_any_int_seed() -> None:
    for seed in (0, -1, 2**63, 2**70, -(2**70)):
        a = torch.rand(5, generator=make_generator(seed))
        assert torch.equal(a, torch.rand(5, generator=make_generator(seed)))
    assert not torch.equal(
        torch.rand(5, generator=make_generator(1)), torch.rand(5, generator=make_generator(2))
    )


# ----------------------------------------------------------------------------------------------------------
# Logprobs.


def test_logprobs_are_raw_with_ordered_top_alternatives() -> None:
    vocab = 30
    logits = _randn(6, vocab, seed=6, scale=3.0)
    shaped = dict(temperature=0.4, top_k=3, presence_penalty=1.0, logit_bias={0: 4.0})
    params = [
        SamplingParams(logprobs=0, **shaped),
        SamplingParams(logprobs=1, **shaped),
        SamplingParams(logprobs=5, temperature=0.0),
        SamplingParams(logprobs=MAX_TOP_LOGPROBS, **shaped),
        SamplingParams(logprobs=None, **shaped),
        SamplingParams(logprobs=MAX_TOP_LOGPROBS, temperature=0.0),
    ]
    outputs = [[0, 1, 2]] * 6
    out = Sampler(make_generator(0)).sample(logits, params, outputs, [None] * 6)
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[4] is None
    for row in (0, 1, 2, 3, 5):
        entry = out.logprobs[row]
        n = params[row].logprobs
        assert entry is not None
        assert n is not None
        assert entry.token_id == out.token_ids[row]
        assert entry.logprob == pytest.approx(float(raw[row, entry.token_id]), abs=1e-6)
        want = raw[row].topk(n)
        assert [t for t, _ in entry.top] == want.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(want.values.tolist(), abs=1e-6)
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    # More alternatives asked for than the vocabulary has: all of it.
    small = Sampler().sample(_randn(1, 7, seed=7), [SamplingParams(logprobs=20)], [[]], [None])
    assert small.logprobs[0] is not None
    assert len(small.logprobs[0].top) == 7


def test_bfloat16_logits_are_upcast() -> None:
    logits = _randn(3, 64, seed=8).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=3)] * 3
    out = Sampler().sample(logits, params, [[]] * 3, [None] * 3)
    want = sample_reference(logits.float(), params, [[]] * 3, [None] * 3)
    assert out.token_ids == want.token_ids
    for got, ref in zip(out.logprobs, want.logprobs, strict=True):
        assert got is not None
        assert ref is not None
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Statistics: sampled frequencies converge to the filtered distribution.


def test_sampling_frequencies_match_the_filtered_distribution() -> None:
    vocab = 8
    logits = _randn(1, vocab, seed=9, scale=1.5)
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.97, min_p=0.03)
    expected = filtered_probs_reference(logits, [params])[0]
    support = int((expected > 0).sum())
    assert 3 <= support < vocab, "the case should keep several tokens and drop some"
    critical = _chi2_critical(support - 1)

    n = 20000
    shared = (
        Sampler(make_generator(10))
        .sample(logits.expand(n, vocab), [params] * n, [[]] * n, [None] * n)
        .token_ids
    )
    assert _chi2(shared, expected) < critical

    m = 4000  # one seeded generator per row: the per-row draw path
    seeded = (
        Sampler()
        .sample(logits.expand(m, vocab), [params] * m, [[]] * m, [make_generator(s) for s in range(m)])
        .token_ids
    )
    assert _chi2(seeded, expected) < critical

    reference = sample_reference(
        logits.expand(m, vocab), [params] * m, [[]] * m, [None] * m, make_generator(11)
    ).token_ids
    assert _chi2(reference, expected) < critical

    # The test has power: the unfiltered distribution is rejected by the same samples.
    unfiltered = (logits[0] / params.temperature).softmax(-1)
    assert sum(
        (Counter(shared)[t] - n * float(p)) ** 2 / (n * float(p)) for t, p in enumerate(unfiltered)
    ) > (_chi2_critical(vocab - 1))


# ----------------------------------------------------------------------------------------------------------
# Edge cases.


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = _randn(16, 100, seed=12)
    params = [SamplingParams(top_p=1e-6)] * 16
    probs = filtered_probs(logits, params)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 100).float())
    out = Sampler(make_generator(0)).sample(logits, params, [[]] * 16, [None] * 16)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_one_equals_greedy() -> None:
    logits = _randn(32, 500, seed=13, scale=0.1)  # close logits: only the filter makes it greedy
    sampled = Sampler(make_generator(0)).sample(
        logits, [SamplingParams(top_k=1)] * 32, [[]] * 32, [None] * 32
    )
    greedy = Sampler().sample(logits, [SamplingParams(temperature=0.0)] * 32, [[]] * 32, [None] * 32)
    assert sampled.token_ids == greedy.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=3.0, top_k=5, top_p=0.2, min_p=0.9),
        SamplingParams(presence_penalty=2.0, frequency_penalty=2.0, logit_bias={2: 5.0}),
    ],
)
def test_a_single_finite_logit_is_always_chosen(params: SamplingParams) -> None:
    logits = torch.full((4, 10), -math.inf)
    only = [3, 0, 9, 6]
    for row, token in enumerate(only):
        logits[row, token] = float(row) - 50.0
    params_n = [dataclasses.replace(params, logprobs=3)] * 4
    out = Sampler(make_generator(0)).sample(logits, params_n, [[3, 0, 9, 6]] * 4, [None] * 4)
    assert out.token_ids == only
    for row, entry in enumerate(out.logprobs):
        assert entry is not None
        assert entry.logprob == 0.0
        assert entry.top[0] == (only[row], 0.0)
        assert all(v == -math.inf for _, v in entry.top[1:])


def test_ties_are_kept_together_and_greedy_takes_the_lowest_id() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, -1.0]])
    tied = [1, 2, 4]
    greedy = Sampler().sample(logits, [SamplingParams(temperature=0.0)], [[]], [None])
    assert greedy.token_ids == [1]
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=0.05), SamplingParams(min_p=1.0)):
        probs = filtered_probs(logits, [params])[0]
        _assert_close(probs[tied], torch.full((3,), 1 / 3))
        assert float(probs.sum()) == pytest.approx(1.0)
        assert torch.equal(probs > 0, filtered_probs_reference(logits, [params])[0] > 0)
        draws = Sampler(make_generator(1)).sample(
            logits.expand(300, 6), [params] * 300, [[]] * 300, [None] * 300
        )
        assert set(draws.token_ids) == set(tied)


@pytest.mark.parametrize("vocab", [2048, 3000, 4096, 5121, 201_088])
def test_chunked_greedy_argmax_equals_argmax(vocab: int) -> None:
    """The CPU's chunked argmax against torch's: the first maximum, wherever it lies, ties and NaN included."""
    logits = _randn(12, vocab, seed=vocab)
    logits[0, -1] = 100.0  # the maximum in the last (possibly short) chunk
    logits[1, 0] = 100.0  # ... in the first column
    logits[2, [5, vocab - 2]] = 100.0  # tied across chunks: the first wins
    logits[3, [1030, 1031]] = 100.0  # tied inside a chunk
    logits[4] = -math.inf  # nothing finite: index 0
    logits[5, [7, vocab - 3]] = math.nan  # NaN counts as the maximum, the first one
    logits[6, vocab - 1] = math.nan
    logits[7] = logits[7].round()  # many ties at the maximum
    logits[8, : vocab - 1] = -math.inf  # only the last column is finite
    logits[9, 1024:] = -math.inf  # only the first chunk is finite
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    assert torch.equal(greedy_argmax(logits[:, :-3]), logits[:, :-3].argmax(dim=-1))  # a strided view
    assert torch.equal(greedy_argmax(logits[10:11]), logits[10:11].argmax(dim=-1))


# ----------------------------------------------------------------------------------------------------------
# Boundaries.


def test_input_logits_are_not_modified() -> None:
    logits = _randn(3, 20, seed=14)
    before = logits.clone()
    params = [
        SamplingParams(logit_bias={1: 3.0}, presence_penalty=1.0),
        SamplingParams(logits_processors=[_force(2, [])]),
        SamplingParams(temperature=0.5, top_p=0.5),
    ]
    out = Sampler().sample(logits, params, [[1, 1], [], [0]], [None] * 3)
    assert isinstance(out, SamplerOutput)
    assert len(out.token_ids) == 3
    assert torch.equal(logits, before)


def test_mismatched_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="params"):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [[]], [None])
    with pytest.raises(ValueError, match="batch, vocab"):
        process_logits(torch.zeros(5), [SamplingParams()], [[]])


def test_check_params_for_vocab() -> None:
    check_params_for_vocab(SamplingParams(logit_bias={0: 1.0, 99: -100.0}), 100)
    with pytest.raises(SamplingParamsError, match=r"\[0, 100\)"):
        check_params_for_vocab(SamplingParams(logit_bias={100: 1.0}), 100)
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        check_params_for_vocab(SamplingParams(logit_bias={-1: 1.0}), 100)
    # The sampler refuses them too rather than index out of range, failing that row alone.
    sampled = Sampler().sample(
        torch.zeros(2, 8),
        [SamplingParams(logit_bias={8: 1.0}), SamplingParams(temperature=0.0)],
        [[], []],
        [None, None],
    )
    assert sampled.token_ids == [None, 0]
    assert sampled.errors[0] is not None
    assert "[0, 8)" in sampled.errors[0]
    assert sampled.errors[1] is None
