"""`POST /v1/completions`: the legacy Completions API on raw text or token ids, as evaluation harnesses use.

No harmony here: the prompt is tokenized as given (or taken as token ids) and the output is decoded as it
comes. Generation stops on the model's end tokens (`<|return|>`, `<|call|>`, `<|endoftext|>`), `stop`
strings or `max_tokens` (16 by default, as OpenAI). vLLM's `return_token_ids` adds the prompt's and the
output's token ids.
"""

from __future__ import annotations

import codecs
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import EventSourceResponse

from engine.request import FinishReason, RequestError, RequestOutput, SamplingParams
from harmony import encoding as tok
from server.errors import ParamNames
from server.protocol import CompletionRequest
from server.serving import EngineRequest, Serving, StopTrimmer, output_budget
from server.streaming import data_events, fan_in, sse

END_TOKENS = sorted({tok.RETURN, tok.CALL, tok.END_OF_TEXT})
# OpenAI's default output budget for this API.
DEFAULT_MAX_TOKENS = 16


# A sampled token's id and logprob, and the top alternatives (id, logprob).
_Logprob = tuple[int, float, list[tuple[int, float]]]


@dataclass(slots=True)
class _Choice:
    index: int
    prompt: list[int]
    params: SamplingParams
    trimmer: StopTrimmer
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[_Logprob] = field(default_factory=list)
    finish: FinishReason | None = None
    stop_reason: int | str | None = None

    @property
    def finish_reason(self) -> str:
        return "length" if self.finish is FinishReason.LENGTH else "stop"


@dataclass(slots=True)
class Prepared:
    """A prepared request: one choice per prompt and sample (`n` per prompt, prompt-major)."""

    choices: list[_Choice]


class CompletionService(Serving[CompletionRequest, Prepared]):
    def param_names(self, request: CompletionRequest) -> ParamNames:
        return {}  # the engine's names are this API's: prompt, max_tokens, logprobs, stop

    def sequences(self, request: CompletionRequest) -> int:
        p = request.prompt
        batch = isinstance(p, list) and bool(p) and not isinstance(p[0], int)
        return (len(p) if batch else 1) * request.n

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

    def _prepare(self, request: CompletionRequest) -> tuple[Prepared, list[EngineRequest]]:
        choices = []
        for prompt in self._prompts(request):
            max_tokens = output_budget(
                len(prompt), request.max_tokens, self.max_model_len, DEFAULT_MAX_TOKENS
            )
            for n_index in range(request.n):
                params = self.sampling_params(
                    request, max_tokens, index=n_index, stop_token_ids=END_TOKENS, logprobs=request.logprobs
                )
                trimmer = StopTrimmer(params.stop, request.include_stop_str_in_output)
                choices.append(_Choice(len(choices), prompt, params, trimmer))
        return Prepared(choices), [(c.prompt, c.params) for c in choices]

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
            choice.stop_reason = output.stop_reason if isinstance(output.stop_reason, str) else None
            text.append(choice.decoder.decode(b"", final=True))
        out = choice.trimmer.feed("".join(text))
        if output.finished:
            out += choice.trimmer.flush()
        choice.text.append(out)
        return out

    def _token_text(self, token: int) -> str:
        return self.encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    def _logprobs_json(self, logprobs: list[_Logprob], offset: int) -> dict[str, Any]:
        """The API's logprobs object for `logprobs`, whose text starts `offset` characters into the choice."""
        tokens, values, tops, offsets = [], [], [], []
        position = offset
        for token, value, top in logprobs:
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
            "logprobs": self._logprobs_json(choice.logprobs, len(prefix))
            if request.logprobs is not None
            else None,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        if request.return_token_ids:
            body["prompt_token_ids"] = choice.prompt
            body["token_ids"] = choice.token_ids
        return body

    @staticmethod
    def _usage(choices: list[_Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in {id(c.prompt): c.prompt for c in choices}.values())
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.settings.served_model_name,
            "choices": [self._choice_json(c, request) for c in prepared.choices],
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
            "model": self.settings.served_model_name,
        }

        def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = prepared.choices[index].stop_reason
            return {**head, "choices": [choice]}

        if request.echo:
            for choice in prepared.choices:
                yield chunk(choice.index, self.encoding.decode(choice.prompt))
        async for index, output in self._outputs(prepared, completion_id):
            choice = prepared.choices[index]
            before = len(choice.logprobs)
            text = self._consume(choice, output)
            finish = choice.finish_reason if output.finished else None
            if text or finish:
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs_json(choice.logprobs[before:], 0)
                yield chunk(index, text, logprobs, finish)
        if request.stream_options is not None and request.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self._usage(prepared.choices)}
