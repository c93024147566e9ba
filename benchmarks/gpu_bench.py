"""The GPU decode path in one run: the Triton kernels checked against their twins on the GPU, then timed
against the torch paths, from the kernels alone up to the engine's decode step.

    python benchmarks/gpu_bench.py [--preset 20b] [--device cuda] [--out DIR] [--budget SECONDS]

No checkpoint is written: a model of the preset's real shapes is drawn at random on the device
(`model.testing.random_model`), which takes seconds where the writer would take minutes. Sections, each
under its own share of the time budget (a section that fails or runs out prints why and the run goes on):

1. **machine**: the GPU, torch and Triton, and the measured device-to-device copy bandwidth (bytes read plus
   written), the ceiling every figure below is set against;
2. **memory**: the KV pool the engine sizes at load beside the weights, as the server does (the 120b's
   promise: at least 100k tokens on one 80 GB card);
3. **check**: on fresh random inputs at the preset's widths, ‖out − ref‖ / ‖ref‖ of the MoE kernels against
   `moe_reference`, of the decode attention against `decode_attention_reference` (short and long contexts,
   full and windowed), and of one decode step's logits of the whole model, Triton kernels against the torch
   kernels on the same weights and cache (and whether the greedy tokens agree);
4. **graphs**: the same requests through the eager Triton step, through the decode graphs (one CUDA
   graph per batch-size bucket), and through the graphs in the overlapped loop (each step launched before
   the previous step's tokens are read, its tokens fed on the device): whether every request gets the same
   tokens, greedy and seeded;
5. **kernels**: the decode MoE at 1, 8 and 64 tokens (GB/s of the experts' bytes it must read) against
   `experts_batched`, the decode attention at 1k and 32k tokens of context against the torch path, the
   unembedding's GB/s, and the device sampler against the host sampler;
6. **grouped**: the grouped-GEMM MoE of prompts and large batches: ‖out − ref‖ / ‖ref‖ against `moe_reference`
   at the preset's widths (random routing, and every token on the same experts), then at 512 and 2048 tokens
   on layer 0 its time, GB/s (routed experts' bytes) and TFLOP/s against `experts_batched` (and their
   difference), its time at tile heights 16, 32 and 64, and at 8 to 64 tokens its time against the decode
   GEMV kernels (`moe_grouped_from`: where it starts to win, the evidence for `DECODE_MAX_TOKENS`);
7. **prefill_attention**: the varlen attention kernel (prompts, chunks after cached tokens, and the decodes
   beside them, in one launch) against its twin and against the torch path, then per layer against the
   torch path on a 2048-token prompt and on 512 new tokens after 4096 cached (full and windowed), a few of
   its tile shapes, and on decode-only batches against the split decode kernel those steps keep;
8. **decode**: the engine's decode step at batch 1, 8 and 64 on each path (:meth:`Bench.paths`): tokens/s
   and the share of the bandwidth ceiling (the bytes a step must read: every weight but the embedding, the
   experts the batch routes to, the KV cache);
9. **overlap**: decode tokens/s at batch 1 and 16 with the overlapped loop off and on
   (`EngineConfig.async_scheduling`), on the eager Triton step and on the graphs, in the same run;
10. **prefill**: time to the first token of a 2048-token prompt, torch kernels and Triton kernels (the
   prompt's attention through the varlen kernel, its experts through the grouped GEMM);
11. **launches**: kernel launches, graph launches and host synchronisations per decode step at batch 1,
   counted by the profiler, on each path;
12. **fused** (last; alone with `--sections fused`, about a minute on a GPU): the fused decode-layer kernels
   (norm + QKV + RoPE, out projection + residual, norm + router) against their twins and the unfused ops,
   timed against those ops at 1 and 64 rows (GB/s of their weights), and the engine's decode step at batch
   1 and 64 with and without them (eager, and graphs), with the kernel launches of a batch-1 step.

Prints a summary table last and writes every figure to `DIR/gpu_bench.json`. `--device cpu --preset tiny`
runs the same sections on a CPU (the kernels under Triton's interpreter), to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the only way to run the kernels; before any is defined

from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from model.batch import AttentionMetadata, BlockTables, LayerKV  # noqa: E402
from model.config import PRESETS, ModelConfig  # noqa: E402
from model.gpt_oss import GptOss  # noqa: E402
from model.kernels import Kernels  # noqa: E402
from model.kernels.experts import experts_batched  # noqa: E402
from model.testing import random_model  # noqa: E402

logger = logging.getLogger("gpu_bench")


class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise SectionTimeout in this (the main) thread after `seconds`."""

    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"over its {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.config: ModelConfig = PRESETS[args.preset]
        self.small = self.device.type == "cpu"
        self.results: dict[str, Any] = {}
        self.summary: list[tuple[str, str]] = []
        self.model: GptOss | None = None
        self.bandwidth: float | None = None  # bytes/s

    def note(self, key: str, value: Any, shown: str | None = None) -> None:
        self.results[key] = value
        if shown is not None:
            self.summary.append((key, shown))
        logger.info("%s: %s", key, shown if shown is not None else value)

    def kernel_sets(self) -> dict[str, Kernels]:
        torch_kernels = Kernels.for_device(self.device)
        return {"torch": torch_kernels, "triton": Kernels.triton()}

    def paths(self) -> dict[str, tuple[Kernels, dict[str, Any]]]:
        """The decode paths compared, each a kernel set and engine settings: the torch kernels with the host
        sampler (the step before this work), the Triton kernels with the device sampler (no sync but the
        sampled ids), and the same through the decode graphs' buffers (captured as CUDA graphs on a GPU)."""
        sets = self.kernel_sets()
        plain = {"async_scheduling": False}  # the overlapped loop has a section of its own
        return {
            "torch": (sets["torch"], {"device_sampling": False}),
            "triton": (sets["triton"], {"device_sampling": True, **plain}),
            "graphs": (sets["triton"], {"device_sampling": True, "cuda_graphs": True, **plain}),
        }

    def get_model(self) -> GptOss:
        if self.model is None:
            started = time.perf_counter()
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.model = random_model(self.config, device=self.device, dtype=dtype, seed=1)
            sync(self.device)
            self.note("model_gb", self.model.weight_nbytes() / 1e9)
            self.note("model_build_s", time.perf_counter() - started)
        return self.model

    # -- machine ---------------------------------------------------------------------------------------------

    def machine(self) -> None:
        self.note("torch", torch.__version__)
        import triton

        self.note("triton", triton.__version__)
        self.note("python", platform.python_version())
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.note("gpu", props.name, props.name)
            self.note("sms", props.multi_processor_count)
        n = (1 << 30) if self.device.type == "cuda" else (1 << 24)
        src = torch.randn(n // 4, device=self.device)
        dst = torch.empty_like(src)
        seconds = timed(lambda: dst.copy_(src), self.device, 10)
        self.bandwidth = 2 * n / seconds
        self.note("copy_bandwidth_gbs", self.bandwidth / 1e9, f"{self.bandwidth / 1e9:.0f} GB/s")

    # -- check -----------------------------------------------------------------------------------------------

    def check(self) -> None:
        from model.kernels.triton_attention import decode_attention, decode_attention_reference
        from model.kernels.triton_moe import moe_decode, moe_reference

        c = self.config
        dev = self.device
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        g = torch.Generator(device="cpu").manual_seed(11)
        hidden, inter, experts, top_k = c.hidden_size, c.intermediate_size, c.num_experts, c.experts_per_token
        use = min(experts, 4)  # a few experts' weights suffice to check the arithmetic

        def experts_of(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Random MXFP4 codes with scales about 1/sqrt(cols), drawn as bytes (quantizing a real-width
            float matrix on the host would take gigabytes of temporaries)."""
            blocks = torch.randint(0, 256, (use, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            centre = 127 + round(math.log2(1 / math.sqrt(cols)))
            scales = (centre + torch.randint(-1, 2, (use, rows, cols // 32), generator=g)).to(torch.uint8)
            bias = 0.1 * torch.randn(use, rows, generator=g)
            return blocks.to(dev), scales.to(dev), bias.to(dev, dtype)

        mlp1, mlp2 = experts_of(2 * inter, hidden), experts_of(hidden, inter)
        for tokens in (1, 8):
            t = torch.randn(tokens, hidden, generator=g).to(dev, dtype)
            ids = torch.stack([torch.randperm(use, generator=g)[:top_k] for _ in range(tokens)]).int().to(dev)
            weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).to(dev, dtype)
            got = moe_decode(t, ids, weights, mlp1, mlp2, c.swiglu_alpha, c.swiglu_limit)
            ref = moe_reference(t.float(), ids, weights.float(), mlp1, mlp2, c.swiglu_alpha, c.swiglu_limit)
            err = rel_error(got, ref)
            self.note(f"check_moe_{tokens}tok", err, f"{err:.1e}")

        heads, kv_heads, dim, block = c.num_attention_heads, c.num_key_value_heads, c.head_dim, 16
        lengths = [1, 200, 1000, 4100] if not self.small else [1, 37, 70]
        pool = sum(-(-n // block) for n in lengths) + 4
        k = torch.randn(pool * block, kv_heads, dim, generator=g).to(dev, dtype)
        v = torch.randn(pool * block, kv_heads, dim, generator=g).to(dev, dtype)
        order = torch.randperm(pool, generator=g)
        width = max(-(-n // block) for n in lengths)
        tables = torch.zeros(len(lengths), width, dtype=torch.int64)
        taken = 0
        for s, n in enumerate(lengths):
            count = -(-n // block)
            tables[s, :count] = order[taken : taken + count]
            taken += count
        tables = tables.to(dev)
        starts = torch.zeros(len(lengths), dtype=torch.int64, device=dev)
        lens = torch.tensor(lengths, device=dev)
        q = torch.randn(len(lengths), heads, dim, generator=g).to(dev, dtype)
        sinks = torch.randn(heads, generator=g).to(dev)
        for window in (0, c.sliding_window):
            got = decode_attention(q, k, v, tables, starts, lens, sinks, dim**-0.5, window, block)
            ref = decode_attention_reference(q, k, v, tables, starts, lens, sinks, dim**-0.5, window, block)
            err = rel_error(got, ref)
            self.note(f"check_attention_window{window}", err, f"{err:.1e}")

        # The whole model: one decode step of a small batch, both kernel sets on the same weights and cache.
        model = self.get_model()
        engine = self.engine(model, max_num_seqs=8)
        prompts = [[(7 * s + 3 * i) % 50_000 for i in range(40 + 9 * s)] for s in range(4)]
        for s, prompt in enumerate(prompts):
            engine.add_request(f"c{s}", prompt, SamplingParams(temperature=0.0, max_tokens=64))
        while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.requests.values()):
            engine.step()
        plan = engine.scheduler.schedule()
        logits = {}
        cache = engine.runner.cache
        saved = [t.clone() for t in (*cache.k, *cache.v)]
        for name, kernels in self.kernel_sets().items():
            model.use_kernels(kernels)
            inputs = engine.runner.prepare(plan)
            logits[name] = model(inputs.token_ids, inputs.meta, inputs.step_kv, inputs.logits_indices)
            for t, old in zip((*cache.k, *cache.v), saved, strict=True):
                t.copy_(old)
        model.use_kernels(self.kernel_sets()["torch"])
        err = rel_error(logits["triton"], logits["torch"])
        agree = bool((logits["triton"].argmax(-1) == logits["torch"].argmax(-1)).all())
        self.note("check_model_step", err, f"{err:.1e}, greedy tokens {'agree' if agree else 'DIFFER'}")

    # -- kernels ---------------------------------------------------------------------------------------------

    def kernels(self) -> None:
        from model.kernels.triton_attention import TritonAttention
        from model.kernels.triton_moe import experts_triton

        model = self.get_model()
        mlp = model.block[0].mlp
        per_expert = (
            sum(t.nbytes for t in (mlp.mlp1_weight.blocks, mlp.mlp1_weight.scales, mlp.mlp2_weight.blocks))
            + mlp.mlp2_weight.scales.nbytes
        )
        per_expert //= self.config.num_experts
        repeats = 50 if not self.small else 2
        for tokens in (1, 8, 64) if not self.small else (1, 8):
            t = torch.randn(tokens, self.config.hidden_size, device=self.device, dtype=model.dtype)
            indices, weights = mlp.route(t)
            unique = len(set(indices.flatten().tolist()))
            triton_s = timed(
                lambda t=t, i=indices, w=weights: experts_triton(mlp, t, i, w), self.device, repeats
            )
            torch_s = timed(
                lambda t=t, i=indices, w=weights: experts_batched(mlp, t, i, w), self.device, repeats
            )
            gbs = unique * per_expert / triton_s / 1e9
            self.note(
                f"moe_{tokens}tok",
                {"triton_us": triton_s * 1e6, "torch_us": torch_s * 1e6, "gbs": gbs},
                f"{triton_s * 1e6:.0f} us ({gbs:.0f} GB/s) vs torch {torch_s * 1e6:.0f} us",
            )
        c = self.config
        torch_attention = Kernels.for_device(self.device).attention
        triton_attention = TritonAttention(torch_attention)
        contexts = (1024, 32768) if not self.small else (64, 256)
        scale = c.head_dim**-0.5
        for batch in (1, 8):
            for context in contexts:
                q, k, v, meta, kv, sinks = decode_case(self.config, batch, context, self.device, model.dtype)

                def run(impl: Any, q=q, k=k, v=v, meta=meta, kv=kv, sinks=sinks) -> torch.Tensor:
                    meta.attention_plans.clear()
                    return impl(q, k, v, meta, kv, sinks, scale, 0)

                triton_s = timed(lambda run=run: run(triton_attention), self.device, repeats)
                torch_s = timed(lambda run=run: run(torch_attention), self.device, repeats)
                kv_bytes = 2 * batch * context * c.num_key_value_heads * c.head_dim * kv.k.element_size()
                gbs = kv_bytes / triton_s / 1e9
                self.note(
                    f"attention_b{batch}_ctx{context}",
                    {"triton_us": triton_s * 1e6, "torch_us": torch_s * 1e6, "gbs": gbs},
                    f"{triton_s * 1e6:.0f} us ({gbs:.0f} GB/s) vs torch {torch_s * 1e6:.0f} us",
                )

        # The unembedding of the rows that sample: 31% of a batch-1 step's bytes, so it must stream its weight
        # at the copy bandwidth.
        weight = model.unembedding.weight
        for rows in (1, 64):
            x = torch.randn(rows, self.config.hidden_size, device=self.device, dtype=model.dtype)
            seconds = timed(lambda x=x: model.logits(x), self.device, repeats)
            gbs = weight.nbytes / seconds / 1e9
            self.note(
                f"unembedding_{rows}rows",
                {"us": seconds * 1e6, "gbs": gbs},
                f"{seconds * 1e6:.0f} us ({gbs:.0f} GB/s)",
            )
        self.sampler()

    # -- grouped ---------------------------------------------------------------------------------------------

    def grouped(self) -> None:
        """The grouped-GEMM MoE of prompts and large batches (`moe_grouped`): its numerics against the twin at
        the preset's widths, then its time against `experts_batched` (the path it replaces) on layer 0 of the
        model, the tile height, and the token count from which it beats the decode GEMV kernels."""
        from model.kernels.triton_moe import (
            DECODE_MAX_TOKENS,
            grouped_block_m,
            moe_decode,
            moe_grouped,
            moe_reference,
        )

        c = self.config
        dev = self.device
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        g = torch.Generator(device="cpu").manual_seed(12)
        hidden, inter, top_k = c.hidden_size, c.intermediate_size, c.experts_per_token
        use = min(c.num_experts, 8)  # enough experts for uneven blocks; the twin's loop stays short

        def experts_of(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            blocks = torch.randint(0, 256, (use, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            centre = 127 + round(math.log2(1 / math.sqrt(cols)))
            scales = (centre + torch.randint(-1, 2, (use, rows, cols // 32), generator=g)).to(torch.uint8)
            return blocks.to(dev), scales.to(dev), (0.1 * torch.randn(use, rows, generator=g)).to(dev, dtype)

        mlp1, mlp2 = experts_of(2 * inter, hidden), experts_of(hidden, inter)
        tokens = DECODE_MAX_TOKENS + 15  # past the decode bound, blocks partly filled
        for kind in ("random", "one"):  # "one": every token on the same experts, several blocks each
            t = torch.randn(tokens, hidden, generator=g).to(dev, dtype)
            if kind == "random":
                ids = torch.stack([torch.randperm(use, generator=g)[:top_k] for _ in range(tokens)])
            else:
                ids = torch.arange(top_k).repeat(tokens, 1)
            ids = ids.int().to(dev)
            weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).to(dev, dtype)
            got = moe_grouped(t, ids, weights, mlp1, mlp2, c.swiglu_alpha, c.swiglu_limit)
            ref = moe_reference(t.float(), ids, weights.float(), mlp1, mlp2, c.swiglu_alpha, c.swiglu_limit)
            err = rel_error(got, ref)
            self.note(f"grouped_check_{tokens}tok_{kind}", err, f"{err:.1e} vs moe_reference")

        model = self.get_model()
        mlp = model.block[0].mlp
        packed = (mlp.mlp1_weight.blocks, mlp.mlp1_weight.scales, mlp.mlp1_bias)
        packed2 = (mlp.mlp2_weight.blocks, mlp.mlp2_weight.scales, mlp.mlp2_bias)
        alpha, limit = mlp.swiglu_alpha, mlp.swiglu_limit
        per_expert = (
            sum(x.nbytes for w in (mlp.mlp1_weight, mlp.mlp2_weight) for x in (w.blocks, w.scales))
            // c.num_experts
        )
        repeats = 20 if not self.small else 1
        sizes = (512, 2048) if not self.small else (DECODE_MAX_TOKENS + 1, 2 * DECODE_MAX_TOKENS)
        for tokens in sizes:
            t = torch.randn(tokens, hidden, device=dev, dtype=model.dtype)
            indices, weights = mlp.route(t)
            err = rel_error(
                moe_grouped(t, indices, weights, packed, packed2, alpha, limit),
                experts_batched(mlp, t, indices, weights),
            )
            grouped_s = timed(
                lambda t=t, i=indices, w=weights: moe_grouped(t, i, w, packed, packed2, alpha, limit),
                dev,
                repeats,
            )
            batched_s = timed(lambda t=t, i=indices, w=weights: experts_batched(mlp, t, i, w), dev, repeats)
            unique = len(set(indices.flatten().tolist()))
            gbs = unique * per_expert / grouped_s / 1e9
            tflops = 6 * tokens * top_k * hidden * inter / grouped_s / 1e12
            self.note(
                f"grouped_{tokens}tok",
                {
                    "grouped_us": grouped_s * 1e6,
                    "batched_us": batched_s * 1e6,
                    "gbs": gbs,
                    "tflops": tflops,
                    "error_vs_batched": err,
                },
                f"{grouped_s * 1e6:.0f} us ({gbs:.0f} GB/s, {tflops:.1f} TFLOP/s) vs batched"
                f" {batched_s * 1e6:.0f} us ({batched_s / grouped_s:.1f}x); rel diff {err:.1e}",
            )
            if tokens == sizes[-1]:  # the tile height, at the largest size (the default picks by the share)
                heights = {}
                for block_m in (16, 32, 64):
                    heights[block_m] = 1e6 * timed(
                        lambda t=t, i=indices, w=weights, b=block_m: moe_grouped(
                            t, i, w, packed, packed2, alpha, limit, block_m=b
                        ),
                        dev,
                        repeats,
                    )
                chosen = grouped_block_m(tokens * top_k, c.num_experts)
                self.note(
                    f"grouped_block_m_{tokens}tok",
                    {**heights, "default": chosen},
                    ", ".join(f"{b}: {us:.0f} us" for b, us in heights.items()) + f" (default {chosen})",
                )

        # Decode batches: the GEMV kernels against the grouped GEMM, to set DECODE_MAX_TOKENS from.
        times = {}
        for tokens in (8, 16, 32, 64) if not self.small else (8, 16):
            t = torch.randn(tokens, hidden, device=dev, dtype=model.dtype)
            indices, weights = mlp.route(t)
            gemv_s = timed(
                lambda t=t, i=indices, w=weights: moe_decode(t, i, w, packed, packed2, alpha, limit),
                dev,
                repeats,
            )
            grouped_s = timed(
                lambda t=t, i=indices, w=weights: moe_grouped(t, i, w, packed, packed2, alpha, limit),
                dev,
                repeats,
            )
            times[tokens] = {"gemv_us": gemv_s * 1e6, "grouped_us": grouped_s * 1e6}
        wins = [n for n, t in times.items() if t["grouped_us"] < t["gemv_us"]]
        self.note(
            "moe_grouped_from",
            {"tokens": wins[0] if wins else None, "times": times},
            "; ".join(
                f"{n}: gemv {t['gemv_us']:.0f} / grouped {t['grouped_us']:.0f} us" for n, t in times.items()
            )
            + f" -> grouped wins from {wins[0] if wins else 'none of these'}",
        )

    def sampler(self) -> None:
        """The device sampler against the host sampler on the same logits: greedy rows and top-p rows with
        seeds, at 1 and 64 rows of the real vocabulary (each call ends with its ids on the host)."""
        from engine.device_sampler import DeviceSampler
        from engine.sampler import Sampler, make_generator

        vocab = self.config.vocab_size
        repeats = 20 if not self.small else 1
        for rows in (1, 64) if not self.small else (1, 4):
            logits = torch.randn(rows, vocab, device=self.device) * 3
            for kind, params in (
                ("greedy", SamplingParams(temperature=0.0)),
                ("top_p", SamplingParams(temperature=0.8, top_p=0.95, seed=1)),
            ):
                batch = [params] * rows
                outputs: list[list[int]] = [[] for _ in range(rows)]
                device_sampler = DeviceSampler(seed=1)
                generators = [make_generator(1, self.device) if params.seed is not None else None] * rows

                def on_device(batch=batch, outputs=outputs, ds=device_sampler, logits=logits) -> list[int]:
                    plan = ds.plan(batch, outputs, outputs, vocab)
                    arrays = [torch.from_numpy(a).to(self.device, non_blocking=True) for a in plan.arrays]
                    return DeviceSampler.sample(logits, plan, arrays).tolist()

                def on_host(batch=batch, outputs=outputs, generators=generators, logits=logits) -> object:
                    return Sampler().sample(logits, batch, outputs, generators).token_ids

                device_s = timed(on_device, self.device, repeats)
                host_s = timed(on_host, self.device, repeats)
                self.note(
                    f"sampler_{kind}_{rows}rows",
                    {"device_us": device_s * 1e6, "host_us": host_s * 1e6},
                    f"device {device_s * 1e6:.0f} us vs host {host_s * 1e6:.0f} us",
                )

    # -- fused -----------------------------------------------------------------------------------------------

    def fused(self) -> None:
        """The fused decode-layer kernels (:mod:`model.kernels.triton_fused`) on layer 0's weights: each
        against its plain twin and against the model's own unfused ops, then timed against those ops at 1 and
        64 rows (GB/s of the weights each must read); then the engine's decode step with and without them
        (eager Triton, and the decode graphs on a GPU), and the kernel launches of a batch-1 step of each."""
        from model.gpt_oss import RotaryEmbedding
        from model.kernels import fused_reference as ref
        from model.kernels import triton_fused as tf

        model = self.get_model()
        attn, mlp = model.block[0].attn, model.block[0].mlp
        c = self.config
        g = torch.Generator(device="cpu").manual_seed(13)
        repeats = 50 if not self.small else 2
        for rows in (1, 64):
            x = (2 * torch.randn(rows, c.hidden_size, generator=g)).to(self.device, model.dtype)
            positions = torch.randint(0, 4096, (rows,), generator=g).to(self.device)
            cos, sin = model.rope.cos_sin(positions)
            a = torch.randn(rows, c.q_size, generator=g).to(self.device, model.dtype)

            def qkv_fused(x=x, cos=cos, sin=sin) -> tuple[torch.Tensor, ...]:
                return tf.norm_qkv_rope(
                    x,
                    attn.norm.scale,
                    attn.norm.eps,
                    attn.qkv.weight,
                    attn.qkv.bias,
                    cos,
                    sin,
                    attn.heads,
                    attn.kv_heads,
                )

            def qkv_twin(x=x, cos=cos, sin=sin) -> tuple[torch.Tensor, ...]:
                return ref.norm_qkv_rope_reference(
                    x,
                    attn.norm.scale,
                    attn.norm.eps,
                    attn.qkv.weight,
                    attn.qkv.bias,
                    cos,
                    sin,
                    attn.heads,
                    attn.kv_heads,
                )

            def qkv_ops(x=x, cos=cos, sin=sin) -> tuple[torch.Tensor, ...]:
                q, k, v = attn.qkv(attn.norm(x)).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
                return (
                    RotaryEmbedding.rotate(q.unflatten(-1, (attn.heads, -1)), cos, sin),
                    RotaryEmbedding.rotate(k.unflatten(-1, (attn.kv_heads, -1)), cos, sin),
                    v.unflatten(-1, (attn.kv_heads, -1)),
                )

            def out_fused(a=a, x=x) -> torch.Tensor:
                return tf.out_residual(a, attn.out.weight, attn.out.bias, x)

            def out_twin(a=a, x=x) -> torch.Tensor:
                return ref.out_residual_reference(a, attn.out.weight, attn.out.bias, x)

            def out_ops(a=a, x=x) -> torch.Tensor:
                return x + attn.out(a)

            def route_fused(x=x) -> tuple[torch.Tensor, ...]:
                return tf.route(x, mlp.norm.scale, mlp.norm.eps, mlp.gate.weight, mlp.gate.bias, mlp.top_k)

            def route_twin(x=x) -> tuple[torch.Tensor, ...]:
                return ref.route_reference(
                    x, mlp.norm.scale, mlp.norm.eps, mlp.gate.weight, mlp.gate.bias, mlp.top_k
                )

            def route_ops(x=x) -> tuple[torch.Tensor, ...]:
                t = mlp.norm(x)
                return (t, *mlp.route(t))

            cases = {
                "qkv": (qkv_fused, qkv_twin, qkv_ops, attn.qkv.weight.nbytes),
                "out": (out_fused, out_twin, out_ops, attn.out.weight.nbytes),
                "router": (route_fused, route_twin, route_ops, mlp.gate.weight.nbytes),
            }
            for name, (fused, twin, ops, weight_bytes) in cases.items():
                got, reference, plain = fused(), twin(), ops()
                got, reference, plain = (r if isinstance(r, tuple) else (r,) for r in (got, reference, plain))
                if name == "router":  # (t, ids, weights): the ids compared as agreement, the rest as values
                    same_ids = float((got[1] == plain[1]).all(-1).float().mean())
                    twin_err = max(rel_error(got[i], reference[i]) for i in (0, 2))
                    plain_err = max(rel_error(got[i], plain[i]) for i in (0, 2))
                    extra = f", top-k as the ops' for {100 * same_ids:.0f}% of rows"
                else:
                    twin_err = max(rel_error(o, r) for o, r in zip(got, reference, strict=True))
                    plain_err = max(rel_error(o, r) for o, r in zip(got, plain, strict=True))
                    extra = ""
                fused_s = timed(fused, self.device, repeats)
                ops_s = timed(ops, self.device, repeats)
                gbs = weight_bytes / fused_s / 1e9
                self.note(
                    f"fused_{name}_{rows}rows",
                    {
                        "err_twin": twin_err,
                        "err_ops": plain_err,
                        "fused_us": fused_s * 1e6,
                        "ops_us": ops_s * 1e6,
                        "gbs": gbs,
                        "ops_gbs": weight_bytes / ops_s / 1e9,
                    },
                    f"{fused_s * 1e6:.0f} us ({gbs:.0f} GB/s) vs ops {ops_s * 1e6:.0f} us; "
                    f"err {twin_err:.1e} vs twin, {plain_err:.1e} vs ops{extra}",
                )
        self.fused_steps()

    def fused_steps(self) -> None:
        """The engine's decode step on the Triton path with and without the fused layers."""
        from torch.profiler import ProfilerActivity, profile

        model = self.get_model()
        variants = {"fused": Kernels.triton(), "unfused": Kernels.triton(fused=False)}
        modes = (
            {"eager": {}} if self.device.type != "cuda" else {"eager": {}, "graphs": {"cuda_graphs": True}}
        )
        batches = (1, 64) if not self.small else (1, 4)
        steps = 8 if not self.small else 1
        prompt_len = 128 if not self.small else 16
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        for mode, settings in modes.items():
            for batch in batches:
                times = {}
                for name, kernels in variants.items():
                    model.use_kernels(kernels)
                    engine = self.engine(model, device_sampling=True, **settings)
                    for s in range(batch):
                        prompt = [(s * 131 + i * 7) % 50_000 for i in range(prompt_len)]
                        engine.add_request(
                            f"f{s}", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8)
                        )
                    while any(
                        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.requests.values()
                    ):
                        engine.step()
                    engine.step()  # the first decode-only step compiles (and captures) what it needs
                    sync(self.device)
                    started = time.perf_counter()
                    for _ in range(steps):
                        engine.step()
                    sync(self.device)
                    times[name] = (time.perf_counter() - started) / steps
                    if mode == "eager" and batch == 1:
                        with profile(activities=activities) as prof:
                            engine.step()
                            sync(self.device)
                        names = [e.name for e in prof.events()]
                        launches = sum(
                            n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx") for n in names
                        )
                        ops = sum(
                            1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
                        )
                        self.note(
                            f"fused_launches_{name}",
                            {"launches": launches, "top_level_ops": ops},
                            f"{launches} kernel launches, {ops} top-level aten ops per batch-1 step",
                        )
                self.note(
                    f"fused_step_{mode}_b{batch}",
                    {f"{name}_ms": t * 1e3 for name, t in times.items()},
                    f"fused {step_ms_text(times['fused'])} vs unfused {step_ms_text(times['unfused'])} "
                    f"({times['unfused'] / times['fused']:.2f}x)",
                )
        model.use_kernels(self.kernel_sets()["torch"])

    # -- graphs ----------------------------------------------------------------------------------------------

    def graphs(self) -> None:
        """The decode graphs against the eager Triton step on the same requests: the same tokens (greedy and
        seeded), then the time of each."""
        model = self.get_model()
        model.use_kernels(Kernels.triton())
        batches = (1, 8, 64) if not self.small else (1, 3)
        steps = 16 if not self.small else 3
        for batch in batches:
            tokens = {}
            variants: dict[str, dict[str, Any]] = {
                "eager": {"async_scheduling": False},
                "graphs": {"cuda_graphs": True, "async_scheduling": False},
                "overlap": {"cuda_graphs": True, "async_scheduling": True},
            }
            for name, settings in variants.items():
                engine = self.engine(model, device_sampling=True, **settings)
                for s in range(batch):
                    prompt = [(s * 97 + i * 5) % 50_000 for i in range(24 + 7 * s)]
                    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=steps)
                    greedy = SamplingParams(temperature=0.0, max_tokens=steps)
                    engine.add_request(f"g{s}", prompt, seeded if s % 2 else greedy)
                out: dict[str, list[int]] = {}
                sync(self.device)
                started = time.perf_counter()
                while engine.has_unfinished():
                    for o in engine.step():
                        out.setdefault(o.request_id, []).extend(o.new_token_ids)
                sync(self.device)
                tokens[name] = (out, time.perf_counter() - started)
            (eager, eager_s), (graphed, graphs_s) = tokens["eager"], tokens["graphs"]
            overlapped, overlap_s = tokens["overlap"]
            same = sum(eager[r] == graphed.get(r) for r in eager)
            same_overlapped = sum(eager[r] == overlapped.get(r) for r in eager)
            self.note(
                f"graphs_check_b{batch}",
                {
                    "same_requests": same,
                    "same_requests_overlapped": same_overlapped,
                    "requests": len(eager),
                    "eager_s": eager_s,
                    "graphs_s": graphs_s,
                    "overlap_s": overlap_s,
                },
                f"{same}/{len(eager)} requests the same tokens"
                + ("" if same == len(eager) else " (DIFFER)")
                + f", overlapped {same_overlapped}/{len(eager)}"
                + ("" if same_overlapped == len(eager) else " (DIFFER)")
                + f"; whole run eager {eager_s:.2f} s, graphs {graphs_s:.2f} s, overlapped {overlap_s:.2f} s"
                " (captures included)",
            )
        model.use_kernels(self.kernel_sets()["torch"])

    # -- prefill_attention -----------------------------------------------------------------------------------

    def prefill_attention(self) -> None:
        """The varlen attention kernel: checked against its twin and against the torch path at the preset's
        widths, then timed per layer (store included) against the torch path on a 2k prompt and on 512 new
        tokens after 4k cached, both attention kinds, with a few tile shapes; and on decode-only batches
        against the split decode kernel, which is what :class:`TritonAttention` keeps for those steps."""
        from model.kernels.triton_attention import (
            TritonAttention,
            decode_attention,
            step_rows,
            varlen_attention,
            varlen_attention_reference,
        )

        c = self.config
        dev = self.device
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        scale = c.head_dim**-0.5
        torch_attention = Kernels.for_device(dev).attention
        triton_attention = TritonAttention(torch_attention)
        small = self.small

        # Correctness: decodes, a prompt and chunks after cached tokens in one launch, against the twin
        # (query by query: kept to a few dozen queries), and a whole prompt against the torch path.
        q_lens, ctx_lens = ([1, 1, 40, 33], [1000, 37, 40, 300]) if not small else ([1, 9, 6], [40, 9, 21])
        for window in (0, c.sliding_window):
            q, k, v, meta, kv, sinks = paged_case(c, q_lens, ctx_lens, window, dev, dtype, seed=3)
            triton_attention(q, k, v, meta, kv, sinks, scale, window)  # stores the step's keys
            tables = kv.tables
            query_starts, lengths = step_rows(meta)
            args = (
                q,
                kv.k,
                kv.v,
                tables.block_index,
                tables.key_positions[:, 0],
                query_starts,
                lengths,
                sinks,
            )
            got = varlen_attention(*args, scale, window, tables.block_size, max(q_lens))
            ref = varlen_attention_reference(*args, scale, window, tables.block_size)
            err = rel_error(got, ref)
            self.note(f"check_varlen_window{window}", err, f"{err:.1e}")
        length = 2048 if not small else 96
        for window in (0, c.sliding_window):
            outs = []
            for impl in (triton_attention, torch_attention):
                q, k, v, meta, kv, sinks = paged_case(c, [length], [length], window, dev, dtype, seed=4)
                outs.append(impl(q, k, v, meta, kv, sinks, scale, window))
            err = rel_error(outs[0], outs[1])
            self.note(f"check_varlen_vs_torch_{length}_window{window}", err, f"{err:.1e}")

        # Prompt and extend, per layer: the store and the attention, each path's per-forward plan kept (it
        # is built once per forward and kind, and shared by the layers).
        repeats = 20 if not small else 1
        shapes = {"prefill": ([2048], [2048]), "extend": ([512], [4608])}
        if small:
            shapes = {"prefill": ([64], [64]), "extend": ([16], [80])}
        for name, (q_lens, ctx_lens) in shapes.items():
            for window in (0, c.sliding_window):
                q, k, v, meta, kv, sinks = paged_case(c, q_lens, ctx_lens, window, dev, dtype, seed=5)

                def run(impl: Any, q=q, k=k, v=v, meta=meta, kv=kv, sinks=sinks, window=window) -> object:
                    return impl(q, k, v, meta, kv, sinks, scale, window)

                triton_s = timed(lambda run=run: run(triton_attention), dev, repeats)
                torch_s = timed(lambda run=run: run(torch_attention), dev, repeats)
                self.note(
                    f"attention_{name}_{q_lens[0]}_on_{ctx_lens[0]}_window{window}",
                    {"triton_us": triton_s * 1e6, "torch_us": torch_s * 1e6},
                    f"triton {triton_s * 1e6:.0f} us vs torch {torch_s * 1e6:.0f} us "
                    f"({torch_s / triton_s:.2f}x)",
                )

        # Tile shapes of the prompt's varlen launch (the default is the first).
        q, k, v, meta, kv, sinks = paged_case(c, shapes["prefill"][0], shapes["prefill"][1], 0, dev, dtype)
        triton_attention(q, k, v, meta, kv, sinks, scale, 0)
        query_starts, lengths = step_rows(meta)
        tables = kv.tables
        timings = {}
        for block_m, block_n, warps in ((128, 64, 4), (128, 64, 8), (64, 64, 4), (128, 32, 4)):
            if small and block_m != 128:
                continue

            def launch(block_m=block_m, block_n=block_n, warps=warps) -> object:
                return varlen_attention(
                    q, kv.k, kv.v, tables.block_index, tables.key_positions[:, 0], query_starts, lengths,
                    sinks, scale, 0, tables.block_size, max(meta.query_lens), block_m=block_m,
                    block_n=block_n, num_warps=warps,
                )  # fmt: skip

            timings[f"m{block_m}_n{block_n}_w{warps}"] = timed(launch, dev, repeats) * 1e6
        best = min(timings, key=timings.__getitem__)
        self.note(
            "varlen_tiles_prefill",
            timings,
            ", ".join(f"{k} {us:.0f} us" for k, us in timings.items()) + f"; best {best}",
        )

        # Decode-only steps: the split kernel (what they take) against the varlen kernel.
        cases = ((1, 1024), (64, 1024), (1, 32768), (8, 32768)) if not small else ((1, 64), (4, 200))
        for batch, context in cases:
            q, k, v, meta, kv, sinks = decode_case(c, batch, context, dev, dtype)
            tables = kv.tables
            starts = tables.key_positions[:, 0]
            lens = meta.positions + 1
            query_starts = torch.arange(batch + 1, device=dev)

            def split(q=q, kv=kv, tables=tables, starts=starts, lens=lens, sinks=sinks) -> object:
                return decode_attention(
                    q, kv.k, kv.v, tables.block_index, starts, lens, sinks, scale, 0, tables.block_size
                )

            def varlen(q=q, kv=kv, tables=tables, starts=starts, lens=lens, qs=query_starts, sinks=sinks):
                return varlen_attention(
                    q, kv.k, kv.v, tables.block_index, starts, qs, lens, sinks, scale, 0, tables.block_size, 1
                )

            err = rel_error(varlen(), split())
            split_s = timed(split, dev, repeats)
            varlen_s = timed(varlen, dev, repeats)
            self.note(
                f"decode_kernels_b{batch}_ctx{context}",
                {"split_us": split_s * 1e6, "varlen_us": varlen_s * 1e6, "rel_diff": err},
                f"split {split_s * 1e6:.0f} us vs varlen {varlen_s * 1e6:.0f} us (diff {err:.1e})",
            )

    # -- decode ----------------------------------------------------------------------------------------------

    def engine(self, model: GptOss, max_num_seqs: int = 64, **settings: Any) -> EngineCore:
        memory = (4 << 30) if not self.small else (64 << 20)
        return EngineCore(
            model,
            EngineConfig(
                max_model_len=4096,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=2048,
                kv_cache_memory=memory,
                **settings,
            ),
        )

    def step_bytes(self, batch: int, context: int) -> float:
        """What one decode step must read: every weight but the embedding (one row per token) and the experts
        the batch does not route to, plus the KV cache of the batch's contexts."""
        model = self.get_model()
        c = self.config
        expert_bytes = sum(
            t.nbytes
            for block in model.block
            for t in (
                block.mlp.mlp1_weight.blocks,
                block.mlp.mlp1_weight.scales,
                block.mlp.mlp2_weight.blocks,
                block.mlp.mlp2_weight.scales,
                block.mlp.mlp1_bias,
                block.mlp.mlp2_bias,
            )
        )
        dense = model.weight_nbytes() - expert_bytes - model.embedding.weight.nbytes
        routed = c.num_experts * (1 - (1 - c.experts_per_token / c.num_experts) ** batch)
        kv = 0
        for layer in range(c.num_hidden_layers):
            seen = min(context, c.window(layer) or context)
            kv += batch * 2 * seen * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
        return dense + expert_bytes * routed / c.num_experts + kv

    def decode(self) -> None:
        model = self.get_model()
        batches = (1, 8, 64) if not self.small else (1, 4)
        steps = 20 if not self.small else 2
        prompt_len = 128 if not self.small else 16
        for name, (kernels, settings) in self.paths().items():
            model.use_kernels(kernels)
            for batch in batches:
                engine = self.engine(model, **settings)
                for s in range(batch):
                    prompt = [(s * 131 + i * 7) % 50_000 for i in range(prompt_len)]
                    engine.add_request(f"d{s}", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8))
                while any(
                    r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.requests.values()
                ):
                    engine.step()
                engine.step()  # the first decode-only step compiles (and captures) what it needs
                sync(self.device)
                started = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                sync(self.device)
                step_s = (time.perf_counter() - started) / steps
                tokens_s = batch / step_s
                ceiling = batch * self.bandwidth / self.step_bytes(batch, prompt_len) if self.bandwidth else 0
                share = tokens_s / ceiling if ceiling else 0.0
                self.note(
                    f"decode_{name}_b{batch}",
                    {"step_ms": step_s * 1e3, "tokens_s": tokens_s, "ceiling_tokens_s": ceiling},
                    f"{step_ms_text(step_s)}, {tokens_s:.0f} tok/s, {100 * share:.1f}% of {ceiling:.0f}",
                )
        model.use_kernels(self.kernel_sets()["torch"])

    # -- overlap ---------------------------------------------------------------------------------------------

    def overlap(self) -> None:
        """Decode tokens/s with the overlapped loop off and on, at batch 1 and 16, on the eager Triton step
        and on the graphs: the host's part of a step (scheduling, stop checks, outputs) is on the critical
        path off, and behind the device's next step on."""
        model = self.get_model()
        model.use_kernels(Kernels.triton())
        steps = 32 if not self.small else 2
        prompt_len = 128 if not self.small else 16
        for path, graphs in (("triton", False), ("graphs", True)):
            for batch in (1, 16) if not self.small else (1, 2):
                tokens_s = {}
                for overlap in (False, True):
                    engine = self.engine(
                        model, device_sampling=True, cuda_graphs=graphs, async_scheduling=overlap
                    )
                    for s in range(batch):
                        prompt = [(s * 131 + i * 7) % 50_000 for i in range(prompt_len)]
                        params = SamplingParams(temperature=0.0, max_tokens=steps + 8)
                        engine.add_request(f"o{s}", prompt, params)
                    # The prompts, the first decode (compiles, captures), then the pipeline is full.
                    for _ in range(3):
                        engine.step()
                    sync(self.device)
                    started = time.perf_counter()
                    for _ in range(steps):
                        engine.step()
                    sync(self.device)
                    tokens_s[overlap] = batch * steps / (time.perf_counter() - started)
                gain = tokens_s[True] / tokens_s[False]
                self.note(
                    f"overlap_{path}_b{batch}",
                    {"off_tokens_s": tokens_s[False], "on_tokens_s": tokens_s[True], "gain": gain},
                    f"off {tokens_s[False]:.0f} tok/s, on {tokens_s[True]:.0f} tok/s ({gain:.2f}x)",
                )
        model.use_kernels(self.kernel_sets()["torch"])

    def prefill(self) -> None:
        """Time to the first token of one prompt on each kernel set: the Triton set runs the prompt's
        attention through the varlen kernel and its experts through the grouped GEMM, the torch set through
        the torch paths."""
        model = self.get_model()
        length = 2048 if not self.small else 128
        for name, kernels in self.kernel_sets().items():
            model.use_kernels(kernels)
            engine = self.engine(model)
            for attempt in range(2):  # the first compiles; each its own prompt, or the prefix cache serves it
                prompt = [(i * 13 + attempt * 7_919) % 50_000 for i in range(length)]
                engine.add_request(f"p{attempt}", prompt, SamplingParams(max_tokens=1))
                sync(self.device)
                started = time.perf_counter()
                while engine.has_unfinished():
                    engine.step()
                sync(self.device)
                ttft = time.perf_counter() - started
            self.note(f"ttft_{length}_{name}", ttft * 1e3, f"{ttft * 1e3:.1f} ms")
        model.use_kernels(self.kernel_sets()["torch"])

    # -- memory ----------------------------------------------------------------------------------------------

    def memory(self) -> None:
        """What serving the preset leaves for the KV cache: the engine sized as the server sizes it at load
        (free memory after a warm-up forward, less `gpu_memory_utilization`'s reserve; the server's default
        context and batch), reported as the full-attention tokens the pool holds. The promise for the 120b on
        one 80 GB card is at least 100k tokens beside packed experts."""
        model = self.get_model()
        engine = EngineCore(model, EngineConfig(max_num_seqs=64 if not self.small else 4))
        blocks, block_size = engine.runner.blocks, engine.runner.block_size
        tokens = blocks.num_full * block_size
        if self.device.type == "cuda":
            allocated = torch.cuda.memory_allocated(self.device) / 1e9
            total = torch.cuda.get_device_properties(self.device).total_memory / 1e9
            self.note("memory_allocated_gb", allocated, f"{allocated:.1f} of {total:.1f} GB allocated")
        self.note(
            "kv_pool",
            {
                "full_blocks": blocks.num_full,
                "sliding_blocks": blocks.num_sliding,
                "block_size": block_size,
                "full_tokens": tokens,
                "cache_gb": engine.runner.cache.nbytes / 1e9,
            },
            f"{tokens:,} tokens of full-attention KV ({engine.runner.cache.nbytes / 1e9:.1f} GB), weights "
            f"{model.weight_nbytes() / 1e9:.1f} GB, " + (">= 100k" if tokens >= 100_000 else "UNDER 100k"),
        )
        del engine
        gc.collect()  # the pool must be gone before the next section sizes its own
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- launches --------------------------------------------------------------------------------------------

    def launches(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        model = self.get_model()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        for name, (kernels, settings) in self.paths().items():
            model.use_kernels(kernels)
            engine = self.engine(model, **settings)
            engine.add_request("l", list(range(1, 65)), SamplingParams(temperature=0.0, max_tokens=16))
            for _ in range(3 if not self.small else 2):
                engine.step()
            sync(self.device)
            steps = 3 if not self.small else 1
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    engine.step()
                sync(self.device)
            names = [e.name for e in prof.events()]
            launches = sum(n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx") for n in names)
            syncs = sum("Synchronize" in n for n in names)
            copies = sum(n.startswith("cudaMemcpy") for n in names)
            graph_launches = sum(n == "cudaGraphLaunch" for n in names)
            ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
            per_step = {
                "launches": launches,
                "graph_launches": graph_launches,
                "syncs": syncs,
                "memcpys": copies,
                "top_level_ops": ops,
            }
            per_step = {k: n / steps for k, n in per_step.items()}
            self.note(
                f"launches_{name}",
                per_step,
                ", ".join(f"{n:.0f} {k}" for k, n in per_step.items()) + " per step",
            )
        model.use_kernels(self.kernel_sets()["torch"])


def decode_case(
    config: ModelConfig, batch: int, context: int, device: torch.device, dtype: torch.dtype, block: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, LayerKV, torch.Tensor]:
    """A decode step of `batch` sequences of `context` tokens (the new one included) over a paged cache,
    each sequence's blocks a shuffled run of the pool, its table in order from position 0."""
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    blocks = -(-context // block)
    pool = torch.randperm(batch * blocks, device=device).view(batch, blocks)
    slots = batch * blocks * block
    positions = torch.full((batch,), context - 1, dtype=torch.int64, device=device)
    meta = AttentionMetadata(
        [1] * batch,
        [context] * batch,
        positions,
        torch.arange(batch, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
    )
    offsets = torch.arange(blocks * block, device=device)
    key_positions = offsets.expand(batch, -1).masked_fill(offsets >= context, -1)
    slot_mapping = pool[:, (context - 1) // block] * block + (context - 1) % block
    tables = BlockTables(slot_mapping, pool, key_positions.contiguous(), block)
    kv = LayerKV(
        torch.randn(slots, kv_heads, dim, device=device, dtype=dtype),
        torch.randn(slots, kv_heads, dim, device=device, dtype=dtype),
        tables,
    )
    q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, dim, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, dim, device=device, dtype=dtype)
    return q, k, v, meta, kv, torch.randn(heads, device=device)


def paged_case(
    config: ModelConfig,
    q_lens: list[int],
    ctx_lens: list[int],
    window: int,
    device: torch.device,
    dtype: torch.dtype,
    block: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, LayerKV, torch.Tensor]:
    """One layer's step as the engine hands it: sequences adding `q_lens` tokens ending at `ctx_lens`, each
    owning a shuffled run of a random paged cache's blocks, the step's tables built by the engine's own
    :func:`~engine.paged_kv.plan_group` and :func:`~engine.paged_kv.group_step`."""
    from engine.paged_kv import StepShape, group_step, plan_group

    g = torch.Generator(device="cpu").manual_seed(seed)
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    counts = [-(-n // block) for n in ctx_lens]
    pool = torch.randperm(sum(counts) + 2, generator=g).numpy()
    table = np.zeros((len(ctx_lens), max(counts)), dtype=np.int64)
    taken = 0
    for s, count in enumerate(counts):
        table[s, :count] = pool[taken : taken + count]
        taken += count
    step = StepShape.build(list(range(len(q_lens))), q_lens, ctx_lens, block)
    plan = plan_group(table, step, block, window)
    offsets = torch.arange(plan.blocks.shape[1] * block, device=device)
    tables = group_step(
        *(torch.from_numpy(a).to(device) for a in (plan.slot_mapping, plan.blocks.reshape(-1), plan.starts)),
        torch.tensor(ctx_lens, device=device),
        offsets,
        block,
    )
    slots = (sum(counts) + 2) * block
    kv = LayerKV(
        torch.randn(slots, kv_heads, dim, generator=g).to(device, dtype),
        torch.randn(slots, kv_heads, dim, generator=g).to(device, dtype),
        tables,
    )
    tokens = sum(q_lens)
    q = torch.randn(tokens, heads, dim, generator=g).to(device, dtype)
    k = torch.randn(tokens, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(tokens, kv_heads, dim, generator=g).to(device, dtype)
    meta = AttentionMetadata.build(q_lens, ctx_lens, device=device)
    return q, k, v, meta, kv, torch.randn(heads, generator=g).to(device)


def step_ms_text(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms/step"


SECTIONS = (
    "machine",
    "memory",
    "check",
    "graphs",
    "kernels",
    "grouped",
    "prefill_attention",
    "decode",
    "overlap",
    "prefill",
    "launches",
    "fused",
)
# Each section's share of the budget.
SHARES = {
    "machine": 0.05,
    "memory": 0.05,
    "check": 0.15,
    "graphs": 0.1,
    "kernels": 0.15,
    "grouped": 0.1,
    "prefill_attention": 0.1,
    "decode": 0.3,
    "overlap": 0.1,
    "prefill": 0.07,
    "launches": 0.08,
    "fused": 0.15,  # last: the sections before it keep their time; `--sections fused` runs it alone
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="20b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=int, default=420, help="seconds for the whole run")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench = Bench(args)
    started = time.perf_counter()
    with torch.inference_mode():
        for section in args.sections.split(","):
            left = args.budget - (time.perf_counter() - started)
            # On a CPU (a check of the script, the kernels interpreted) a section may take what is left.
            share = SHARES[section] * args.budget * 1.5 if args.device != "cpu" else left
            limit = int(min(left, max(10, share)))
            if limit <= 5:
                bench.note(f"{section}_skipped", "no time left", "no time left")
                continue
            section_started = time.perf_counter()
            try:
                with time_limit(limit):
                    getattr(bench, section)()
            except Exception as error:  # a section's failure must leave the others' figures
                logger.exception("section %s failed", section)
                bench.note(f"{section}_error", repr(error), f"FAILED: {error!r}"[:200])
            bench.results[f"{section}_s"] = time.perf_counter() - section_started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(bench.results, indent=2, default=str))
    width = max(len(k) for k, _ in bench.summary) if bench.summary else 10
    out_line(f"\n== gpu_bench {args.preset} on {args.device} ({time.perf_counter() - started:.0f} s)")
    for key, shown in bench.summary:
        out_line(f"   {key:<{width}}  {shown}")


def out_line(line: str) -> None:
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
