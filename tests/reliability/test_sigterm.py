"""SIGTERM with streams in flight, on a real `python -m server` process: every stream (chat, completions,
Responses) ends with a terminal event, a normal end or an error event, never a cut connection; exit status 0.

The grace period (1 s) is shorter than the streams (hundreds of tokens), so the streams still running when it
ends must be closed by the server with an error event, not dropped."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.reliability.conftest import server_process, stream_ending

GRACE = 1.0
PER_API = 2
LONG = 400  # with the ~70-token prompt, inside --max-model-len 512


def test_sigterm_ends_every_stream_with_a_terminal_event(
    demo_cache: Path, summary: Callable[[str], None]
) -> None:
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG},
        "/v1/completions": {"prompt": "Once upon a time", "max_tokens": LONG},
        "/v1/responses": {"input": "Hi", "max_output_tokens": LONG},
    }
    args = ("--max-model-len", "512", "--shutdown-grace", str(GRACE), "--max-num-seqs", "8")
    with server_process(demo_cache, *args) as (process, base):
        results: dict[int, tuple[str, list[str], str | None]] = {}
        started = threading.Barrier(len(bodies) * PER_API + 1, timeout=60)

        def one(index: int, path: str, body: dict[str, object]) -> None:
            lines: list[str] = []
            problem = None
            try:
                with httpx.stream(
                    "POST",
                    base + path,
                    json={"model": "gpt-oss-demo", "stream": True, "temperature": 0, **body},
                    timeout=httpx.Timeout(60, connect=10),
                ) as response:
                    if response.status_code != 200:
                        problem = f"status {response.status_code}"
                    received = response.iter_lines()
                    for line in received:
                        lines.append(line)
                        if line.startswith("data: "):
                            break
                    started.wait()
                    lines.extend(received)
            except (httpx.HTTPError, threading.BrokenBarrierError) as error:
                problem = f"{type(error).__name__}: {error}"
            results[index] = (path, lines, problem)

        threads = [
            threading.Thread(target=one, args=(i * len(bodies) + j, path, body), daemon=True)
            for i in range(PER_API)
            for j, (path, body) in enumerate(bodies.items())
        ]
        for thread in threads:
            thread.start()
        started.wait()  # every stream has sent its first event
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(90)
        try:
            status: int | str = process.wait(60)
        except subprocess.TimeoutExpired as error:
            status = f"still running: {error!r}"
        took = time.perf_counter() - signalled
    endings = {i: stream_ending(path, lines) for i, (path, lines, _) in results.items()}
    normal = sum(e == "normal" for e in endings.values())
    errors = sum(e == "error" for e in endings.values())
    cut = {i: results[i] for i, e in endings.items() if e is None or results[i][2] is not None}
    summary(
        f"SIGTERM with {len(threads)} streams in flight (grace {GRACE:.0f} s): {normal} ended normally, "
        f"{errors} with an error event, {len(cut)} cut without a terminal event; exit status {status} "
        f"after {took:.1f} s"
    )
    assert len(results) == len(threads), f"only {len(results)} of {len(threads)} streams came back"
    assert not cut, f"{len(cut)} of {len(threads)} streams ended without a terminal event: " + "; ".join(
        f"{path}: {problem or 'closed'} after {len(lines)} lines, last {lines[-1:]!r}"
        for path, lines, problem in list(cut.values())[:4]
    )
    assert status == 0, f"the server's exit status after SIGTERM was {status}"
