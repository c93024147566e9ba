"""Engine benchmark: continuous batching, the prefix cache and the scheduler's overhead, against one-at-a-time
serving and Hugging Face transformers' batched `generate`.

    python benchmarks/engine_bench.py [--quick] [--device cpu|cuda] [--preset tiny,small | 20b-shaped]
                                      [--threads N] [--requests N] [--no-hf] [--dtype float32|bfloat16]

For each preset, writes once (under .cache/bench/, never committed) a random HF-layout checkpoint with
`write_checkpoint` and loads it with `GptOss.from_checkpoint` (float32 on the CPU, bfloat16 on CUDA, or
`--dtype`). Then:

* **Throughput.** A deterministic workload of requests with mixed prompt lengths (16..512 tokens) and output
  lengths (8..64 tokens), greedy, with no stop tokens, so every request produces exactly its `max_tokens`.
  At concurrency c the driver keeps c requests in flight: it adds the next request through
  `EngineCore.add_request` as soon as one finishes (continuous, not waves), and calls `EngineCore.step` until
  all are done. Aggregate output tokens/s = all output tokens / wall time (prefill included). c = 1 serves the
  same requests one at a time: that is the baseline. Every run gets a fresh engine (no prefix-cache reuse
  between runs; the random prompts share no prefix within a run). Each run also splits its wall time into
  decode-only steps (one token per scheduled request: their count, mean batch and time per step) and steps
  that carry prompt tokens; the summary's "decode-only steps" line is batching's gain per decoded token in
  the former, where the prompts' prefill (the same work at any concurrency) plays no part.
* **transformers.** `GptOssForCausalLM` on the same checkpoint (same dtype, MXFP4 dequantized at load, eager
  attention), the same requests in order, in batches of 16, left-padded, greedy `generate` with
  `max_new_tokens` = the largest `max_tokens` of the batch. Only the tokens each request asked for count as
  useful output (the extra tokens the shorter requests of a batch are dragged along for do not).
* **Prefix cache.** A shared 1024-token prefix with distinct 16-token suffixes: one request warms the cache,
  then the time to first token (add_request to the step that returns the token) of new requests with the
  same prefix, one at a time, with `enable_prefix_caching` on and off; the median of a few.
* **Scheduler overhead.** 64 requests (the workload's prompts, 32 output tokens each) all admitted at once;
  `engine.scheduler.schedule()` and `engine.runner.prepare()` are wrapped with timers (thread CPU time and
  wall time), averaged over the decode steps (one new token per request) with 64 running requests.
* **TTFT of a 2k-token prompt** alone on an empty engine.

* **The overlapped loop, model stubbed** (`--overlap-stub`, this alone): what the overlapped loop
  (`EngineConfig.async_scheduling`) hides of the host's part of a step, measurable on a CPU. The model's
  forward is replaced by a stand-in for a GPU: it returns fixed logits at once and queues
  `--device-step-ms` of simulated device work behind the work already queued; reading a step's sampled ids
  waits until that step's work is done, as a device-to-host copy waits for its stream. Decode steps at batch 1
  and 16 (greedy, vocabulary 1024 so that sampling on CPU tensors stays small), plain loop and overlapped
  loop: ms/step with no device time (the host's part), then with the device time, and the share of the
  host time the overlap hid: 1 - (overlapped - device) / host. The ideal is max(host, device) per step.
  Times are on a virtual clock: the engine thread's CPU time plus its simulated waits (one torch thread),
  so a loaded machine slows the figures less than it would wall time.

On CUDA (`--device cuda --preset 20b-shaped`): the KV pool is sized from the free memory after a warm-up
(`EngineConfig.kv_cache_memory=None`) and its size is printed; concurrency 1, 16 and 64; transformers is
skipped unless `--hf` is given.

Timings on a shared machine are noisy: the load average and the thread count are printed with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from model.config import PRESETS, ModelConfig  # noqa: E402
from model.gpt_oss import GptOss  # noqa: E402
from model.make_checkpoint import write_checkpoint  # noqa: E402

logger = logging.getLogger("engine_bench")

# Bigger than tiny on every axis that costs compute, yet a full run stays in minutes on 2 CPU cores.
SMALL = ModelConfig(
    num_hidden_layers=8,
    num_experts=32,
    experts_per_token=4,
    hidden_size=256,
    intermediate_size=256,
    head_dim=64,
    num_attention_heads=8,
    num_key_value_heads=2,
)
CONFIGS: dict[str, ModelConfig] = {"tiny": PRESETS["tiny"], "small": SMALL, "20b-shaped": PRESETS["20b"]}

PREFIX_LEN = 1024
SUFFIX_LEN = 16
LONG_PROMPT = 2048
OVERHEAD_SEQS = 64
OVERHEAD_TOKENS = 32
HF_BATCH = 16

TARGET_VS_BASELINE = 8.0
TARGET_VS_HF = 2.0
TARGET_PREFIX = 5.0
TARGET_OVERHEAD_MS = 1.0


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- setup -------------------------------------------------------------------------------------------------


def checkpoint_dir(name: str, config: ModelConfig) -> Path:
    """The HF-layout checkpoint of `config`, seed 0, written once (a `.done` marker guards partial writes)."""
    path = ROOT / ".cache" / "bench" / f"{name}-seed0"
    if not (path / ".done").is_file():
        started = time.perf_counter()
        write_checkpoint(config, path, layout="hf", seed=0)
        (path / ".done").write_text("ok\n")
        logger.info("wrote %s in %.1f s", path, time.perf_counter() - started)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(
    n: int, vocab: int, seed: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int]
) -> Workload:
    rng = random.Random(seed)
    prompts, max_tokens = [], []
    for _ in range(n):
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(*prompt_lens))])
        max_tokens.append(rng.randint(*output_lens))
    return Workload(prompts, max_tokens)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)  # no stop tokens: exactly max_tokens


def make_engine(model: GptOss, args: argparse.Namespace, **overrides: Any) -> EngineCore:
    settings: dict[str, Any] = {"kv_cache_memory": args.kv_cache_memory, "max_model_len": args.max_model_len}
    settings.update(overrides)
    return EngineCore(model, EngineConfig(**settings))


# -- measurements ------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RunResult:
    seconds: float
    output_tokens: int
    steps: int
    ttft: list[float]
    preemptions: int
    # The steps that ran decodes only (one token per scheduled request), against those with prompt tokens.
    decode_steps: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    @property
    def prompt_step_seconds(self) -> float:
        return self.seconds - self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def run_concurrency(engine: EngineCore, work: Workload, concurrency: int, tag: str) -> RunResult:
    """Keep `concurrency` requests in flight: the next is added as soon as one finishes."""
    pending = deque(range(len(work.prompts)))
    in_flight = 0
    tokens = 0
    steps = 0
    added: dict[str, float] = {}
    ttft: list[float] = []
    plans: list[Any] = []
    engine.scheduler.schedule = _timed(engine.scheduler.schedule, plans)  # type: ignore[method-assign]
    decode_steps, decode_seconds, decode_tokens = 0, 0.0, 0
    sync(engine.model.device)
    started = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            i = pending.popleft()
            rid = f"{tag}-{i}"
            added[rid] = time.perf_counter()
            engine.add_request(rid, work.prompts[i], greedy(work.max_tokens[i]))
            in_flight += 1
        step_started = time.perf_counter()
        outputs = engine.step()
        steps += 1
        now = time.perf_counter()
        plan = plans.pop()[2]
        if plan.scheduled and plan.num_tokens == len(plan.scheduled):
            decode_steps += 1
            decode_seconds += now - step_started
            decode_tokens += plan.num_tokens
        for output in outputs:
            if output.new_token_ids and output.request_id in added:
                ttft.append(now - added.pop(output.request_id))
            tokens += len(output.new_token_ids)
            if output.finished:
                in_flight -= 1
    seconds = time.perf_counter() - started
    if tokens != work.num_output_tokens:
        raise RuntimeError(f"expected {work.num_output_tokens} output tokens, got {tokens}")
    return RunResult(
        seconds,
        tokens,
        steps,
        ttft,
        engine.stats().num_preemptions,
        decode_steps,
        decode_seconds,
        decode_tokens,
    )


def time_to_first_token(engine: EngineCore, rid: str, prompt: list[int]) -> float:
    """Add one request to an idle engine and step until its first token; the request is then run out."""
    sync(engine.model.device)
    started = time.perf_counter()
    engine.add_request(rid, prompt, greedy(1))
    elapsed = None
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id == rid and output.new_token_ids and elapsed is None:
                elapsed = time.perf_counter() - started
    assert elapsed is not None
    return elapsed


def prefix_ttft(model: GptOss, args: argparse.Namespace, caching: bool, repeats: int) -> float:
    rng = random.Random(11)
    vocab = model.config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(PREFIX_LEN)]
    suffixes = [[rng.randrange(vocab) for _ in range(SUFFIX_LEN)] for _ in range(repeats + 1)]
    engine = make_engine(model, args, enable_prefix_caching=caching)
    time_to_first_token(engine, "warm", prefix + suffixes[0])
    times = [time_to_first_token(engine, f"p{i}", prefix + s) for i, s in enumerate(suffixes[1:])]
    del engine
    release(model.device)
    return statistics.median(times)


@dataclasses.dataclass(slots=True)
class Overhead:
    schedule_cpu_ms: float
    prepare_cpu_ms: float
    schedule_wall_ms: float
    prepare_wall_ms: float
    steps: int

    @property
    def cpu_ms(self) -> float:
        return self.schedule_cpu_ms + self.prepare_cpu_ms

    @property
    def wall_ms(self) -> float:
        return self.schedule_wall_ms + self.prepare_wall_ms


def _timed(fn: Callable[..., Any], record: list[tuple[float, float, Any]]) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        result = fn(*a, **k)
        record.append((time.thread_time() - cpu, time.perf_counter() - wall, result))
        return result

    return wrapper


def scheduler_overhead(model: GptOss, args: argparse.Namespace, work: Workload) -> Overhead:
    """Schedule and prepare times per decode step with OVERHEAD_SEQS running requests."""
    engine = make_engine(model, args, max_num_seqs=OVERHEAD_SEQS)
    schedules: list[tuple[float, float, Any]] = []
    prepares: list[tuple[float, float, Any]] = []
    engine.scheduler.schedule = _timed(engine.scheduler.schedule, schedules)  # type: ignore[method-assign]
    engine.runner.prepare = _timed(engine.runner.prepare, prepares)  # type: ignore[method-assign]
    for i in range(OVERHEAD_SEQS):
        prompt = work.prompts[i % len(work.prompts)][: args.overhead_prompt_cap]
        engine.add_request(f"o{i}", prompt, greedy(args.overhead_tokens))
    decode: list[tuple[tuple[float, float, Any], tuple[float, float, Any]]] = []
    while engine.has_unfinished():
        engine.step()
        plan = schedules[-1][2]
        # A decode step: every one of the OVERHEAD_SEQS requests ran and added exactly one token.
        if len(plan.scheduled) == OVERHEAD_SEQS and plan.num_tokens == OVERHEAD_SEQS:
            decode.append((schedules[-1], prepares[-1]))
    del engine, schedules, prepares
    release(model.device)
    if not decode:
        raise RuntimeError("no decode step with all requests running")
    n = len(decode)
    return Overhead(
        schedule_cpu_ms=1e3 * sum(s[0] for s, _ in decode) / n,
        prepare_cpu_ms=1e3 * sum(p[0] for _, p in decode) / n,
        schedule_wall_ms=1e3 * sum(s[1] for s, _ in decode) / n,
        prepare_wall_ms=1e3 * sum(p[1] for _, p in decode) / n,
        steps=n,
    )


def hf_generate(path: Path, work: Workload, device: torch.device, dtype: torch.dtype) -> RunResult:
    """transformers' batched greedy generate, HF_BATCH requests at a time, left-padded."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf = GptOssForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        attn_implementation="eager",
        quantization_config=Mxfp4Config(dequantize=True),
    ).to(device)
    hf.eval()
    hf.generation_config.eos_token_id = None  # lengths exactly as asked, as for our engine
    hf.generation_config.pad_token_id = 0
    useful = 0
    seconds = 0.0
    steps = 0
    with torch.inference_mode():
        # One small warm-up call, untimed.
        hf.generate(torch.tensor([[1, 2, 3]], device=device), max_new_tokens=2, do_sample=False)
        for start in range(0, len(work.prompts), HF_BATCH):
            prompts = work.prompts[start : start + HF_BATCH]
            wanted = work.max_tokens[start : start + HF_BATCH]
            width = max(len(p) for p in prompts)
            ids = torch.zeros(len(prompts), width, dtype=torch.int64)
            mask = torch.zeros(len(prompts), width, dtype=torch.int64)
            for row, p in enumerate(prompts):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            new = max(wanted)
            sync(device)
            started = time.perf_counter()
            result = hf.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False
            )
            sync(device)
            seconds += time.perf_counter() - started
            if result.shape[1] != width + new:
                raise RuntimeError(f"transformers produced {result.shape[1] - width} tokens, not {new}")
            useful += sum(wanted)
            steps += new
    del hf
    release(device)
    return RunResult(seconds, useful, steps, [], 0)


# -- the run -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Check:
    name: str
    figure: str
    target: str
    ok: bool | None  # None: informational


def describe(config: ModelConfig) -> str:
    return (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}, {config.num_experts} experts top-{config.experts_per_token}, "
        f"{config.num_attention_heads}x{config.head_dim} q heads / {config.num_key_value_heads} kv, "
        f"vocab {config.vocab_size}"
    )


def bench_preset(name: str, args: argparse.Namespace, device: torch.device) -> list[Check]:
    path = Path(args.checkpoint) if args.checkpoint else checkpoint_dir(name, CONFIGS[name])
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    experts = args.experts or ("dequantized" if device.type == "cpu" else "packed")
    started = time.perf_counter()
    model = GptOss.from_checkpoint(path, device=device, dtype=dtype, expert_mode=experts, progress=False)
    config = model.config
    out(f"\n== {name}: {describe(config)}")
    out(f"   {path} ({dtype}, {experts} experts, loaded in {time.perf_counter() - started:.1f} s)")

    n = args.requests or (8 if args.quick else 64)
    work = make_workload(
        n, config.vocab_size, seed=1, prompt_lens=args.prompt_lens, output_lens=args.output_lens
    )
    out(
        f"   workload: {n} requests, prompts {args.prompt_lens[0]}..{args.prompt_lens[1]} tokens "
        f"({work.num_prompt_tokens} in all), outputs {args.output_lens[0]}..{args.output_lens[1]} tokens "
        f"({work.num_output_tokens} in all), greedy, no stop tokens; c requests kept in flight"
    )

    # Warm-up (first-call costs), and the KV pool the engine chose.
    engine = make_engine(model, args)
    pool = engine.scheduler.kv
    kv_bytes = sum(t.numel() * t.element_size() for t in (*engine.runner.cache.k, *engine.runner.cache.v))
    out(
        f"   KV pool: {pool.full.num_blocks} full-attention + {pool.sliding.num_blocks} sliding-window "
        f"blocks of {pool.block_size} tokens, {kv_bytes / 2**20:.0f} MiB "
        f"({pool.full.num_blocks * pool.block_size} tokens of full-attention context)"
    )
    run_concurrency(engine, make_workload(4, config.vocab_size, 99, (8, 64), (2, 4)), 4, "warm")
    del engine
    release(device)

    checks: list[Check] = []
    if args.latency_first:
        checks += latency_checks(name, model, args, work)
    concurrencies = args.concurrency
    if concurrencies is None:
        concurrencies = [1, 16, 64] if device.type == "cuda" else [1, 4, 16, 64]
    results: dict[int, RunResult] = {}
    out(
        f"   {'run':<26}{'seconds':>9}{'out tok/s':>11}{'steps':>8}{'median TTFT':>13}{'preempt':>9}"
        f"   decode-only steps: n, mean batch, ms/step; seconds in steps with prompt tokens"
    )
    for c in concurrencies:
        engine = make_engine(model, args)
        result = run_concurrency(engine, work, c, f"c{c}")
        del engine
        release(device)
        results[c] = result
        label = "c=1 (one at a time)" if c == 1 else f"c={c}"
        out(
            f"   {label:<26}{result.seconds:>9.2f}{result.tokens_per_s:>11.1f}{result.steps:>8}"
            f"{1e3 * statistics.median(result.ttft):>10.0f} ms{result.preemptions:>9}"
            f"   {result.decode_steps:>6}{result.decode_tokens / max(result.decode_steps, 1):>6.1f}"
            f"{1e3 * result.decode_seconds / max(result.decode_steps, 1):>8.1f}"
            f"{result.prompt_step_seconds:>8.2f}"
        )

    hf_result = None
    if args.hf if args.hf is not None else device.type == "cpu":
        hf_result = hf_generate(path, work, device, dtype)
        out(
            f"   {'transformers batch 16':<26}{hf_result.seconds:>9.2f}{hf_result.tokens_per_s:>11.1f}"
            f"{hf_result.steps:>8}{'':>13}{'':>9}   (useful tokens only)"
        )

    base = results[1].tokens_per_s if 1 in results else None
    for c in concurrencies:
        if c == 1 or base is None:
            continue
        ratio = results[c].tokens_per_s / base
        if c == 16:
            checks.append(
                Check(
                    f"{name}: c=16 vs one at a time",
                    f"{ratio:.1f}x",
                    f">= {TARGET_VS_BASELINE:g}x",
                    ratio >= TARGET_VS_BASELINE,
                )
            )
        else:
            checks.append(Check(f"{name}: c={c} vs one at a time", f"{ratio:.1f}x", "", None))
        one, many = results[1], results[c]
        if one.decode_steps and many.decode_steps:
            # Seconds per decoded token in decode-only steps: batching's gain where prompts play no part.
            gain = (one.decode_seconds / one.decode_tokens) / (many.decode_seconds / many.decode_tokens)
            checks.append(Check(f"{name}:   decode-only steps, c={c} vs one", f"{gain:.1f}x", "", None))
    if hf_result is not None and 16 in results:
        ratio = results[16].tokens_per_s / hf_result.tokens_per_s
        checks.append(
            Check(
                f"{name}: c=16 vs transformers batch 16",
                f"{ratio:.1f}x",
                f">= {TARGET_VS_HF:g}x",
                ratio >= TARGET_VS_HF,
            )
        )

    if not args.latency_first:
        checks += latency_checks(name, model, args, work)
    del model
    release(device)
    return checks


def latency_checks(name: str, model: GptOss, args: argparse.Namespace, work: Workload) -> list[Check]:
    """The prefix cache's effect on TTFT, the TTFT of a long prompt and the scheduler's overhead."""
    config, device = model.config, model.device
    checks: list[Check] = []
    repeats = 2 if args.quick else 5
    on = prefix_ttft(model, args, True, repeats)
    off = prefix_ttft(model, args, False, repeats)
    out(
        f"   TTFT, {PREFIX_LEN}-token shared prefix + {SUFFIX_LEN}-token suffix (median of {repeats}): "
        f"prefix cache on {1e3 * on:.1f} ms, off {1e3 * off:.1f} ms"
    )
    checks.append(
        Check(
            f"{name}: TTFT 1k prefix, cache off / on",
            f"{off / on:.1f}x",
            f">= {TARGET_PREFIX:g}x",
            off / on >= TARGET_PREFIX,
        )
    )

    engine = make_engine(model, args)
    rng = random.Random(5)
    long_ttft = time_to_first_token(
        engine, "long", [rng.randrange(config.vocab_size) for _ in range(LONG_PROMPT)]
    )
    del engine
    release(device)
    out(f"   TTFT, one {LONG_PROMPT}-token prompt on an idle engine: {1e3 * long_ttft:.1f} ms")
    checks.append(Check(f"{name}: TTFT {LONG_PROMPT}-token prompt", f"{1e3 * long_ttft:.0f} ms", "", None))

    overhead = scheduler_overhead(model, args, work)
    out(
        f"   per decode step at {OVERHEAD_SEQS} running ({overhead.steps} steps): schedule "
        f"{overhead.schedule_cpu_ms:.3f} ms CPU ({overhead.schedule_wall_ms:.3f} wall), prepare "
        f"{overhead.prepare_cpu_ms:.3f} ms CPU ({overhead.prepare_wall_ms:.3f} wall)"
    )
    checks.append(
        Check(
            f"{name}: schedule+prepare CPU/step @64",
            f"{overhead.cpu_ms:.3f} ms",
            f"<= {TARGET_OVERHEAD_MS:g} ms",
            overhead.cpu_ms <= TARGET_OVERHEAD_MS,
        )
    )
    return checks


# -- the overlapped loop with the model stubbed --------------------------------------------------------------


class SimulatedDevice:
    """A GPU's stream on a virtual clock: the host's time is this thread's CPU time (so other processes on a
    loaded machine do not count) plus the time it has waited for the device; work is queued behind what is
    queued and done `step_s` later; waiting for a point of the queue moves the clock to it."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.busy_until = 0.0
        self.waited = 0.0

    def now(self) -> float:
        return time.thread_time() + self.waited

    def enqueue(self) -> float:
        self.busy_until = max(self.now(), self.busy_until) + self.step_s
        return self.busy_until

    def wait(self, until: float) -> None:
        self.waited += max(0.0, until - self.now())


def stubbed_engine(model: GptOss, device: SimulatedDevice, overlap: bool, batch: int) -> EngineCore:
    """An engine whose model forward is `device`'s queued work (fixed logits, returned at once), and whose
    reads of sampled ids wait for the work they depend on: all queued work in the plain loop (the read
    follows the step's own forward), the read step's in the overlapped loop (a later step may be queued)."""
    engine = EngineCore(
        model,
        EngineConfig(
            max_num_seqs=batch,
            kv_cache_memory=64 << 20,
            max_model_len=512,
            device_sampling=True,
            async_scheduling=overlap,
        ),
    )
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    rows = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))

    def forward(
        token_ids: torch.Tensor,
        meta: Any,
        cache: Any = None,
        indices: Any = None,
        out: Any = None,
        lora: Any = None,
    ) -> torch.Tensor:
        device.enqueue()
        n = token_ids.shape[0] if indices is None else indices.shape[0]
        logits = out[:n] if out is not None else torch.empty(n, vocab)
        return logits.copy_(rows[:n])

    def hidden_states(token_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        device.enqueue()
        return torch.zeros(token_ids.shape[0], hidden)

    runner = engine.runner
    runner.model = _Stub(model, forward, hidden_states)  # type: ignore[assignment]
    if not overlap:
        read_back = runner.read_back
        runner.read_back = lambda ids: (device.wait(device.busy_until), read_back(ids))[1]  # type: ignore[method-assign]
        return engine
    done: dict[int, float] = {}
    launch, collect = runner.launch, runner.collect

    def launched(plan: Any, previous: Any) -> Any:
        step = launch(plan, previous)
        done[id(step)] = device.busy_until
        return step

    def collected(step: Any) -> Any:
        device.wait(done.pop(id(step)))
        return collect(step)

    runner.launch = launched  # type: ignore[method-assign]
    runner.collect = collected  # type: ignore[method-assign]
    return engine


class _Stub:
    """The model as the runner sees it, with forward and hidden replaced."""

    def __init__(
        self, model: GptOss, forward: Callable[..., torch.Tensor], hidden: Callable[..., torch.Tensor]
    ) -> None:
        self._model = model
        self._forward = forward
        self.hidden = hidden

    def __call__(self, *args: Any) -> torch.Tensor:
        return self._forward(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def stubbed_step_ms(model: GptOss, device_s: float, overlap: bool, batch: int, steps: int) -> float:
    """Mean ms per decode-only step of `batch` requests, the model stubbed (see :func:`stubbed_engine`)."""
    device = SimulatedDevice(device_s)
    engine = stubbed_engine(model, device, overlap, batch)
    for i in range(batch):
        prompt = [(i * 37 + j * 11) % 1000 + 1 for j in range(16)]
        engine.add_request(f"s{i}", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 16))
    for _ in range(4):  # the prompts, and the pipeline filled
        engine.step()
    assert all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.requests.values())
    started = device.now()
    for _ in range(steps):
        engine.step()
    device.wait(device.busy_until)
    return (device.now() - started) / steps * 1e3


def overlap_stub(args: argparse.Namespace) -> None:
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=1024)
    path = checkpoint_dir("tiny-vocab1024", config)
    model = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)
    device_s = args.device_step_ms / 1e3
    steps = 60 if args.quick else 300
    out(f"\n== the overlapped loop, model stubbed; simulated device {args.device_step_ms:.2f} ms per step")
    heads = ("host plain", "host overl.", "plain", "overlapped", "ideal", "hidden")
    out(f"   {'batch':>5} " + " ".join(f"{h:>12}" for h in heads))
    for batch in (1, 16):
        host = stubbed_step_ms(model, 0.0, False, batch, steps)
        host_overlapped = stubbed_step_ms(model, 0.0, True, batch, steps)
        plain = stubbed_step_ms(model, device_s, False, batch, steps)
        overlapped = stubbed_step_ms(model, device_s, True, batch, steps)
        ideal = max(host_overlapped, args.device_step_ms)
        # What is left of the host's part on the critical path: the overlapped step past the device's time.
        exposed = max(0.0, overlapped - args.device_step_ms)
        hidden = 1 - min(exposed, host_overlapped) / host_overlapped if host_overlapped else 0.0
        times = (host, host_overlapped, plain, overlapped, ideal)
        out(f"   {batch:>5} " + " ".join(f"{t:>9.3f} ms" for t in times) + f" {100 * hidden:>11.0f}%")
        tokens = (batch / plain * 1e3, batch / overlapped * 1e3)
        out(
            f"         decode tok/s: plain {tokens[0]:,.0f}, overlapped {tokens[1]:,.0f} "
            f"({plain / overlapped:.2f}x)"
        )
    out("   load average now: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def machine_info(device: torch.device) -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        f"CPU: {cpu}, {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable; "
        f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})",
        "load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke test")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--preset",
        default=None,
        help=f"comma-separated, of {sorted(CONFIGS)}; default tiny,small on the CPU, 20b-shaped on CUDA",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="an existing checkpoint to run (one preset, named by --preset) instead of writing one",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    parser.add_argument("--requests", type=int, default=None, help="requests in the workload (default 64)")
    parser.add_argument("--experts", choices=["packed", "dequantized"], default=None)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="weights and activations, ours and transformers' (default float32 on the CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",") if c],
        default=None,
        help="comma-separated (default 1,4,16,64 on CPUs, 1,16,64 on CUDA; 1 is the baseline; '' runs none)",
    )
    parser.add_argument(
        "--latency-first",
        action="store_true",
        help="run the prefix-cache, long-prompt and overhead checks before the throughput runs",
    )
    parser.add_argument(
        "--hf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run transformers (default: on the CPU only)",
    )
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--kv-cache-memory",
        type=int,
        default=None,
        help="KV bytes (default: 1 GiB on the CPU, the free memory after a warm-up on CUDA)",
    )
    parser.add_argument(
        "--overlap-stub",
        action="store_true",
        help="only the overlapped loop's figures with the model stubbed and a simulated device (see above)",
    )
    parser.add_argument(
        "--device-step-ms",
        type=float,
        default=1.45,
        help="the simulated device's time per step for --overlap-stub (default: the GPU target at batch 1)",
    )
    args = parser.parse_args(argv)
    args.prompt_lens = (16, 512)
    args.output_lens = (8, 64)
    args.overhead_prompt_cap = 512
    args.overhead_tokens = OVERHEAD_TOKENS
    if args.quick:
        args.output_lens = (8, 24)
        args.overhead_prompt_cap = 32
        args.overhead_tokens = 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.overlap_stub:
        torch.set_num_threads(1)  # the virtual clock counts this thread's CPU time only
        with torch.inference_mode():
            overlap_stub(args)
        return
    presets = (args.preset or ("tiny,small" if device.type == "cpu" else "20b-shaped")).split(",")
    for name in presets:
        if name not in CONFIGS:
            raise SystemExit(f"unknown preset {name!r}; choose from {sorted(CONFIGS)}")
    if args.checkpoint and len(presets) != 1:
        raise SystemExit("--checkpoint runs one checkpoint: name its preset alone with --preset")
    out("engine benchmark" + (" (--quick)" if args.quick else ""))
    for line in machine_info(device):
        out("  " + line)
    if device.type == "cpu" and torch.get_num_threads() > 1 and os.getloadavg()[0] > os.cpu_count():
        out(
            "  warning: more runnable processes than cores; with several torch threads every parallel op "
            "waits for its slowest thread (try --threads 1)"
        )
    started = time.perf_counter()
    checks: list[Check] = []
    for name in presets:
        checks += bench_preset(name, args, device)
    out(f"\n== summary ({time.perf_counter() - started:.0f} s in all)")
    out(f"   {'check':<44}{'figure':>12}{'target':>12}  result")
    for check in checks:
        result = "-" if check.ok is None else ("PASS" if check.ok else "FAIL")
        out(f"   {check.name:<44}{check.figure:>12}{check.target:>12}  {result}")
    out("   load average now: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
