"""Attention with sinks on the CPU: the log-sum-exp way (what the CPU runs) against the extra-key way (what
CUDA runs), on the same inputs in the same run.

    python benchmarks/attention_bench.py [--threads N] [--repeats N]
    python benchmarks/attention_bench.py --paged [--threads N] [--repeats N]

Each case calls :meth:`model.kernels.attention.TorchAttention.attend` (what every layer runs once its keys
are gathered: decodes batched in one call, each prompt chunk in its own) with one way of adding the sinks,
then the other, alternating, and prints the best time of each and the ratio. Shapes are the engine
benchmark's `small` preset (8 query heads of 64 on 2 key heads) and gpt-oss's (64 on 8), float32, full
attention and a 128-token window. Both results are compared before timing (they agree to rounding; the tests
check each against the reference). The calls and masks (`attention_plan`) are built once per metadata, as in
a forward's first layer of each kind; the two timed columns reuse them, as the other layers do, and the last
column times the lse way with the plan built in the call, as in the first layer.

`--paged` times a bfloat16 decode step's attention over the paged cache instead, at gpt-oss widths (64
query heads of 64 on 8 key heads) and 16-token blocks in shuffled order, for 1 and 4 decodes at several
contexts, full attention and a 128-token window: the fused CPU call the decode layer takes
(:func:`model.kernels.cpu_fused.paged_attention`: store, then attend where the blocks lie) against the torch
path it replaces (:class:`~model.kernels.attention.TorchAttention`: store, gather, attend), best of
`--repeats`, each result checked against the other first.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.kernels import cpu_fused, cpu_mxfp4  # noqa: E402
from model.kernels.attention import TorchAttention, sdpa_sink_as_key, sdpa_sink_from_lse  # noqa: E402
from model.testing import random_attention_case, random_paged_case  # noqa: E402

logger = logging.getLogger("attention_bench")


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def best_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def paged(args: argparse.Namespace) -> None:
    """The decode step's attention over the paged cache: the fused CPU call against the torch path."""
    if not cpu_mxfp4.native_bf16():
        raise SystemExit("the fused decode layer needs the CPU kernels built with AVX512-BF16")
    torch_path = TorchAttention(sdpa_sink_from_lse)
    out(f"paged decode attention, bf16, 64/8 heads of 64, {args.threads} thread(s), best of {args.repeats}")
    out(f"   {'decodes':>8}{'keys':>7}{'window':>8}{'fused':>12}{'torch':>12}{'ratio':>8}")
    for decodes in (1, 4):
        for context in (145, 1024, 4096):
            for window in (0, 128):
                q, k, v, meta, kv, sinks = random_paged_case(
                    2,
                    [1] * decodes,
                    [context] * decodes,
                    window,
                    block_size=16,
                    heads=64,
                    kv_heads=8,
                    dim=64,
                    shuffle=True,
                )
                q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
                kv = dataclasses.replace(kv, k=kv.k.bfloat16(), v=kv.v.bfloat16())
                step = (q, k, v, meta, kv, sinks, 0.125, window)
                calls = {
                    "fused": functools.partial(cpu_fused.paged_attention, *step),
                    "torch": functools.partial(torch_path, *step),
                }
                fused, plain = calls["fused"]().float(), calls["torch"]().float()
                torch.testing.assert_close(fused, plain, rtol=0, atol=3e-2)
                times = {name: best_ms(call, args.repeats) for name, call in calls.items()}
                out(
                    f"   {decodes:>8}{context:>7}{window:>8}{times['fused']:>9.3f} ms"
                    f"{times['torch']:>9.3f} ms{times['torch'] / times['fused']:>7.1f}x"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and round")
    parser.add_argument("--paged", action="store_true", help="the bf16 decode attention over the paged cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.paged:
        with torch.inference_mode():
            paged(args)
        return
    rng = random.Random(0)
    contexts = [rng.randint(200, 600) for _ in range(64)]
    cases = [
        ("16 decodes, 200..600 keys", [1] * 16, contexts[:16]),
        ("64 decodes, 200..600 keys", [1] * 64, contexts),
        ("280-token prompt", [280], [280]),
        ("280-token chunk + 15 decodes", [280] + [1] * 15, [280, *contexts[:15]]),
        ("2048-token prompt", [2048], [2048]),
    ]
    impls = {"lse": TorchAttention(sdpa_sink_from_lse), "key": TorchAttention(sdpa_sink_as_key)}
    out(f"attention benchmark, float32, torch {torch.__version__}, {args.threads} thread(s)")
    out(
        f"   {'case':<32}{'heads':>7}{'window':>8}{'sink via lse':>14}{'sink as key':>13}{'ratio':>8}"
        f"{'lse, plan built too':>22}"
    )
    for heads, kv_heads in ((8, 2), (64, 8)):
        for name, query_lens, context_lens in cases:
            if heads == 64 and name.startswith("2048"):
                continue  # minutes per call at 64 heads on one core: the 8-head row makes the point
            q, kv, meta, sinks = random_attention_case(1, query_lens, context_lens, heads, kv_heads, 64)
            for window in (0, 128):
                results, times = {}, {k: float("inf") for k in impls}
                for _ in range(2):  # alternate, so a slow spell of the machine hits both
                    for key, impl in impls.items():
                        call = functools.partial(impl.attend, q, kv, meta, sinks, 0.125, window)
                        results[key] = call()
                        repeats = max(1, args.repeats // (10 if name.startswith("2048") else 1))
                        times[key] = min(times[key], best_ms(call, repeats))
                torch.testing.assert_close(results["lse"], results["key"], rtol=0, atol=1e-4)
                # A first layer's call: fresh metadata, so the plan is built inside the timed call.
                first = best_ms(
                    lambda q=q, kv=kv, m=meta, s=sinks, w=window: impls["lse"].attend(
                        q, kv, dataclasses.replace(m, attention_plans={}), s, 0.125, w
                    ),
                    repeats,
                )
                out(
                    f"   {name:<32}{f'{heads}/{kv_heads}':>7}{window:>8}{times['lse']:>11.2f} ms"
                    f"{times['key']:>10.2f} ms{times['key'] / times['lse']:>7.1f}x{first:>19.2f} ms"
                )


if __name__ == "__main__":
    main()
