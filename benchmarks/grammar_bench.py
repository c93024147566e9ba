"""Constrained decoding's cost, in one run on the tiny model: decode step time at batch 64 with every row
constrained against none, the time to fill and apply the masks per step, and the compile time of a new
schema's turn grammar (median over a corpus of 30) against a cache hit.

    .venv/bin/python benchmarks/grammar_bench.py [--threads N] [--device cpu|cuda] [--steps N] [--rounds N]

The constrained rows run a JSON grammar from their first token (a reasoning budget of 0): an array of at least
64 strings, so that no row finishes inside the measured steps and every step masks all 64 rows, mostly inside
bounded strings (the costlier masks).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.constraint import (  # noqa: E402
    Grammar,
    GrammarConstraint,
    StepMasks,
    compile_within,
    grammar_problem,
)
from engine.core import EngineCore  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from harmony import encoding as tok  # noqa: E402
from harmony.encoding import load_harmony_encoding  # noqa: E402
from harmony.grammar import ResponseFormat, grammar_tokenizer, turn_grammar  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.gpt_oss import GptOss  # noqa: E402
from model.make_checkpoint import write_checkpoint  # noqa: E402
from tests.api.schema_corpus import CORPUS  # noqa: E402

BATCH = 64
PROMPT = list(range(100, 116))
LONG = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64}},
    "required": ["items"],
    "additionalProperties": False,
}


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def checkpoint() -> Path:
    path = ROOT / ".cache" / "bench" / "tiny-seed0"
    if not (path / ".done").is_file():
        write_checkpoint(PRESETS["tiny"], path, layout="hf", seed=0)
        (path / ".done").write_text("ok\n")
    return path


@dataclass
class Steps:
    """Per decode step: wall seconds; CPU seconds of the engine thread (the step's wall where every other
    thread has a core of its own); and CPU seconds of the whole process (every thread: the forward, the
    masks' worker, llguidance's and torch's pools), which a machine with no idle core cannot hide."""

    wall: list[float] = field(default_factory=list)
    engine_cpu: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def decode_steps(
    model: GptOss, grammar: Grammar | None, steps: int, device: torch.device, into: Steps
) -> None:
    """Time each decode step with BATCH rows running, each adding one token, into `into`."""
    engine = EngineCore(model, EngineConfig(max_num_seqs=BATCH, max_model_len=1024, block_size=16))
    for i in range(BATCH):
        params = SamplingParams(
            max_tokens=steps + 8,
            temperature=1.0,
            seed=i,
            stop_token_ids=[tok.RETURN, tok.CALL],
            grammar=grammar,
        )
        engine.add_request(f"r{i}", PROMPT, params)
    while engine.has_unfinished():
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        full = len(engine.scheduler.running) == BATCH
        start, start_engine, start_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        outputs = engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if decoding and full and len(outputs) == BATCH:
            into.wall.append(time.perf_counter() - start)
            into.engine_cpu.append(time.thread_time() - start_engine)
            into.cpu.append(time.process_time() - start_cpu)
        assert all(o.error is None for o in outputs), [o.error for o in outputs if o.error]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each kind, alternating (on a loaded machine both kinds then see the same load)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    enc = load_harmony_encoding()
    started = time.perf_counter()
    lltok = grammar_tokenizer(enc)
    out(f"grammar tokenizer built in {time.perf_counter() - started:.2f} s (once per process)")

    # Compile: a new schema's whole-turn grammar, then the same one again (a cache hit) and a request's copy.
    fresh, hits, copies = [], [], []
    for schema in CORPUS:
        grammar = Grammar(turn_grammar(response_format=ResponseFormat(schema)) or "", lltok)
        start = time.perf_counter()
        assert compile_within(grammar, 10.0) is None
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert grammar_problem(grammar) is None
        hits.append(time.perf_counter() - start)
        start = time.perf_counter()
        GrammarConstraint(grammar)
        copies.append(time.perf_counter() - start)
    ms = 1e3
    out(
        f"compile per new schema ({len(CORPUS)} schemas): p50 {statistics.median(fresh) * ms:.2f} ms, "
        f"max {max(fresh) * ms:.2f} ms (target p50 <= 5 ms)"
    )
    out(
        f"cache hit: {statistics.median(hits) * 1e6:.1f} us; a request's matcher copied from it: "
        f"{statistics.median(copies) * ms:.3f} ms"
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = GptOss.from_checkpoint(checkpoint(), device=args.device, dtype=dtype, progress=False)
    grammar = Grammar(turn_grammar(response_format=ResponseFormat(LONG), reasoning_budget=0) or "", lltok)
    worker: list[float] = []
    exposed: list[float] = []
    original = StepMasks.apply

    def recorded(self: StepMasks, logits: torch.Tensor, errors: list[str | None]) -> None:
        original(self, logits, errors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        worker.append(self.worker_seconds)
        exposed.append(self.exposed_seconds)

    StepMasks.apply = recorded  # type: ignore[method-assign]
    try:
        decode_steps(model, None, 4, device, Steps())  # warm-up
        plain, constrained = Steps(), Steps()
        for _ in range(args.rounds):
            decode_steps(model, None, args.steps, device, plain)
            decode_steps(model, grammar, args.steps, device, constrained)
    finally:
        StepMasks.apply = original  # type: ignore[method-assign]
    base, masked = statistics.median(plain.wall), statistics.median(constrained.wall)
    out(f"load average (1 min) after the decode steps: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    out(
        f"decode step at batch {BATCH} ({args.device}, {args.threads} threads, "
        f"{len(plain.wall)} and {len(constrained.wall)} steps): none constrained {base * ms:.2f} ms, "
        f"all constrained {masked * ms:.2f} ms, "
        f"ratio {masked / base:.3f} (target <= 1.05)"
    )
    base_engine = statistics.median(plain.engine_cpu)
    masked_engine = statistics.median(constrained.engine_cpu)
    out(
        f"CPU time per step, engine thread: none constrained {base_engine * ms:.2f} ms, all constrained "
        f"{masked_engine * ms:.2f} ms, ratio {masked_engine / base_engine:.3f}"
    )
    base_cpu, masked_cpu = statistics.median(plain.cpu), statistics.median(constrained.cpu)
    out(
        f"CPU time per step, all threads: none constrained {base_cpu * ms:.2f} ms, all constrained "
        f"{masked_cpu * ms:.2f} ms (+{(masked_cpu - base_cpu) * ms:.2f} ms: what a step pays where no core "
        "is idle)"
    )
    out(
        f"masks per step: computed on the worker thread while the model runs (fill {BATCH} rows) "
        f"p50 {statistics.median(worker) * ms:.2f} ms, "
        f"max {max(worker) * ms:.2f} ms; on the engine thread after the forward (wait + apply) "
        f"p50 {statistics.median(exposed) * ms:.2f} ms, max {max(exposed) * ms:.2f} ms"
    )


if __name__ == "__main__":
    main()
