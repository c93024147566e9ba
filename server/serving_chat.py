"""`POST /v1/chat/completions`: request to harmony prompt, engine outputs to a response or a chunk stream."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import tiktoken

from engine.request import (
    FinishReason,
    LogitsProcessor,
    RequestOutput,
    RequestRejected,
    SamplingParams,
    SamplingParamsError,
    TokenLogprob,
)
from harmony import encoding as tok
from harmony.render import Renderer
from server.async_engine import AsyncEngine, EngineFailure
from server.errors import APIError, bad_request, not_found
from server.harmony_chat import ChatOutputParser, Delta, DeltaKind
from server.prompting import check_sizes, output_budget, render_prompt
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.settings import ServerSettings
from server.tool_choice import tool_choice_processors

logger = logging.getLogger(__name__)

# Extra logits processors for a request's choices, given the request's unknown body fields (`model_extra`)
# and the choice index (see `create_app`); chat and Responses requests go through the same hook.
ProcessorsHook = Callable[[dict[str, Any], int], list[LogitsProcessor]]


@dataclass(slots=True)
class Prepared:
    """A validated request: its prompt and one set of sampling parameters per choice."""

    prompt: list[int]
    params: list[SamplingParams]
    named_tool: str | None
    logprobs: bool


class StopTrimmer:
    """Holds back answer text that may be the start of a stop string, and cuts the answer at one.

    The engine ends the request on the token that completes a stop string; the text the client sees ends
    before the stop string, as with the OpenAI API, streamed or not.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        split = max(len(self.pending) - self.keep, 0)
        out, self.pending = self.pending[:split], self.pending[split:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass(slots=True)
class ChoiceState:
    index: int
    parser: ChatOutputParser
    trimmer: StopTrimmer
    tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    # The answer text as sent (after stop-string trimming).
    content: list[str] = field(default_factory=list)
    finish: FinishReason | None = None
    cached_tokens: int = 0


class ChatService:
    def __init__(
        self,
        engine: AsyncEngine,
        encoding: tiktoken.Encoding,
        settings: ServerSettings,
        max_model_len: int,
        processors_hook: ProcessorsHook | None = None,
    ) -> None:
        self.engine = engine
        self.processors_hook = processors_hook
        self.encoding = encoding
        self.renderer = Renderer(encoding)
        self.settings = settings
        self.max_model_len = max_model_len

    # -- preparing ------------------------------------------------------------------------------------------

    def render(self, request: ChatCompletionRequest) -> list[int]:
        tools = request.tools if request.tool_choice != "none" else None
        return render_prompt(
            self.renderer, self.settings, request.messages, tools, request.reasoning_effort, param="messages"
        )

    def prepare(self, request: ChatCompletionRequest) -> Prepared:
        if request.model != self.settings.served_model_name:
            raise not_found(
                f"the model {request.model!r} does not exist; this server serves "
                f"{self.settings.served_model_name!r}",
                param="model",
            )
        if request.response_format is not None and request.response_format.type != "text":
            raise bad_request(
                f"response_format {request.response_format.type!r} is not supported yet; use 'text'",
                param="response_format",
            )
        check_sizes(self.settings, len(request.messages), len(request.tools or []), messages_param="messages")
        names = [t.function.name for t in request.tools or []]
        choice = request.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if named is not None and named not in names:
            raise bad_request(
                f"tool_choice names {named!r}, which is not among the tools", param="tool_choice"
            )
        if choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs at least one tool", param="tool_choice")
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")

        prompt = self.render(request)
        max_tokens = output_budget(
            len(prompt),
            request.max_completion_tokens or request.max_tokens,
            self.max_model_len,
            prompt_param="messages",
            tokens_param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
        )
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop sequences must not be empty", param="stop")
        try:
            logit_bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
        except ValueError as error:
            raise bad_request("logit_bias keys must be token ids", param="logit_bias") from error
        processors = tool_choice_processors(
            self.encoding, named or (choice if isinstance(choice, str) else None), names
        )
        params = []
        for i in range(request.n):
            try:
                params.append(
                    SamplingParams(
                        max_tokens=max_tokens,
                        temperature=self.settings.default_temperature
                        if request.temperature is None
                        else request.temperature,
                        top_p=self.settings.default_top_p if request.top_p is None else request.top_p,
                        top_k=max(request.top_k or 0, 0),
                        min_p=request.min_p or 0.0,
                        presence_penalty=request.presence_penalty,
                        frequency_penalty=request.frequency_penalty,
                        logit_bias=logit_bias,
                        seed=None if request.seed is None else request.seed + i,
                        stop_token_ids=sorted(tok.STOP_TOKENS_FOR_ASSISTANT_ACTIONS),
                        stop=stops,
                        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                        logits_processors=[
                            *processors,
                            *(
                                self.processors_hook(request.model_extra or {}, i)
                                if self.processors_hook
                                else []
                            ),
                        ],
                    )
                )
            except SamplingParamsError as error:
                raise bad_request(str(error), param=str(error).split(" ", 1)[0]) from error
        try:
            self.engine.check(prompt, params[0])
        except RequestRejected as error:
            raise bad_request(str(error), param="messages") from error
        return Prepared(prompt, params, named, request.logprobs)

    # -- running --------------------------------------------------------------------------------------------

    def _logprob_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            raw = self.encoding.decode_single_token_bytes(token)
            # A forced or banned token can have a logprob of -inf, which JSON cannot carry; OpenAI uses -9999.
            value = max(logprob, -9999.0)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}

        entry = one(lp.token_id, lp.logprob)
        entry["top_logprobs"] = [one(t, v) for t, v in lp.top]
        return entry

    def _consume(self, state: ChoiceState, output: RequestOutput, prepared: Prepared) -> list[Delta]:
        """Feed a step's tokens to the choice's parser; the deltas to send, answer text trimmed at stops."""
        produced: list[Delta] = []
        logprobs = output.logprobs or []
        for i, token in enumerate(output.new_token_ids):
            deltas = state.parser.feed(token)
            produced.extend(deltas)
            state.tokens += 1
            if prepared.logprobs and i < len(logprobs) and any(d.kind is DeltaKind.CONTENT for d in deltas):
                state.logprobs.append(self._logprob_entry(logprobs[i]))
        state.cached_tokens = output.num_cached_tokens
        if output.finished:
            state.finish = output.finish_reason
            produced.extend(state.parser.finish())
        out = []
        for delta in produced:
            if delta.kind is DeltaKind.CONTENT:
                delta.text = state.trimmer.feed(delta.text)
                if not delta.text:
                    continue
            out.append(delta)
        if output.finished:
            tail = state.trimmer.flush()
            if tail:
                out.append(Delta(DeltaKind.CONTENT, tail))
        return out

    @staticmethod
    def _content(state: ChoiceState, deltas: list[Delta]) -> None:
        state.content.extend(d.text for d in deltas if d.kind is DeltaKind.CONTENT)

    def _choice(self, prepared: Prepared, index: int) -> ChoiceState:
        return ChoiceState(index, ChatOutputParser(self.encoding), StopTrimmer(prepared.params[index].stop))

    def _finish_reason(self, state: ChoiceState, prepared: Prepared) -> str:
        if state.finish is FinishReason.LENGTH:
            return "length"  # also when a tool call was cut off: its arguments are incomplete
        if state.parser.output.tool_calls and prepared.named_tool is None:
            return "tool_calls"
        return "stop"

    @staticmethod
    def _usage(prompt: list[int], states: list[ChoiceState]) -> dict[str, Any]:
        completion = sum(s.tokens for s in states)
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": completion,
            "total_tokens": len(prompt) + completion,
            "prompt_tokens_details": {"cached_tokens": max((s.cached_tokens for s in states), default=0)},
            "completion_tokens_details": {
                "reasoning_tokens": sum(s.parser.output.reasoning_tokens for s in states)
            },
        }

    async def _run_choice(self, prepared: Prepared, state: ChoiceState, request_id: str) -> None:
        async for output in self.engine.generate(prepared.prompt, prepared.params[state.index], request_id):
            self._content(state, self._consume(state, output, prepared))

    async def complete(self, request: ChatCompletionRequest) -> dict[str, Any]:
        prepared = self.prepare(request)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        states = [self._choice(prepared, i) for i in range(request.n)]
        try:
            await asyncio.gather(
                *(self._run_choice(prepared, s, f"{completion_id}-{s.index}") for s in states)
            )
        except EngineFailure as error:
            raise APIError(500, str(error), type="server_error") from error
        choices = []
        for state in states:
            out = state.parser.output
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(state.content) if state.content else (None if out.tool_calls else ""),
                "reasoning": "".join(out.reasoning) or None,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in out.tool_calls
                ]
                or None,
            }
            choices.append(
                {
                    "index": state.index,
                    "message": message,
                    "logprobs": {"content": state.logprobs, "refusal": None} if prepared.logprobs else None,
                    "finish_reason": self._finish_reason(state, prepared),
                }
            )
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.served_model_name,
            "choices": choices,
            "usage": self._usage(prepared.prompt, states),
        }

    async def stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Validates first (errors raise before any byte is sent), then returns the SSE data lines."""
        prepared = self.prepare(request)
        return self._stream(request, prepared)

    async def _stream(self, request: ChatCompletionRequest, prepared: Prepared) -> AsyncIterator[str]:
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        model = self.settings.served_model_name
        states = [self._choice(prepared, i) for i in range(request.n)]

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            body["choices"] = choices
            body.update(extra)
            return json.dumps(body, ensure_ascii=False)

        for state in states:
            yield chunk(
                [
                    {
                        "index": state.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )

        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(state: ChoiceState) -> None:
            try:
                async for output in self.engine.generate(
                    prepared.prompt, prepared.params[state.index], f"{completion_id}-{state.index}"
                ):
                    await queue.put((state.index, output))
            except EngineFailure as error:
                await queue.put((state.index, error))
            finally:
                await queue.put((state.index, None))

        tasks = [asyncio.create_task(pump(s)) for s in states]
        try:
            remaining = len(states)
            while remaining:
                index, item = await queue.get()
                state = states[index]
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    error = APIError(500, str(item), type="server_error")
                    yield json.dumps(error.body())
                    yield "[DONE]"
                    return
                logprobs_before = len(state.logprobs)
                for delta in self._consume(state, item, prepared):
                    yield chunk(
                        [
                            {
                                "index": index,
                                "delta": _delta_json(delta),
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                if prepared.logprobs and len(state.logprobs) > logprobs_before:
                    yield chunk(
                        [
                            {
                                "index": index,
                                "delta": {},
                                "finish_reason": None,
                                "logprobs": {"content": state.logprobs[logprobs_before:], "refusal": None},
                            }
                        ]
                    )
                if item.finished:
                    yield chunk(
                        [
                            {
                                "index": index,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": self._finish_reason(state, prepared),
                            }
                        ]
                    )
            if request.stream_options is not None and request.stream_options.include_usage:
                yield chunk([], usage=self._usage(prepared.prompt, states))
            yield "[DONE]"
        finally:
            for task in tasks:
                task.cancel()


def _delta_json(delta: Delta) -> dict[str, Any]:
    if delta.kind is DeltaKind.REASONING:
        return {"reasoning": delta.text}
    if delta.kind is DeltaKind.CONTENT:
        return {"content": delta.text}
    if delta.kind is DeltaKind.TOOL_CALL_START:
        return {
            "tool_calls": [
                {
                    "index": delta.index,
                    "id": delta.call_id,
                    "type": "function",
                    "function": {"name": delta.name, "arguments": ""},
                }
            ]
        }
    return {"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]}
