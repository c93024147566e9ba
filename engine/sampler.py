"""Sampling: one step's logits ``[B, V]`` in, one token per request out, with its logprobs when asked.

Order of operations, for every row (the fast path and its reference twin follow the same steps):

1. the request's logits processors, in order (constrained decoding; tests that force tokens);
2. logit bias: ``logit[t] += bias[t]``; then, while the request has fewer than ``min_tokens`` outputs, its
   stop token ids are set to ``-inf`` (vLLM's min_tokens);
3. the repetition penalty (vLLM's and Hugging Face's), over every token seen in the prompt or the output:
   ``logit[t] /= r`` where the logit is positive, ``logit[t] *= r`` elsewhere; then the presence and
   frequency penalties as OpenAI defines them, counted over the request's *output* tokens only:
   ``logit[t] -= presence · (count[t] > 0) + frequency · count[t]``;
4. greedy rows (temperature 0) take the argmax of these processed logits, the lowest id among ties;
5. other rows divide by the temperature, keep the tokens that pass every filter, renormalize and sample:

   - top-k: logit >= the k-th largest logit;
   - top-p, on the top-k survivors: rank them by probability, find the smallest prefix whose mass reaches
     top_p (a token is in it when the mass ranked before it is < top_p); keep every token at least as likely
     as the prefix's last one;
   - min-p: ``p >= min_p · p_max``, both of the temperature-scaled distribution before top-k and top-p.

Every filter is a threshold, so tokens tied at a boundary are kept or dropped together and the kept set never
depends on how a sort breaks ties. ``top_k = 0``, ``top_p = 1`` and ``min_p = 0`` turn a filter off.

Sampling is by inverse CDF with one uniform draw per row: the token whose float64 cumulative-probability
interval holds ``u · total``. It needs no host sync, and the draw is one number per row rather than the V
exponentials of the "exponential race" ``argmax(p / q)``, which on the CPU cost several times the whole
inverse-CDF step at a 200k vocabulary (float64 keeps even 1e-8-probability tokens at their exact odds). A row
whose request has its own generator (a seeded request, see :func:`make_generator`) draws its ``u`` from that
generator alone, so the sampler gives a seeded request the same tokens for the same logits whatever else is
in the batch and wherever its row is. The logits themselves are not always bit-identical across batch mixes
(a batched forward rounds differently from a lone one), so a near-tie between two tokens can still go the
other way in another batch. Rows without a generator share the sampler's and draw in one batched call.

Logprobs are those of the model's raw distribution: ``log_softmax`` of the logits as given, before processors,
bias, penalties, temperature and filters (vLLM's default, "raw_logprobs"). They say what the model thinks,
whatever the sampling settings; a token forced by a processor can therefore have a raw logprob of ``-inf``.

One row's failure is that row's alone: a processor that raises, a row left with nothing to sample (all
``-inf``, NaN), or a row that makes the batched filter raise (found by sampling the rows one by one, with the
same uniforms) gets its reason in :attr:`SamplerOutput.errors` and no token, and the other rows are sampled
as if it were not there. The engine then ends that request alone.

:func:`process_logits` and :func:`filtered_probs` (steps 1-3 and 4-5) are public so tests can compare the
distributions themselves, not only samples, with their plain twins :func:`process_logits_reference` and
:func:`filtered_probs_reference`; :func:`sample_reference` is the twin of :meth:`Sampler.sample`. The twins
are for tests only: they loop over rows and over the vocabulary in Python.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch

from engine.constraint import StepMasks
from engine.request import SamplingParams, SamplingParamsError, TokenLogprob

logger = logging.getLogger(__name__)

_SEED_MODULUS = 2**64
# Above this k (and whenever a row has top-p) top-k takes the k-th value from a full sort rather than topk.
_MAX_TOPK_WITHOUT_SORT = 1024
# Chunk width of the CPU argmax (see greedy_argmax); about the fastest for 16-64 rows of a 200k vocabulary.
_ARGMAX_CHUNK = 1024
# The smallest top_p the filter uses. A top_p that float32 rounds to 0 (1e-50, say) would keep no token at
# all; any top_p below the most likely token's probability keeps just that token (and its ties), and so does
# this, float32's smallest normal number. So tinier values are raised to it: the same tokens kept, no refusal.
_MIN_TOP_P = float(torch.finfo(torch.float32).tiny)
# A row's error when its processed logits leave nothing to sample: every logit -inf or NaN, or +inf ones.
_NO_TOKEN = (
    "no token can be sampled: after the logits processors, bias and penalties the logits are all -inf, or "
    "NaN (or +inf, which a temperature > 0 cannot sample from)"
)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded request's own random stream. The engine makes one per request, once, on the logits' device,
    and passes it with the request's row at every step (and keeps it across preemption)."""
    generator = torch.Generator(device=device)
    # torch accepts seeds in [-2**63, 2**64); any Python int maps into that range.
    generator.manual_seed(seed % _SEED_MODULUS)
    return generator


def check_params_for_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Refuse what SamplingParams cannot check alone because it does not know the vocabulary: logit_bias keys
    outside ``[0, vocab_size)``. The engine calls this at admission, not per step."""
    bad_ids = sorted(t for t in params.logit_bias if not 0 <= t < vocab_size)
    if bad_ids:
        raise SamplingParamsError(
            f"logit_bias token ids must be in [0, {vocab_size}), got {bad_ids[:5]}"
            + (f" and {len(bad_ids) - 5} more" if len(bad_ids) > 5 else ""),
            "logit_bias",
        )


@dataclass(slots=True)
class SamplerOutput:
    # One sampled token id per row; None for a row that failed (see `errors`).
    token_ids: list[int | None]
    # Per row: the sampled token's raw logprob and its top alternatives when params.logprobs is not None.
    logprobs: list[TokenLogprob | None]
    # Per row: why no token could be sampled for it (its request fails, alone), or None.
    errors: list[str | None]


def _check_batch(
    logits: torch.Tensor, params: list[SamplingParams], output_token_ids: list[list[int]]
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if not len(params) == len(output_token_ids) == logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} logits rows, {len(params)} params and {len(output_token_ids)} output id lists"
        )


def _host_column(
    values: list[float] | list[int] | list[bool], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-row settings as a ``[n, 1]`` column on the logits' device (a host-to-device copy, never a sync)."""
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Fast path: batched over rows, no Python loop over the vocabulary.


def _needs_processing(p: SamplingParams, num_outputs: int) -> bool:
    return bool(
        p.logits_processors
        or p.logit_bias
        or p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or (p.stop_token_ids and num_outputs < p.min_tokens)
    )


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    errors: list[str | None] | None = None,
    prompt_token_ids: list[list[int]] | None = None,
) -> torch.Tensor:
    """Steps 1-3 for the whole batch: float32 ``[B, V]``. ``logits`` is never modified: the result is a new
    tensor, or, when no row has a processor, a bias, a min_tokens mask or a penalty, ``logits`` itself
    (upcast if need be).

    ``prompt_token_ids[i]`` is row i's prompt, read only by the repetition penalty (required when a row has
    one). Each step a penalized row's prompt and output ids go to the device as one list, in time linear in
    the context (a few milliseconds per 100k tokens on the host), which only those rows pay.

    Processors must not modify the output id list they are given (it is the engine's). A processor is the
    request's own code, so it may raise: without ``errors`` that propagates; with ``errors`` (one entry per
    row) the row's error is recorded there, the row is zeroed (a finite row that sampling cannot trip on) and
    its bias and penalties are skipped, and the other rows go on."""
    _check_batch(logits, params, output_token_ids)
    if not any(_needs_processing(p, len(out)) for p, out in zip(params, output_token_ids, strict=True)):
        return logits.to(torch.float32)
    if prompt_token_ids is None and any(p.repetition_penalty != 1.0 for p in params):
        raise ValueError("a repetition penalty needs the prompt token ids")
    x = logits.to(torch.float32, copy=True)
    vocab = x.shape[1]
    device = x.device

    for i, p in enumerate(params):
        try:
            for processor in p.logits_processors:
                row = processor(output_token_ids[i], x[i])
                if row.shape != (vocab,):
                    raise ValueError(
                        f"a logits processor returned shape {tuple(row.shape)}, expected ({vocab},)"
                    )
                x[i] = row
            if p.logit_bias:
                # Checked here too, on the host: an id out of range would be a device-side assert on a GPU.
                check_params_for_vocab(p, vocab)
        except Exception as error:
            if errors is None:
                raise
            errors[i] = f"processing the logits failed: {type(error).__name__}: {error}"
            x[i] = 0.0

    def ok(i: int) -> bool:
        return errors is None or errors[i] is None

    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    for i, p in enumerate(params):
        if not ok(i):
            continue
        bias_rows.extend([i] * len(p.logit_bias))
        bias_ids.extend(p.logit_bias.keys())
        bias_values.extend(p.logit_bias.values())
    if bias_rows:
        index = (
            torch.tensor(bias_rows, dtype=torch.int64, device=device),
            torch.tensor(bias_ids, dtype=torch.int64, device=device),
        )
        x.index_put_(index, torch.tensor(bias_values, dtype=torch.float32, device=device), accumulate=True)

    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i, p in enumerate(params):
        if ok(i) and len(output_token_ids[i]) < p.min_tokens:
            ids = [t for t in p.stop_token_ids if 0 <= t < vocab]
            ban_rows.extend([i] * len(ids))
            ban_ids.extend(ids)
    if ban_rows:
        index = (
            torch.tensor(ban_rows, dtype=torch.int64, device=device),
            torch.tensor(ban_ids, dtype=torch.int64, device=device),
        )
        x.index_put_(index, torch.tensor(-math.inf, dtype=torch.float32, device=device))

    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and ok(i)]
    if repeated:
        assert prompt_token_ids is not None
        # Seen tokens per row via one scatter over the ids padded with an extra column V, dropped after.
        seen_ids = [prompt_token_ids[i] + output_token_ids[i] for i in repeated]
        width = max(len(ids) for ids in seen_ids)
        padded = torch.tensor(
            [ids + [vocab] * (width - len(ids)) for ids in seen_ids], dtype=torch.int64, device=device
        )
        seen = torch.zeros(len(repeated), vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, padded, True)
        seen = seen[:, :vocab]
        index = torch.tensor(repeated, dtype=torch.int64, device=device)
        rows = x[index]
        penalty = _host_column([params[i].repetition_penalty for i in repeated], torch.float32, device)
        scaled = torch.where(rows > 0, rows / penalty, rows * penalty)
        x[index] = torch.where(seen, scaled, rows)

    penalized = [
        i
        for i, p in enumerate(params)
        if (p.presence_penalty or p.frequency_penalty) and output_token_ids[i] and ok(i)
    ]
    if penalized:
        # Counts per row via one scatter_add over the output ids padded with an extra column V, dropped after.
        width = max(len(output_token_ids[i]) for i in penalized)
        padded = [output_token_ids[i] + [vocab] * (width - len(output_token_ids[i])) for i in penalized]
        ids = torch.tensor(padded, dtype=torch.int64, device=device)
        counts = torch.zeros(len(penalized), vocab + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
        counts = counts[:, :vocab]
        presence = _host_column([params[i].presence_penalty for i in penalized], torch.float32, device)
        frequency = _host_column([params[i].frequency_penalty for i in penalized], torch.float32, device)
        penalty = presence * (counts > 0) + frequency * counts
        # (Rows are distinct, so a plain indexed update; index_add_ is needlessly slow on the CPU.)
        x[torch.tensor(penalized, dtype=torch.int64, device=device)] -= penalty
    return x


def greedy_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a ``[B, V]`` tensor: per row, the index of the first maximum (NaN counting as
    the maximum, as in argmax).

    On the CPU, argmax walks a row one element at a time carrying the index, several times slower than a
    vectorised max: at 16 rows of a 200k vocabulary it cost a third of a tiny model's whole step. So the row
    is cut into chunks; amax gives each chunk's maximum, argmax over those (one per chunk) finds the first
    chunk holding the row's maximum, and argmax runs only inside that chunk. First chunk, then first index
    in it: the first maximum of the row, ties and NaN included. Other devices take argmax directly.
    """
    vocab = x.shape[1]
    if x.device.type != "cpu" or vocab < 2 * _ARGMAX_CHUNK:
        return x.argmax(dim=-1)
    width = _ARGMAX_CHUNK
    whole = vocab // width
    maxima = x[:, : whole * width].unflatten(1, (whole, width)).amax(dim=-1)
    if whole * width < vocab:
        maxima = torch.cat((maxima, x[:, whole * width :].amax(dim=-1, keepdim=True)), dim=1)
    chunk = maxima.argmax(dim=-1, keepdim=True)
    columns = chunk * width + torch.arange(width, device=x.device)
    # The last chunk may be short: its missing columns read a real one and are masked to -inf, which never
    # wins there (the chunk was chosen for a value above -inf, or it is the first chunk).
    values = x.gather(1, columns.clamp(max=vocab - 1)).masked_fill(columns >= vocab, -math.inf)
    return chunk.squeeze(1) * width + values.argmax(dim=-1)


@dataclass(slots=True)
class FilterSettings:
    """Step 5's per-row settings as ``[n, 1]`` columns on the logits' device, with what the host knows of them
    (which filters some row uses, the largest k), so that no decision waits for the device. A column is None
    when no row uses its filter."""

    temperature: torch.Tensor | None  # float32; None when every row has temperature 1
    top_k: torch.Tensor | None  # int64 k, 1 where a row has no top-k
    top_k_on: torch.Tensor | None  # bool
    max_k: int  # the largest k of a row with top-k (0: none)
    top_p: torch.Tensor | None  # float32, inf where a row has no top-p
    min_p: torch.Tensor | None  # float32

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> FilterSettings:
        """The columns of `params`' rows, each a host-to-device copy (on the CPU, none)."""
        top_k_on = [0 < p.top_k < vocab for p in params]
        any_top_k, any_top_p = any(top_k_on), any(p.top_p < 1.0 for p in params)
        max_k = max(p.top_k for p, on in zip(params, top_k_on, strict=True) if on) if any_top_k else 0
        sort = any_top_k or any_top_p
        return cls(
            _host_column([p.temperature for p in params], torch.float32, device)
            if any(p.temperature != 1.0 for p in params)
            else None,
            _host_column(
                [p.top_k if on else 1 for p, on in zip(params, top_k_on, strict=True)], torch.int64, device
            )
            if sort
            else None,
            _host_column(top_k_on, torch.bool, device) if sort else None,
            max_k,
            # top_p = 1 is "off": a float cumsum may reach 1.0 before the tail and must not cut it.
            _host_column(
                [max(p.top_p, _MIN_TOP_P) if p.top_p < 1.0 else math.inf for p in params],
                torch.float32,
                device,
            )
            if any_top_p
            else None,
            _host_column([p.min_p for p in params], torch.float32, device)
            if any(p.min_p > 0.0 for p in params)
            else None,
        )


def filtered_logits(logits: torch.Tensor, s: FilterSettings) -> torch.Tensor:
    """Step 5's filters for rows that sample (temperature > 0): the temperature-scaled logits ``[n, V]`` with
    every token a filter drops set to -inf. Their softmax is the distribution the row samples from."""
    # Passes over [n, V] are what this costs on the CPU: each step below runs only when some row needs it.
    x = logits if s.temperature is None else logits / s.temperature
    keep: torch.Tensor | None = None
    if s.top_k is not None:
        assert s.top_k_on is not None
        # Both become a logit threshold applied to the unsorted row. Top-p needs the whole row sorted; top-k
        # alone needs only its first k, and topk is much cheaper than a sort of a 200k vocabulary.
        if s.top_p is not None or s.max_k > _MAX_TOPK_WITHOUT_SORT:
            sorted_x = x.sort(dim=-1, descending=True).values
        else:
            sorted_x = x.topk(s.max_k, dim=-1).values
        kth = torch.where(s.top_k_on, sorted_x.gather(1, s.top_k - 1), -math.inf)
        if s.max_k:
            keep = x >= kth
        if s.top_p is not None:
            sorted_x = sorted_x.masked_fill(sorted_x < kth, -math.inf)
            sorted_p = sorted_x.softmax(dim=-1)
            # The mass ranked before each token, shifted rather than `cumsum - p` so it never decreases.
            before = torch.cat((torch.zeros_like(sorted_p[:, :1]), sorted_p.cumsum(dim=-1)[:, :-1]), dim=1)
            # At least the first token (its `before` is 0 < top_p), and for a NaN row too: `last` is an index.
            last = ((before < s.top_p).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
            # If the survivors' mass rounds below top_p the prefix runs into the -inf tail; kth still holds.
            reached = x >= sorted_x.gather(1, last)
            keep = reached if keep is None else keep & reached

    if s.min_p is not None:
        ratio = torch.exp(x - x.max(dim=-1, keepdim=True).values)  # p / p_max
        keep = ratio >= s.min_p if keep is None else keep & (ratio >= s.min_p)

    if keep is not None:
        x = x.masked_fill(~keep, -math.inf)
    return x


def _filter_random_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Step 5's distributions for rows that sample (temperature > 0): float32 ``[n, V]`` probabilities."""
    assert all(not p.greedy for p in params), "greedy rows take the argmax and are never filtered"
    settings = FilterSettings.from_params(params, logits.shape[1], logits.device)
    return filtered_logits(logits, settings).softmax(dim=-1)


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Steps 4-5 on processed logits: float32 ``[B, V]``, each row the distribution that row samples from
    (for greedy rows, one-hot at the argmax)."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(params)} params")
    logits = logits.to(torch.float32)
    probs = torch.zeros_like(logits)
    probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        index = torch.tensor(random_rows, dtype=torch.int64, device=logits.device)
        probs[index] = _filter_random_rows(logits[index], [params[i] for i in random_rows])
    return probs


class Sampler:
    """Turns a step's logits into tokens. Holds only the generator that rows without their own share."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # None: torch's default generator for the logits' device. Otherwise it must live on that device.
        self.generator = generator

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        masks: StepMasks | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of ``logits`` ([B, V], float32 or any float dtype, which is upcast).

        A row with a grammar (``masks``, begun by the runner before the forward) samples only among the
        tokens its grammar allows next: its mask is applied after the processors, bias and penalties, before
        any filter, in place (on ``logits`` itself unless a row reads the raw logits for its logprobs).

        ``params[i]``, ``output_token_ids[i]`` (the request's output so far, for penalties and processors),
        ``generators[i]`` (the request's own generator, required when it has a seed) and
        ``prompt_token_ids[i]`` (its prompt, for the repetition penalty) describe row i. The one
        host sync is reading back the token ids (and the logprobs, when any row asks for them)."""
        if len(generators) != len(params):
            raise ValueError(f"{len(generators)} generators for {len(params)} params")
        for p, g in zip(params, generators, strict=True):
            if p.seed is not None and g is None:
                raise ValueError(
                    "a request with a seed needs its own generator (make_generator(seed, device))"
                )

        errors: list[str | None] = [None] * len(params)
        x = process_logits(logits, params, output_token_ids, errors, prompt_token_ids)
        if masks is not None:
            if x is logits and any(p.logprobs is not None for p in params):
                x = logits.clone()
            masks.apply(x, errors)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        # Drawn before anything can fail, so that a retry row by row reuses the same draws: the rows that did
        # not fail get the tokens the batch would have given them, and no generator advances twice.
        u = self._uniforms([generators[i] for i in random_rows], x.device)
        try:
            token_ids = _pick(x, params, u)
        except Exception:
            logger.exception("sampling %d rows failed as a batch; sampling them one by one", len(params))
            token_ids = _pick_row_by_row(x, params, u, errors)
        ids: list[int] = token_ids.tolist()
        for i, token in enumerate(ids):
            if token < 0 and errors[i] is None:
                errors[i] = _NO_TOKEN
        # Failed rows read token 0 here and their logprobs are dropped below.
        safe_ids = token_ids.clamp(min=0)
        try:
            logprobs = _raw_logprobs(logits, params, safe_ids)
        except Exception:
            logger.exception("logprobs of %d rows failed as a batch; computing them one by one", len(params))
            logprobs = [None] * len(params)
            for i, p in enumerate(params):
                try:
                    logprobs[i] = _raw_logprobs(logits[i : i + 1], [p], safe_ids[i : i + 1])[0]
                except Exception as error:
                    errors[i] = errors[i] or f"computing the logprobs failed: {type(error).__name__}: {error}"
        return SamplerOutput(
            [None if e is not None else t for t, e in zip(ids, errors, strict=True)],
            [None if e is not None else lp for lp, e in zip(logprobs, errors, strict=True)],
            errors,
        )

    def _uniforms(self, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
        """float64 ``[n, 1]`` uniforms in [0, 1): each own-generator row from its generator alone, the other
        rows in one batched draw from the shared generator."""
        u = torch.empty((len(generators), 1), dtype=torch.float64, device=device)
        if not generators:
            return u
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            u.uniform_(generator=self.generator)
        elif shared:
            draw = torch.empty((len(shared), 1), dtype=torch.float64, device=device)
            u[torch.tensor(shared, dtype=torch.int64, device=device)] = draw.uniform_(
                generator=self.generator
            )
        for j, g in enumerate(generators):
            if g is not None:
                u[j].uniform_(generator=g)
        return u


def _pick(x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Steps 4-5: int64 ``[B]`` token ids from processed logits, -1 for a row with nothing to sample. ``u``
    holds the uniforms of the random rows, in order."""
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(random_rows) == len(params):
        return _inverse_cdf(_filter_random_rows(x, params), u)
    token_ids = greedy_argmax(x)
    # A row of -inf, or one with NaN (argmax takes NaN for the maximum), has no token to pick.
    best = x.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    token_ids = token_ids.masked_fill(~(best > -math.inf), -1)
    if random_rows:
        index = torch.tensor(random_rows, dtype=torch.int64, device=x.device)
        token_ids[index] = _inverse_cdf(_filter_random_rows(x[index], [params[i] for i in random_rows]), u)
    return token_ids


def _pick_row_by_row(
    x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, errors: list[str | None]
) -> torch.Tensor:
    """:func:`_pick` one row at a time, after the batch raised: a row that raises alone gets its error in
    ``errors`` (and -1); the others get what the batch would have given them (each row is computed alone in
    the batch too, and ``u`` is the same draws)."""
    token_ids = torch.full((len(params),), -1, dtype=torch.int64, device=x.device)
    j = 0  # the row's uniform, for random rows
    for i, p in enumerate(params):
        row_u = u[j : j + 1] if not p.greedy else u[:0]
        j += 0 if p.greedy else 1
        if errors[i] is not None:
            continue
        try:
            token_ids[i] = _pick(x[i : i + 1], [p], row_u)[0]
        except Exception as error:
            errors[i] = f"sampling failed: {type(error).__name__}: {error}"
    return token_ids


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose cumulative-probability interval holds ``u · total``: token t with probability
    ``probs[t] / total``, and never a token of probability 0 (its interval is empty). -1 for a row whose total
    is not a positive number (NaN probabilities, or none left): it has nothing to sample."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:].contiguous()
    token = torch.searchsorted(cdf, u * total, right=True)
    # u · total can round up to total: the last token with mass is where the cdf first reaches the total.
    last = torch.searchsorted(cdf, total, right=False)
    # `total > 0` is false for NaN too.
    return torch.where(total > 0, torch.minimum(token, last), -1).squeeze(1)


def _raw_logprobs(
    logits: torch.Tensor, params: list[SamplingParams], token_ids: torch.Tensor
) -> list[TokenLogprob | None]:
    """The sampled tokens' logprobs and top alternatives under ``log_softmax(logits)``, for rows that ask."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return result
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits[index].to(torch.float32), dim=-1)
    chosen_ids = token_ids[index]
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
    k = min(max(params[i].logprobs or 0 for i in rows), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    for i, token, value, values, ids in zip(
        rows, chosen_ids.tolist(), chosen.tolist(), top_values.tolist(), top_ids.tolist(), strict=True
    ):
        n = params[i].logprobs or 0
        result[i] = TokenLogprob(token, value, list(zip(ids[:n], values[:n], strict=True)))
    return result


def score_tokens(logits: torch.Tensor, target_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprob]:
    """Per row of ``logits`` ``[R, V]``, the token ``target_ids[r]`` under ``log_softmax`` (the raw
    distribution, as for sampled tokens): its logprob, its rank (vLLM's: the number of tokens at least as
    likely, itself included, so 1 is the argmax) and the row's ``num_top[r]`` most likely tokens. Prompt
    logprobs are made of these."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = logprobs.gather(1, target_ids.unsqueeze(1))
    # An int32 sum: on the CPU about half the time of the default int64 one over a 201k vocabulary.
    ranks = (logprobs >= chosen).sum(dim=-1, dtype=torch.int32)
    k = min(max(num_top, default=0), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    return [
        TokenLogprob(token, value, list(zip(ids[:n], values[:n], strict=True)), rank)
        for token, value, rank, ids, values, n in zip(
            target_ids.tolist(),
            chosen.squeeze(1).tolist(),
            ranks.tolist(),
            top_ids.tolist(),
            top_values.tolist(),
            num_top,
            strict=True,
        )
    ]


# ----------------------------------------------------------------------------------------------------------
# Reference twins: plain, per row, in float64 Python; for tests only.


def process_logits_reference(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    prompt_token_ids: list[list[int]] | None = None,
) -> torch.Tensor:
    """Twin of :func:`process_logits`: one row at a time, bias and penalties token by token."""
    _check_batch(logits, params, output_token_ids)
    rows: list[list[float]] = []
    for i, p in enumerate(params):
        row = logits[i].to(torch.float32, copy=True)
        for processor in p.logits_processors:
            row = processor(output_token_ids[i], row)
        values = row.tolist()
        for token, bias in p.logit_bias.items():
            values[token] += bias
        if len(output_token_ids[i]) < p.min_tokens:
            for token in p.stop_token_ids:
                if 0 <= token < len(values):
                    values[token] = -math.inf
        if p.repetition_penalty != 1.0:
            assert prompt_token_ids is not None
            r = p.repetition_penalty
            for token in set(prompt_token_ids[i]) | set(output_token_ids[i]):
                values[token] = values[token] / r if values[token] > 0 else values[token] * r
        if p.presence_penalty or p.frequency_penalty:
            for token, count in Counter(output_token_ids[i]).items():
                values[token] -= p.presence_penalty + p.frequency_penalty * count
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float32, device=logits.device).reshape(logits.shape)


def _filtered_row_reference(row: list[float], p: SamplingParams) -> list[float]:
    vocab = len(row)
    if p.greedy:
        best = row.index(max(row))
        return [1.0 if t == best else 0.0 for t in range(vocab)]
    scaled = [v / p.temperature for v in row]
    top = max(scaled)
    assert top > -math.inf, "a row needs at least one finite logit"
    ratio = [math.exp(s - top) for s in scaled]  # p / p_max
    keep = [True] * vocab
    if 0 < p.top_k < vocab:
        kth = sorted(scaled, reverse=True)[p.top_k - 1]
        keep = [s >= kth for s in scaled]
    if p.top_p < 1.0:
        survivors = [t for t in range(vocab) if keep[t]]
        mass = sum(ratio[t] for t in survivors)
        ranked = sorted(survivors, key=lambda t: -scaled[t])
        before = 0.0
        last = ranked[0]
        for t in ranked:
            if before >= p.top_p:
                break
            last = t
            before += ratio[t] / mass
        keep = [keep[t] and scaled[t] >= scaled[last] for t in range(vocab)]
    if p.min_p > 0.0:
        keep = [keep[t] and ratio[t] >= p.min_p for t in range(vocab)]
    total = sum(ratio[t] for t in range(vocab) if keep[t])
    return [ratio[t] / total if keep[t] else 0.0 for t in range(vocab)]


def filtered_probs_reference(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Twin of :func:`filtered_probs`: float64 ``[B, V]``, filters written out with sorted lists."""
    rows = [_filtered_row_reference(logits[i].tolist(), p) for i, p in enumerate(params)]
    return torch.tensor(rows, dtype=torch.float64, device=logits.device).reshape(logits.shape)


def sample_reference(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
    generator: torch.Generator | None = None,
    prompt_token_ids: list[list[int]] | None = None,
) -> SamplerOutput:
    """Twin of :meth:`Sampler.sample`: greedy rows take the first maximum; other rows draw by inverse CDF
    (``torch.multinomial``) from their own generator or ``generator``. Same distributions as the fast path,
    not the same draws."""
    x = process_logits_reference(logits, params, output_token_ids, prompt_token_ids)
    probs = filtered_probs_reference(x, params)
    token_ids: list[int | None] = []
    logprobs: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        if p.greedy:
            row = x[i].tolist()
            token = row.index(max(row))
        else:
            own = generators[i]
            token = int(torch.multinomial(probs[i], 1, generator=own if own is not None else generator))
        token_ids.append(token)
        if p.logprobs is None:
            logprobs.append(None)
            continue
        raw = logits[i].to(torch.float64).tolist()
        top = max(raw)
        log_z = top + math.log(sum(math.exp(v - top) for v in raw))
        lp = [v - log_z for v in raw]
        best = sorted(range(len(raw)), key=lambda t: (-lp[t], t))[: p.logprobs]
        logprobs.append(TokenLogprob(token, lp[token], [(t, lp[t]) for t in best]))
    return SamplerOutput(token_ids, logprobs, [None] * len(token_ids))
