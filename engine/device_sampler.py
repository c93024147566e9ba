"""Sampling on the device: a step's logits in, its sampled ids out, with no host sync in between.

The host sampler (:class:`engine.sampler.Sampler`) turns its per-row settings into small tensors at every step
(on a GPU, a blocking copy each) and draws a seeded row's uniform from the row's own torch generator. Here
:meth:`DeviceSampler.plan` turns one step's settings into int64 arrays on the host, which travel with the
step's other inputs in the runner's one host-to-device copy, and :meth:`DeviceSampler.sample` computes the
tokens from them with device ops whose shapes and branches the host already knows. The runner then copies
the ids back: the step's one device-to-host copy.

The steps are the host sampler's (:mod:`engine.sampler`: logit bias, min_tokens, the repetition, presence
and frequency penalties, then temperature, top-k, top-p and min-p through
:func:`engine.sampler.filtered_logits`), and then:

* greedy rows take the first maximum of the processed logits, exactly as the host sampler's do;
* other rows race: ``argmax(filtered logits + Gumbel noise)`` picks token t with probability
  ``softmax(filtered logits)[t]``. The noise of a (row, token) is a hash of the row's key and the token id
  (:func:`gumbel_noise`), counter-based, so no generator state lives on the device and nothing is read back
  to advance one. A seeded request's key is (its seed, the number of tokens it has output): it gets the
  same tokens for the same logits whatever its batch mates and wherever its row, and again after a
  preemption. Unseeded rows take (the sampler's own random seed, a running count).

What this does not serve: logits processors (the request's own Python code, run on host rows), grammar
constraints (masks filled on the host) and logprobs (their values would travel back too). The runner sends a
step with such a row to the host sampler (:func:`supports`).

The noise is not the host sampler's draws, so a seeded request samples other tokens here than on the CPU
(each the same on every run).

Twins for tests: :func:`gumbel_noise_reference` (the hash in plain Python integers) and the host sampler.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from engine.constraint import GrammarConstraint
from engine.request import SamplingParams
from engine.sampler import _MIN_TOP_P, FilterSettings, _needs_processing, filtered_logits, greedy_argmax

_MASK32 = 0xFFFFFFFF
# lowbias32's multipliers (C. Wellons' integer hash search): a 32-bit hash with very low bias.
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
# Mixed into the keys so that a seed and a count of equal value hash apart.
_SALT1, _SALT2 = 0x243F6A88, 0x85A308D3


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` of int64 ``x`` in [0, 2^32): ``c`` cut into 16-bit halves so that no product
    leaves int64 (a wrapping signed overflow would be undefined behaviour in the kernels)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def _hash32_np(x: np.ndarray) -> np.ndarray:
    """:func:`_hash32` over numpy uint64 values below 2^32 (products stay below 2^64)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(_MUL1)) & np.uint64(_MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(_MUL2)) & np.uint64(_MASK32)
    return x ^ (x >> np.uint64(16))


def hash32_reference(x: int) -> int:
    """Twin of :func:`_hash32` on one Python integer."""
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: list[int], counters: list[int]) -> np.ndarray:
    """Per row, two 32-bit words ``[n, 2]`` (int64) from its (seed, counter), each any integer; every word
    of both goes into both words of the key."""
    m = np.uint64(_MASK32)
    s = np.array([x % 2**64 for x in seeds], dtype=np.uint64)
    c = np.array([x % 2**64 for x in counters], dtype=np.uint64)
    s_lo, s_hi, c_lo, c_hi = s & m, s >> np.uint64(32), c & m, c >> np.uint64(32)
    a = _hash32_np(s_lo ^ _hash32_np(s_hi ^ _hash32_np(c_lo ^ _hash32_np(c_hi ^ np.uint64(_SALT1)))))
    b = _hash32_np(a ^ _hash32_np(c_lo ^ np.uint64(_SALT2)) ^ _hash32_np(s_hi ^ c_hi))
    return np.stack((a, b), axis=1).astype(np.int64)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Float64 standard Gumbel noise ``[n, vocab]``: element (r, t) a function of row r's key
    (``keys [n, 2]``, from :func:`row_keys`) and t alone. Two 32-bit hashes give a 53-bit uniform u in
    (0, 1), and ``-log(-log u)`` the noise (53 bits keep a token 36 logits below the best in the race)."""
    t = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    a, b = keys[:, :1], keys[:, 1:]
    high = _hash32(_hash32(t ^ a) ^ b) >> 6  # 26 bits
    low = _hash32(_hash32(t ^ b) ^ a) >> 5  # 27 bits
    u = (high * 2**27 + low).to(torch.float64).add_(0.5).mul_(2.0**-53)
    return u.log_().neg_().log_().neg_()


def gumbel_noise_reference(key: tuple[int, int], vocab: int) -> list[float]:
    """Twin of one row of :func:`gumbel_noise`, in plain Python integers and floats."""
    a, b = key
    out = []
    for t in range(vocab):
        high = hash32_reference(hash32_reference(t ^ a) ^ b) >> 6
        low = hash32_reference(hash32_reference(t ^ b) ^ a) >> 5
        u = (high * 2**27 + low + 0.5) * 2.0**-53
        out.append(-math.log(-math.log(u)))
    return out


def supports(params: SamplingParams, constraint: GrammarConstraint | None) -> bool:
    """Whether a row can be sampled here (see the module's docstring for what cannot)."""
    return not params.logits_processors and constraint is None and params.logprobs is None


def overlaps(params: SamplingParams, constraint: GrammarConstraint | None) -> bool:
    """Whether a request's steps may run in the overlapped loop (engine.core), whose next step is planned
    before the host knows the token just sampled: sampled here, and nothing in its plan reads its output
    ids (the penalties count them) nor needs a pass of its own (prompt logprobs)."""
    return (
        supports(params, constraint)
        and params.prompt_logprobs is None
        and params.repetition_penalty == 1.0
        and not params.presence_penalty
        and not params.frequency_penalty
    )


def _bits(values: list[float]) -> np.ndarray:
    """Floats carried in the int64 upload: their float64 bits (read back with ``view(torch.float64)``)."""
    return np.array(values, dtype=np.float64).view(np.int64)


def _floats(bits: torch.Tensor) -> torch.Tensor:
    """The float32 ``[n, 1]`` column of :func:`_bits` values on the device: float64 to float32 rounds as
    ``torch.tensor(values, dtype=torch.float32)`` does, so the columns equal the host sampler's."""
    return bits.view(torch.float64).to(torch.float32).unsqueeze(1)


def _padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, int]:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out.ravel(), width


@dataclass(slots=True)
class SamplingPlan:
    """One step's sampling as the host prepared it: the int64 arrays to upload, in order, and what the host
    knows of them (which steps run, the padded widths), so that :meth:`DeviceSampler.sample` never asks the
    device."""

    arrays: list[np.ndarray]
    params: list[SamplingParams]
    vocab: int
    process: bool  # some row has a bias, a min_tokens ban or a penalty
    repeat_width: int  # ids per row of the repetition-penalty rows
    penalty_width: int  # ids per row of the presence/frequency rows


class DeviceSampler:
    """Plans a step's sampling on the host and samples on the logits' device. Holds only its own seed (for
    rows without one) and how many such rows it has drawn for."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else seed
        self.draws = 0

    def plan(
        self,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        prompt_token_ids: list[list[int]],
        vocab: int,
        pending: list[int] | None = None,
    ) -> SamplingPlan:
        """The arrays of one step's rows (those :func:`supports`), a few numpy operations per row.

        `pending`: per row, tokens it has sampled that are not in its output ids yet (the overlapped loop's
        placeholders), counted in its output's length: a seed's counter, min_tokens. Only rows that
        :func:`overlaps` may have some."""
        n = len(params)
        counts = [len(out) for out in output_token_ids]
        if pending is not None:
            counts = [c + k for c, k in zip(counts, pending, strict=True)]
        seeds, counters = [], []
        for p, count in zip(params, counts, strict=True):
            if p.seed is not None:
                seeds.append(p.seed)
                counters.append(count)
            elif not p.greedy:
                seeds.append(self.seed)
                counters.append(self.draws)
                self.draws += 1
            else:
                seeds.append(0)
                counters.append(0)
        keys = row_keys(seeds, counters) if n else np.zeros((0, 2), dtype=np.int64)
        greedy = np.array([p.greedy for p in params], dtype=np.int64)
        temperature = _bits([1.0 if p.greedy else p.temperature for p in params])
        top_k = np.array([p.top_k if not p.greedy and 0 < p.top_k < vocab else 0 for p in params], np.int64)
        top_p = _bits(
            [max(p.top_p, _MIN_TOP_P) if not p.greedy and p.top_p < 1.0 else math.inf for p in params]
        )
        min_p = _bits([0.0 if p.greedy else p.min_p for p in params])
        arrays = [keys.ravel(), greedy, temperature, top_k, top_p, min_p]

        process = any(_needs_processing(p, count) for p, count in zip(params, counts, strict=True))
        bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
        repeat_rows, repeat_penalty, seen = [], [], []
        penalty_rows, presence, frequency, counted = [], [], [], []
        for i, (p, out, count) in enumerate(zip(params, output_token_ids, counts, strict=True)):
            assert count == len(out) or overlaps(p, None), "the penalties read every output id"
            bias_rows += [i] * len(p.logit_bias)
            bias_ids += list(p.logit_bias)
            bias_values += list(p.logit_bias.values())
            if count < p.min_tokens:
                ids = [t for t in p.stop_token_ids if 0 <= t < vocab]
                ban_rows += [i] * len(ids)
                ban_ids += ids
            if p.repetition_penalty != 1.0:
                repeat_rows.append(i)
                repeat_penalty.append(p.repetition_penalty)
                seen.append(prompt_token_ids[i] + out)
            if (p.presence_penalty or p.frequency_penalty) and out:
                penalty_rows.append(i)
                presence.append(p.presence_penalty)
                frequency.append(p.frequency_penalty)
                counted.append(out)
        seen_ids, repeat_width = _padded(seen, vocab)
        counted_ids, penalty_width = _padded(counted, vocab)
        ints = np.array
        arrays += [ints(bias_rows, np.int64), ints(bias_ids, np.int64), _bits(bias_values)]
        arrays += [ints(ban_rows, np.int64), ints(ban_ids, np.int64)]
        arrays += [ints(repeat_rows, np.int64), _bits(repeat_penalty), seen_ids]
        arrays += [ints(penalty_rows, np.int64), _bits(presence), _bits(frequency), counted_ids]
        return SamplingPlan(arrays, params, vocab, process, repeat_width, penalty_width)

    @staticmethod
    def sample(logits: torch.Tensor, plan: SamplingPlan, arrays: list[torch.Tensor]) -> torch.Tensor:
        """int64 ``[n]`` token ids on the device, -1 for a row with nothing to sample (all -inf, NaN, or +inf
        in a row that samples). `arrays` are `plan.arrays` on the logits' device."""
        (keys, greedy, temperature, top_k, top_p, min_p) = arrays[:6]
        (bias_rows, bias_ids, bias_values, ban_rows, ban_ids) = arrays[6:11]
        (repeat_rows, repeat_penalty, seen_ids, penalty_rows, presence, frequency, counted_ids) = arrays[11:]
        params, vocab = plan.params, plan.vocab
        x = logits.to(torch.float32, copy=plan.process)
        # The host sampler's steps 2 and 3 (engine.sampler.process_logits), in its order, from the arrays.
        if bias_rows.numel():
            x.index_put_((bias_rows, bias_ids), bias_values.view(torch.float64).float(), accumulate=True)
        if ban_rows.numel():
            x.index_put_((ban_rows, ban_ids), torch.full((), -math.inf, device=x.device))
        if repeat_rows.numel():
            seen = torch.zeros(repeat_rows.shape[0], vocab + 1, dtype=torch.bool, device=x.device)
            seen.scatter_(1, seen_ids.view(repeat_rows.shape[0], plan.repeat_width), True)
            rows = x[repeat_rows]
            penalty = _floats(repeat_penalty)
            scaled = torch.where(rows > 0, rows / penalty, rows * penalty)
            x[repeat_rows] = torch.where(seen[:, :vocab], scaled, rows)
        if penalty_rows.numel():
            ids = counted_ids.view(penalty_rows.shape[0], plan.penalty_width)
            counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=x.device)
            counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=x.device))
            counts = counts[:, :vocab]
            x[penalty_rows] -= _floats(presence) * (counts > 0) + _floats(frequency) * counts

        random = [not p.greedy for p in params]
        token_ids: torch.Tensor | None = None
        if not all(random):
            token_ids = greedy_argmax(x)
            best = x.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            token_ids = token_ids.masked_fill(~(best > -math.inf), -1)
        if any(random):
            drawn = [p for p in params if not p.greedy]
            any_top_k = any(0 < p.top_k < vocab for p in drawn)
            any_top_p = any(p.top_p < 1.0 for p in drawn)
            settings = FilterSettings(
                _floats(temperature) if any(p.temperature != 1.0 for p in drawn) else None,
                top_k.clamp(min=1).unsqueeze(1) if any_top_k or any_top_p else None,
                (top_k > 0).unsqueeze(1) if any_top_k or any_top_p else None,
                max((p.top_k for p in drawn if 0 < p.top_k < vocab), default=0),
                _floats(top_p) if any_top_p else None,
                _floats(min_p) if any(p.min_p > 0.0 for p in drawn) else None,
            )
            score = filtered_logits(x, settings).to(torch.float64) + gumbel_noise(keys.view(-1, 2), vocab)
            raced = score.argmax(dim=-1)
            best = score.gather(1, raced.unsqueeze(1)).squeeze(1)
            raced = raced.masked_fill(~((best > -math.inf) & (best < math.inf)), -1)
            token_ids = raced if token_ids is None else torch.where(greedy.bool(), token_ids, raced)
        assert token_ids is not None
        return token_ids
