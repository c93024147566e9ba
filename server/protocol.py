"""Request and response shapes of the OpenAI API, as pydantic models, in one place.

No field is silently ignored: every field a request model declares is honoured, refused with a 400 naming it
when its value asks for what the server cannot do (`_refuse_unless`), or accepted as a documented no-op (the
README's "Request fields" table lists each). A field no model declares is unknown: `unknown_fields` finds it
wherever it is in the body and the route refuses it with a 400 naming it (or, with `--ignore-unknown-fields`,
logs it and names it in the `x-ignored-fields` response header). The models keep unknown fields
(`extra="allow"`) so that they can be reported with their path, and so that the test processors hook can read
the fields it declares. The Responses models are `_Lenient`: their unknown fields are still ignored.

Responses are built as plain dicts by the services and checked against the official SDK's models in the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

# The deepest a request body may nest (a JSON Schema of tool parameters is the deep part of a real request).
# The renderer and the engine recurse over what they are given, so past a few hundred levels they would
# raise RecursionError; a bound well under that, and well over any real schema, keeps that a 400.
MAX_BODY_DEPTH = 64
# JSON's `\ud800` escape decodes to a lone surrogate: a Python str that no codec can encode, which would
# fail deep in the tokenizer, the engine's stop matching or the response's encoding.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Model(BaseModel):
    """A request shape: its unknown fields are kept, to be refused by `unknown_fields` with their path."""

    model_config = ConfigDict(extra="allow")
    # Whether `unknown_fields` reports this model's unknown fields.
    strict_fields: ClassVar[bool] = True


class _Lenient(_Model):
    """A request shape whose unknown fields are still ignored (the Responses API's, for now)."""

    strict_fields: ClassVar[bool] = False


def unknown_fields(body: BaseModel, allowed: Collection[str] = ()) -> list[str]:
    """The paths (`messages[0].foo`) of the fields of `body` that no model declares, outer first; `allowed`
    names top-level fields someone else consumes (the processors hook's). Walked without recursion."""
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, BaseModel):
            extra = value.model_extra or {}
            if getattr(value, "strict_fields", False):
                found.extend(
                    f"{path}.{name}" if path else name for name in extra if path or name not in allowed
                )
            children = [(getattr(value, name), name) for name in type(value).model_fields]
            for item, name in reversed(children):
                stack.append((item, f"{path}.{name}" if path else name))
        elif isinstance(value, list):
            for i in reversed(range(len(value))):
                stack.append((value[i], f"{path}[{i}]"))
    return found


def _refuse_unless(allowed: Callable[[Any], bool], why: str) -> Any:
    """A validator refusing a value `allowed` rejects (None, an explicit null, is always allowed): a field the
    server declares so that it is refused with its own reason, not as unknown."""

    def check(cls: type, value: Any) -> Any:
        if value is not None and not allowed(value):
            raise ValueError(why)
        return value

    return check


def _never(value: Any) -> bool:
    return False


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


_TEXT_ONLY = "gpt-oss reads text only"


class TextPart(_Model):
    """A content part: text, or an assistant's refusal (read as its text)."""

    type: str = "text"
    text: str = ""
    refusal: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        # gpt-oss reads text only: an image, audio or file part cannot be shown to it, and dropping it would
        # answer a different question than the one asked.
        if value not in ("text", "refusal"):
            raise ValueError(f"{_TEXT_ONLY}; content parts of type {value!r} are not supported")
        return value

    def content(self) -> str:
        return (self.refusal or "") if self.type == "refusal" else self.text


class FunctionCall(_Model):
    name: str
    arguments: str = ""


class ToolCall(_Model):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    # "function": the deprecated result of a `function_call`, naming the function (read as a tool result).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # The deprecated single call of an assistant message (read as its one tool call).
    function_call: FunctionCall | None = None
    refusal: str | None = None
    # What the API returned with an earlier answer, echoed back by clients: nothing the prompt needs.
    annotations: list[Any] | None = None
    audio: Any = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    # LiteLLM's: the fields of an earlier answer it has no name for (our `reasoning`), sent back with it. The
    # reasoning is read from there when the message carries none of its own; the rest is not needed.
    provider_specific_fields: dict[str, Any] | None = None

    _no_audio = field_validator("audio")(_refuse_unless(_never, f"{_TEXT_ONLY}; audio is not supported"))

    @model_validator(mode="after")
    def _legacy_call(self) -> ChatMessage:
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs the name of the function whose result it is")
        if self.function_call is not None:
            if self.tool_calls:
                raise ValueError("give tool_calls or the deprecated function_call, not both")
            self.tool_calls = [ToolCall(function=self.function_call)]
        extra = self.provider_specific_fields or {}
        if self.reasoning is None and self.reasoning_content is None:
            found = extra.get("reasoning", extra.get("reasoning_content"))
            self.reasoning = found if isinstance(found, str) else None
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.content() for part in self.content)


class FunctionDefinition(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class StreamOptions(_Model):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk carries the usage so far (guidellm asks for it).
    continuous_usage_stats: bool = False
    # OpenAI pads chunks against length side channels when set; a no-op here.
    include_obfuscation: bool | None = None


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    # `schema` would shadow a pydantic method; the field is read and written under its API name.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Model):
    """vLLM's `structured_outputs`: the final answer held to one of these (give one)."""

    # `json` would shadow a pydantic method; the field is read under its API name.
    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class TurnConstraints(_Model):
    """The fields of the harmony APIs (chat, Responses) that constrain the assistant's turn beyond the
    response format: vLLM's `structured_outputs` with its older `guided_*` names, and the reasoning budget."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: the most tokens the reasoning may take; then the answer begins (0: no reasoning).
    thinking_token_budget: int | None = Field(default=None, ge=0)


class GenerationRequest(_Model):
    """What every generating API takes: the model, sampling (None: the server's default), streaming, and
    stop strings (Responses has none in OpenAI's API; vLLM's extension is taken, so that chat and Responses
    stop alike), with vLLM's `include_stop_str_in_output`."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    # vLLM's extras, which benchmark and evaluation tools send: the end tokens cannot end the output before
    # `min_tokens` tokens; with `ignore_eos` they never do (generation runs to the token limit); and the
    # repetition penalty (None: off; its bounds are the engine's).
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = None


def _no_offset(value: Any) -> bool:
    return value == 0


class ChoicesRequest(GenerationRequest):
    """The fields of the APIs that sample `n` choices per prompt (chat and the legacy completions)."""

    # The range OpenAI's API takes (a 64-bit integer).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=8)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream_options: StreamOptions | None = None
    # vLLM's extra: the prompt tokens' logprobs with this many alternatives each (not with stream).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's: the prompt's and each choice's token ids in the response (streamed: each chunk's new ids).
    return_token_ids: bool = False
    # vLLM's: more token ids that end a choice, besides the model's own end tokens.
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    # No-ops: the request id is the `x-request-id` header's; an end user's id is not used.
    request_id: str | None = None
    user: str | None = None
    # vLLM's: special tokens are never in the text here (the harmony parser consumes them); `false` cannot be
    # honoured.
    skip_special_tokens: bool | None = None
    # vLLM's: the engine has one queue, in arrival order.
    priority: int | None = None

    _specials = field_validator("skip_special_tokens")(
        _refuse_unless(bool, "special tokens are never part of the text here; only true is supported")
    )
    _priority = field_validator("priority")(
        _refuse_unless(_no_offset, "requests are served in arrival order; only priority 0 is supported")
    )


class ChatCompletionRequest(ChoicesRequest, TurnConstraints):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # Enables the browser, which the server runs inside the completion (`server.web_search` reads it).
    web_search_options: Any = None
    # Deprecated: read as `tools` and `tool_choice`; the answer then says `function_call` as OpenAI's did.
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedToolChoiceFunction | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # gpt-oss makes at most one call per turn (its turn ends at `<|call|>`): `false` holds by construction.
    parallel_tool_calls: bool | None = None
    # No-ops: nothing is stored (chat completions are not kept), and there is one service tier; the prompt
    # cache is automatic (prefix caching) and is not kept per key.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    # Refused unless they ask for what the server does anyway: gpt-oss reads and writes text only, has no
    # predicted outputs, no verbosity setting and no moderation.
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    verbosity: str | None = None
    moderation: Any = None

    _audio = field_validator("audio")(_refuse_unless(_never, f"{_TEXT_ONLY}; audio output is not supported"))
    _modalities = field_validator("modalities")(
        _refuse_unless(lambda v: v == ["text"], f"{_TEXT_ONLY}; only the modality 'text' is supported")
    )
    _prediction = field_validator("prediction")(_refuse_unless(_never, "predicted outputs are not supported"))
    _verbosity = field_validator("verbosity")(
        _refuse_unless(
            lambda v: v == "medium", "gpt-oss has no verbosity setting; only 'medium' is supported"
        )
    )
    _moderation = field_validator("moderation")(_refuse_unless(_never, "moderation is not supported"))

    # The deprecated field given beside the field that replaced it (refused when the request is prepared, so
    # that the 400 names it).
    _legacy_conflict: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _legacy_functions(self) -> ChatCompletionRequest:
        """The deprecated `functions` and `function_call`, as the tools and tool choice they became."""
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if old in self.model_fields_set and new in self.model_fields_set:
                self._legacy_conflict = self._legacy_conflict or old
        if self.functions is not None and self.tools is None:
            self.tools = [Tool(function=f) for f in self.functions]
        call = self.function_call
        if call is not None and self.tool_choice is None:
            self.tool_choice = call if isinstance(call, str) else NamedToolChoice(function=call)
        return self

    def legacy_conflict(self) -> str | None:
        """The deprecated field given beside the field that replaced it, if any."""
        return self._legacy_conflict


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # Whether the ids end with `<|start|>assistant`, the header the model's answer follows.
    add_generation_prompt: bool = True
    # A no-op: the harmony vocabulary adds no BOS or EOS token to text (lm-eval sends false).
    add_special_tokens: bool | None = None


class DetokenizeRequest(_Model):
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
    # `allowed_tools`: the tools the model may call (the others stay in the prompt), freely or one of them.
    mode: Literal["auto", "required"] | None = None
    tools: list[dict[str, Any]] | None = None


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


class ResponsesRequest(GenerationRequest, TurnConstraints):
    """A Responses request. Its own fields are checked like chat's (an unknown one is a 400 naming it); the
    items and parts inside it stay lenient, since clients send back what earlier responses held."""

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
    # The range OpenAI's API takes (a 64-bit integer).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    # The most tool calls one response may hold (`ResponsesService.events` says what happens past it).
    max_tool_calls: int | None = Field(default=None, ge=0)
    # vLLM's sampling extras on the Responses API.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # No-ops: hints with nothing to do here (one service tier; prefix caching is automatic and needs no key;
    # chunks are not padded).
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    stream_options: dict[str, Any] | None = None
    # Refused when set: each would change what a response is, in a way this server does not do.
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    background_options: Any = None
    moderation: Any = None

    _conversation = field_validator("conversation")(
        _refuse_unless(_never, "conversations are not stored here; use previous_response_id")
    )
    _prompt = field_validator("prompt")(
        _refuse_unless(_never, "prompt templates are not stored here; send the input")
    )
    _context_management = field_validator("context_management")(
        _refuse_unless(_never, "the conversation is never compacted here")
    )
    _background_options = field_validator("background_options")(
        _refuse_unless(_never, "background responses run at once, with no completion window")
    )
    _moderation = field_validator("moderation")(_refuse_unless(_never, "this server does not moderate"))


class InputItemsQuery(_Lenient):
    """The query of `GET /v1/responses/{id}/input_items`: a page of the items, by item id cursors."""

    after: str | None = None
    before: str | None = None
    limit: int = Field(default=20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    include: list[str] | None = None


# -- Completions API (`POST /v1/completions`) ----------------------------------------------------------------


class CompletionRequest(ChoicesRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # None: the API's default of 16 tokens. 0 (with echo only, as OpenAI took it): the prompt alone, scored.
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    # Sample this many per prompt and return the `n` of the highest cumulative logprob (None: n).
    best_of: int | None = Field(default=None, ge=1, le=20)
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # gpt-oss has no fill-in-the-middle.
    suffix: str | None = None

    _suffix = field_validator("suffix")(
        _refuse_unless(lambda v: v == "", "gpt-oss has no fill-in-the-middle; suffix is not supported")
    )
