"""`POST /v1/chat/completions`: request to harmony prompt, engine outputs to a response or a chunk stream."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from sse_starlette import EventSourceResponse

from engine.constraint import Grammar
from engine.request import FinishReason, RequestError, RequestOutput, SamplingParams, TokenLogprob
from harmony import encoding as tok
from harmony.messages import Message
from harmony.messages import ResponseFormat as HarmonyResponseFormat
from server.async_engine import AsyncEngine
from server.builtin_tools import (
    BuiltinRequest,
    BuiltinTools,
    Citations,
    ResponseTools,
    ToolResult,
    builtin_call,
    continuation_tokens,
)
from server.errors import ParamNames, bad_request
from server.harmony_chat import Delta, DeltaKind
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.serving import (
    ChoiceOutput,
    EngineRequest,
    ProcessorsHook,
    Serving,
    Workers,
    final_format,
    logprob_json,
    output_budget,
    prompt_logprobs_json,
    requested_schema,
    stop_strings,
)
from server.settings import ServerSettings
from server.streaming import data_events, fan_in, sse

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    """A prepared request: its prompt and one set of sampling parameters per choice."""

    prompt: list[int]
    params: list[SamplingParams]
    named_tool: str | None
    logprobs: bool
    # The request used the deprecated `functions`: the call is answered as `function_call`.
    legacy_functions: bool
    # The functions the model was shown (its calls to anything else are not returned).
    tools: frozenset[str]
    # Matched against each choice's answer (see `ChoiceOutput`), not by the engine.
    stops: list[str]
    include_stop: bool
    # vLLM's extra: the prompt scored, by choice 0's request, with this many alternatives per token.
    prompt_logprobs: int | None = None
    # `web_search_options`: the browser the server runs inside the completion (None: no built-in tool).
    builtin: BuiltinRequest | None = None


class ToolRan:
    """In a choice's outputs: the engine request before ended on a built-in call, which the server ran; the
    next outputs continue the same turn after the tool's message (see `ChatService._tool_loop`)."""


@dataclass(slots=True)
class ChoiceState:
    index: int
    request_id: str
    output: ChoiceOutput
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    # The answer text as sent (after stop-string trimming).
    content: list[str] = field(default_factory=list)
    finish: FinishReason | None = None
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    # The choice is over (its engine request finished, or its answer reached a stop string); the engine's
    # outputs after that are not the client's.
    ended: bool = False
    # A built-in tool loop's: its tools, the answer's citations, the annotations so far (chat's shape), the
    # reasoning of every step, the prompt tokens of the steps after the first, the cached tokens of the steps
    # before the current one, and whether it ended on a call past the tool-call cap.
    tools: ResponseTools | None = None
    citations: Citations | None = None
    annotations: list[dict[str, Any]] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    step_prompt_tokens: int = 0
    cached_before: int = 0
    capped: bool = False


class ChatService(Serving[ChatCompletionRequest, Prepared]):
    """Chat completions. With `web_search_options` the server runs the browser for the model inside the
    completion, as Responses does for its web_search tool: each call the model makes to `browser.*` is run,
    its page appended as harmony renders it, and the turn goes on until an answer, whose citation marks
    become `url_citation` annotations on the message. The model's reasoning around its calls streams as
    reasoning; the calls themselves are part of that reasoning (they are written on the analysis channel),
    and no item of chat's shows them."""

    # Stop strings end the answer the client sees, not the raw output (see `ChoiceOutput`).
    engine_stops = False

    def __init__(
        self,
        engine: AsyncEngine,
        encoding: tiktoken.Encoding,
        settings: ServerSettings,
        max_model_len: int,
        workers: Workers,
        processors_hook: ProcessorsHook | None = None,
        builtin: BuiltinTools | None = None,
        *,
        on_anomalies: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            engine, encoding, settings, max_model_len, workers, processors_hook, on_anomalies=on_anomalies
        )
        # The server's built-in tools, shared with Responses (None: web_search_options is refused).
        self.builtin = builtin

    # -- preparing ------------------------------------------------------------------------------------------

    def param_names(self, request: ChatCompletionRequest) -> ParamNames:
        budget = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        return {
            "prompt": "messages",
            "max_tokens": budget,
            "logprobs": "top_logprobs",
            "grammar": "response_format",
        }

    @property
    def generation_prompt(self) -> list[int]:
        """The ids every chat prompt ends with: `<|start|>assistant`, the header the answer follows."""
        return [tok.START, *self.encoding.encode_ordinary("assistant")]

    async def prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt token ids the engine gets for `request` (what `/tokenize` counts)."""
        with self.in_api_terms(request):
            return await self.workers.run(self._prompt, request)

    def _prompt(self, request: ChatCompletionRequest, builtin: BuiltinRequest | None = None) -> list[int]:
        """`builtin`: what `_builtin` made of the request's `web_search_options`, if the caller has it."""
        tools = request.tools if request.tool_choice != "none" else None
        builtin = builtin or self._builtin(request)
        namespaces = None
        if builtin is not None:
            assert self.builtin is not None
            namespaces = self.builtin.namespaces(builtin)
        return self.render(
            request.messages, tools, request.reasoning_effort, _harmony_format(request), namespaces
        )

    def _builtin(self, request: ChatCompletionRequest) -> BuiltinRequest | None:
        """The browser `web_search_options` asks for (None without them); a 400 naming the field where it
        cannot run."""
        if request.web_search_options is None:
            return None
        if self.builtin is None:
            raise bad_request(
                "web_search_options is not available on this server", param="web_search_options"
            )
        if request.n > 1:
            # Each choice would browse on its own; one completion runs one tool loop.
            raise bad_request("with web_search_options, n must be 1", param="n")
        return self.builtin.parse_chat(request.web_search_options)

    def _grammar(self, request: ChatCompletionRequest, tool_choice: str) -> Grammar | None:
        """The turn's grammar: the answer held to the response format or `structured_outputs`, the tool
        choice and strict tools enforced, the reasoning within its budget (None: nothing to constrain)."""
        rf = request.response_format
        spec = rf.json_schema if rf is not None else None
        answer, field = final_format(
            rf.type if rf is not None else "text",
            spec.json_schema if spec is not None else None,
            spec.strict if spec is not None else None,
            request,
            "response_format",
        )
        return self.turn_constraint(
            answer,
            # With 'none' the model is shown no tools, and a call it makes anyway is not returned.
            [] if tool_choice == "none" else request.tools or [],
            tool_choice,
            budget=request.thinking_token_budget,
            effort=request.reasoning_effort,
            field=field,
            tool_field="functions[{i}].parameters"
            if request.functions is not None
            else "tools[{i}].function.parameters",
        )

    def _prepare(self, request: ChatCompletionRequest) -> tuple[Prepared, list[EngineRequest]]:
        conflict = request.legacy_conflict()
        if conflict is not None:
            replacement = "tools" if conflict == "functions" else "tool_choice"
            raise bad_request(f"give {replacement} or the deprecated {conflict}, not both", param=conflict)
        stops = stop_strings(request.stop)
        names = [t.function.name for t in request.tools or []]
        choice = request.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if named is not None and named not in names:
            raise bad_request(
                f"tool_choice names {named!r}, which is not among the tools", param="tool_choice"
            )
        if choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs at least one tool", param="tool_choice")
        grammar = self._grammar(request, named or (choice if isinstance(choice, str) else "auto"))
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request(
                "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
            )

        builtin = self._builtin(request)
        prompt = self._prompt(request, builtin)
        max_tokens = output_budget(
            len(prompt), request.max_completion_tokens or request.max_tokens, self.max_model_len
        )
        try:
            logit_bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
        except ValueError as error:
            raise RequestError("logit_bias keys must be token ids", "logit_bias") from error
        params = [
            self.sampling_params(
                request,
                max_tokens,
                index=i,
                stop_token_ids=sorted(tok.STOP_TOKENS_FOR_ASSISTANT_ACTIONS),
                logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                top_k=max(request.top_k or 0, 0),
                min_p=request.min_p or 0.0,
                logit_bias=logit_bias,
                grammar=grammar,
                prompt_logprobs=request.prompt_logprobs if i == 0 else None,
            )
            for i in range(request.n)
        ]
        prepared = Prepared(
            prompt,
            params,
            named,
            request.logprobs,
            legacy_functions=request.functions is not None,
            tools=frozenset(names if choice != "none" else []),
            stops=stops,
            include_stop=request.include_stop_str_in_output,
            prompt_logprobs=request.prompt_logprobs,
            builtin=builtin,
        )
        return prepared, [(prompt, p) for p in params]

    # -- running --------------------------------------------------------------------------------------------

    def _consume(self, state: ChoiceState, output: RequestOutput, prepared: Prepared) -> list[Delta]:
        """Feed a step's tokens to the choice's output; the deltas to send. Sets `state.ended` when the choice
        is over: when its answer reaches a stop string, its engine request is aborted then and there."""
        if state.ended:
            return []
        produced: list[Delta] = []
        logprobs = output.logprobs or []
        choice = state.output
        for i, token in enumerate(output.new_token_ids):
            deltas = choice.feed(token)
            produced.extend(deltas)
            state.token_ids.append(token)
            if prepared.logprobs and i < len(logprobs) and any(d.kind is DeltaKind.CONTENT for d in deltas):
                state.logprobs.append(logprob_json(self.encoding, logprobs[i]))
            if choice.stopped:
                break
        state.cached_tokens = state.cached_before + output.num_cached_tokens
        if choice.stopped:
            state.ended = True
            state.finish = FinishReason.STOP
            if not output.finished:
                self.engine.abort(output.request_id)
        elif output.finished:
            state.ended = True
            state.finish = output.finish_reason
            produced.extend(choice.finish())
        return produced

    def _step_ended(self, state: ChoiceState) -> list[Delta]:
        """A `ToolRan` came: what the step's parser still held, and the choice's output goes on after the
        tool's message."""
        deltas = state.output.finish()
        state.output.next_request()
        state.cached_before = state.cached_tokens
        return deltas

    def _cite(self, state: ChoiceState, deltas: list[Delta]) -> list[tuple[Delta, list[dict[str, Any]]]]:
        """Each delta with the annotations it brings (chat's `url_citation` shape, indices into the whole
        message's content): with the browser on, the answer's citation marks are rewritten as they complete,
        and text from a mark's start is held back until then. Keeps the message's content, reasoning and
        annotations on `state`."""
        out: list[tuple[Delta, list[dict[str, Any]]]] = []
        for delta in deltas:
            if delta.kind is DeltaKind.REASONING:
                state.reasoning.append(delta.text)
            if delta.kind is not DeltaKind.CONTENT:
                out.append((delta, []))
                continue
            annotations: list[dict[str, Any]] = []
            if state.citations is not None:
                text, found = state.citations.feed(delta.text)
                annotations = self._annotations(state, found)
                delta = Delta(DeltaKind.CONTENT, text)
            if delta.text:
                state.content.append(delta.text)
                out.append((delta, annotations))
        if state.ended and state.citations is not None and state.citations.pending:
            held = state.citations.flush()  # the answer ended inside what looked like a citation mark
            state.content.append(held)
            out.append((Delta(DeltaKind.CONTENT, held), []))
        return out

    @staticmethod
    def _annotations(state: ChoiceState, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        offset = sum(len(text) for text in state.content)
        added = [
            {
                "type": "url_citation",
                "url_citation": {
                    "start_index": a["start_index"] + offset,
                    "end_index": a["end_index"] + offset,
                    "url": a["url"],
                    "title": a["title"],
                },
            }
            for a in found
        ]
        state.annotations += added
        return added

    def _choice(self, prepared: Prepared, completion_id: str, index: int) -> ChoiceState:
        output = ChoiceOutput(
            self.encoding,
            prepared.tools,
            prepared.stops,
            prepared.include_stop,
            on_anomalies=self.on_anomalies,
        )
        state = ChoiceState(index, _request_id(completion_id, index), output)
        if prepared.builtin is not None:
            assert self.builtin is not None
            state.tools = self.builtin.start(prepared.builtin, None)
            assert state.tools.browser is not None
            state.citations = Citations(state.tools.browser)
        return state

    def _finish_reason(self, state: ChoiceState, prepared: Prepared) -> str:
        if state.finish is FinishReason.LENGTH or state.capped:
            # Also when a tool call was cut off (its arguments are incomplete), or the built-in tool loop
            # reached its cap of calls before an answer.
            return "length"
        if state.output.stopped:
            return "stop"
        if state.output.output.tool_calls and prepared.named_tool is None:
            return "function_call" if prepared.legacy_functions else "tool_calls"
        return "stop"

    @staticmethod
    def _usage(prompt: list[int], states: list[ChoiceState]) -> dict[str, Any]:
        """Every engine request's prompt counts: a built-in tool loop reads the turn again at each step (the
        prefix cache holds it, as `cached_tokens` says)."""
        completion = sum(s.output.tokens for s in states)
        prompt_tokens = len(prompt) + sum(s.step_prompt_tokens for s in states)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": max((s.cached_tokens for s in states), default=0)},
            "completion_tokens_details": {"reasoning_tokens": sum(s.output.reasoning_tokens for s in states)},
        }

    def _outputs(
        self,
        request: ChatCompletionRequest,
        prepared: Prepared,
        completion_id: str,
        states: list[ChoiceState],
    ) -> AsyncIterator[tuple[int, RequestOutput | ToolRan]]:
        """Every choice's outputs as they come, tagged with the choice's index."""
        return fan_in(
            [
                self.engine.generate(prepared.prompt, p, _request_id(completion_id, i))
                if states[i].tools is None
                else self._tool_loop(request, prepared, p, states[i])
                for i, p in enumerate(prepared.params)
            ]
        )

    async def _tool_loop(
        self, request: ChatCompletionRequest, prepared: Prepared, params: SamplingParams, state: ChoiceState
    ) -> AsyncIterator[RequestOutput | ToolRan]:
        """A choice whose model may call the built-in tools: one engine request, then one more after each
        call the server ran, its prompt the previous one extended by what the model wrote and the tool's
        message (the prefix cache holds the rest of the turn). Between two requests comes a `ToolRan`; the
        output that ended on the call is passed on unfinished (the choice goes on). A call past the cap of
        calls is not run: the choice ends there, `state.capped`."""
        tools = state.tools
        assert tools is not None
        prompt, step, produced = prepared.prompt, 0, 0
        budget = params.max_tokens
        while True:
            rid = state.request_id if step == 0 else f"{state.request_id}-{step}"
            generated: list[int] = []
            call = None
            stream = self.engine.generate(prompt, params, rid)
            async with contextlib.aclosing(stream):
                async for output in stream:
                    generated += output.new_token_ids
                    if output.finish_reason is FinishReason.STOP:
                        call = builtin_call(self.encoding, generated, tools)
                        if call is not None and tools.calls >= self.settings.max_builtin_tool_calls:
                            logger.info("%s: built-in tool call limit reached", state.request_id)
                            state.capped, call = True, None
                        if call is not None:
                            output = dataclasses.replace(output, finish_reason=None, stop_reason=None)
                    yield output
            if call is None:
                return
            yield ToolRan()
            result = await self._run_tool(tools, call)
            tail = await self.workers.run(
                continuation_tokens, self.renderer, self.encoding, call, result.text
            )
            prompt = prompt + generated + tail
            produced += len(generated)
            step += 1
            room = min(self.max_model_len - len(prompt), budget - produced)
            if room < 1:
                yield RequestOutput(rid, [], finish_reason=FinishReason.LENGTH)
                return
            state.step_prompt_tokens += len(prompt)
            hook = self.processors_hook
            processors = hook.make(request.model_extra or {}, step) if hook is not None else []
            params = dataclasses.replace(params, max_tokens=room, logits_processors=processors)

    @staticmethod
    async def _run_tool(tools: ResponseTools, call: Message) -> ToolResult:
        assert call.recipient is not None
        try:
            return await tools.run(call.recipient, call.text)
        except (OSError, RuntimeError) as error:  # the tool could not run: the model reads why
            logger.error("%s failed: %s", call.recipient, error)
            return ToolResult(f"[the tool failed: {error}]", False)

    async def complete(self, request: ChatCompletionRequest) -> dict[str, Any]:
        prepared, admission = await self.prepare(request)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        states = [self._choice(prepared, completion_id, i) for i in range(request.n)]
        scored: list[TokenLogprob | None] | None = None
        try:
            async for index, output in self._outputs(request, prepared, completion_id, states):
                state = states[index]
                if isinstance(output, ToolRan):
                    deltas = self._step_ended(state)
                else:
                    scored = output.prompt_logprobs if output.prompt_logprobs is not None else scored
                    deltas = self._consume(state, output, prepared)
                self._cite(state, deltas)  # keeps the content, reasoning and annotations on `state`
        finally:
            admission.release()
        choices = []
        for state in states:
            out = state.output.output
            calls = [{"name": c.name, "arguments": c.arguments} for c in out.tool_calls]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(state.content) if state.content else (None if out.tool_calls else ""),
                "reasoning": "".join(state.reasoning) or None,
            }
            if state.citations is not None:
                message["annotations"] = state.annotations
            if prepared.legacy_functions:
                # The deprecated shape holds one call; a harmony turn ends at its first `<|call|>`.
                message["function_call"] = calls[0] if calls else None
            else:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": call}
                    for c, call in zip(out.tool_calls, calls, strict=True)
                ] or None
            choice: dict[str, Any] = {
                "index": state.index,
                "message": message,
                "logprobs": {"content": state.logprobs, "refusal": None} if prepared.logprobs else None,
                "finish_reason": self._finish_reason(state, prepared),
                "stop_reason": state.output.stop_reason,
            }
            if request.return_token_ids:
                choice["token_ids"] = state.token_ids
            choices.append(choice)
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,  # the base model or the LoRA adapter it named
            "choices": choices,
            "usage": self._usage(prepared.prompt, states),
        }
        if prepared.prompt_logprobs is not None:
            assert scored is not None, "choice 0's first output brings the prompt's logprobs"
            body["prompt_logprobs"] = prompt_logprobs_json(self.encoding, scored, prepared.prompt_logprobs)
        if request.return_token_ids:
            body["prompt_token_ids"] = prepared.prompt
        return body

    async def stream(self, request: ChatCompletionRequest) -> EventSourceResponse:
        """Validates first (errors raise before any byte is sent), then streams the chunks."""
        prepared, admission = await self.prepare(request)
        chunks = data_events(self._chunks(request, prepared))
        return sse(chunks, self.settings, admission.release, self.engine)

    async def _chunks(
        self, request: ChatCompletionRequest, prepared: Prepared
    ) -> AsyncIterator[dict[str, Any]]:
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model,  # the base model or the LoRA adapter it named
        }
        states = [self._choice(prepared, completion_id, i) for i in range(request.n)]

        options = request.stream_options
        include_usage = options is not None and options.include_usage
        # vLLM's continuous usage: with include_usage, every chunk carries the usage so far.
        continuous = include_usage and options is not None and options.continuous_usage_stats
        token_ids = request.return_token_ids

        def chunk(
            index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
        ) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = states[index].output.stop_reason
            out = {**head, "choices": [choice]}
            if continuous:
                out["usage"] = self._usage(prepared.prompt, states)
            return out

        for state in states:
            first = chunk(state.index, {"role": "assistant", "content": ""})
            if token_ids:
                first["prompt_token_ids"] = prepared.prompt
            yield first
        async for index, output in self._outputs(request, prepared, completion_id, states):
            state = states[index]
            if state.ended:
                continue  # the rest of a choice that reached a stop string, until its abort takes effect
            if isinstance(output, ToolRan):
                for delta, annotations in self._cite(state, self._step_ended(state)):
                    yield chunk(index, self._delta_for(delta, prepared, annotations))
                continue
            logprobs_before = len(state.logprobs)
            consumed = len(state.token_ids)
            chunks = [
                chunk(index, self._delta_for(delta, prepared, annotations))
                for delta, annotations in self._cite(state, self._consume(state, output, prepared))
            ]
            if prepared.logprobs and len(state.logprobs) > logprobs_before:
                chunks.append(
                    chunk(index, {}, {"content": state.logprobs[logprobs_before:], "refusal": None})
                )
            if state.ended:
                chunks.append(chunk(index, {}, finish=self._finish_reason(state, prepared)))
            if token_ids and len(state.token_ids) > consumed:
                # The step's new ids ride on its first chunk (one with an empty delta if the tokens said
                # nothing yet, such as a message's header), so the chunks' ids add up to the output's.
                if not chunks:
                    chunks.append(chunk(index, {}))
                chunks[0]["choices"][0]["token_ids"] = state.token_ids[consumed:]
            for out in chunks:
                yield out
        if include_usage:
            yield {**head, "choices": [], "usage": self._usage(prepared.prompt, states)}

    @staticmethod
    def _delta_for(delta: Delta, prepared: Prepared, annotations: list[dict[str, Any]]) -> dict[str, Any]:
        """A delta as this request's chunks carry it: a tool call as the deprecated `function_call` when
        the request gave `functions`; the answer's text with the `annotations` it brings (as OpenAI streams
        them, on the delta: indices into the whole message's content)."""
        if prepared.legacy_functions and delta.kind is DeltaKind.TOOL_CALL_START:
            return {"function_call": {"name": delta.name, "arguments": ""}}
        if prepared.legacy_functions and delta.kind is DeltaKind.TOOL_CALL_ARGUMENTS:
            return {"function_call": {"arguments": delta.text}}
        out = _delta_json(delta)
        if annotations:
            out["annotations"] = annotations
        return out


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


def _request_id(completion_id: str, index: int) -> str:
    """The engine request id of choice `index` (what a stop string aborts)."""
    return f"{completion_id}-{index}"


def _harmony_format(request: ChatCompletionRequest) -> HarmonyResponseFormat | None:
    """The schema to show the model in the developer message: a json_schema response format's, or the one
    vLLM's `structured_outputs` asks for."""
    rf = request.response_format
    if rf is None or rf.type != "json_schema" or rf.json_schema is None or rf.json_schema.json_schema is None:
        return requested_schema(request)
    spec = rf.json_schema
    return HarmonyResponseFormat(spec.name, spec.json_schema, spec.description)
