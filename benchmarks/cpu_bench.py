"""CPU benchmark: the packed-expert paths at gpt-oss-20b's widths, the dequantize-per-step path against the
fused MXFP4 kernel (model/kernels/cpu_mxfp4.py), in one run on the same machine and threads.

    python benchmarks/cpu_bench.py [--layers 4] [--prompt 128] [--decode-steps 8] [--threads N]
                                   [--impls grouped,fused] [--dtypes bfloat16,float32]
    python benchmarks/cpu_bench.py [--kernels] [--matrix-tokens 64,256,512,1024] [--repeats 7]

The default (quick) mode writes once, under .cache/model_bench/, the random 20b-shaped checkpoint slice that
benchmarks/model_bench.py uses (hidden 2880, 32 experts, top-4, the real vocabulary, `--layers` layers), then
runs each implementation and dtype in its own process (so peak RSS is that run's alone) and prints, per run:
prefill tokens/s for one `--prompt`-token sequence, decode tokens/s at batch 1 after that prompt (the best
step and the median of `--decode-steps`), and peak RSS; then the fused path's ratio to today's.

`--kernels` times one MoE layer's experts alone (no checkpoint): batch 1 (one token, 4 experts) and a
`--prompt`-token prefill, each implementation and dtype, the minimum of `--repeats` runs (the machine may be
shared: other load only ever adds time). `--matrix-tokens` adds one expert's first matrix (5760 x 2880) at
those token counts, dequantized then multiplied (oneDNN) against fused: where the two cross is the fused
path's token limit per expert (`FUSED_MAX_ROWS` in model/kernels/experts.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_bench import checkpoint_dir, proc_status  # noqa: E402

from model.config import PRESETS  # noqa: E402
from model.gpt_oss import AttentionMetadata, ContiguousKVCache, GptOss, MLPBlock  # noqa: E402
from model.kernels import Kernels, cpu_mxfp4, prepacked  # noqa: E402
from model.kernels.experts import Experts, experts_fused, experts_grouped  # noqa: E402
from model.kernels.mxfp4 import dequantize  # noqa: E402

logger = logging.getLogger("cpu_bench")

IMPLS: dict[str, Experts] = {"grouped": experts_grouped, "fused": experts_fused}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def kernels_for(impl: str) -> Kernels:
    """The CPU's fast paths with the experts implementation `impl`."""
    if impl == "fused" and not cpu_mxfp4.available():
        raise SystemExit("the fused kernel did not build here (see the warning above)")
    return Kernels(Kernels.for_device("cpu").attention, IMPLS[impl])


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_kernels(args: argparse.Namespace) -> None:
    """One 20b-shaped MoE layer's experts, random MXFP4 weights of trained-like scales, random routing."""
    config = PRESETS["20b"]
    g = torch.Generator().manual_seed(0)
    mlp = MLPBlock(config, experts_grouped)
    for weight in (mlp.mlp1_weight, mlp.mlp2_weight):
        weight.blocks.copy_(torch.randint(0, 256, weight.blocks.shape, generator=g, dtype=torch.uint8))
        weight.scales.copy_(torch.randint(118, 128, weight.scales.shape, generator=g, dtype=torch.uint8))
    cpu_mxfp4.available()
    lines = [f"{'experts of one 20b layer':34}{'dequantize (ms)':>16}{'fused (ms)':>12}{'speed-up':>10}"]
    for dtype_name, dtype in DTYPES.items():
        mlp.mlp1_bias.data = torch.randn(mlp.mlp1_bias.shape, generator=g).to(dtype) * 0.1
        mlp.mlp2_bias.data = torch.randn(mlp.mlp2_bias.shape, generator=g).to(dtype) * 0.1
        for tokens in (1, args.prompt):
            t = torch.randn(tokens, config.hidden_size, generator=g).to(dtype)
            logits = torch.randn(tokens, config.num_experts, generator=g)
            top = torch.topk(logits, config.experts_per_token, dim=-1)
            indices, weights = top.indices, torch.softmax(top.values, -1).to(dtype)
            ms = {
                name: 1e3 * best(lambda f=fn, a=(mlp, t, indices, weights): f(*a), args.repeats)
                for name, fn in IMPLS.items()
            }
            label = f"{dtype_name}, {tokens} token{'s' if tokens > 1 else ''}"
            lines.append(
                f"{label:34}{ms['grouped']:16.1f}{ms['fused']:12.1f}{ms['grouped'] / ms['fused']:9.1f}x"
            )
    logger.info("threads %d, min of %d\n%s", torch.get_num_threads(), args.repeats, "\n".join(lines))


def bench_matrix(args: argparse.Namespace) -> None:
    """One expert's first matrix (5760 x 2880, random MXFP4) at each of `--matrix-tokens` token counts."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 2 * PRESETS["20b"].intermediate_size, PRESETS["20b"].hidden_size
    blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 128, (rows, cols // 32), generator=g, dtype=torch.uint8)
    cpu_mxfp4.available()
    lines = [f"{'one expert matrix 5760 x 2880':34}{'dequantize (ms)':>16}{'fused (ms)':>12}"]
    for dtype_name, dtype in DTYPES.items():
        bias = torch.randn(rows, generator=g).to(dtype)
        for tokens in map(int, args.matrix_tokens.split(",")):
            x = torch.randn(tokens, cols, generator=g).to(dtype)
            old = best(
                lambda x=x, d=dtype, b=bias: prepacked.linear(x, dequantize(blocks, scales, d), b),
                args.repeats,
            )
            new = best(lambda x=x, b=bias: cpu_mxfp4.mxfp4_linear(x, blocks, scales, b), args.repeats)
            lines.append(f"{f'{dtype_name}, {tokens} tokens':34}{1e3 * old:16.1f}{1e3 * new:12.1f}")
    logger.info("threads %d, min of %d\n%s", torch.get_num_threads(), args.repeats, "\n".join(lines))


def worker(args: argparse.Namespace) -> None:
    """One implementation and dtype on the checkpoint slice; prints its figures as one JSON line."""
    impl, dtype_name = args.worker.split(":")
    path = checkpoint_dir(args.layers, 32)
    started = time.perf_counter()
    model = GptOss.from_checkpoint(path, dtype=DTYPES[dtype_name], kernels=kernels_for(impl), progress=False)
    out: dict[str, float] = {"load_s": time.perf_counter() - started}
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    warm = torch.randint(0, vocab, (8,), generator=g)
    model(warm, AttentionMetadata.build([8]), logits_indices=torch.tensor([7]))  # one-time costs
    cache = ContiguousKVCache(model.config, 1, args.prompt + args.decode_steps + 1, dtype=model.dtype)
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g)
    meta = AttentionMetadata.build([args.prompt], cache_slots=[0])
    started = time.perf_counter()
    token = model(prompt, meta, cache, logits_indices=torch.tensor([args.prompt - 1])).argmax(-1)
    out["prefill_tok_s"] = args.prompt / (time.perf_counter() - started)
    steps = []
    for n in range(args.decode_steps):
        meta = AttentionMetadata.build([1], [args.prompt + n + 1], cache_slots=[0])
        started = time.perf_counter()
        token = model(token, meta, cache).argmax(-1)
        steps.append(time.perf_counter() - started)
    out["decode_tok_s_best"] = 1 / min(steps)
    out["decode_tok_s_median"] = 1 / statistics.median(steps)
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak (checkpoint writing).
    out["peak_rss_gb"] = proc_status("VmHWM") / 1e9
    sys.stdout.write(json.dumps(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--impls", default="grouped,fused")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--kernels", action="store_true", help="time one layer's experts alone")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--matrix-tokens", default="", help="time one matrix at these token counts")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if args.kernels or args.matrix_tokens:
            if args.kernels:
                bench_kernels(args)
            if args.matrix_tokens:
                bench_matrix(args)
            return
        if args.worker:
            worker(args)
            return

    path = checkpoint_dir(args.layers, 32)
    logger.info("checkpoint %s (%d layers of gpt-oss-20b), %d threads", path, args.layers, args.threads)
    results: dict[str, dict[str, float]] = {}
    for dtype_name in args.dtypes.split(","):
        for impl in args.impls.split(","):
            run = f"{impl}:{dtype_name}"
            command = [sys.executable, __file__, "--worker", run, *sys.argv[1:]]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[run] = json.loads(done.stdout.strip().splitlines()[-1])
            logger.info("%s: %s", run, json.dumps(results[run]))

    header = f"{'':18}{'prefill tok/s':>14}{'decode tok/s best':>19}{'median':>8}{'peak RSS GB':>13}"
    lines = [header]
    for run, r in results.items():
        lines.append(
            f"{run:18}{r['prefill_tok_s']:14.1f}{r['decode_tok_s_best']:19.2f}"
            f"{r['decode_tok_s_median']:8.2f}{r['peak_rss_gb']:13.2f}"
        )
    for dtype_name in args.dtypes.split(","):
        new, old = results.get(f"fused:{dtype_name}"), results.get(f"grouped:{dtype_name}")
        if new and old:
            lines.append(
                f"fused / grouped, {dtype_name}: prefill "
                f"{new['prefill_tok_s'] / old['prefill_tok_s']:.1f}x, decode (best) "
                f"{new['decode_tok_s_best'] / old['decode_tok_s_best']:.1f}x"
            )
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
