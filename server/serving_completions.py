"""`POST /v1/completions`: the legacy Completions API on raw text or token ids, as evaluation harnesses use.

No harmony here: the prompt is tokenized as given (or taken as token ids) and the output is decoded as it
comes. Generation stops on the model's end tokens (`<|return|>`, `<|call|>`, `<|endoftext|>`), `stop`
strings or `max_tokens` (16 by default, as OpenAI). vLLM's `return_token_ids` adds the prompt's and the
output's token ids.

Scoring, as lm-evaluation-harness's loglikelihood does it: `echo` with `logprobs` returns the prompt's tokens
with their logprobs (the first one null) before the output's, from the engine's prompt logprobs (computed in
the prefill); `max_tokens: 0` with `echo` returns the prompt alone, scored (the engine samples one token,
which is dropped, as vLLM does). vLLM's `prompt_logprobs` adds its own per-choice list of
`{token_id: {logprob, rank, decoded_token}}`. `best_of` samples that many per prompt and keeps the `n` of
the highest cumulative logprob (usage counts them all).
"""

from __future__ import annotations

import codecs
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import EventSourceResponse

from engine.request import FinishReason, RequestError, RequestOutput, SamplingParams, TokenLogprob
from harmony import encoding as tok
from server.errors import ParamNames, bad_request
from server.protocol import CompletionRequest
from server.serving import (
    MIN_LOGPROB,
    EngineRequest,
    Serving,
    StopTrimmer,
    output_budget,
    prompt_logprobs_json,
)
from server.streaming import data_events, fan_in, sse

END_TOKENS = sorted({tok.RETURN, tok.CALL, tok.END_OF_TEXT})
# OpenAI's default output budget for this API.
DEFAULT_MAX_TOKENS = 16


@dataclass(slots=True)
class _Choice:
    index: int
    prompt: list[int]
    params: SamplingParams
    trimmer: StopTrimmer
    # False for `max_tokens: 0`: the one token the engine samples is dropped.
    keep_output: bool = True
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # The prompt's tokens scored (the first None), when the request asks for them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Output tokens generated: usage counts them for every candidate, returned or not (best_of), but not the
    # one `max_tokens: 0` drops (it asked for none).
    num_generated: int = 0
    finish: FinishReason | None = None
    stop_reason: int | str | None = None

    @property
    def finish_reason(self) -> str:
        return "length" if self.finish is FinishReason.LENGTH else "stop"

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


@dataclass(slots=True)
class Prepared:
    """A prepared request: `best_of` (else `n`) candidates per prompt, prompt-major; each prompt's `n` best
    become the response's choices."""

    choices: list[_Choice]
    per_prompt: int


class CompletionService(Serving[CompletionRequest, Prepared]):
    def param_names(self, request: CompletionRequest) -> ParamNames:
        return {}  # the engine's names are this API's: prompt, max_tokens, logprobs, stop

    def sequences(self, request: CompletionRequest) -> int:
        p = request.prompt
        batch = isinstance(p, list) and bool(p) and not isinstance(p[0], int)
        return (len(p) if batch else 1) * (request.best_of or request.n)

    def _prompts(self, request: CompletionRequest) -> list[list[int]]:
        p = request.prompt
        self.check_text_size(len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str)))
        if isinstance(p, str):
            prompts = [self.encoding.encode_ordinary(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.encoding.encode_ordinary(x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        else:
            raise RequestError("prompt must be text, token ids, or a list of either", "prompt")
        if not all(prompts):
            raise RequestError("a prompt is empty", "prompt")
        return prompts

    def _check(self, request: CompletionRequest) -> None:
        best_of = request.best_of or request.n
        if best_of < request.n:
            raise bad_request(f"best_of ({best_of}) must be at least n ({request.n})", param="best_of")
        if request.stream and best_of > request.n:
            raise bad_request("best_of cannot be used with stream", param="best_of")
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request(
                "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
            )
        if request.max_tokens == 0 and not request.echo:
            raise bad_request("max_tokens 0 returns nothing without echo", param="max_tokens")

    def _prepare(self, request: CompletionRequest) -> tuple[Prepared, list[EngineRequest]]:
        self._check(request)
        try:
            logit_bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
        except ValueError as error:
            raise RequestError("logit_bias keys must be token ids", "logit_bias") from error
        # One scoring of the prompt serves both views: echo's logprobs and vLLM's prompt_logprobs. Each
        # candidate scores its prompt itself (so it recomputes the prefill rather than sharing a cached one):
        # simple, and n or best_of are rarely combined with scoring.
        wanted = [request.prompt_logprobs, request.logprobs if request.echo else None]
        prompt_logprobs = max((k for k in wanted if k is not None), default=None)
        per_prompt = request.best_of or request.n
        # Picking the best needs each candidate's logprobs, asked for or not.
        logprobs = request.logprobs if request.logprobs is not None or per_prompt == request.n else 0
        choices = []
        for prompt in self._prompts(request):
            max_tokens = output_budget(
                len(prompt), request.max_tokens, self.max_model_len, DEFAULT_MAX_TOKENS
            )
            for n_index in range(per_prompt):
                params = self.sampling_params(
                    request,
                    max(max_tokens, 1),
                    index=n_index,
                    stop_token_ids=END_TOKENS,
                    logprobs=logprobs,
                    top_k=max(request.top_k or 0, 0),
                    min_p=request.min_p or 0.0,
                    logit_bias=logit_bias,
                    prompt_logprobs=prompt_logprobs,
                )
                trimmer = StopTrimmer(params.stop, request.include_stop_str_in_output)
                choices.append(_Choice(len(choices), prompt, params, trimmer, keep_output=max_tokens > 0))
        return Prepared(choices, per_prompt), [(c.prompt, c.params) for c in choices]

    def _consume(self, choice: _Choice, output: RequestOutput) -> str:
        if output.prompt_logprobs is not None:
            choice.prompt_logprobs = output.prompt_logprobs
        choice.num_generated += len(output.new_token_ids)
        if output.finished:
            choice.finish = output.finish_reason
            choice.stop_reason = output.stop_reason if isinstance(output.stop_reason, str) else None
        if not choice.keep_output:
            return ""
        text = []
        for i, token in enumerate(output.new_token_ids):
            choice.token_ids.append(token)
            text.append(choice.decoder.decode(self.encoding.decode_single_token_bytes(token)))
            if output.logprobs is not None and i < len(output.logprobs):
                choice.logprobs.append(output.logprobs[i])
        if output.finished:
            text.append(choice.decoder.decode(b"", final=True))
        out = choice.trimmer.feed("".join(text))
        if output.finished:
            out += choice.trimmer.flush()
        choice.text.append(out)
        return out

    def _token_text(self, token: int) -> str:
        return self.encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    def _logprobs_json(self, logprobs: list[TokenLogprob], top_n: int, offset: int) -> dict[str, Any]:
        """The API's logprobs object for `logprobs`, whose text starts `offset` characters into the choice.
        Each top_logprobs map holds the `top_n` most likely tokens and the token itself (OpenAI's "up to
        logprobs + 1")."""
        tokens, values, tops, offsets = [], [], [], []
        position = offset
        for lp in logprobs:
            text = self._token_text(lp.token_id)
            tokens.append(text)
            values.append(max(lp.logprob, MIN_LOGPROB))
            top = {self._token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top[:top_n]}
            top.setdefault(text, max(lp.logprob, MIN_LOGPROB))
            tops.append(top)
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _echo_logprobs_json(self, choice: _Choice, top_n: int) -> dict[str, Any]:
        """The prompt's part of echo's logprobs: the first token with null logprob and top_logprobs."""
        assert choice.prompt_logprobs is not None, "the engine scored the prompt"
        scored = [lp for lp in choice.prompt_logprobs[1:] if lp is not None]
        assert len(scored) == len(choice.prompt) - 1
        first = self._token_text(choice.prompt[0])
        rest = self._logprobs_json(scored, top_n, len(first))
        return {
            "tokens": [first, *rest["tokens"]],
            "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]],
            "text_offset": [0, *rest["text_offset"]],
        }

    def _choice_json(self, choice: _Choice, index: int, request: CompletionRequest) -> dict[str, Any]:
        prefix = self.encoding.decode(choice.prompt) if request.echo else ""
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._logprobs_json(choice.logprobs, request.logprobs, len(prefix))
            if request.echo:
                head = self._echo_logprobs_json(choice, request.logprobs)
                logprobs = {key: head[key] + logprobs[key] for key in head}
        body: dict[str, Any] = {
            "index": index,
            "text": prefix + "".join(choice.text),
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        if request.prompt_logprobs is not None:
            assert choice.prompt_logprobs is not None, "the engine scored the prompt"
            body["prompt_logprobs"] = prompt_logprobs_json(
                self.encoding, choice.prompt_logprobs, request.prompt_logprobs
            )
        if request.return_token_ids:
            body["prompt_token_ids"] = choice.prompt
            body["token_ids"] = choice.token_ids
        return body

    @staticmethod
    def _usage(choices: list[_Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in {id(c.prompt): c.prompt for c in choices}.values())
        completion = sum(c.num_generated if c.keep_output else 0 for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _best(prepared: Prepared, n: int) -> list[_Choice]:
        """Each prompt's `n` candidates of the highest cumulative logprob, in prompt order (all of them, in
        order, without best_of)."""
        if prepared.per_prompt == n:
            return prepared.choices
        best = []
        for start in range(0, len(prepared.choices), prepared.per_prompt):
            group = prepared.choices[start : start + prepared.per_prompt]
            best += sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
        return best

    def _outputs(self, prepared: Prepared, completion_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's outputs as they come, tagged with the choice's index."""
        return fan_in(
            [self.engine.generate(c.prompt, c.params, f"{completion_id}-{c.index}") for c in prepared.choices]
        )

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        prepared, admission = await self.prepare(request)
        completion_id = "cmpl-" + secrets.token_hex(12)
        try:
            async for index, output in self._outputs(prepared, completion_id):
                self._consume(prepared.choices[index], output)
        finally:
            admission.release()
        chosen = self._best(prepared, request.n)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,  # the base model or the LoRA adapter it named
            "choices": [self._choice_json(c, i, request) for i, c in enumerate(chosen)],
            "usage": self._usage(prepared.choices),
        }

    async def stream(self, request: CompletionRequest) -> EventSourceResponse:
        """Validates first (errors raise before any byte is sent), then streams the chunks."""
        prepared, admission = await self.prepare(request)
        chunks = data_events(self._chunks(request, prepared))
        return sse(chunks, self.settings, admission.release, self.engine)

    async def _chunks(self, request: CompletionRequest, prepared: Prepared) -> AsyncIterator[dict[str, Any]]:
        completion_id = "cmpl-" + secrets.token_hex(12)
        head = {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,  # the base model or the LoRA adapter it named
        }

        options = request.stream_options
        include_usage = options is not None and options.include_usage
        # vLLM's continuous usage: with include_usage, every chunk carries the usage so far.
        continuous = include_usage and options is not None and options.continuous_usage_stats
        # vLLM's return_token_ids: a choice's first chunk carries its prompt's ids, every chunk its new ids.
        prompt_sent = [not request.return_token_ids] * len(prepared.choices)

        def chunk(
            choice: _Choice, text: str, new_ids: list[int], logprobs: Any = None, finish: str | None = None
        ) -> dict[str, Any]:
            body = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                body["stop_reason"] = choice.stop_reason
            if request.return_token_ids:
                body["token_ids"] = new_ids
                if not prompt_sent[choice.index]:
                    prompt_sent[choice.index] = True
                    body["prompt_token_ids"] = choice.prompt
            out = {**head, "choices": [body]}
            if continuous:
                out["usage"] = self._usage(prepared.choices)
            return out

        # Echo's prompt text comes first; with logprobs it waits for the choice's first output, which brings
        # the prompt's logprobs. Text offsets count from the start of the choice's whole text.
        echoed = [False] * len(prepared.choices)
        sent = [0] * len(prepared.choices)

        def echo(choice: _Choice) -> dict[str, Any]:
            echoed[choice.index] = True
            sent[choice.index] = len(self.encoding.decode(choice.prompt))
            logprobs = None
            # (A request ended before its prefill, by an abort, has no prompt logprobs to send.)
            if request.logprobs is not None and choice.prompt_logprobs is not None:
                logprobs = self._echo_logprobs_json(choice, request.logprobs)
            return chunk(choice, self.encoding.decode(choice.prompt), [], logprobs)

        if request.echo and request.logprobs is None:
            for choice in prepared.choices:
                yield echo(choice)
        async for index, output in self._outputs(prepared, completion_id):
            choice = prepared.choices[index]
            before = len(choice.logprobs)
            text = self._consume(choice, output)
            if request.echo and not echoed[index]:
                yield echo(choice)
            finish = choice.finish_reason if output.finished else None
            # With token ids asked for, every step's ids are sent, even those whose text is held back.
            if text or finish or (request.return_token_ids and output.new_token_ids):
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs_json(choice.logprobs[before:], request.logprobs, sent[index])
                sent[index] += len(text)
                yield chunk(choice, text, list(output.new_token_ids), logprobs, finish)
        if include_usage:
            yield {**head, "choices": [], "usage": self._usage(prepared.choices)}
