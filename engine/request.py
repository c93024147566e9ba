"""The plain data that crosses the engine's boundary: what a request asks for and what a step gives back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

import torch

from engine.constraint import Grammar, GrammarConstraint

# A per-request hook on the next token's logits: it gets the request's output token ids so far and the float32
# logits row [vocab] and returns the row to sample from (constrained decoding; forcing tokens in tests).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

MAX_TOP_LOGPROBS = 20
# Below this a temperature is refused (0 is greedy). The sampler divides float32 logits by it: 1e-300 is 0 in
# float32 and the division gives inf and NaN, and long before the denormal range a logit gap of 1e-3 is
# already e^100 at 1e-5, so any smaller temperature samples the argmax anyway (vLLM's sampling epsilon).
MIN_TEMPERATURE = 1e-5
# Above this the float32 division turns every logit into 0 (a uniform draw) and -inf / inf into NaN; it is
# float32's largest finite value, so every temperature that float32 holds is accepted.
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)
# OpenAI's bound on logit_bias values. A bias of this size already forces or bans a token; beyond it a
# float32 logit overflows to inf (1e308 is inf in float32), and inf - inf in the softmax is NaN.
MAX_LOGIT_BIAS = 100.0
# Bounds on repetition_penalty. vLLM takes any positive value; the bound keeps the scaled logits finite (a
# logit divided by 1e-40 is inf in float32, and inf - inf in the softmax is NaN) while leaving every value a
# client uses in practice (1.0 to 2.0) far inside.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0


class RequestError(ValueError):
    """A request the engine cannot take, and the field of the request that is at fault.

    `field` uses the engine's names (``prompt``, ``max_tokens``, a :class:`SamplingParams` field,
    ``request_id``); an API maps them onto its own parameter names.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SamplingParamsError(RequestError):
    """Sampling parameters out of range (or not valid for the model's vocabulary)."""


class RequestRejected(RequestError):
    """A request that can never run: too long for the context or the cache, bad token ids, a reused id."""


class LoraRefused(RequestError):
    """A LoRA adapter that cannot be loaded or unloaded now: its name is taken, every slot is full, requests
    are running with it. `field` names the load or unload request's field at fault."""


class LoraNotFound(RequestError):
    """No LoRA adapter of that name is loaded."""


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A loaded LoRA adapter: the name requests use, its id (never reused; on SamplingParams.lora_id and in
    the prefix cache's hashes) and the model's slot holding its weights."""

    name: str
    lora_id: int
    slot: int
    path: str


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    # Sampling ends when one of these is produced (it is included in the output).
    stop_token_ids: list[int] = field(default_factory=list)
    # Sampling ends when the output text contains one of these (the engine needs a detokenizer for them).
    stop: list[str] = field(default_factory=list)
    # Number of top alternatives to report with each sampled token's logprob; None: no logprobs at all.
    logprobs: int | None = None
    # The same for every prompt token after the first (scored in the prefill; see Request.prompt_logprobs).
    prompt_logprobs: int | None = None
    # Neither a stop token nor a stop string ends the request before it has this many output tokens (the stop
    # tokens cannot even be sampled until then, as in vLLM).
    min_tokens: int = 0
    # vLLM's and Hugging Face's: the logit of every token seen in the prompt or the output so far is divided
    # by this when positive and multiplied by it when negative; 1.0 is off.
    repetition_penalty: float = 1.0
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # Tokens outside the grammar are never sampled (structured outputs, enforced tool calls).
    grammar: Grammar | None = None
    # The LoRA adapter the request runs with (the id EngineCore.load_lora gave it); None: the base model.
    lora_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse what the engine step cannot compute; raises :class:`SamplingParamsError` naming the field.

        Runs at construction and again when the engine admits a request (the fields are mutable), so nothing
        that would raise inside a batched step, and so fail the other requests in it, gets that far."""
        self._check_types()
        temperature = self.temperature
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (
                temperature == 0.0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE,
                "temperature",
                f"must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}",
            ),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                "prompt_logprobs",
                f"must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be between 0 and max_tokens"),
            (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
                "repetition_penalty",
                f"must be between {MIN_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g} (1 is off)",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise SamplingParamsError(f"{name} {why}, got {getattr(self, name)!r}", name)
        # `not -M <= b <= M` is also true for NaN and for both infinities.
        bad_bias = [b for b in self.logit_bias.values() if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS]
        if bad_bias:
            raise SamplingParamsError(
                f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bad_bias[0]!r}",
                "logit_bias",
            )
        for stop in self.stop:
            if not stop:
                raise SamplingParamsError("stop strings must not be empty", "stop")
            try:
                stop.encode("utf-8")
            except UnicodeEncodeError as error:
                # A lone surrogate (JSON "\ud800") is a valid Python str but no text the model can produce.
                raise SamplingParamsError(
                    f"stop strings must be valid Unicode text, got {stop!r} ({error.reason})", "stop"
                ) from error

    def _check_types(self) -> None:
        """Types first, so that the range checks compare numbers (a str raises TypeError there) and the step
        builds its tensors from ints and floats (a float top_k fails torch.topk; a bool is not a count)."""

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        fields: list[tuple[str, bool, str]] = [
            ("max_tokens", integer(self.max_tokens), "an integer"),
            ("top_k", integer(self.top_k), "an integer"),
            ("logprobs", self.logprobs is None or integer(self.logprobs), "an integer or None"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or integer(self.prompt_logprobs),
                "an integer or None",
            ),
            ("min_tokens", integer(self.min_tokens), "an integer"),
            ("repetition_penalty", number(self.repetition_penalty), "a number"),
            ("seed", self.seed is None or integer(self.seed), "an integer or None"),
            ("lora_id", self.lora_id is None or integer(self.lora_id), "an integer or None"),
            ("temperature", number(self.temperature), "a number"),
            ("top_p", number(self.top_p), "a number"),
            ("min_p", number(self.min_p), "a number"),
            ("presence_penalty", number(self.presence_penalty), "a number"),
            ("frequency_penalty", number(self.frequency_penalty), "a number"),
            (
                "logit_bias",
                all(integer(t) and number(b) for t, b in self.logit_bias.items()),
                "a map of integer token ids to numbers",
            ),
            ("stop_token_ids", all(integer(t) for t in self.stop_token_ids), "a list of integer token ids"),
            ("stop", all(isinstance(s, str) for s in self.stop), "a list of strings"),
            ("logits_processors", all(callable(p) for p in self.logits_processors), "a list of callables"),
        ]
        for name, ok, what in fields:
            if not ok:
                raise SamplingParamsError(f"{name} must be {what}, got {getattr(self, name)!r}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(StrEnum):
    STOP = "stop"  # a stop token or a stop string
    LENGTH = "length"  # max_tokens, or the context limit
    ABORT = "abort"


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # The most likely alternatives, best first: (token id, logprob).
    top: list[tuple[int, float]] = field(default_factory=list)
    # For prompt tokens: how many tokens the model found at least as likely, this one included (1: the
    # argmax); None for sampled tokens.
    rank: int | None = None


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    # With params.prompt_logprobs: one entry per prompt token, the first None (nothing precedes it to score
    # it). Given once, whole, on the request's first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: FinishReason | None = None
    # For FinishReason.STOP: the stop token id or stop string that ended it.
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Set when the request was refused or the engine failed while running it.
    error: str | None = None
    # On the last output of a request that was admitted: seconds from its arrival to its first token (None if
    # it had none) and to its end. The engine measures these once, for every consumer.
    time_to_first_token: float | None = None
    latency: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class Request:
    """One request's state inside the engine. The scheduler owns it; the runner only reads it.

    The one scheduling rule works on two counters: `num_computed_tokens` (tokens whose KV is in the cache)
    catches up with `num_tokens` (prompt plus output so far) a chunk at a time.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # Output tokens may not run past this many tokens in all (the context limit, or prompt + max_tokens).
    max_total_tokens: int
    generator: torch.Generator | None = None
    # The grammar's state (params.grammar), advanced by each output token; kept across preemption, since
    # recomputing the KV does not change the output.
    constraint: GrammarConstraint | None = None
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Tokens sampled on the device whose ids the host has not read yet (the overlapped loop's placeholders,
    # engine.core): counted by the scheduler as tokens of the request, not yet in `all_token_ids`. 0 or 1
    # between steps.
    num_pending_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (reported as cached tokens).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    # Chained hashes of the full blocks of `all_token_ids`, extended as blocks fill up.
    block_hashes: list[bytes] = field(default_factory=list)
    output_bytes: bytearray = field(default_factory=bytearray)
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # With params.prompt_logprobs: the prompt tokens scored so far, the first None; extended by each prefill
    # chunk (position p's logits score token p + 1) and kept across preemption.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    # The model's adapter slot for params.lora_id (0: none), set at admission; fixed while the request lives,
    # since an adapter in use is never unloaded.
    lora_slot: int = 0

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs = [None]

    @property
    def prompt_logprobs_from(self) -> int | None:
        """The first position whose logits prompt logprobs still need, or None when none are needed.

        Position p's logits score prompt token p + 1, so with tokens 0..k-1 scored the next position is
        k - 1: the KV of positions before it may come from the prefix cache, its own may not (a cached
        position has no logits)."""
        if self.params.prompt_logprobs is None or len(self.prompt_logprobs) >= self.num_prompt_tokens:
            return None
        return len(self.prompt_logprobs) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
