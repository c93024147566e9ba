"""One prepared GPU check for the model: the CUDA path against the CPU path, and its memory and step times.
Run it as is on a GPU machine.

    python benchmarks/model_gpu_check.py [--workdir /tmp/gpu-check] [--preset 20b] [--device cuda]

1. writes a random checkpoint of the preset's real shapes with the checkpoint writer (HF layout, sharded);
2. loads it with packed MXFP4 experts in bf16 and reports GPU memory held against the checkpoint's size;
3. checks the CUDA path against the CPU float32 path on a tiny checkpoint: CUDA float32 logits (tight) and
   CUDA bf16 logits (loose), and greedy tokens of a small batch through the engine (paged cache, sampler)
   on CUDA float32 against the same batch on the CPU;
4. times prefill of 2048 tokens and the decode step at batch 1 and 16;
5. with `--dequantized-too`, loads the checkpoint again with experts dequantized at load and times the same
   steps, to show what on-the-fly dequantization costs.

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

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import SamplingParams
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


def engine_greedy(model: GptOss, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    """Greedy outputs of `prompts` served together by an engine over `model` (a fixed 64 MiB KV pool)."""
    engine = EngineCore(model, EngineConfig(kv_cache_memory=64 * 2**20, max_num_batched_tokens=256))
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        outputs[str(i)] = []
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id] += output.new_token_ids
    return outputs


def check_tiny(work: Path, device: torch.device) -> None:
    """The CUDA path against the CPU float32 path on a tiny checkpoint."""
    tiny = write_checkpoint(PRESETS["tiny"], work / "tiny", layout="hf", seed=1)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    cpu = GptOss.from_checkpoint(tiny, dtype=torch.float32, expert_mode="packed", progress=False)
    ref = cpu(ids, AttentionMetadata.build([300]))
    scale = ref.abs().max().item()
    for dtype in (torch.float32, torch.bfloat16):
        fast = GptOss.from_checkpoint(tiny, device=device, dtype=dtype, progress=False)
        got = fast(ids.to(device), AttentionMetadata.build([300], device=device)).cpu()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        logger.info(
            "tiny, %s %s vs cpu float32, 300 tokens: max |diff| %.3g at logit scale %.3g; "
            "argmax agree %.1f%%",
            device,
            dtype,
            (got - ref).abs().max().item(),
            scale,
            100 * agree,
        )
        del fast

    g = torch.Generator().manual_seed(3)
    vocab = PRESETS["tiny"].vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 40, 130, 300, 17, 600)]
    on_cpu = engine_greedy(cpu, prompts, 24)
    fast = GptOss.from_checkpoint(tiny, device=device, dtype=torch.float32, progress=False)
    on_device = engine_greedy(fast, prompts, 24)
    same = sum(on_cpu[k] == on_device[k] for k in on_cpu)
    logger.info(
        "tiny, engine (paged KV, chunked prefill, sampler) on %s float32 vs cpu float32: %d of %d requests "
        "gave identical 24-token greedy outputs",
        device,
        same,
        len(prompts),
    )


def time_steps(model: GptOss, device: torch.device, prefill: int, label: str) -> None:
    """Prefill of `prefill` tokens, then the decode step at batch 1 and 16 with a 1024-token context."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prefill,), generator=g).to(device)
    meta = AttentionMetadata.build([prefill], device=device)
    last = torch.tensor([prefill - 1], device=device)
    seconds = timed(lambda: model(prompt, meta, logits_indices=last), device, repeat=3)
    logger.info(
        "%s: prefill %d tokens: %.1f ms (%.0f tok/s)", label, prefill, 1e3 * seconds, prefill / seconds
    )

    for batch in (1, 16):
        context = 1024
        cache = ContiguousKVCache(model.config, batch, context + 1, dtype=model.dtype, device=device)
        slots = list(range(batch))
        for s in slots:  # fill each slot's cache with a 1024-token prefill
            fill = torch.randint(0, vocab, (context,), generator=g).to(device)
            model(fill, AttentionMetadata.build([context], cache_slots=[s], device=device), cache, last[:0])
        step = AttentionMetadata.build([1] * batch, [context + 1] * batch, cache_slots=slots, device=device)
        tokens = torch.randint(0, vocab, (batch,), generator=g).to(device)
        seconds = timed(lambda t=tokens, m=step, c=cache: model(t, m, c).argmax(-1), device, repeat=5)
        logger.info(
            "%s: decode step at batch %d, context %d: %.1f ms (%.0f tok/s)",
            label,
            batch,
            context,
            1e3 * seconds,
            batch / seconds,
        )
        del cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/gpu-check")
    parser.add_argument("--preset", default="20b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--dequantized-too", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("model").setLevel(logging.WARNING)
    device = torch.device(args.device)
    work = Path(args.workdir)
    if device.type == "cuda":
        logger.info("device: %s, torch %s", torch.cuda.get_device_name(device), torch.__version__)

    started = time.perf_counter()
    path = write_checkpoint(PRESETS[args.preset], work / args.preset, layout="hf", seed=0)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    logger.info(
        "wrote %s checkpoint to %s: %.2f GB in %.0f s",
        args.preset,
        path,
        disk / 1e9,
        time.perf_counter() - started,
    )

    with torch.inference_mode():
        check_tiny(work, device)  # first: quick, and it needs none of the big model's memory

        started = time.perf_counter()
        model = GptOss.from_checkpoint(path, device=device, dtype=torch.bfloat16, progress=False)
        load_s = time.perf_counter() - started
        held = model.weight_nbytes()
        line = f"packed: loaded in {load_s:.1f} s; weights {held / 1e9:.2f} GB = {held / disk:.3f}x the disk"
        if device.type == "cuda":
            line += f"; torch.cuda.memory_allocated {torch.cuda.memory_allocated(device) / 1e9:.2f} GB"
        logger.info(line)
        time_steps(model, device, args.prefill, "packed")
        if device.type == "cuda":
            logger.info("packed: peak GPU memory %.2f GB", torch.cuda.max_memory_allocated(device) / 1e9)
        del model

        if args.dequantized_too:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = GptOss.from_checkpoint(
                path, device=device, dtype=torch.bfloat16, expert_mode="dequantized", progress=False
            )
            held = model.weight_nbytes()
            logger.info("dequantized: weights %.2f GB = %.2fx the checkpoint", held / 1e9, held / disk)
            time_steps(model, device, args.prefill, "dequantized")


if __name__ == "__main__":
    main()
