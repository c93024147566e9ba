"""One prepared GPU check for the model (issue 3): run it as is on a GPU machine.

    python benchmarks/model_gpu_check.py [--workdir /tmp/gpu-check] [--preset 20b] [--device cuda]

1. writes a random checkpoint of the preset's real shapes with the checkpoint writer (HF layout, sharded);
2. loads it with packed MXFP4 experts in bf16 and reports GPU memory held against the checkpoint's size;
3. checks the CUDA bf16 path against the CPU float32 path on a tiny checkpoint;
4. times prefill of 2048 tokens and the decode step at batch 1 and 16.

`--preset tiny --device cpu` runs the same steps on a CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import PRESETS
from model.gpt_oss import AttentionMetadata, ContiguousKVCache, GptOss
from model.make_checkpoint import write_checkpoint

logger = logging.getLogger("model_gpu_check")


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """Median seconds of `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/gpu-check")
    parser.add_argument("--preset", default="20b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill", type=int, default=2048)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    work = Path(args.workdir)
    if device.type == "cuda":
        logger.info("device: %s", torch.cuda.get_device_name(device))

    started = time.perf_counter()
    path = write_checkpoint(PRESETS[args.preset], work / args.preset, layout="hf", seed=0)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    logger.info(
        "wrote %s checkpoint: %.2f GB in %.0f s", args.preset, disk / 1e9, time.perf_counter() - started
    )

    with torch.inference_mode():
        # 3 first: it is quick and does not need the big model's memory.
        tiny = write_checkpoint(PRESETS["tiny"], work / "tiny", layout="hf", seed=1)
        ids = torch.randint(0, PRESETS["tiny"].vocab_size, (300,), generator=torch.Generator().manual_seed(0))
        ref = GptOss.from_checkpoint(tiny, dtype=torch.float32, progress=False)(
            ids, AttentionMetadata.build([300])
        )
        fast = GptOss.from_checkpoint(tiny, device=device, dtype=torch.bfloat16, progress=False)
        got = fast(ids.to(device), AttentionMetadata.build([300], device=device)).cpu()
        scale = ref.abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        logger.info(
            "tiny, %s bf16 vs cpu fp32, 300 tokens: max |diff| %.3g at logit scale %.3g; argmax agree %.1f%%",
            device,
            (got - ref).abs().max().item(),
            scale,
            100 * agree,
        )
        del fast, ref

        started = time.perf_counter()
        model = GptOss.from_checkpoint(path, device=device, dtype=torch.bfloat16, progress=False)
        load_s = time.perf_counter() - started
        held = sum(t.nbytes for t in model.state_dict().values())
        line = f"loaded in {load_s:.1f} s; weights {held / 1e9:.2f} GB = {held / disk:.3f}x the checkpoint"
        if device.type == "cuda":
            line += f"; torch.cuda.memory_allocated {torch.cuda.memory_allocated(device) / 1e9:.2f} GB"
        logger.info(line)

        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (args.prefill,), generator=g).to(device)
        meta = AttentionMetadata.build([args.prefill], device=device)
        last = torch.tensor([args.prefill - 1], device=device)
        seconds = timed(lambda: model(prompt, meta, logits_indices=last), device, repeat=3)
        logger.info(
            "prefill %d tokens: %.1f ms (%.0f tok/s)", args.prefill, 1e3 * seconds, args.prefill / seconds
        )

        for batch in (1, 16):
            context = 1024
            cache = ContiguousKVCache(model.config, batch, context + 1, dtype=model.dtype, device=device)
            slots = list(range(batch))
            for s in slots:  # fill each slot's cache with a 1024-token prefill
                fill = torch.randint(0, vocab, (context,), generator=g).to(device)
                model(
                    fill, AttentionMetadata.build([context], cache_slots=[s], device=device), cache, last[:0]
                )
            step = AttentionMetadata.build(
                [1] * batch, [context + 1] * batch, cache_slots=slots, device=device
            )
            tokens = torch.randint(0, vocab, (batch,), generator=g).to(device)
            seconds = timed(lambda t=tokens, m=step, c=cache: model(t, m, c).argmax(-1), device, repeat=5)
            logger.info(
                "decode step at batch %d, context %d: %.1f ms (%.0f tok/s)",
                batch,
                context,
                1e3 * seconds,
                batch / seconds,
            )


if __name__ == "__main__":
    main()
