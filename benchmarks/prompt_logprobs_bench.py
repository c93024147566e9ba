"""What scoring a prompt costs: a 512-token prompt with prompt logprobs against the same prompt without.

    python benchmarks/prompt_logprobs_bench.py [--preset tiny,small] [--prompt 512] [--repeats 5]
                                               [--threads N] [--device cpu|cuda]

Per preset (the engine benchmark's random checkpoints, written once under `.cache/bench/`), one engine with
the prefix cache off (so both requests run the whole prefill) and the default 2048-token budget (one chunk)
runs one request at a time, `max_tokens: 1`, greedy: first without prompt logprobs, then with
`prompt_logprobs: 1` (what lm-eval's `echo, logprobs: 1` asks for). It prints the median wall time of each
over `--repeats` runs (after one warm-up of each) and their ratio. The extra work is unembedding the 511
scored positions (128 rows at a time) and their log-softmax, rank and top-k; the forward is shared.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_bench import CONFIGS, checkpoint_dir, out, sync  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from model.gpt_oss import GptOss  # noqa: E402


def one_request(engine: EngineCore, rid: str, prompt: list[int], params: SamplingParams) -> float:
    sync(engine.model.device)
    started = time.perf_counter()
    engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        engine.step()
    sync(engine.model.device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny,small")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out(f"prompt logprobs cost, {args.prompt}-token prompt, {device}, {dtype}, {args.threads} thread(s)")
    out(f"{'preset':>12}{'plain ms':>12}{'scored ms':>12}{'ratio':>8}")
    rng = random.Random(0)
    for name in args.preset.split(","):
        config = CONFIGS[name]
        model = GptOss.from_checkpoint(
            checkpoint_dir(name, config), dtype=dtype, device=device, progress=False
        )
        engine = EngineCore(
            model,
            EngineConfig(
                max_model_len=args.prompt + 16, enable_prefix_caching=False, kv_cache_memory=256 << 20
            ),
        )
        prompt = [rng.randrange(config.vocab_size) for _ in range(args.prompt)]
        plain = SamplingParams(temperature=0.0, max_tokens=1)
        scored = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        times: dict[str, list[float]] = {"plain": [], "scored": []}
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                for kind, params in (("plain", plain), ("scored", scored)):
                    seconds = one_request(engine, f"{kind}-{i}", prompt, params)
                    if i:  # the first of each is a warm-up
                        times[kind].append(seconds)
        a, b = statistics.median(times["plain"]), statistics.median(times["scored"])
        out(f"{name:>12}{a * 1e3:>12.1f}{b * 1e3:>12.1f}{b / a:>8.2f}")
        del engine, model


if __name__ == "__main__":
    main()
