"""Request and response shapes of the OpenAI API, as pydantic models, in one place.

Requests accept and ignore unknown fields (an OpenAI SDK sends fields we do not use); responses are built as
plain dicts by the services and checked against the official SDK's models in the tests.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The deepest a request body may nest (a JSON Schema of tool parameters is the deep part of a real request).
# The renderer and the engine recurse over what they are given, so past a few hundred levels they would
# raise RecursionError; a bound well under that, and well over any real schema, keeps that a 400.
MAX_BODY_DEPTH = 64
# JSON's `\ud800` escape decodes to a lone surrogate: a Python str that no codec can encode, which would
# fail deep in the tokenizer, the engine's stop matching or the response's encoding.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


def _is_text(value: str) -> bool:
    """Whether `value` holds no lone surrogate: encoding checks a megabyte in a millisecond, where the
    surrogate pattern, searched only to report one, takes tens."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def invalid_field(body: BaseModel) -> tuple[str, str] | None:
    """The first field of `body` that holds a lone surrogate, a number JSON cannot carry (Python's parser
    takes `NaN` and `Infinity`, which then fail in the sampler or when echoed back), or nests past
    `MAX_BODY_DEPTH`, as (param, message), or None. Walked without recursion (the body may be deep)."""
    # (value, its path, the path of the model field it is in, its depth)
    stack: list[tuple[Any, str, str, int]] = [(body, "", "", 0)]
    while stack:
        value, path, field, depth = stack.pop()
        if isinstance(value, str):
            found = None if _is_text(value) else _SURROGATE.search(value)
            if found:
                code = f"U+{ord(found.group()):04X}"
                return path, f"{path} holds a lone surrogate ({code}), which is not text; send valid UTF-8"
            continue
        if isinstance(value, float) and not math.isfinite(value):
            return path, f"{path} is {value}, which is not a JSON number"
        if depth >= MAX_BODY_DEPTH and isinstance(value, dict | list | BaseModel):
            return field, f"{field} nests deeper than {MAX_BODY_DEPTH} levels"
        if isinstance(value, BaseModel):
            items = [(name, getattr(value, name)) for name in type(value).model_fields]
            items += list((value.model_extra or {}).items())
            for name, item in reversed(items):
                child = f"{path}.{name}" if path else name
                stack.append((item, child, child, depth + 1))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                if isinstance(key, str) and _SURROGATE.search(key):
                    return path, f"{path} has a key with a lone surrogate, which is not text"
                stack.append((item, f"{path}.{key}", field, depth + 1))
        elif isinstance(value, list):
            for i in reversed(range(len(value))):
                stack.append((value[i], f"{path}[{i}]", field, depth + 1))
    return None


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope every error leaves in (documented in the OpenAPI schema)."""

    error: ErrorObject


class TextPart(_Lenient):
    type: str = "text"
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        # gpt-oss reads text only: an image, audio or file part cannot be shown to it, and dropping it would
        # answer a different question than the one asked.
        if value not in ("text", "refusal"):
            raise ValueError(f"gpt-oss reads text only; content parts of type {value!r} are not supported")
        return value


class FunctionCall(_Lenient):
    name: str
    arguments: str = ""


class ToolCall(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    description: str | None = None
    # `schema` would shadow a pydantic method; the field is read and written under its API name.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class GenerationRequest(_Lenient):
    """What every generating API takes: the model, sampling (None: the server's default), streaming, and
    stop strings (Responses has none in OpenAI's API; vLLM's extension is taken, so that chat and Responses
    stop alike), with vLLM's `include_stop_str_in_output`."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False


class ChoicesRequest(GenerationRequest):
    """The fields of the APIs that sample `n` choices per prompt (chat and the legacy completions)."""

    # The range OpenAI's API takes (a 64-bit integer).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=8)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(ChoicesRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


# -- Responses API (`POST /v1/responses`) --------------------------------------------------------------------
# Item and tool shapes are checked by `server.serving_responses`, which names the offending `param`.


class ResponsesContentPart(_Lenient):
    type: str = "input_text"
    text: str | None = None


class ResponsesInputItem(_Lenient):
    """One `input` item: a message (the type may be left out), `reasoning`, `function_call`,
    `function_call_output` or `item_reference`; which fields matter depends on `type`."""

    type: str = "message"
    id: str | None = None
    role: str | None = None
    content: str | list[ResponsesContentPart] | None = None
    summary: list[ResponsesContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ResponsesContentPart] | None = None


class ResponsesTool(_Lenient):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(_Lenient):
    type: str
    name: str | None = None


class ResponsesReasoning(_Lenient):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesTextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    description: str | None = None
    # `schema` would shadow a pydantic method; the field is read and written under its API name.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Lenient):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(GenerationRequest):
    input: str | Annotated[list[ResponsesInputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    reasoning: ResponsesReasoning | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    text: ResponsesText | None = None
    user: str | None = None


# -- Completions API (`POST /v1/completions`) ----------------------------------------------------------------


class CompletionRequest(ChoicesRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # None: the API's default of 16 tokens.
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    return_token_ids: bool = False
    user: str | None = None
