"""Model benchmark: our gpt-oss against Hugging Face transformers on one checkpoint of real widths.

    python benchmarks/model_bench.py [--layers 4] [--experts 32] [--prompt 128] [--decode-steps 6]
                                     [--impls ours-packed,ours-dequantized,hf] [--device cpu|cuda]

Writes (once, under .cache/model_bench/) a random HF-layout checkpoint with gpt-oss's real widths (hidden
2880, 64 query heads, 8 kv heads, vocabulary 201088) but few layers and experts, then measures each
implementation in its own process, so that peak memory is that implementation's alone:

* load time; resident bytes of the weights against the checkpoint's size on disk; peak RSS of the process;
* prefill tokens/s for one `--prompt`-token sequence (best of two);
* decode-step latency at batch 1 and 16, each sequence with a `--prompt`-token context: the best of
  `--decode-steps` steps (other load on a shared machine only ever adds time) and their median.

`ours-packed` keeps experts as MXFP4 and dequantizes each active expert per step (memory);
`ours-dequantized` dequantizes once at load (CPU speed); both prepack their bf16 matrices for oneDNN on the
CPU (model/kernels/prepacked.py). `hf` is transformers' GptOssForCausalLM, which on CPU dequantizes the
experts to bf16 at load.
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

from model.config import PRESETS  # noqa: E402
from model.gpt_oss import AttentionMetadata, ContiguousKVCache, GptOss  # noqa: E402
from model.make_checkpoint import write_checkpoint  # noqa: E402

logger = logging.getLogger("model_bench")
BATCHES = (1, 16)


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    return proc_status("VmRSS")


def checkpoint_dir(layers: int, experts: int) -> Path:
    path = ROOT / ".cache" / "model_bench" / f"hf-L{layers}-E{experts}-seed0"
    if not (path / "config.json").is_file():
        import dataclasses

        config = dataclasses.replace(
            PRESETS["20b"], num_hidden_layers=layers, num_experts=experts, layer_sliding=()
        )
        started = time.perf_counter()
        write_checkpoint(config, path, layout="hf", seed=0)
        logger.info("wrote %s in %.1f s", path, time.perf_counter() - started)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def bench_ours(path: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    before = rss_bytes()
    started = time.perf_counter()
    model = GptOss.from_checkpoint(
        path, device=device, dtype=torch.bfloat16, expert_mode=mode, progress=False
    )
    load_s = time.perf_counter() - started
    # Prepacked (oneDNN) weights report their logical size, numel × element size, which is what they hold.
    weights = model.weight_nbytes()
    resident = rss_bytes() - before
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    out: dict[str, float] = {"load_s": load_s, "weights_bytes": weights, "rss_after_load": resident}

    prompt = torch.randint(0, vocab, (args.prompt,), generator=g).to(device)
    meta = AttentionMetadata.build([args.prompt], device=device)
    last = torch.tensor([args.prompt - 1], device=device)
    model(prompt, meta, logits_indices=last)  # warm-up
    out["prefill_tok_s"] = args.prompt / min(
        timed(lambda: model(prompt, meta, logits_indices=last), device) for _ in range(2)
    )

    for batch in BATCHES:
        cache = ContiguousKVCache(model.config, batch, args.prompt + args.decode_steps + 1, dtype=model.dtype,
                                  device=device)  # fmt: skip
        ids = torch.randint(0, vocab, (batch * args.prompt,), generator=g).to(device)
        slots = list(range(batch))
        meta = AttentionMetadata.build([args.prompt] * batch, cache_slots=slots, device=device)
        lasts = torch.arange(1, batch + 1, device=device) * args.prompt - 1
        token = model(ids, meta, cache, logits_indices=lasts).argmax(-1)
        steps = []
        for n in range(args.decode_steps):
            ctx = args.prompt + n + 1
            meta = AttentionMetadata.build([1] * batch, [ctx] * batch, cache_slots=slots, device=device)
            steps.append(timed(lambda m=meta, t=token, c=cache: model(t, m, c).argmax(-1), device))
            token = torch.randint(0, vocab, (batch,), generator=g).to(device)
        out[f"decode_b{batch}_ms"] = 1e3 * min(steps)
        out[f"decode_b{batch}_median_ms"] = 1e3 * statistics.median(steps)
    return out


def bench_hf(path: Path, args: argparse.Namespace) -> dict[str, float]:
    from transformers import GptOssForCausalLM, Mxfp4Config

    device = torch.device(args.device)
    before = rss_bytes()
    started = time.perf_counter()
    model = (
        GptOssForCausalLM.from_pretrained(
            str(path),
            dtype=torch.bfloat16,
            attn_implementation="eager",
            quantization_config=Mxfp4Config(dequantize=True),
        )
        .to(device)
        .eval()
    )
    load_s = time.perf_counter() - started
    weights = sum(t.nbytes for t in model.state_dict().values())
    out: dict[str, float] = {
        "load_s": load_s,
        "weights_bytes": weights,
        "rss_after_load": rss_bytes() - before,
    }
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(device)
    model(prompt, logits_to_keep=1)
    out["prefill_tok_s"] = args.prompt / min(
        timed(lambda: model(prompt, logits_to_keep=1), device) for _ in range(2)
    )
    for batch in BATCHES:
        ids = torch.randint(0, vocab, (batch, args.prompt), generator=g).to(device)
        past = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        steps = []
        for _ in range(args.decode_steps):
            token = torch.randint(0, vocab, (batch, 1), generator=g).to(device)

            def step(t: torch.Tensor = token) -> None:
                nonlocal past
                past = model(t, past_key_values=past, use_cache=True).past_key_values

            steps.append(timed(step, device))
        out[f"decode_b{batch}_ms"] = 1e3 * min(steps)
        out[f"decode_b{batch}_median_ms"] = 1e3 * statistics.median(steps)
    return out


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path = checkpoint_dir(args.layers, args.experts)
    with torch.inference_mode():
        if args.worker == "hf":
            result = bench_hf(path, args)
        else:
            result = bench_ours(path, args.worker.removeprefix("ours-"), args)
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak (checkpoint writing).
    result["peak_rss"] = proc_status("VmHWM")
    sys.stdout.write(json.dumps(result) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--impls", default="ours-packed,ours-dequantized,hf")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        worker(args)
        return

    path = checkpoint_dir(args.layers, args.experts)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    logger.info("checkpoint %s: %.2f GB on disk, %d layers, %d experts, real widths", path, disk / 1e9,
                args.layers, args.experts)  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    for impl in args.impls.split(","):
        command = [sys.executable, __file__, "--worker", impl, *sys.argv[1:]]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        logger.info("%s: %s", impl, json.dumps(results[impl]))

    rows = [
        ("load time (s)", lambda r: f"{r['load_s']:.1f}"),
        ("weights resident (GB)", lambda r: f"{r['weights_bytes'] / 1e9:.2f}"),
        ("  ÷ size on disk", lambda r: f"{r['weights_bytes'] / disk:.2f}x"),
        ("RSS growth at load (GB)", lambda r: f"{r['rss_after_load'] / 1e9:.2f}"),
        ("peak RSS (GB)", lambda r: f"{r['peak_rss'] / 1e9:.2f}"),
        (f"prefill {args.prompt} tok (tok/s)", lambda r: f"{r['prefill_tok_s']:.0f}"),
        *[
            (f"decode step, batch {b}, best (ms)", lambda r, b=b: f"{r[f'decode_b{b}_ms']:.1f}")
            for b in BATCHES
        ],
        *[
            (f"decode step, batch {b}, median (ms)", lambda r, b=b: f"{r[f'decode_b{b}_median_ms']:.1f}")
            for b in BATCHES
        ],
    ]
    impls = list(results)
    lines = [f"{'':30}" + "".join(f"{impl:>18}" for impl in impls)]
    for label, fmt in rows:
        lines.append(f"{label:30}" + "".join(f"{fmt(results[i]):>18}" for i in impls))
    if "hf" in results:
        hf = results["hf"]
        for impl in impls:
            if impl == "hf":
                continue
            r = results[impl]
            lines.append(
                f"{impl}: decode b16 {hf['decode_b16_ms'] / r['decode_b16_ms']:.2f}x faster than hf, "
                f"peak RSS {r['peak_rss'] / hf['peak_rss']:.2f}x of hf's"
            )
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
