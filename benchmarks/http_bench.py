"""HTTP overhead: streamed chat through the server against the same requests on the engine alone.

    python benchmarks/http_bench.py [--tokens 64] [--concurrency 1 32]

Both sides run the same tiny random checkpoint, the same prompt and the same forced output (a logits
processor makes every request produce the same `--tokens` answer tokens, so lengths do not depend on the
random weights). "Engine alone" drives `AsyncEngine.generate` in this process; "HTTP" starts the real app
under uvicorn on localhost and streams `/v1/chat/completions` with httpx from a separate client process,
counting content chunks. Printed per concurrency: time to first token and time per output token (mean over
streams of the mean gap between tokens), and the HTTP overhead on time per token against the target (at most
10% at 32 streams).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import LogitsProcessor, SamplingParams
from harmony.encoding import load_harmony_encoding
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from server.app import create_app
from server.async_engine import AsyncEngine
from server.serving import ProcessorsHook
from server.settings import ServerSettings

MODEL = "bench"


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def forcing(tokens: list[int]) -> LogitsProcessor:
    def processor(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        row = torch.full_like(logits, float("-inf"))
        row[tokens[min(len(output), len(tokens) - 1)]] = 0.0
        return row

    return processor


@dataclasses.dataclass
class Timing:
    ttft: list[float]
    tpot: list[float]

    def summary(self) -> tuple[float, float]:
        return statistics.mean(self.ttft), statistics.mean(self.tpot)


def _record(starts: float, stamps: list[float]) -> tuple[float, float]:
    ttft = stamps[0] - starts
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return ttft, statistics.mean(gaps) if gaps else 0.0


async def engine_alone(
    engine: AsyncEngine, prompt: list[int], script: list[int], n_tokens: int, c: int
) -> Timing:
    async def one() -> tuple[float, float]:
        params = SamplingParams(max_tokens=len(script), temperature=0.0, logits_processors=[forcing(script)])
        start = time.perf_counter()
        stamps: list[float] = []
        async for output in engine.generate(prompt, params):
            stamps.extend(time.perf_counter() for _ in output.new_token_ids)
        # As the HTTP side sees it: from the first answer token (after the 3 header tokens) to the last word.
        return _record(start, stamps[3 : 3 + n_tokens])

    results = await asyncio.gather(*(one() for _ in range(c)))
    return Timing([r[0] for r in results], [r[1] for r in results])


async def over_http(base: str, c: int) -> Timing:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stream": True,
        "temperature": 0,
        "bench_force": True,
    }

    async def one(client: httpx.AsyncClient) -> tuple[float, float]:
        start = time.perf_counter()
        stamps: list[float] = []
        async with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning"):
                        stamps.append(time.perf_counter())
        return _record(start, stamps)

    limits = httpx.Limits(max_connections=c + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        results = await asyncio.gather(*(one(client) for _ in range(c)))
    return Timing([r[0] for r in results], [r[1] for r in results])


def _client_process(base: str, c: int) -> tuple[list[float], list[float]]:
    timing = asyncio.run(over_http(base, c))
    return timing.ttft, timing.tpot


def http_in_another_process(base: str, c: int) -> Timing:
    """The clients run in a process of their own, as real clients do: in this one they would compete with the
    server and the engine thread for the GIL and count their own JSON parsing as server overhead."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        ttft, tpot = pool.apply(_client_process, (base, c))
    return Timing(ttft, tpot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="answer tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    encoding = load_harmony_encoding()
    folder = Path(tempfile.gettempdir()) / "gpt-oss-http-bench"
    if not (folder / "config.json").is_file():
        write_checkpoint(dataclasses.replace(PRESETS["tiny"], sliding_window=16), folder, layout="hf", seed=3)
    model = GptOss.from_checkpoint(folder, dtype=torch.float32, progress=False)
    engine = EngineCore(
        model,
        EngineConfig(max_model_len=2048, max_num_seqs=64, kv_cache_memory=256 << 20),
        token_bytes=encoding.decode_single_token_bytes,
    )
    # Every request answers the same: a final message of `--tokens` one-token words, then <|return|>.
    script = encoding.encode(
        "<|channel|>final<|message|>" + " word" * args.tokens + "<|return|>", allowed_special="all"
    )

    def hook(extra: dict[str, Any], index: int) -> list[LogitsProcessor]:
        return [forcing(script)] if extra.get("bench_force") else []

    settings = ServerSettings(served_model_name=MODEL, conversation_date="2026-11-27")
    app = create_app(
        engine, settings, encoding=encoding, processors_hook=ProcessorsHook(frozenset({"bench_force"}), hook)
    )
    bridge = app.state.server.services.engine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    prompt = httpx.post(
        base + "/tokenize", json={"messages": [{"role": "user", "content": "Tell me a story."}]}
    ).json()["tokens"]

    say(f"http_bench: tiny checkpoint, {args.tokens} answer tokens per request, torch threads {args.threads}")
    header = ["streams", "engine ttft ms", "http ttft ms", "engine tpot ms", "http tpot ms", "overhead"]
    say(" ".join(f"{h:>15}" for h in header))
    verdicts = []
    for c in args.concurrency:
        asyncio.run(engine_alone(bridge, prompt, script, args.tokens, min(c, 4)))  # warm-up
        alone = asyncio.run(engine_alone(bridge, prompt, script, args.tokens, c)).summary()
        http = http_in_another_process(base, c).summary()
        overhead = http[1] / alone[1] - 1
        row = [str(c), f"{alone[0] * 1e3:.1f}", f"{http[0] * 1e3:.1f}", f"{alone[1] * 1e3:.2f}"]
        row += [f"{http[1] * 1e3:.2f}", f"{overhead:.1%}"]
        say(" ".join(f"{v:>15}" for v in row))
        if c == 32:
            verdicts.append(
                f"at 32 streams HTTP adds {overhead:.1%} per token (target <= 10%): "
                + ("PASS" if overhead <= 0.10 else "FAIL")
            )
    for line in verdicts:
        say(line)
    server.should_exit = True


if __name__ == "__main__":
    main()
