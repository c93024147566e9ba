"""Per-request LoRA benchmark: the engine's decode step time for a batch of base rows only, against the same
batch with a third of its rows on one adapter and a third on another.

    python benchmarks/lora_bench.py [--preset tiny,small] [--device cpu|cuda] [--batch 16] [--steps 30]
                                    [--ranks 8,32] [--targets attention,experts] [--threads N] [--rounds 3]

For each preset, target and rank: one model with random weights (`model.testing.random_model`, packed MXFP4
experts, prepacked on the CPU as `GptOss.from_checkpoint` does), an engine with room for two adapters of that
rank, and two random adapters loaded: on the attention projections (q, k, v and o) for `attention`, on the
experts' gate_up_proj and down_proj for `experts` (the engine then keeps room on the experts too). A batch of
`--batch` requests (32-token random prompts, greedy) is admitted and prefilled; then `--steps` decode steps
(one token per request each) are timed. Base and mixed batches run in turn `--rounds` times (after one untimed
warm-up) and the median step of each is reported. The base batch's forward takes no LoRA path at all; the
mixed one runs the two stacked low-rank products per attention projection for every row, or per active
expert for its rows. The ratio is mixed / base: the cost of serving adapters in the batch.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import CONFIGS  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from model.lora import read_adapter, write_random_adapter  # noqa: E402
from model.testing import random_model  # noqa: E402

PROMPT_LEN = 32

# write_random_adapter's arguments for each --targets entry.
ADAPTED: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {"modules": ("q_proj", "k_proj", "v_proj", "o_proj"), "experts": ()},
    "experts": {"modules": (), "experts": ("gate_up_proj", "down_proj")},
}


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def decode_steps(engine: EngineCore, loras: list[int | None], steps: int, seed: int) -> list[float]:
    """The wall times (ms) of `steps` decode steps of one request per entry of `loras` (its adapter id)."""
    rng = random.Random(seed)
    vocab = engine.vocab_size
    for i, lora_id in enumerate(loras):
        prompt = [rng.randrange(vocab) for _ in range(PROMPT_LEN)]
        params = SamplingParams(max_tokens=steps + 4, temperature=0.0, lora_id=lora_id)
        engine.add_request(f"s{seed}-{i}", prompt, params)
    requests = engine.scheduler.requests.values()
    while any(not r.output_token_ids for r in requests):  # prefill every request
        engine.step()
    device = engine.model.device
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    while engine.has_unfinished():
        engine.step()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny,small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--targets", default="attention,experts", help="what the adapters adapt")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--rounds", type=int, default=3, help="base and mixed batches run in turn, this often"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out(f"device {device}, {dtype}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    out(f"batch {args.batch}, {args.rounds} x {args.steps} decode steps timed (median), prompts {PROMPT_LEN}")
    out(f"{'preset':8} {'targets':9} {'rank':>4} {'base ms':>9} {'mixed ms':>9} {'ratio':>6}")
    with torch.inference_mode(), tempfile.TemporaryDirectory() as scratch:
        for preset in args.preset.split(","):
            config = CONFIGS[preset]
            for targets in args.targets.split(","):
                adapted = ADAPTED[targets]
                for rank in (int(r) for r in args.ranks.split(",")):
                    model = random_model(config, device=device, dtype=dtype)
                    model.prepack_weights()
                    engine = EngineCore(
                        model,
                        EngineConfig(
                            max_model_len=256,
                            kv_cache_memory=256 << 20,
                            max_loras=2,
                            max_lora_rank=rank,
                            lora_experts=bool(adapted["experts"]),
                        ),
                    )
                    for seed, name in enumerate(("a", "b")):
                        where = Path(scratch) / f"{preset}-{targets}-{rank}-{name}"
                        path = write_random_adapter(config, where, rank=rank, seed=seed, **adapted)
                        engine.load_lora(name, read_adapter(path, config), str(path))
                    ids = [None, engine.loras["a"].lora_id, engine.loras["b"].lora_id]
                    mix = [ids[i % 3] for i in range(args.batch)]
                    decode_steps(engine, mix, 2, seed=0)  # warm-up: first-use allocations of both paths
                    times: dict[str, list[float]] = {"base": [], "mixed": []}
                    for r in range(args.rounds):  # in turn, so that a burst of load on the machine hits both
                        times["base"] += decode_steps(engine, [None] * args.batch, args.steps, seed=2 * r + 1)
                        times["mixed"] += decode_steps(engine, mix, args.steps, seed=2 * r + 2)
                    base, mixed = (statistics.median(times[k]) for k in ("base", "mixed"))
                    out(f"{preset:8} {targets:9} {rank:>4} {base:>9.2f} {mixed:>9.2f} {mixed / base:>6.2f}")


if __name__ == "__main__":
    main()
