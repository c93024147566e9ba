"""Constrained decoding through the real engine: every sampled token is one the request's grammar allows, even
against a logit bias pushing the other way, and a turn that ends is valid."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from engine.constraint import Grammar, GrammarConstraint
from engine.request import FinishReason, SamplingParams
from harmony import encoding as tok
from harmony.encoding import load_harmony_encoding
from harmony.grammar import ResponseFormat, grammar_tokenizer, turn_grammar
from harmony.messages import Role
from harmony.parser import parse_completion_tokens
from model.gpt_oss import GptOss
from tests.engine.conftest import make_engine

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_sampled_tokens_follow_the_grammar_against_a_bias(tiny_model: GptOss) -> None:
    enc = load_harmony_encoding()
    lltok = grammar_tokenizer(enc)
    text = turn_grammar(response_format=ResponseFormat(SCHEMA))
    assert text is not None
    sure = enc.encode_ordinary("Sure")[0]
    engine = make_engine(tiny_model)
    for seed in range(12):
        params = SamplingParams(
            temperature=1.5,
            seed=seed,
            max_tokens=24,
            stop_token_ids=[tok.RETURN, tok.CALL],
            logit_bias={sure: 100.0, tok.END: 100.0},  # pushes hard towards tokens the grammar forbids early
            grammar=Grammar(text, lltok),
        )
        engine.add_request(f"g{seed}", [1, 2, 3, 4, 5], params)
    outputs: dict[str, list[int]] = {}
    finished: dict[str, FinishReason] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.error is None, out.error
                finished[out.request_id] = out.finish_reason  # type: ignore[assignment]
    completed = 0
    for rid, tokens in outputs.items():
        check = GrammarConstraint(lltok, text)
        mask = np.zeros(check.words, dtype=np.int32)
        for token in tokens:
            check.fill(mask)
            assert (int(mask[token // 32]) >> (token % 32)) & 1, (rid, enc.decode(tokens))
            check.advance(token)
        if finished[rid] is FinishReason.STOP:
            completed += 1
            messages = parse_completion_tokens(enc, tokens, Role.ASSISTANT, strict=True)
            final = [m for m in messages if m.channel == "final"]
            assert len(final) == 1
            jsonschema.validate(json.loads(final[0].text), SCHEMA)
    assert completed > 0, "no turn reached its final answer within the budget"


def test_a_grammar_that_does_not_compile_is_refused_naming_it(tiny_model: GptOss) -> None:
    from engine.request import RequestRejected

    lltok = grammar_tokenizer(load_harmony_encoding())
    engine = make_engine(tiny_model)
    with pytest.raises(RequestRejected) as refused:
        engine.add_request("bad", [1, 2], SamplingParams(grammar=Grammar("start: undefined_rule", lltok)))
    assert refused.value.field == "grammar"
