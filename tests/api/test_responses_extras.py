"""vLLM's sampling extras on /v1/responses: min_tokens, ignore_eos and repetition_penalty reach the engine
through the shared sampling parameters, as on chat and completions."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import MODEL, Served


def _respond(served: Served, **body: object) -> httpx.Response:
    return httpx.post(
        served.base_url + "/v1/responses", json={"model": MODEL, "input": "Hello", **body}, timeout=120
    )


def test_ignore_eos_runs_to_the_token_limit(served: Served) -> None:
    script = "<|channel|>final<|message|>Hi<|return|>"
    forced = {"test_force": script, "max_output_tokens": 12}
    length = len(served.encoding.encode(script, allowed_special="all"))
    assert _respond(served, **forced).json()["usage"]["output_tokens"] == length
    ignored = _respond(served, **forced, ignore_eos=True).json()
    assert ignored["usage"]["output_tokens"] == 12
    assert ignored["status"] == "incomplete"
    assert _respond(served, max_output_tokens=3, repetition_penalty=1.3).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"min_tokens": 9, "max_output_tokens": 3}, "min_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -2}, "min_tokens"),
    ],
)
def test_extras_are_validated(served: Served, body: dict, param: str) -> None:
    """A refusal naming the field shows each one reached the engine's parameters (the engine checks
    min_tokens against the output limit and the penalty's bounds)."""
    response = _respond(served, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
