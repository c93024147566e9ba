"""The MoE layers of the engine benchmark's presets on the CPU: `experts_grouped` (the CPU path) over every
layer, for a few token counts, against `experts_batched` (the GPU path) on the same inputs.

    python benchmarks/moe_bench.py [--threads N] [--repeats N] [--dtype float32|bfloat16]
                                   [--tokens 1,16,64,264]

Loads the engine benchmark's `tiny` and `small` checkpoints (written once under .cache/bench/ by
`engine_bench.checkpoint_dir`) with dequantized experts, routes random hidden states through each layer's
router once, then times the experts of all layers together, each path in turn, and prints the best of
`--repeats` and the ratio. To compare two versions of the CPU path, copy this script into a checkout of the
other version and run it there and here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_bench import CONFIGS, checkpoint_dir  # noqa: E402

from model.gpt_oss import GptOss  # noqa: E402
from model.kernels.experts import experts_batched, experts_grouped  # noqa: E402


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tokens", default="1,16,64,264", help="token counts, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    out(f"MoE layers (experts), {args.dtype}, torch {torch.__version__}, {args.threads} thread(s)")
    out(f"   {'preset':<8}{'tokens':>8}{'CPU path':>12}{'GPU path':>12}{'GPU/CPU':>9}   (all layers, best)")
    paths = {"cpu": experts_grouped, "gpu": experts_batched}
    for name in ("tiny", "small"):
        model = GptOss.from_checkpoint(
            checkpoint_dir(name, CONFIGS[name]), dtype=dtype, expert_mode="dequantized", progress=False
        )
        mlps = [block.mlp for block in model.block]
        g = torch.Generator().manual_seed(0)
        for tokens in (int(n) for n in args.tokens.split(",")):
            t = torch.randn(tokens, model.config.hidden_size, generator=g).to(dtype)
            routed = [(mlp, *mlp.route(mlp.norm(t))) for mlp in mlps]
            best = dict.fromkeys(paths, float("inf"))
            for _ in range(2):  # two rounds, so a slow spell of the machine hits both paths
                for path_name, experts in paths.items():
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        for mlp, indices, weights in routed:
                            experts(mlp, t, indices, weights)
                        best[path_name] = min(best[path_name], time.perf_counter() - started)
            cpu, gpu = 1e3 * best["cpu"], 1e3 * best["gpu"]
            out(f"   {name:<8}{tokens:>8}{cpu:>9.2f} ms{gpu:>9.2f} ms{gpu / cpu:>8.1f}x")


if __name__ == "__main__":
    main()
