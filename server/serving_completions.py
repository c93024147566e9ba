"""`POST /v1/completions`: the legacy Completions API on raw text or token ids, as evaluation harnesses use.

No harmony here: the prompt is tokenized as given (or taken as token ids) and the output is decoded as it
comes. Generation stops on the model's end tokens (`<|return|>`, `<|call|>`, `<|endoftext|>`), `stop`
strings or `max_tokens` (16 by default, as OpenAI). vLLM's `return_token_ids` adds the prompt's and the
output's token ids.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from fastapi import FastAPI
from pydantic import Field

from engine.request import FinishReason, RequestOutput, RequestRejected, SamplingParams, SamplingParamsError
from harmony import encoding as tok
from server.async_engine import AsyncEngine, EngineFailure
from server.errors import APIError, bad_request, not_found
from server.protocol import StreamOptions, _Lenient
from server.serving_chat import StopTrimmer
from server.settings import ServerSettings
from server.streaming import data_events, sse

END_TOKENS = sorted({tok.RETURN, tok.CALL, tok.END_OF_TEXT})


class CompletionRequest(_Lenient):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    return_token_ids: bool = False
    user: str | None = None


@dataclass(slots=True)
class _Choice:
    index: int
    prompt: list[int]
    trimmer: StopTrimmer
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish: FinishReason | None = None


class CompletionService:
    def __init__(
        self, engine: AsyncEngine, encoding: tiktoken.Encoding, settings: ServerSettings, max_model_len: int
    ) -> None:
        self.engine = engine
        self.encoding = encoding
        self.settings = settings
        self.model_name = settings.served_model_name
        self.max_model_len = max_model_len

    def _prompts(self, request: CompletionRequest) -> list[list[int]]:
        p = request.prompt
        if isinstance(p, str):
            return [self.encoding.encode_ordinary(p)]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if p and all(isinstance(x, str) for x in p):
            return [self.encoding.encode_ordinary(x) for x in p]  # type: ignore[arg-type]
        if p and all(isinstance(x, list) for x in p):
            return [list(x) for x in p]  # type: ignore[union-attr]
        raise bad_request("prompt must be text, token ids, or a list of either", param="prompt")

    def _params(self, request: CompletionRequest, prompt: list[int], index: int) -> SamplingParams:
        room = self.max_model_len - len(prompt)
        if room < 1 or request.max_tokens > room:
            raise APIError(
                400,
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({request.max_tokens}) exceeds this "
                f"model's context of {self.max_model_len} tokens",
                param="prompt" if room < 1 else "max_tokens",
                code="context_length_exceeded",
            )
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        try:
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=None if request.seed is None else request.seed + index,
                stop_token_ids=END_TOKENS,
                stop=stops,
                logprobs=request.logprobs,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
            )
            self.engine.check(prompt, params)
        except (SamplingParamsError, RequestRejected) as error:
            raise bad_request(str(error), param="prompt") from error
        return params

    def prepare(self, request: CompletionRequest) -> list[tuple[_Choice, SamplingParams]]:
        if request.model != self.model_name:
            raise not_found(f"the model {request.model!r} does not exist", param="model")
        prompts = self._prompts(request)
        if not all(prompts):
            raise bad_request("a prompt is empty", param="prompt")
        work = []
        for p_index, prompt in enumerate(prompts):
            for n_index in range(request.n):
                index = p_index * request.n + n_index
                params = self._params(request, prompt, n_index)
                work.append((_Choice(index, prompt, StopTrimmer(params.stop)), params))
        return work

    def _consume(self, choice: _Choice, output: RequestOutput) -> str:
        text = []
        for i, token in enumerate(output.new_token_ids):
            choice.token_ids.append(token)
            text.append(choice.decoder.decode(self.encoding.decode_single_token_bytes(token)))
            if output.logprobs is not None and i < len(output.logprobs):
                lp = output.logprobs[i]
                choice.logprobs.append((lp.token_id, lp.logprob, lp.top))
        if output.finished:
            choice.finish = output.finish_reason
            text.append(choice.decoder.decode(b"", final=True))
        out = choice.trimmer.feed("".join(text))
        if output.finished:
            out += choice.trimmer.flush()
        choice.text.append(out)
        return out

    def _token_text(self, token: int) -> str:
        return self.encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    def _logprobs_json(self, choice: _Choice, offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        position = offset
        for token, value, top in choice.logprobs:
            text = self._token_text(token)
            tokens.append(text)
            values.append(max(value, -9999.0))  # -inf is not JSON
            tops.append({self._token_text(t): max(v, -9999.0) for t, v in top})
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _choice_json(self, choice: _Choice, request: CompletionRequest) -> dict[str, Any]:
        prefix = self.encoding.decode(choice.prompt) if request.echo else ""
        body: dict[str, Any] = {
            "index": choice.index,
            "text": prefix + "".join(choice.text),
            "logprobs": self._logprobs_json(choice, len(prefix)) if request.logprobs is not None else None,
            "finish_reason": "length" if choice.finish is FinishReason.LENGTH else "stop",
        }
        if request.return_token_ids:
            body["prompt_token_ids"] = choice.prompt
            body["token_ids"] = choice.token_ids
        return body

    def _usage(self, work: list[tuple[_Choice, SamplingParams]]) -> dict[str, int]:
        prompt = sum(len(p) for p in {id(c.prompt): c.prompt for c, _ in work}.values())
        completion = sum(len(c.token_ids) for c, _ in work)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        work = self.prepare(request)
        completion_id = "cmpl-" + secrets.token_hex(12)

        async def run(choice: _Choice, params: SamplingParams) -> None:
            async for output in self.engine.generate(
                choice.prompt, params, f"{completion_id}-{choice.index}"
            ):
                self._consume(choice, output)

        try:
            await asyncio.gather(*(run(c, p) for c, p in work))
        except EngineFailure as error:
            raise APIError(500, str(error), type="server_error") from error
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [self._choice_json(c, request) for c, _ in work],
            "usage": self._usage(work),
        }

    async def stream(self, request: CompletionRequest) -> AsyncIterator[str]:
        work = self.prepare(request)
        return self._stream(request, work)

    async def _stream(
        self, request: CompletionRequest, work: list[tuple[_Choice, SamplingParams]]
    ) -> AsyncIterator[str]:
        completion_id = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        queue: asyncio.Queue[tuple[_Choice, RequestOutput | BaseException | None]] = asyncio.Queue()

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
            }
            return json.dumps({**body, "choices": choices, **extra}, ensure_ascii=False)

        async def pump(choice: _Choice, params: SamplingParams) -> None:
            try:
                async for output in self.engine.generate(
                    choice.prompt, params, f"{completion_id}-{choice.index}"
                ):
                    await queue.put((choice, output))
            except EngineFailure as error:
                await queue.put((choice, error))
            finally:
                await queue.put((choice, None))

        if request.echo:
            for choice, _ in work:
                yield chunk(
                    [
                        {
                            "index": choice.index,
                            "text": self.encoding.decode(choice.prompt),
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        tasks = [asyncio.create_task(pump(c, p)) for c, p in work]
        try:
            remaining = len(work)
            while remaining:
                choice, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    yield json.dumps(APIError(500, str(item), type="server_error").body())
                    yield "[DONE]"
                    return
                before = len(choice.logprobs)
                text = self._consume(choice, item)
                finish = None
                if item.finished:
                    finish = "length" if choice.finish is FinishReason.LENGTH else "stop"
                if text or finish:
                    logprobs = None
                    if request.logprobs is not None:
                        part = _Choice(
                            choice.index, choice.prompt, choice.trimmer, logprobs=choice.logprobs[before:]
                        )
                        logprobs = self._logprobs_json(part, 0)
                    yield chunk(
                        [{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
                    )
            if request.stream_options is not None and request.stream_options.include_usage:
                yield chunk([], usage=self._usage(work))
            yield "[DONE]"
        finally:
            for task in tasks:
                task.cancel()


def register_completions_routes(app: FastAPI, service: Any) -> None:
    """`service()` returns the ready CompletionService (or raises a 503 while loading)."""

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        completions_service: CompletionService = service()
        if body.stream:
            lines = await completions_service.stream(body)
            return sse(data_events(lines), completions_service.settings)
        return await completions_service.complete(body)
