"""Constrained decoding through the real engine: every sampled token is one the request's grammar allows, even
against a logit bias pushing the other way, and a turn that ends is valid."""

from __future__ import annotations

import json
import uuid

import jsonschema
import numpy as np
import pytest
import torch

from engine.constraint import Grammar, GrammarConstraint, TokenMasker, apply_token_masks_reference
from engine.core import EngineCore
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
        check = GrammarConstraint(Grammar(text, lltok))
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


def test_a_reasoning_budget_bounds_the_analysis_and_the_answer_begins(tiny_model: GptOss) -> None:
    """The random model left to itself (no forcing) reasons at most the budget, then writes its answer."""
    enc = load_harmony_encoding()
    lltok = grammar_tokenizer(enc)
    budget = 5
    text = turn_grammar(reasoning_budget=budget)
    assert text is not None
    engine = make_engine(tiny_model)
    for seed in range(8):
        params = SamplingParams(
            temperature=1.0,
            seed=seed,
            max_tokens=24,
            stop_token_ids=[tok.RETURN, tok.CALL],
            grammar=Grammar(text, lltok),
        )
        engine.add_request(f"b{seed}", [1, 2, 3, 4, 5], params)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    answered = 0
    for rid, tokens in outputs.items():
        said = enc.decode(tokens)
        opened = tokens.index(tok.MESSAGE) + 1
        if enc.decode(tokens[:opened]) == "<|channel|>analysis<|message|>":
            assert tok.END in tokens, (rid, said)
            assert tokens.index(tok.END) - opened <= budget, (rid, said)
            assert said.count("<|channel|>analysis") == 1, (rid, said)
        answered += "<|channel|>final<|message|>" in said
    # The header's own tokens are the model's choice (`final` may be spelled in pieces), so a turn or two
    # may still be in its header at the token limit; most are past it.
    assert answered >= 6, outputs


def test_a_compile_past_its_time_budget_is_refused_and_remembered_once_done() -> None:
    from engine.constraint import compile_within, grammar_problem

    lltok = grammar_tokenizer(load_harmony_encoding())
    # Names no other test uses (a grammar compiled before in this process is remembered, and costs nothing), and
    # enough of them that the compile takes tens of milliseconds: far past the budget, whatever the scheduler
    # does with the threads.
    tag = uuid.uuid4().hex
    properties = {f"p{tag}_{i}": {"type": "string", "pattern": f"^[a-z]+[0-9]+x{i}$"} for i in range(1000)}
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    grammar = Grammar(turn_grammar(response_format=ResponseFormat(schema)) or "", lltok)
    assert compile_within(grammar, 1e-6) == "compiling the grammar took longer than 1e-06 s"
    assert compile_within(grammar, 30.0) is None
    assert grammar_problem(grammar) is None  # remembered: the engine's check costs nothing


def test_constrained_and_free_requests_in_one_batch_each_get_what_they_get_alone(tiny_model: GptOss) -> None:
    """Batch invariance: a row's mask touches only its own logits, so every request, constrained or not,
    samples the same tokens in a mixed batch as alone (seeded)."""
    lltok = grammar_tokenizer(load_harmony_encoding())
    grammar = Grammar(turn_grammar(response_format=ResponseFormat(SCHEMA), reasoning_budget=3) or "", lltok)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14], [2, 4, 6, 8, 10, 12]]
    params = [
        SamplingParams(temperature=1.0, seed=10 + i, max_tokens=16, grammar=grammar if i % 2 == 0 else None)
        for i in range(len(prompts))
    ]

    def run(indices: list[int]) -> dict[int, list[int]]:
        engine = make_engine(tiny_model)
        for i in indices:
            engine.add_request(f"r{i}", prompts[i], params[i])
        tokens: dict[int, list[int]] = {i: [] for i in indices}
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                tokens[int(out.request_id[1:])].extend(out.new_token_ids)
        return tokens

    together = run(list(range(len(prompts))))
    for i in range(len(prompts)):
        assert together[i] == run([i])[i], i


def _run_tokens(
    engine: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


def test_masks_hold_through_chunked_prefill_and_preemption(tiny_model: GptOss) -> None:
    """The masks are computed while the model runs, for the rows that sample in that step: a request whose
    prompt is chunked, or that is preempted and recomputed, keeps its grammar's state and samples what it
    samples alone, with its raw logprobs (the masked logits are a copy then)."""
    enc = load_harmony_encoding()
    lltok = grammar_tokenizer(enc)
    text = turn_grammar(response_format=ResponseFormat(SCHEMA), reasoning_budget=4)
    assert text is not None
    grammar = Grammar(text, lltok)
    rng = np.random.default_rng(5)
    requests = {
        f"r{i}": (
            rng.integers(100, 200_000, size=int(rng.integers(20, 40))).tolist(),
            SamplingParams(
                temperature=1.0,
                seed=i,
                max_tokens=20,
                stop_token_ids=[tok.RETURN, tok.CALL],
                logprobs=2 if i == 1 else None,
                grammar=grammar if i % 4 != 3 else None,
            ),
        )
        for i in range(8)
    }
    # Room for about three requests at a time and a small token budget: chunked prompts, preemptions.
    engine = make_engine(
        tiny_model,
        num_kv_blocks=40,
        max_model_len=160,
        max_num_batched_tokens=24,
        enable_prefix_caching=False,
    )
    together = _run_tokens(engine, requests)
    assert engine.stats().num_preemptions > 0
    for rid, (prompt, params) in requests.items():
        alone = _run_tokens(make_engine(tiny_model), {rid: (prompt, params)})
        assert together[rid] == alone[rid], rid
        if params.grammar is not None:
            check = GrammarConstraint(grammar)
            mask = np.zeros(check.words, dtype=np.int32)
            for token in together[rid]:
                check.fill(mask)
                assert (int(mask[token // 32]) >> (token % 32)) & 1, (rid, enc.decode(together[rid]))
                check.advance(token)


def test_a_grammar_that_fails_fails_its_request_alone(tiny_model: GptOss) -> None:
    """A matcher in error (here pushed there by hand) ends its own request with the error; the other
    constrained request in the step goes on to its end."""
    lltok = grammar_tokenizer(load_harmony_encoding())
    grammar = Grammar(turn_grammar(response_format=ResponseFormat(SCHEMA)) or "", lltok)
    engine = make_engine(tiny_model)
    for rid in ("broken", "fine"):
        params = SamplingParams(temperature=1.0, seed=1, max_tokens=12, grammar=grammar)
        engine.add_request(rid, [1, 2, 3, 4], params)
    engine.step()
    broken = engine.scheduler.requests["broken"].constraint
    assert broken is not None
    broken.matcher.consume_token(tok.RETURN)  # not allowed here: the matcher is in error from now on
    errors: dict[str, str | None] = {}
    counts = {"broken": 1, "fine": 1}
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] += len(out.new_token_ids)
            if out.finished:
                errors[out.request_id] = out.error
    assert errors["broken"] is not None
    assert "output constraint failed" in errors["broken"]
    assert errors["fine"] is None
    assert counts["fine"] == 12


def test_the_masker_applies_what_each_matcher_allows_and_falls_back_row_by_row() -> None:
    """The worker's batched fill, and its fallback one matcher at a time when the batch raises, give the
    logits each row's own mask; rows without a grammar are untouched, a matcher in error fails its row."""
    enc = load_harmony_encoding()
    lltok = grammar_tokenizer(enc)
    grammar = Grammar(turn_grammar(response_format=ResponseFormat(SCHEMA)) or "", lltok)
    vocab = enc.n_vocab - 1  # the model's rows may be fewer than the mask's bits
    constraints = [GrammarConstraint(grammar) for _ in range(3)]
    for token in enc.encode("<|channel|>final<|message|>", allowed_special="all"):
        constraints[1].advance(token)
    constraints[2].advance(tok.RETURN)  # refused at the start: this matcher is in error
    source = torch.randn(5, vocab, generator=torch.Generator().manual_seed(3))
    want = source.clone()
    for row, constraint in ((0, constraints[0]), (2, constraints[1])):
        mask = np.zeros((1, constraint.words), dtype=np.int32)
        constraint.fill(mask[0])
        apply_token_masks_reference(want[row : row + 1], mask)

    class Broken:
        def unsafe_compute_mask_ptr(self, *args: object) -> None:
            raise RuntimeError("the batch fails")

    for broken in (False, True):
        masker = TokenMasker(torch.device("cpu"))
        if broken:
            masker._executor = Broken()  # type: ignore[assignment]
        logits = source.clone()
        errors: list[str | None] = [None] * 5
        masks = masker.start([constraints[0], None, constraints[1], constraints[2], None])
        assert masks is not None
        masks.apply(logits, errors)
        assert torch.equal(logits[:3], want[:3]), broken
        assert torch.equal(logits[4], source[4])
        assert errors[:3] == [None, None, None]
        assert errors[3] is not None
        assert "output constraint failed" in errors[3]
