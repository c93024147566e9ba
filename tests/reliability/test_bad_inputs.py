"""The bad-input corpus (tests/reliability/corpus.py) against one server while victim streams run: every bad
case is answered 4xx in the OpenAI envelope (an edge case 2xx or 4xx), never 5xx and never a hang; every
victim stream completes with its terminal chunk and the forced text; the server is healthy after each case."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.reliability.conftest import (
    MODEL,
    StreamResult,
    final_script,
    read_chat_stream,
    serve,
    stream_ending,
)
from tests.reliability.corpus import CASES, Case

VICTIMS = 3
CASE_WORKERS = 3
CASE_TIMEOUT = 20.0
VICTIM_TEXT = " ".join(f"victim{i}" for i in range(30))


def _envelope_problem(response: httpx.Response) -> str | None:
    """None if the body is `{"error": {"message": str, "type": str, "param": ..., "code": ...}}`."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not the envelope: {response.text[:120]!r}"
    if not (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
    ):
        return f"envelope without message/type: {error!r:.120}"
    if "param" not in error or "code" not in error:
        return f"envelope without param/code: {error!r:.120}"
    return None


def _accepted_problem(path: str, response: httpx.Response) -> str | None:
    """None if a 2xx answer is a whole, error-free response (streamed or not)."""
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        ending = stream_ending(path, text.splitlines())
        return None if ending == "normal" else f"the stream ended {ending or 'cut off'}: {text[-200:]!r}"
    try:
        body = response.json()
    except ValueError:
        return f"a 2xx body that is not JSON: {text[:120]!r}"
    if isinstance(body, dict) and "error" in body and body["error"]:
        return f"a 2xx carrying an error: {text[:120]!r}"
    return None


def _check(client: httpx.Client, case: Case) -> str | None:
    """None when the server answered the case soundly and is healthy after it; else what went wrong."""
    try:
        response = client.post(
            case.path,
            content=case.body.encode(),
            headers={"content-type": "application/json"},
            timeout=CASE_TIMEOUT,
        )
    except httpx.TimeoutException:
        return f"hang: no answer within {CASE_TIMEOUT:.0f} s"
    except httpx.HTTPError as error:
        return f"transport error: {error!r}"
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:160]!r}"
    if 400 <= status < 500:
        problem = _envelope_problem(response)
        outcome = None if problem is None else f"{status} {problem}"
    elif case.kind == "edge" and 200 <= status < 300:
        outcome = _accepted_problem(case.path, response)
    else:
        outcome = f"{status} (a bad request accepted): {response.text[:100]!r}"
    try:
        health = client.get("/health", timeout=5).status_code
    except httpx.HTTPError as error:
        return (outcome or "") + f"; server unhealthy after it: {error!r}"
    if health != 200:
        return (outcome or "") + f"; /health answered {health} after it"
    return outcome


def test_bad_input_corpus_with_victim_streams(checkpoint: Path, summary: Callable[[str], None]) -> None:
    assert len(CASES) >= 150, f"the corpus has {len(CASES)} cases; at least 150 wanted"
    started = time.perf_counter()
    failures: dict[str, str] = {}
    victims: list[StreamResult] = []
    durations: dict[str, float] = {}
    victim_seconds: list[float] = []
    with serve(checkpoint, engine={"max_num_seqs": 16}) as served:
        done = threading.Event()

        def victim() -> None:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Tell me"}],
                "stream": True,
                "test_force": final_script(VICTIM_TEXT),
            }
            for _ in range(200):  # bounded; normally `done` ends it far sooner
                if done.is_set():
                    return
                began = time.perf_counter()
                try:
                    with httpx.stream(
                        "POST", served.base_url + "/v1/chat/completions", json=body, timeout=60
                    ) as response:
                        victims.append(read_chat_stream(response))
                except httpx.HTTPError as error:
                    victims.append(StreamResult(0, problem=repr(error)))
                victim_seconds.append(time.perf_counter() - began)

        def run(case: Case) -> tuple[str, str | None]:
            with httpx.Client(base_url=served.base_url) as client:
                began = time.perf_counter()
                problem = _check(client, case)
                durations[case.name] = time.perf_counter() - began
                return case.name, problem

        victim_threads = [threading.Thread(target=victim, daemon=True) for _ in range(VICTIMS)]
        for thread in victim_threads:
            thread.start()
        time.sleep(0.5)  # the victims are streaming before the first bad case
        try:
            with ThreadPoolExecutor(CASE_WORKERS) as pool:
                for name, problem in pool.map(run, CASES):
                    if problem is not None:
                        failures[name] = problem
        finally:
            done.set()
            for thread in victim_threads:
                thread.join(90)
    elapsed = time.perf_counter() - started
    hurt = [v for v in victims if not (v.terminal and v.error is None and v.content == VICTIM_TEXT)]
    slowest = max(durations, key=durations.__getitem__)
    why_hurt = sorted({(v.error or {}).get("message", v.problem or "wrong text")[:60] for v in hurt})
    counts = {
        "5xx": sum(p[:1] == "5" for p in failures.values()),
        "hang": sum(p.startswith("hang") for p in failures.values()),
        "accepted": sum("accepted" in p for p in failures.values()),
        "unhealthy": sum("health" in p for p in failures.values()),
    }
    summary(
        f"{len(CASES)} cases ({sum(c.kind == 'bad' for c in CASES)} bad, {sum(c.kind == 'edge' for c in CASES)} edge): "
        f"{len(CASES) - len(failures)} answered soundly, {counts['5xx']} 5xx, {counts['hang']} hangs, "
        f"{counts['accepted']} bad ones accepted, {len(failures) - sum(counts.values())} other; "
        f"server unhealthy after {counts['unhealthy']}; victims {len(victims) - len(hurt)}/{len(victims)} intact "
        f"(longest {max(victim_seconds, default=0):.1f} s; hurt by {why_hurt}); slowest case {slowest} "
        f"{durations[slowest]:.1f} s; {elapsed:.1f} s"
    )
    listing = "\n".join(f"  {name}: {problem}" for name, problem in list(failures.items())[:80])
    assert not failures, f"{len(failures)} of {len(CASES)} cases answered unsoundly:\n{listing}"
    assert len(victims) >= VICTIMS, f"only {len(victims)} victim streams ran"
    assert not hurt, (
        f"{len(hurt)} of {len(victims)} victim streams hurt, e.g. "
        + json.dumps([v.__dict__ for v in hurt[:2]], default=str)[:600]
    )
