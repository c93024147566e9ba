"""Start-up time to the first served token on the embedded default model, first start and cached.

    python benchmarks/startup_bench.py [--runs 2]

Each run starts `python -m server` with no `--model` in a new process and measures, from the launch: when
`/health` first answers 200, and when the first streamed content token of a chat request arrives. The first
start gets an empty cache folder (the demo checkpoint is written then); later runs reuse it. The baseline
in the same run is a bare `python -c "import torch"`: the interpreter and torch import that any start pays.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(cache_dir: str) -> tuple[float, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--port",
            str(port),
            "--cache-dir",
            cache_dir,
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        ready = time.perf_counter() - started
        body = {
            "model": "gpt-oss-demo",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "max_tokens": 16,
        }
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content") or delta.get("reasoning"):
                        break
        first_token = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(60)
    return ready, first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="cached starts after the first")
    args = parser.parse_args()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    baseline = time.perf_counter() - started
    say(f"startup_bench: demo model on CPU; baseline `python -c 'import torch'`: {baseline:.2f} s")
    say(f"{'start':>10} {'healthy s':>10} {'first token s':>14} {'x baseline':>11}")
    with tempfile.TemporaryDirectory() as cache:
        for run in range(1 + args.runs):
            ready, first = one_start(cache)
            label = "first" if run == 0 else f"cached {run}"
            say(f"{label:>10} {ready:>10.2f} {first:>14.2f} {first / baseline:>11.1f}")


if __name__ == "__main__":
    main()
