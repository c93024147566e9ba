"""Structured outputs over HTTP on the real engine: a json_schema response format is enforced by the grammar
(the random model's answers that finish validate), shown to the model in the developer message, and the SDK's
parse() helper returns the parsed object."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field, ValidationError

from harmony.encoding import load_harmony_encoding
from harmony.messages import ResponseFormat
from harmony.render import Renderer
from server.harmony_chat import to_harmony
from server.protocol import ChatMessage
from tests.api.conftest import MODEL, Served

USER = [{"role": "user", "content": "Is the sky blue?"}]


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(8):
        choice = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
            },
            temperature=1.5,
            seed=seed,
            max_tokens=40,
        ).choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    assert finished > 0, "no answer finished within the budget"


def test_the_schema_reaches_the_developer_message() -> None:
    """Harmony tells the model the answer's shape in the developer message's `# Response Formats`."""
    conversation = to_harmony(
        [ChatMessage(role="user", content="Is the sky blue?")],
        None,
        effort=None,
        date_setting=None,
        response_format=ResponseFormat("verdict", SCHEMA),
    )
    enc = load_harmony_encoding()
    text = enc.decode(Renderer(enc).render_for_completion(conversation))
    assert "# Response Formats" in text
    assert "## verdict" in text
    assert '"confidence"' in text


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=9)


def test_the_sdk_parse_helper_returns_the_object(client: openai.OpenAI) -> None:
    parsed = None
    for seed in range(8):
        try:
            completion = client.chat.completions.parse(
                model=MODEL, messages=USER, response_format=Verdict, temperature=1.5, seed=seed, max_tokens=40
            )
        except openai.LengthFinishReasonError:  # still reasoning at the budget: the random model's way
            continue
        parsed = completion.choices[0].message.parsed
        break
    assert isinstance(parsed, Verdict)


def test_responses_text_format_answers_validate_and_parse(client: openai.OpenAI) -> None:
    finished = 0
    for seed in range(8):
        response = client.responses.create(
            model=MODEL,
            input="Is the sky blue?",
            text={"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}},
            temperature=1.5,
            max_output_tokens=40,
            extra_body={"seed": seed},
        )
        assert response.text.format.type == "json_schema"
        if response.status == "completed":
            finished += 1
            jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert finished > 0, "no response completed within the budget"
    parsed = None
    for seed in range(8):
        try:
            result = client.responses.parse(
                model=MODEL,
                input="Is the sky blue?",
                text_format=Verdict,
                temperature=1.5,
                max_output_tokens=40,
                extra_body={"seed": seed},
            )
        except ValidationError:  # cut by max_output_tokens mid-answer: the SDK parses what there is
            continue
        if result.status == "completed":
            parsed = result.output_parsed
            break
    assert isinstance(parsed, Verdict)
