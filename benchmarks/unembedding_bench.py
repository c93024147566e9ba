"""The vocabulary projection on the CPU in three weight layouts, same inputs, same run.

    python benchmarks/unembedding_bench.py [--threads N] [--repeats N] [--hidden 64,256] [--rows 1,4,16,64]
    python benchmarks/unembedding_bench.py --dtype bfloat16 [--hidden 2880] [--rows 1,2,4,16] ...

`x [rows, hidden] @ W.T` with `W [201088, hidden]` (gpt-oss's vocabulary; hidden 64 and 256 are the engine
benchmark's tiny and small presets), written into a preallocated float32 output as the runner does:

* **row-major**: `W` as loaded;
* **column-major**: `W` stored transposed (:func:`model.kernels.prepacked.column_major`, what the model keeps
  for a float32 projection on the CPU);
* **oneDNN packed**: `W` reordered for oneDNN's float32 matmul (`torch.ops.mkldnn._reorder_linear_weight`),
  the alternative measured and not kept (faster at a few rows, slower at one and at many).

All three run through :func:`model.kernels.prepacked.linear`, as the model's projection does.

With ``--dtype bfloat16`` (hidden 2880 by default, gpt-oss's): `W` plain through
:func:`model.kernels.prepacked.linear` (the bf16 GEMV, :func:`model.kernels.cpu_mxfp4.bf16_gemv`, up to its
row limit; what the model keeps where the CPU has AVX512-BF16), `W` plain through ``F.linear`` (oneDNN on the
row-major weight), and `W` prepacked for oneDNN (:func:`model.kernels.prepacked.prepack`).

Checks that the three agree, then prints per layout the best of `--repeats` calls in a row, over two rounds
of the three layouts. The bfloat16 weight lies on huge pages, as the model's does
(:func:`model.host_memory.huge_empty`), and a fourth column, **read**, times a plain pass over its bytes (a
torch sum of them as int64): the memory's speed in the same run, the bound for the GEMV at few rows. The last
column is the median over the repeats of the read's time divided by the GEMV's in the same repeat (the
memory's speed drifts, so the best times of the two may come from different spells).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.host_memory import huge_empty  # noqa: E402
from model.kernels import cpu_mxfp4, prepacked  # noqa: E402

VOCAB = 201088


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--hidden", help="hidden sizes, comma-separated (default 64,256; bfloat16: 2880)")
    parser.add_argument("--rows", default="1,4,16,64", help="rows (tokens projected), comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dtype == "bfloat16":
        bf16(args)
        return
    args.hidden = args.hidden or "64,256"
    out(f"float32 vocabulary projection ({VOCAB} rows), torch {torch.__version__}, {args.threads} thread(s)")
    out(f"   {'hidden':>6}{'rows':>6}{'row-major':>12}{'column-major':>15}{'oneDNN packed':>16}")
    g = torch.Generator().manual_seed(0)
    for hidden in (int(h) for h in args.hidden.split(",")):
        weight = torch.randn(VOCAB, hidden, generator=g)
        layouts = {
            "row": weight,
            "column": prepacked.column_major(weight),
            # (prepacked.prepack applies to bfloat16 only; this is its float32 counterpart)
            "onednn": torch.ops.mkldnn._reorder_linear_weight(weight),
        }
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, hidden, generator=g)
            buffer = torch.empty(rows, VOCAB)
            reference = prepacked.linear(x, layouts["row"], out=buffer).clone()
            for name, w in layouts.items():
                torch.testing.assert_close(
                    prepacked.linear(x, w, out=buffer), reference, rtol=1e-4, atol=1e-4, msg=name
                )
            best = dict.fromkeys(layouts, float("inf"))
            for _ in range(2):  # two rounds, so a slow spell of the machine hits every layout
                for name, w in layouts.items():
                    for _ in range(args.repeats):  # back to back, as the same weight is used step after step
                        started = time.perf_counter()
                        prepacked.linear(x, w, out=buffer)
                        best[name] = min(best[name], time.perf_counter() - started)
            ms = {name: f"{1e3 * b:.2f} ms" for name, b in best.items()}
            out(f"   {hidden:>6}{rows:>6}{ms['row']:>12}{ms['column']:>15}{ms['onednn']:>16}")


def bf16(args: argparse.Namespace) -> None:
    """The bf16 projection: the GEMV on the plain weight, oneDNN on the plain weight, oneDNN prepacked; and a
    plain read of the weight's bytes."""
    if not cpu_mxfp4.native_bf16():
        raise SystemExit("this CPU has no AVX512-BF16 (or the kernel did not build): no bf16 GEMV to time")
    out(f"bfloat16 vocabulary projection ({VOCAB} rows), torch {torch.__version__}, {args.threads} thread(s)")
    out(
        f"   {'hidden':>6}{'rows':>6}{'GEMV':>12}{'oneDNN plain':>15}{'oneDNN packed':>16}{'read':>10}"
        f"{'read / GEMV':>14}"
    )
    g = torch.Generator().manual_seed(0)
    for hidden in (int(h) for h in (args.hidden or "2880").split(",")):
        weight = huge_empty((VOCAB, hidden), torch.bfloat16)
        weight.copy_(torch.randn(VOCAB, hidden, generator=g))
        packed = prepacked.prepack(weight)
        # The weight's bytes as int64 where a row's divide evenly (an exact sum: no float rounding or NaN).
        words = weight.view(torch.int64) if hidden % 4 == 0 else weight.view(torch.int16)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, hidden, generator=g).bfloat16()
            buffer = torch.empty(rows, VOCAB)
            runs = {
                "gemv": lambda x=x, w=weight, o=buffer: prepacked.linear(x, w, out=o),
                "plain": lambda x=x, w=weight, o=buffer: o.copy_(F.linear(x, w)),
                "packed": lambda x=x, w=packed, o=buffer: prepacked.linear(x, w, out=o),
            }
            reference = cpu_mxfp4.bf16_gemv_reference(x, weight)
            for name, run in runs.items():
                torch.testing.assert_close(run(), reference, rtol=2**-7, atol=1e-2, msg=name)
            timed = {**runs, "read": lambda words=words: words.sum()}
            best = dict.fromkeys(timed, float("inf"))
            ratios = []
            for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every path
                took = {}
                for name, run in timed.items():
                    started = time.perf_counter()
                    run()
                    took[name] = time.perf_counter() - started
                    best[name] = min(best[name], took[name])
                # The GEMV against the read of the same round: the memory's speed drifts between rounds.
                ratios.append(took["read"] / took["gemv"])
            ms = {name: f"{1e3 * b:.1f} ms" for name, b in best.items()}
            out(
                f"   {hidden:>6}{rows:>6}{ms['gemv']:>12}{ms['plain']:>15}{ms['packed']:>16}{ms['read']:>10}"
                f"{statistics.median(ratios):>13.2f}x"
            )


if __name__ == "__main__":
    main()
