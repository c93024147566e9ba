"""lm-evaluation-harness's `local-completions` model on two tiny tasks kept in the repo (tests/clients/
lm_eval_tasks): a multiple-choice task scored by loglikelihood (/v1/completions with `echo` and `logprobs`, the
prompt's own logprobs), and a generate_until task (a stop sequence, the text scored by exact match).

Offline: the datasets are local JSON files, and the tokenizer is tiktoken's `o200k_harmony`, which tiktoken
picks for any model named `gpt-oss-*`, read from a cache folder the test fills with the vocabulary the server
already verified (lm-eval would otherwise fetch a Hugging Face tokenizer).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import torch

from harmony.encoding import VOCAB_FILE_NAME, VOCAB_URL
from model.batch import AttentionMetadata
from tests.api.conftest import MODEL
from tests.clients.conftest import Script, ScriptedServer

REPO = Path(__file__).resolve().parents[2]
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# What the model answers to the generate_until task's questions: two right, one wrong; the newline is lm-eval's
# stop sequence, so what follows it never reaches lm-eval.
ANSWERS = {
    "capital of France": " Paris\nQ: and Italy?",
    "two plus two": " four\n",
    "colour is grass": " blue\n",
}


def _answer(encoding: tiktoken.Encoding) -> Script:
    def script(body: dict[str, Any]) -> str | None:
        if body.get("echo"):
            return None  # a loglikelihood request: the model's own logprobs are what is measured
        # lm-eval sends one prompt per request here: its token ids, in a list of prompts.
        (prompt,) = body["prompt"]
        text = encoding.decode(prompt)
        return next(answer for key, answer in ANSWERS.items() if key in text)

    return script


def _expected_choice_scores(scripted: ScriptedServer, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's loglikelihood and greediness, from the engine's model run on the whole text at once
    (no server, no KV cache), tokenized as lm-eval splits a context from its continuation."""
    encoding = scripted.served.encoding
    whole = encoding.encode_ordinary(context + continuation)
    start = len(encoding.encode_ordinary(context))
    ids = torch.tensor(whole)
    with torch.no_grad():
        logits = scripted.network(ids, AttentionMetadata.build([len(whole)]))
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = ids[start:]
    rows = logprobs[start - 1 : len(whole) - 1]
    total = rows.gather(1, targets[:, None]).sum().item()
    greedy = bool((rows.argmax(dim=-1) == targets).all())
    return total, greedy


@pytest.fixture
def offline_tiktoken(tmp_path: Path, vocab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's download cache, filled with the verified vocabulary under the name tiktoken looks for."""
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    shutil.copy(vocab_dir / VOCAB_FILE_NAME, cache / hashlib.sha1(VOCAB_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))


def _evaluate(scripted: ScriptedServer, task: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """lm-eval's own evaluation of `task` through `local-completions` against the server."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository
    out = simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": scripted.v1 + "/completions",
            "tokenizer_backend": "tiktoken",
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert out is not None
    return out


def test_generate_until(
    scripted: ScriptedServer, offline_tiktoken: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted.model.script = _answer(scripted.served.encoding)
    out = _evaluate(scripted, "clients_generate", monkeypatch)

    # lm-eval cut each answer at its stop sequence and matched two of three.
    generated = sorted(s["filtered_resps"][0] for s in out["samples"]["clients_generate"])
    assert generated == [" Paris", " blue", " four"]
    assert out["results"]["clients_generate"]["exact_match,none"] == pytest.approx(2 / 3)
    # lm-eval adds the tokenizer's end-of-text string to the task's stop sequence.
    assert [b["stop"] for b in scripted.requests("/v1/completions")] == [["\n", "<|endoftext|>"]] * 3


def test_loglikelihood_multiple_choice(
    scripted: ScriptedServer, offline_tiktoken: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every choice's score, as lm-eval computes it from the server's prompt logprobs (`echo` with `logprobs`,
    `max_tokens: 1`), equals the model's own, and so does the accuracy lm-eval derives from them."""
    out = _evaluate(scripted, "clients_choice", monkeypatch)

    sent = scripted.requests("/v1/completions")
    assert len(sent) == 9  # one request per (question, choice)
    assert all(b["echo"] is True and b["logprobs"] == 1 and b["max_tokens"] == 1 for b in sent)
    right = 0
    samples = out["samples"]["clients_choice"]
    assert len(samples) == 3
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = [_expected_choice_scores(scripted, context, " " + choice) for choice in doc["choices"]]
        got = [(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=2e-3)
        assert [g for _, g in got] == [g for _, g in expected]
        right += max(range(len(expected)), key=lambda i: expected[i][0]) == doc["label"]
    assert out["results"]["clients_choice"]["acc,none"] == pytest.approx(right / 3)
