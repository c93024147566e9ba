"""What every serving class shares: the engine and encoding, the model check, the prompt and output budget,
the sampling parameters, and the one place where a refused request becomes the API's 400.

Each API's service subclasses `Serving` and writes `_prepare` (body to engine requests) in the engine's terms:
a field at fault raises `RequestError` naming the engine-level field ("prompt", "max_tokens", "stop", a
`SamplingParams` field), and `prepare` names it as the API does through the service's `param_names`.

`_prepare` renders and tokenizes, which takes time in proportion to the request's text (seconds for a
few megabytes), so it runs on `Workers`, a bounded thread pool, never on the event loop: streams and /health
go on while a large prompt is tokenized. Admission, which counts slots on the event loop, comes after.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import tiktoken

from engine.constraint import Grammar, compile_within
from engine.request import LogitsProcessor, LoraNotFound, RequestError, SamplingParams, TokenLogprob
from harmony.grammar import (
    ChoiceFormat,
    FinalFormat,
    GrammarError,
    LarkFormat,
    Recipient,
    RegexFormat,
    ResponseFormat,
    ToolSpec,
    grammar_tokenizer,
    schema_grammar,
    turn_grammar,
)
from harmony.messages import Message, ToolNamespaceConfig
from harmony.messages import ResponseFormat as HarmonyResponseFormat
from harmony.render import Renderer
from server.async_engine import Admission, AsyncEngine
from server.errors import APIError, ContextLengthExceeded, ParamNames, not_found, request_error
from server.harmony_chat import ChatOutput, ChatOutputParser, Delta, DeltaKind, to_harmony
from server.protocol import ChatMessage, ChoicesRequest, GenerationRequest, Tool, TurnConstraints
from server.settings import ServerSettings


@dataclass(frozen=True, slots=True)
class ProcessorsHook:
    """Extra logits processors for a request's choices (see `create_app`): the seam through which tests make
    the real model say chosen tokens. `make` gets the request's body fields that no model declares
    (`model_extra`) and the choice index (in a Responses built-in tool loop, which has one choice, the index
    of the engine request in the loop: 0, then one more after each tool the server ran); `fields` names the
    ones it consumes, which are then not refused as unknown."""

    fields: frozenset[str]
    make: Callable[[dict[str, Any], int], list[LogitsProcessor]]


RequestT = TypeVar("RequestT", bound=GenerationRequest)
PreparedT = TypeVar("PreparedT")
T = TypeVar("T")
# JSON has no -inf (a banned or forced token's logprob); OpenAI and vLLM send this instead.
MIN_LOGPROB = -9999.0

# An engine request: prompt token ids and sampling parameters.
EngineRequest = tuple[list[int], SamplingParams]

# Who sent the request being served (set by the app's middleware for each HTTP request): the key of its
# share of the in-flight bound.
CLIENT: ContextVar[str] = ContextVar("client", default="")


class Workers:
    """The bounded pool that renders and tokenizes requests off the event loop.

    Its size bounds how many requests are tokenized at once (each holds a core while it runs; tiktoken
    releases the GIL while it encodes); the rest wait in line, costing only the memory their bodies already
    take. A request cancelled while it waits or runs (its client left) has its result dropped; no slot of
    the in-flight bound was taken yet, so nothing leaks.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="render")

    def warm_up(self, fn: Callable[[], object]) -> None:
        """Run `fn` once on every worker thread, without waiting for it. A thread's first tokenize sets up
        tiktoken's per-thread state while holding the GIL (about half a second, during which the event loop
        stops); done at start, no request pays for it."""
        barrier = threading.Barrier(self.size)

        def once() -> None:
            fn()
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=60)  # each task holds its thread until all have one: one task per thread

        for _ in range(self.size):
            self._pool.submit(once)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@functools.cache
def shared_grammar_tokenizer(encoding: tiktoken.Encoding) -> Any:
    """llguidance's view of the vocabulary, built on the first structured request (a second or two, over a
    hundred MB) and shared by every grammar after it."""
    return grammar_tokenizer(encoding)


def output_budget(
    prompt_len: int, requested: int | None, max_model_len: int, default: int | None = None
) -> int:
    """The output token limit of every API: what was asked for, else the API's default, else all the context
    left (a default never asks for more than is left). `ContextLengthExceeded` when the prompt leaves no room
    or the request asks for more than is left."""
    room = max_model_len - prompt_len
    if room < 1:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_len} tokens; this model's context is {max_model_len} tokens", "prompt"
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ContextLengthExceeded(
            f"the prompt ({prompt_len} tokens) plus {requested} output tokens exceeds this model's context "
            f"of {max_model_len} tokens",
            "max_tokens",
        )
    return requested


class StopTrimmer:
    """Holds back answer text that may be the start of a stop string, and cuts the answer at one.

    The text the client sees ends before the stop string (or after it, with vLLM's
    `include_stop_str_in_output`), streamed or not; `matched` is the stop string that ended it. Where several
    match, the one that starts first wins, then the first listed.
    """

    def __init__(self, stops: list[str], include: bool = False) -> None:
        self.stops = stops
        self.include = include
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        found = [(at, i) for i, stop in enumerate(self.stops) if (at := self.pending.find(stop)) >= 0]
        if found:
            cut, i = min(found)
            self.matched = self.stops[i]
            end = cut + len(self.matched) if self.include else cut
            out, self.pending = self.pending[:end], ""
            return out
        split = max(len(self.pending) - self.keep, 0)
        out, self.pending = self.pending[:split], self.pending[split:]
        return out

    def flush(self) -> str:
        """The text held back, now known not to start a stop string (the answer ended or was interrupted)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ChoiceOutput:
    """One choice's output as its client receives it, in chat and Responses: the harmony parser's deltas, the
    answer cut at the first stop string.

    Stop strings apply to the answer (the content: final and commentary text), never to reasoning, tool-call
    arguments or harmony's headers. So the engine is not given them (it would match them in the raw output,
    headers and reasoning included); the answer is matched here, and when it reaches one the choice is over:
    `stopped` is set, nothing more is produced, and the caller aborts the engine request. A stop string does
    not span text the answer was interrupted by (reasoning or a tool call between two parts of it).
    `tokens` counts the output tokens up to the one that completed the stop string.
    """

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        tools: Collection[str],
        stops: list[str],
        include_stop: bool,
        builtins: Collection[str] = (),
        on_anomalies: Callable[[int], None] | None = None,
    ) -> None:
        self.encoding = encoding
        self.parser = ChatOutputParser(encoding, tools, builtins)
        # Told how much malformed harmony each engine request's output held (the server's metrics).
        self.on_anomalies = on_anomalies
        self.trimmer = StopTrimmer(stops, include_stop)
        self.tokens = 0
        # Reasoning tokens and anomalies of the engine requests before the current one (a tool loop's).
        self._earlier = ChatOutput()
        self._ended = False

    def next_request(self) -> None:
        """The engine request ended on a call the server ran; the next one continues the same turn after
        the tool's message (a fresh `<|start|>assistant`). The answer's stop strings and counts carry on."""
        self.finish()
        output = self.parser.output
        self._earlier.reasoning_tokens += output.reasoning_tokens
        self._earlier.anomalies += output.anomalies
        self.parser = ChatOutputParser(self.encoding, self.parser.tools, self.parser.builtins)
        self._ended = self.stopped

    @property
    def reasoning_tokens(self) -> int:
        """The reasoning tokens of every engine request of the choice (once finished)."""
        return self._earlier.reasoning_tokens + self.parser.output.reasoning_tokens

    @property
    def output(self) -> ChatOutput:
        return self.parser.output

    @property
    def stopped(self) -> bool:
        return self.trimmer.stopped

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the answer, or None."""
        return self.trimmer.matched

    def feed(self, token: int) -> list[Delta]:
        if self._ended:
            return []
        self.tokens += 1
        deltas = self._trim(self.parser.feed(token))
        if self.stopped:
            self._ended = True
            # Completes the counts (reasoning tokens, anomalies); the text it flushes is past the stop.
            self.parser.finish()
            self._report()
        return deltas

    def finish(self) -> list[Delta]:
        """The engine request ended: what the parser and the trimmer still hold."""
        if self._ended:
            return []
        self._ended = True
        deltas = self._trim(self.parser.finish())
        self._report()
        tail = self.trimmer.flush()
        return [*deltas, Delta(DeltaKind.CONTENT, tail)] if tail else deltas

    def _report(self) -> None:
        anomalies = self.parser.output.anomalies
        if anomalies and self.on_anomalies is not None:
            self.on_anomalies(anomalies)

    def _trim(self, deltas: list[Delta]) -> list[Delta]:
        out: list[Delta] = []
        for delta in deltas:
            if self.stopped:
                break
            if delta.kind is DeltaKind.CONTENT:
                delta.text = self.trimmer.feed(delta.text)
                if delta.text:
                    out.append(delta)
                continue
            held = self.trimmer.flush()  # the answer was interrupted: what it held goes out first
            if held:
                out.append(Delta(DeltaKind.CONTENT, held))
            out.append(delta)
        return out


class Serving(ABC, Generic[RequestT, PreparedT]):
    """A serving class: turns one API's request bodies into admitted engine requests and their outputs into
    the API's responses."""

    # Whether the engine matches the request's stop strings against the raw output text (the legacy
    # completions, which has no harmony), rather than the service against the answer (`ChoiceOutput`).
    engine_stops: ClassVar[bool] = True

    def __init__(
        self,
        engine: AsyncEngine,
        encoding: tiktoken.Encoding,
        settings: ServerSettings,
        max_model_len: int,
        workers: Workers,
        processors_hook: ProcessorsHook | None = None,
        *,
        on_anomalies: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        # Counts malformed harmony in the outputs (the server's metrics), where the API parses harmony.
        self.on_anomalies = on_anomalies
        self.workers = workers
        self.encoding = encoding
        self.renderer = Renderer(encoding)
        self.settings = settings
        self.max_model_len = max_model_len
        self.processors_hook = processors_hook

    @abstractmethod
    def param_names(self, request: RequestT) -> ParamNames:
        """This API's names for the engine-level fields a `RequestError` may name."""

    @abstractmethod
    def _prepare(self, request: RequestT) -> tuple[PreparedT, list[EngineRequest]]:
        """Validate and render `request` (on a worker thread: it must not touch the event loop's state): the
        prepared request and its engine requests. A field at fault raises `RequestError`."""

    async def prepare(self, request: RequestT) -> tuple[PreparedT, Admission]:
        """Everything that can refuse a request happens here, before any byte of the response is sent. The
        admission, taken last (nothing may refuse the request once its slots are taken), is the caller's to
        release."""
        lora_id = self.lora_id(request.model)
        with self.in_api_terms(request):
            self._check_sequences(request)
            prepared, requests = await self.workers.run(self._prepare, request)
            assert len(requests) == self.sequences(request)
            for _, params in requests:
                params.lora_id = lora_id
            # On the event loop, with no await between the check and the count (see `AsyncEngine.admit`).
            try:
                return prepared, self.engine.admit(requests, client=CLIENT.get())
            except LoraNotFound:  # unloaded while the request was rendered: as if it had never been there
                raise self.model_not_found(request.model) from None

    def lora_id(self, model: str) -> int | None:
        """The LoRA adapter a request's `model` names (None: the base model), else a 404 naming what is
        served."""
        if model == self.settings.served_model_name:
            return None
        adapter = self.engine.engine.loras.get(model)
        if adapter is None:
            raise self.model_not_found(model)
        return adapter.lora_id

    def model_not_found(self, model: str) -> APIError:
        """The 404 for a `model` that is neither the base model nor a loaded adapter, naming those."""
        # One read: the engine thread replaces the mapping, never edits it.
        served = ", ".join(
            repr(name) for name in [self.settings.served_model_name, *self.engine.engine.loras]
        )
        return not_found(f"the model {model!r} does not exist; this server serves {served}", param="model")

    def sequences(self, request: RequestT) -> int:
        """How many engine requests `request` becomes: its choices (completions: prompts x choices)."""
        return request.n if isinstance(request, ChoicesRequest) else 1

    def _check_sequences(self, request: RequestT) -> None:
        """Refuse, before rendering, a request of more sequences than one request may have, or than the
        in-flight bound could ever admit (a 429 would have the client retry in vain)."""
        count = self.sequences(request)
        limit = self.settings.max_sequences_per_request
        for bound in (self.engine.max_in_flight, self.engine.max_in_flight_per_client):
            if bound is not None:
                limit = min(limit, bound)
        if count > limit:
            per_prompt = getattr(request, "best_of", None) or getattr(request, "n", 1)
            named = "best_of" if getattr(request, "best_of", None) else "n"
            field = named if count == per_prompt else "prompt"
            message = f"the request asks for {count} sequences (prompts x {named}); at most {limit} are taken"
            raise RequestError(message, field)

    @contextmanager
    def in_api_terms(self, request: RequestT) -> Iterator[None]:
        """A `RequestError` raised inside becomes the API's 400, naming the field as `request`'s API does."""
        try:
            yield
        except RequestError as error:
            # The adapter a request runs with comes from its `model`.
            names = {"lora_id": "model", **self.param_names(request)}
            raise request_error(error, names) from error

    # -- shared pieces of `_prepare` ----------------------------------------------------------------------

    def check_text_size(self, chars: int) -> None:
        """Refuse a prompt of more than `max_prompt_chars` characters before tokenizing it: tokenizing costs
        time in proportion, and no prompt that long fits a model's context anyway."""
        limit = self.settings.max_prompt_chars
        if chars > limit:
            raise RequestError(
                f"the prompt's text is {chars} characters; at most {limit} are taken",
                "prompt",
            )

    def render(
        self,
        messages: Sequence[ChatMessage | Message],
        tools: list[Tool] | None,
        effort: str | None,
        response_format: HarmonyResponseFormat | None = None,
        builtin_tools: dict[str, ToolNamespaceConfig] | None = None,
    ) -> list[int]:
        """The prompt ids for a conversation, within the per-request limits on messages, tools and text."""
        self.check_text_size(conversation_chars(messages, tools))
        if len(messages) > self.settings.max_messages:
            raise RequestError(
                f"at most {self.settings.max_messages} messages per request, got {len(messages)}", "prompt"
            )
        if len(tools or []) > self.settings.max_tools:
            raise RequestError(
                f"at most {self.settings.max_tools} tools per request, got {len(tools or [])}", "tools"
            )
        conversation = to_harmony(
            messages,
            tools or None,
            effort=effort,
            date_setting=self.settings.conversation_date,
            default_effort=self.settings.default_reasoning_effort,
            response_format=response_format,
            builtin_tools=builtin_tools,
        )
        try:
            return self.renderer.render_for_completion(conversation)
        except ValueError as error:
            raise RequestError(f"the conversation cannot be rendered: {error}", "prompt") from error

    def reasoning_budget(self, requested: int | None, effort: str | None) -> int | None:
        """The reasoning budget of a request that asked for `requested` (None: none) with reasoning `effort`
        (None: the server's default effort): the request's own, else the server's for that effort, else the
        server's for all (None: no bound)."""
        if requested is not None:
            return requested
        by_effort = self.settings.thinking_token_budget_by_effort
        level = effort or self.settings.default_reasoning_effort
        return by_effort.get(level, self.settings.thinking_token_budget)

    def turn_constraint(
        self,
        answer: FinalFormat | None,
        tools: list[Tool],
        tool_choice: str,
        *,
        allowed: list[str] | None = None,
        budget: int | None = None,
        effort: str | None = None,
        recipients: list[Recipient] | None = None,
        allowed_recipients: list[str] | None = None,
        field: str = "grammar",
        tool_field: str = "tools[{i}].function.parameters",
    ) -> Grammar | None:
        """The whole-turn grammar of a request (see `harmony.grammar.turn_grammar`): the final answer held to
        `answer`, the tool choice enforced, the strict tools' arguments to their schemas, the reasoning within
        `budget` tokens (None: the server's default for the request's reasoning `effort`, see
        :meth:`reasoning_budget`), the other `recipients` (built-in tools) callable as the tool choice and
        `allowed_recipients` say. None when nothing is constrained.

        Compiled here, on a worker, within the server's compile budget, so that the engine's own check at
        admission finds it already known; refused naming `field` (the engine's "grammar" is the API's
        response format) when it cannot be enforced or takes too long to compile; a strict tool whose schema
        cannot be enforced is refused naming that tool's parameters (`tool_field`)."""
        specs = [
            ToolSpec(t.function.name, t.function.parameters or {}, bool(t.function.strict)) for t in tools
        ]
        tokenizer = shared_grammar_tokenizer(self.encoding)
        timeout = self.settings.grammar_compile_timeout
        for i, spec in enumerate(specs):
            if spec.strict and spec.parameters:
                problem = compile_within(Grammar(schema_grammar(spec.parameters), tokenizer), timeout)
                if problem is not None:
                    raise RequestError(
                        f"the strict tool {spec.name!r} cannot be enforced: {problem}", tool_field.format(i=i)
                    )
        try:
            text = turn_grammar(
                response_format=answer,
                tools=specs,
                tool_choice=tool_choice,
                allowed=allowed,
                reasoning_budget=self.reasoning_budget(budget, effort),
                closing=self.settings.thinking_budget_closing,
                recipients=recipients,
                allowed_recipients=allowed_recipients,
            )
        except GrammarError as error:
            raise RequestError(f"the output cannot be constrained: {error}", field) from error
        if text is None:
            return None
        grammar = Grammar(text, tokenizer)
        problem = compile_within(grammar, timeout)
        if problem is not None:
            raise RequestError(f"the output cannot be constrained: {problem}", field)
        return grammar

    def sampling_params(
        self,
        request: RequestT,
        max_tokens: int,
        *,
        index: int = 0,
        stop_token_ids: list[int],
        logprobs: int | None = None,
        top_k: int = 0,
        min_p: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        grammar: Grammar | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The engine's parameters for choice `index` of `request`: the settings' defaults for what it leaves
        out, its seed offset by the choice (so choices differ but repeat), the processors hook's additions.

        `stop_token_ids` are the API's end tokens: with `ignore_eos` none is passed, so only the token limit,
        a stop string or the request's own `stop_token_ids` ends the output."""
        choices = request if isinstance(request, ChoicesRequest) else None
        stops = stop_strings(request.stop) if self.engine_stops else []
        hook = self.processors_hook
        hooked = hook.make(request.model_extra or {}, index) if hook is not None else []
        extra_stops = (choices.stop_token_ids or []) if choices is not None else []
        if any(t >= self.encoding.n_vocab for t in extra_stops):
            raise RequestError(f"stop_token_ids must be below {self.encoding.n_vocab}", "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.settings.default_temperature
            if request.temperature is None
            else request.temperature,
            top_p=self.settings.default_top_p if request.top_p is None else request.top_p,
            top_k=top_k,
            min_p=min_p,
            presence_penalty=choices.presence_penalty if choices is not None else 0.0,
            frequency_penalty=choices.frequency_penalty if choices is not None else 0.0,
            logit_bias=logit_bias or {},
            seed=None if choices is None or choices.seed is None else choices.seed + index,
            stop_token_ids=sorted({*([] if request.ignore_eos else stop_token_ids), *extra_stops}),
            stop=stops,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=request.min_tokens,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            logits_processors=hooked,
            grammar=grammar,
        )


def prompt_logprobs_json(
    encoding: tiktoken.Encoding, scored: list[TokenLogprob | None], top_n: int
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first None) a map from token id to its logprob, rank
    and text, holding the token itself and the `top_n` most likely (chat's shares this shape)."""

    def text(token: int) -> str:
        return encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    entries: list[dict[str, Any] | None] = []
    for lp in scored:
        if lp is None:
            entries.append(None)
            continue
        entry = {
            str(t): {"logprob": max(v, MIN_LOGPROB), "rank": r + 1, "decoded_token": text(t)}
            for r, (t, v) in enumerate(lp.top[:top_n])
        }
        entry[str(lp.token_id)] = {
            "logprob": max(lp.logprob, MIN_LOGPROB),
            "rank": lp.rank,
            "decoded_token": text(lp.token_id),
        }
        entries.append(entry)
    return entries


def logprob_json(encoding: tiktoken.Encoding, lp: TokenLogprob) -> dict[str, Any]:
    """One sampled token's logprob with its top alternatives, as chat's `logprobs.content` and Responses'
    `output_text.logprobs` both carry it."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = encoding.decode_single_token_bytes(token)
        value = max(logprob, MIN_LOGPROB)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}

    entry = one(lp.token_id, lp.logprob)
    entry["top_logprobs"] = [one(t, v) for t, v in lp.top]
    return entry


def conversation_chars(messages: Sequence[ChatMessage | Message], tools: list[Tool] | None) -> int:
    """The characters of a conversation's text (rendering and tokenizing take time in proportion)."""
    total = 0
    for message in messages:
        if isinstance(message, Message):
            total += len(message.text) + len(message.recipient or "")
            continue
        total += len(message.text()) + len(message.reasoning or "") + len(message.reasoning_content or "")
        total += len(message.name or "") + len(message.tool_call_id or "")
        for call in message.tool_calls or []:
            total += len(call.function.name) + len(call.function.arguments)
    for tool in tools or []:
        total += len(tool.function.description or "") + len(str(tool.function.parameters or ""))
    return total


def final_format(
    kind: str, schema: dict[str, Any] | None, strict: bool | None, request: TurnConstraints, name: str
) -> tuple[FinalFormat | None, str]:
    """The final answer's format, and the field that errors in it are named by: the response format (`kind`
    "text", "json_object" or "json_schema" with `schema`, called `name` in the API) or vLLM's
    `structured_outputs`, not both."""
    requested = requested_answer(request)
    if kind == "text":
        return requested if requested is not None else (None, "grammar")
    if requested is not None:
        raise RequestError(f"give {name} or {requested[1]}, not both", requested[1])
    if kind == "json_schema" and schema is None:
        raise RequestError("json_schema needs a schema", "grammar")
    if kind == "json_schema":
        return ResponseFormat(schema, bool(strict)), "grammar"
    return ResponseFormat(None), "grammar"


def requested_schema(request: TurnConstraints) -> HarmonyResponseFormat | None:
    """The JSON Schema that `structured_outputs.json` or `guided_json` asks for, to show the model in the
    developer message as a response format does (None when there is none, or it is not a schema: that is
    refused where the grammar is built)."""
    value = request.structured_outputs.json_schema if request.structured_outputs is not None else None
    value = request.guided_json if value is None else value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return HarmonyResponseFormat("response", value) if isinstance(value, dict) else None


def requested_answer(request: TurnConstraints) -> tuple[FinalFormat, str] | None:
    """The final answer's format that vLLM's `structured_outputs` (or one of its older `guided_*` names) asks
    for, with the field that asked (errors in it are named so), or None. One of them at most."""
    given: list[tuple[str, Any]] = []
    so = request.structured_outputs
    if so is not None:
        for key in ("json", "regex", "choice", "grammar", "json_object"):
            value = getattr(so, "json_schema" if key == "json" else key)
            if value is not None and value is not False:
                given.append((f"structured_outputs.{key}", value))
    for key in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(request, key)
        if value is not None:
            given.append((key, value))
    if not given:
        return None
    if len(given) > 1:
        raise RequestError(f"give one output constraint, not {given[0][0]} and {given[1][0]}", given[1][0])
    field, value = given[0]
    kind = field.rsplit(".", 1)[-1].removeprefix("guided_")
    if kind == "json_object":
        return ResponseFormat(None), field
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise RequestError(f"{field} is not valid JSON: {error}", field) from error
        if not isinstance(value, dict):
            raise RequestError(f"{field} must be a JSON Schema object", field)
        return ResponseFormat(value), field
    if kind == "choice":
        if not value or any(not isinstance(c, str) or not c for c in value):
            raise RequestError(f"{field} must be a list of non-empty strings", field)
        return ChoiceFormat(tuple(value)), field
    if not isinstance(value, str) or not value:
        raise RequestError(f"{field} must be a non-empty string", field)
    return (RegexFormat(value) if kind == "regex" else LarkFormat(value)), field


# Bounds on a request's stop strings: each delta of the answer is matched against every one of them (and a
# tail as long as the longest is held back), so an unbounded list would let one request make every delta of
# its stream cost as much as it likes. Generous for every client seen (OpenAI takes 4, lm-eval a handful).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """A request's `stop` as a list; `RequestError` for an empty one (it would match everywhere), more than
    `MAX_STOP_STRINGS` or one longer than `MAX_STOP_CHARS`."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise RequestError("stop sequences must not be empty", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long", "stop")
    return stops
